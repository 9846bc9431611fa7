"""FID and Inception Score through torchmetrics, with the right feature extractor for each dataset.

``digits`` and ``mnist5k`` use the shipped digit classifier (offline, see :mod:`.extractor`); natural images use
torchmetrics' default Inception (downloaded on first use) with ``antialias=False``, the resize of the original
TF implementation, for parity with published CIFAR-10 numbers. Images go in as the generator makes them, in
[-1, 1]; :func:`to_unit_range` maps them for Inception. FID keeps the real statistics across resets
(``reset_real_features=False``), so they are computed once per run.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from lightning_dpgan.metrics.extractor import EXTRACTOR_DATASETS, FrozenExtractor, load_classifier


def uses_embedded_extractor(dataset: str) -> bool:
    return dataset in EXTRACTOR_DATASETS


def fid_metric(dataset: str, **kwargs: Any) -> FrechetInceptionDistance:
    if uses_embedded_extractor(dataset):
        extractor = FrozenExtractor(load_classifier(dataset), "features")
        return FrechetInceptionDistance(feature=extractor, reset_real_features=False, **kwargs)
    return FrechetInceptionDistance(feature=2048, reset_real_features=False, normalize=True, antialias=False, **kwargs)


def inception_score_metric(dataset: str, **kwargs: Any) -> InceptionScore:
    if uses_embedded_extractor(dataset):
        return InceptionScore(feature=FrozenExtractor(load_classifier(dataset), "logits"), **kwargs)
    return InceptionScore(normalize=True, **kwargs)


def to_unit_range(images: Tensor) -> Tensor:
    """[-1, 1] generator output -> [0, 1], three channels, as Inception's ``normalize=True`` expects."""
    images = ((images + 1) / 2).clamp(0, 1)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
