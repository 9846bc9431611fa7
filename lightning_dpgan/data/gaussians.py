"""Mixtures of 2-D Gaussians with PacGAN's definitions (Lin et al., 2018), the standard mode-collapse benchmark.

* ``ring``: 8 modes evenly spaced on the unit circle, σ = 0.01;
* ``grid``: 25 modes at {-4, -2, 0, 2, 4}², σ = 0.05.

Samples pick a mode uniformly at random; the data are drawn once, from ``seed``, so every rank holds the same
points and takes its own shard of them.
"""

from __future__ import annotations

import numpy as np
import torch

from lightning_dpgan.checks import check_choice, check_int
from lightning_dpgan.data.base import InMemoryDataset, ShardedDataModule

MIXTURES = ("ring", "grid")


def mixture_modes(name: str) -> tuple[np.ndarray, float]:
    """The modes ``(K, 2)`` and the common standard deviation of mixture ``name``."""
    check_choice("mixture", name, MIXTURES)
    if name == "ring":
        angles = 2 * np.pi * np.arange(8) / 8
        return np.stack([np.cos(angles), np.sin(angles)], axis=1), 0.01
    axis = np.arange(-4.0, 5.0, 2.0)  # grid
    return np.array([(a, b) for a in axis for b in axis]), 0.05


def sample_mixture(name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points and their mode labels."""
    modes, sigma = mixture_modes(name)
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(modes), size=n)
    return modes[labels] + sigma * rng.standard_normal((n, 2)), labels


class GaussianMixtureDataModule(ShardedDataModule):
    """``num_samples`` points of mixture ``mixture`` with their mode labels (``shard="by_label"``: ranks own modes)."""

    def __init__(
        self, mixture: str = "grid", num_samples: int = 100_000, batch_size: int = 100, shard: str = "iid", seed: int = 0, **kwargs: int
    ) -> None:
        super().__init__(batch_size=batch_size, shard=shard, seed=seed, **kwargs)
        self.modes, self.sigma = mixture_modes(mixture)  # validates the name
        check_int("num_samples", num_samples, 1)
        self.mixture, self.num_samples = mixture, num_samples
        self.name = mixture

    def load(self) -> tuple[InMemoryDataset, np.ndarray]:
        points, labels = sample_mixture(self.mixture, self.num_samples, self.seed)
        return InMemoryDataset(torch.as_tensor(points, dtype=torch.float32), torch.as_tensor(labels)), labels
