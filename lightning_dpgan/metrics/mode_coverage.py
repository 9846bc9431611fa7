"""``ModeCoverage``: PacGAN's mode-collapse numbers for samples of a known 2-D Gaussian mixture."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_dpgan.data.gaussians import mixture_modes


def high_quality_histogram(samples: Tensor, modes: Tensor, sigma: float) -> Tensor:
    """High-quality samples (within 3σ of their nearest mode) per mode."""
    distance = torch.cdist(samples.detach().to(torch.float64).reshape(-1, 2), modes.to(torch.float64))
    nearest, closest = distance.min(dim=1)
    return torch.bincount(closest[nearest < 3 * sigma], minlength=len(modes))


class ModeCoverage(Metric):
    """Modes covered (at least one high-quality sample), the fraction of high-quality samples, and the reverse KL
    ``KL(p_gen || uniform)`` of the high-quality samples' mode histogram (``inf`` when there are none).

    ``update`` takes ``(N, 2)`` samples; states are sums, so ``compute`` under DDP covers every rank's samples.
    PacGAN reports these over 2500 samples.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, mixture: str = "grid", **kwargs: object) -> None:
        super().__init__(**kwargs)
        modes, sigma = mixture_modes(mixture)
        self.mixture, self.sigma = mixture, sigma
        self.modes = torch.as_tensor(modes)
        self.add_state("counts", default=torch.zeros(len(modes), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, samples: Tensor) -> None:
        if samples.dim() != 2 or samples.shape[1] != 2:
            raise ValueError(f"ModeCoverage expects (N, 2) samples, got shape {tuple(samples.shape)}")
        self.counts += high_quality_histogram(samples, self.modes.to(samples.device), self.sigma).to(self.counts.device)
        self.total += samples.shape[0]

    def compute(self) -> dict[str, Tensor]:
        high_quality = self.counts.sum()
        if high_quality == 0:
            kl = torch.tensor(math.inf, dtype=torch.float64)
        else:
            p = self.counts[self.counts > 0].to(torch.float64) / high_quality
            kl = (p * torch.log(p * len(self.modes))).sum()
        return {
            "modes": (self.counts > 0).sum(),
            "high_quality": high_quality.to(torch.float64) / self.total.clamp(min=1),
            "reverse_kl": kl,
        }
