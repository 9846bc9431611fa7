"""``ModeCoverage``: PacGAN's mode-collapse numbers for samples of a known 2-D Gaussian mixture, and its functional
twin :func:`mode_coverage`. The mixture's modes and standard deviation are arguments: the metric knows no dataset
(``lightning_dpgan.data.mixture_modes(name)`` gives PacGAN's ring and grid)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_dpgan.checks import check_number


def high_quality_histogram(samples: Tensor, modes: Tensor, sigma: float) -> Tensor:
    """High-quality samples (within 3σ of their nearest mode) per mode."""
    distance = torch.cdist(samples.detach().to(torch.float64).reshape(-1, 2), modes.to(torch.float64))
    nearest, closest = distance.min(dim=1)
    return torch.bincount(closest[nearest < 3 * sigma], minlength=len(modes))


def _scores(counts: Tensor, total: Tensor) -> dict[str, Tensor]:
    high_quality = counts.sum()
    if high_quality == 0:
        kl = torch.tensor(math.inf, dtype=torch.float64)
    else:
        p = counts[counts > 0].to(torch.float64) / high_quality
        kl = (p * torch.log(p * len(counts))).sum()
    return {
        "modes": (counts > 0).sum(),
        "high_quality": high_quality.to(torch.float64) / total.clamp(min=1),
        "reverse_kl": kl,
    }


def _checked(samples: Tensor) -> Tensor:
    if samples.dim() != 2 or samples.shape[1] != 2:
        raise ValueError(f"mode coverage expects (N, 2) samples, got shape {tuple(samples.shape)}")
    return samples


def mode_coverage(samples: Tensor, modes: Tensor | Any, sigma: float) -> dict[str, Tensor]:
    """Modes covered, fraction of high-quality samples and reverse KL of ``(N, 2)`` samples (see :class:`ModeCoverage`)."""
    modes = torch.as_tensor(modes, dtype=torch.float64, device=samples.device)
    counts = high_quality_histogram(_checked(samples), modes, check_number("sigma", sigma, 0, low_open=True))
    return _scores(counts, torch.tensor(samples.shape[0]))


class ModeCoverage(Metric):
    """Modes covered (at least one high-quality sample), the fraction of high-quality samples, and the reverse KL
    ``KL(p_gen || uniform)`` of the high-quality samples' mode histogram (``inf`` when there are none).

    Args:
        modes: the mixture's ``(K, 2)`` mode centres.
        sigma: the mixture's standard deviation; a sample is high quality within ``3 sigma`` of its nearest mode.

    ``update`` takes ``(N, 2)`` samples; states are sums, so ``compute`` under DDP covers every rank's samples.
    PacGAN reports these over 2500 samples.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, modes: Tensor | Any, sigma: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        modes = torch.as_tensor(modes, dtype=torch.float64)
        if modes.dim() != 2 or modes.shape[1] != 2 or len(modes) == 0:
            raise ValueError(f"modes must be a (K, 2) array of mode centres, got shape {tuple(modes.shape)}")
        self.sigma = check_number("sigma", sigma, 0, low_open=True)
        self.modes = modes
        self.add_state("counts", default=torch.zeros(len(modes), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, samples: Tensor) -> None:
        counts = high_quality_histogram(_checked(samples), self.modes.to(samples.device), self.sigma)
        self.counts += counts.to(self.counts.device)
        self.total += samples.shape[0]

    def compute(self) -> dict[str, Tensor]:
        return _scores(self.counts, self.total)
