"""Mixtures of 2-D Gaussians with PacGAN's definitions (Lin et al., 2018), the standard mode-collapse benchmark.

* ``ring``: 8 modes evenly spaced on the unit circle, σ = 0.01;
* ``grid``: 25 modes at {-4, -2, 0, 2, 4}², σ = 0.05.

Samples pick a mode uniformly at random; the data are drawn once, from ``seed``, so every rank holds the same
points and the distributed sampler shards them.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

MIXTURES = ("ring", "grid")


def mixture_modes(name: str) -> tuple[np.ndarray, float]:
    """The modes ``(K, 2)`` and the common standard deviation of mixture ``name``."""
    if name == "ring":
        angles = 2 * np.pi * np.arange(8) / 8
        return np.stack([np.cos(angles), np.sin(angles)], axis=1), 0.01
    if name == "grid":
        axis = np.arange(-4.0, 5.0, 2.0)
        return np.array([(a, b) for a in axis for b in axis]), 0.05
    raise ValueError(f"unknown mixture {name!r}; allowed: {', '.join(MIXTURES)}")


def sample_mixture(name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points and their mode labels."""
    modes, sigma = mixture_modes(name)
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(modes), size=n)
    return modes[labels] + sigma * rng.standard_normal((n, 2)), labels


def mode_coverage(samples: np.ndarray, name: str) -> tuple[int, float]:
    """PacGAN's quality numbers: modes with at least one sample within 3σ, and the fraction of such samples."""
    modes, sigma = mixture_modes(name)
    distance = np.linalg.norm(np.asarray(samples)[:, None, :] - modes[None], axis=2)
    high_quality = distance.min(axis=1) < 3 * sigma
    return len(np.unique(distance.argmin(axis=1)[high_quality])), float(high_quality.mean())


class GaussianMixtureDataModule(pl.LightningDataModule):
    def __init__(self, mixture: str = "grid", num_samples: int = 100_000, batch_size: int = 100, seed: int = 0) -> None:
        super().__init__()
        mixture_modes(mixture)  # validates the name
        for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.mixture, self.num_samples, self.batch_size, self.seed = mixture, num_samples, batch_size, seed
        self.modes, self.sigma = mixture_modes(mixture)
        self.dataset: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        points, labels = sample_mixture(self.mixture, self.num_samples, self.seed)
        self.dataset = TensorDataset(torch.as_tensor(points, dtype=torch.float32), torch.as_tensor(labels))

    def train_dataloader(self) -> DataLoader:
        assert self.dataset is not None
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True)
