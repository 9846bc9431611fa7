"""FID and Inception Score through torchmetrics, with the right feature extractor for each dataset.

``digits`` and ``mnist5k`` use the shipped digit classifier (offline, see :mod:`.extractor`); natural images use
torchmetrics' Inception (torch-fidelity's weights) with ``antialias=False``, the resize of the original TF
implementation, for parity with published CIFAR-10 numbers. The Inception weights are downloaded on first use into
torch's hub cache; offline, pass ``inception_weights=`` the file instead (:data:`INCEPTION_WEIGHTS_FILE`). The file
(given, or the cached download) is read as data (``weights_only=True``) and handed to torchmetrics as a copy written
here, because torch-fidelity itself unpickles the file it is given.

Images go in as the generator makes them, in [-1, 1]; :func:`to_unit_range` maps them for Inception. FID keeps
the real statistics across resets (``reset_real_features=False``), so they are computed once per run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.inception import InceptionScore

from lightning_dpgan.metrics.extractor import EXTRACTOR_DATASETS, FrozenExtractor, load_classifier

INCEPTION_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_FILE = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[1]


class InceptionWeightsError(ValueError):
    """The Inception weights for FID/IS are not available (no network, or a bad file); the message says what to do."""


def uses_embedded_extractor(dataset: str) -> bool:
    return dataset in EXTRACTOR_DATASETS


def inception_cache_path() -> str:
    """Where torch-fidelity's download of the Inception weights goes (torch's hub cache)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILE)


def ensure_inception_weights(inception_weights: str | None) -> str:
    """The Inception weights file FID/IS will use: the given one, checked to load as a state dict of tensors, or
    the cached download, downloaded now if it is not there. Raises :class:`InceptionWeightsError` naming the file,
    the cache path and the settings that help."""
    if inception_weights is not None:
        _read_state_dict(inception_weights)
        return inception_weights
    if os.path.isfile(inception_cache_path()):
        return inception_cache_path()
    try:
        torch.hub.load_state_dict_from_url(INCEPTION_WEIGHTS_URL, progress=False, weights_only=True)
    except Exception as err:  # URLError, HTTPError, timeouts: no network
        raise InceptionWeightsError(
            f"FID/IS need the Inception weights {INCEPTION_WEIGHTS_FILE}, which could not be downloaded ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}). Without network, copy the file from "
            f"{INCEPTION_WEIGHTS_URL} to {inception_cache_path()}, or pass evaluation.inception_weights=<the file>, or "
            f"turn evaluation off with evaluation.enabled=false"
        ) from None
    return inception_cache_path()


def fid_metric(dataset: str, inception_weights: str | None = None, **kwargs: Any) -> FrechetInceptionDistance:
    if uses_embedded_extractor(dataset):
        extractor = FrozenExtractor(load_classifier(dataset), "features")
        return FrechetInceptionDistance(feature=extractor, reset_real_features=False, **kwargs)
    with _safe_copy(ensure_inception_weights(inception_weights)) as path:
        return FrechetInceptionDistance(
            feature=2048, reset_real_features=False, normalize=True, antialias=False, feature_extractor_weights_path=path, **kwargs
        )


def inception_score_metric(dataset: str, inception_weights: str | None = None, **kwargs: Any) -> InceptionScore:
    if uses_embedded_extractor(dataset):
        return InceptionScore(feature=FrozenExtractor(load_classifier(dataset), "logits"), **kwargs)
    with _safe_copy(ensure_inception_weights(inception_weights)) as path:
        # torchmetrics' InceptionScore builds this same network, but takes no weights file: built here with one
        logits = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"], feature_extractor_weights_path=path)
    return InceptionScore(feature=logits, normalize=True, **kwargs)


def to_unit_range(images: Tensor) -> Tensor:
    """[-1, 1] generator output -> [0, 1], three channels, as Inception's ``normalize=True`` expects."""
    images = ((images + 1) / 2).clamp(0, 1)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _read_state_dict(path: str) -> dict[str, Tensor]:
    from lightning_dpgan.loading import CheckpointError, safe_load

    try:
        state = safe_load(path, "Inception weights file")
    except CheckpointError as err:
        raise InceptionWeightsError(f"{err}; pass evaluation.inception_weights=<{INCEPTION_WEIGHTS_FILE}>") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InceptionWeightsError(f"Inception weights file {path!r} is not a state dict of tensors ({INCEPTION_WEIGHTS_FILE} is)")
    return state


@contextlib.contextmanager
def _safe_copy(path: str) -> Iterator[str]:
    """``path`` read as data and written again here, for torch-fidelity (which unpickles what it is given)."""
    state = _read_state_dict(path)
    with tempfile.TemporaryDirectory() as folder:
        copy = os.path.join(folder, INCEPTION_WEIGHTS_FILE)
        torch.save(state, copy)
        yield copy
