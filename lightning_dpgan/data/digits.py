"""scikit-learn's 8x8 handwritten digits (1797 images, shipped with the package), scaled to [-1, 1]."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class DigitsDataModule(pl.LightningDataModule):
    """Flattened 64-pixel digits. Under a distributed strategy Lightning adds the DistributedSampler that shards it."""

    def __init__(self, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.dataset: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        x = torch.as_tensor(images, dtype=torch.float32) / 8.0 - 1.0  # pixel values are 0..16
        self.dataset = TensorDataset(x, torch.as_tensor(labels))

    def train_dataloader(self) -> DataLoader:
        assert self.dataset is not None
        return DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True, num_workers=self.num_workers
        )
