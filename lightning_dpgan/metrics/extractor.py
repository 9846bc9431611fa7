"""Small digit classifiers shipped with the package, as offline feature extractors for FID and IS.

The Inception network that FID/IS use by default is downloaded on first use and knows nothing of 8×8 digits.
For ``digits`` and ``mnist5k`` the project ships a classifier trained on the dataset's own real images
(``weights/<dataset>.pt``, made by ``python benchmarks/train_extractor.py <dataset>``, which also
writes its held-out accuracy to ``weights/<dataset>.json``). FID uses its penultimate layer, IS its logits.
"""

from __future__ import annotations

import json
from importlib import resources

import torch
from torch import Tensor, nn

from lightning_dpgan.checks import check_choice

#: dataset -> image size
EXTRACTOR_DATASETS = {"digits": 8, "mnist5k": 28}
NUM_FEATURES = 64


class DigitClassifier(nn.Module):
    """Conv-ReLU(-pool) ×2, a ``NUM_FEATURES``-wide ReLU layer (the FID features), 10 logits."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = check_choice("DigitClassifier image_size", image_size, (8, 28))
        pool = nn.MaxPool2d(2)
        layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()]
        if image_size == 28:
            layers.append(pool)  # 14
        layers += [nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]  # 4 or 7
        side = 4 if image_size == 8 else 7
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * side * side, NUM_FEATURES), nn.ReLU())
        self.head = nn.Linear(NUM_FEATURES, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.reshape(-1, 1, self.image_size, self.image_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class FrozenExtractor(nn.Module):
    """What torchmetrics' FID/IS take as ``feature=``: images in [-1, 1] -> ``(N, num_features)``, always in eval."""

    def __init__(self, classifier: DigitClassifier, output: str) -> None:
        super().__init__()
        self.output = check_choice("output", output, ("features", "logits"))
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = NUM_FEATURES if output == "features" else 10

    def train(self, mode: bool = True) -> FrozenExtractor:
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(next(self.classifier.parameters()).dtype)
        return self.classifier.features(x) if self.output == "features" else self.classifier(x)


def weights_file(dataset: str) -> str:
    if dataset not in EXTRACTOR_DATASETS:
        raise ValueError(f"no embedded feature extractor for {dataset!r}; available: {', '.join(EXTRACTOR_DATASETS)}")
    return str(resources.files("lightning_dpgan.metrics") / "weights" / f"{dataset}.pt")


def load_classifier(dataset: str) -> DigitClassifier:
    """The shipped classifier for ``dataset`` (``digits`` or ``mnist5k``)."""
    path = weights_file(dataset)
    classifier = DigitClassifier(EXTRACTOR_DATASETS[dataset])
    classifier.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return classifier.eval()


def extractor_report(dataset: str) -> dict[str, object]:
    """The training record written next to the weights: held-out accuracy, sizes, the command."""
    with open(weights_file(dataset).removesuffix(".pt") + ".json") as f:
        return json.load(f)
