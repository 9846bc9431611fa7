"""scikit-learn's 8×8 handwritten digits (1797 images, shipped with the package), scaled to [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch

from lightning_dpgan.data.base import InMemoryDataset, ShardedDataModule


class DigitsDataModule(ShardedDataModule):
    """Images ``(1, 8, 8)``, or 64 values with ``flatten=True``; labels 0–9."""

    name = "digits"
    needs = ("sklearn",)

    def __init__(self, batch_size: int = 64, shard: str = "iid", val_size: int = 0, flatten: bool = False, **kwargs: int) -> None:
        super().__init__(batch_size=batch_size, shard=shard, val_size=val_size, **kwargs)
        self.flatten = flatten

    def load(self) -> tuple[InMemoryDataset, np.ndarray]:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        x = torch.as_tensor(images, dtype=torch.float32) / 8.0 - 1.0  # pixel values are 0..16
        if not self.flatten:
            x = x.view(-1, 1, 8, 8)
        return InMemoryDataset(x, torch.as_tensor(labels)), labels
