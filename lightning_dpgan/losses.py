"""GAN losses as (discriminator loss, generator loss) pairs over the discriminator's raw scores.

Each player minimises its own loss; DPGAN takes both gradients at the same parameters before one fused step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpgan.checks import check_choice, check_number


@dataclass
class GANLoss:
    """A loss family; ``gradient_penalty`` is the WGAN-GP weight and ``r1`` the R1 weight γ (0 for none).

    Not frozen: Lightning's hyperparameter logging rebuilds dataclasses field by field."""

    name: str
    gradient_penalty: float = 0.0
    r1: float = 0.0

    def discriminator(self, real_scores: Tensor, fake_scores: Tensor) -> Tensor:
        if self.name == "ns":
            return F.softplus(-real_scores).mean() + F.softplus(fake_scores).mean()  # BCE with labels 1 / 0
        if self.name == "hinge":
            return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()
        return fake_scores.mean() - real_scores.mean()  # wgan-gp critic

    def generator(self, fake_scores: Tensor) -> Tensor:
        if self.name == "ns":
            return F.softplus(-fake_scores).mean()  # non-saturating: -log D(G(z))
        return -fake_scores.mean()  # hinge and WGAN share the generator loss


LOSSES = ("ns", "hinge", "wgan-gp")


def build_loss(name: str, gradient_penalty: float = 10.0, r1: float = 0.0) -> GANLoss:
    """``r1``: weight γ of the R1 penalty ``γ/2 · E_real ||∇ₓD(x)||²`` added to D's loss, for any loss family."""
    check_choice("loss", name, LOSSES)
    check_number("gradient_penalty", gradient_penalty, 0)
    check_number("r1", r1, 0)
    return GANLoss(name, float(gradient_penalty) if name == "wgan-gp" else 0.0, float(r1))


def gradient_penalty(discriminator: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP (Gulrajani et al., 2017): ``E[(||∇D(x̂)||₂ - 1)²]`` on random interpolates of real and fake."""
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    alpha = torch.rand(shape, device=real.device, dtype=real.dtype)
    mixed = (alpha * real + (1 - alpha) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(mixed).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def r1_penalty(real_scores: Tensor, real: Tensor) -> Tensor:
    """R1 (Mescheder et al., 2018): ``E_real ||∇ₓD(x)||²``, from the scores of ``real`` (which must require grad).

    It makes D flat on the data, so D cannot sharpen around narrow modes faster than G can follow."""
    (grad,) = torch.autograd.grad(real_scores.sum(), real, create_graph=True)
    return _mean_squared_norm(grad)


def r1_scores(discriminator: nn.Module, real: Tensor) -> tuple[Tensor, Tensor]:
    """D's scores of ``real`` and the R1 penalty of :func:`r1_penalty`, through ``torch.func.vjp``: inside
    ``torch.func``'s transforms (the many-replica simulator), which refuse ``torch.autograd.grad``."""
    scores, pullback = torch.func.vjp(discriminator, real)
    (grad,) = pullback(torch.ones_like(scores))
    return scores, _mean_squared_norm(grad)


def _mean_squared_norm(grad: Tensor) -> Tensor:
    return grad.flatten(1).pow(2).sum(1).mean()
