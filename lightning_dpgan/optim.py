"""Optimistic optimizers in DPOSG's anchored form, and the plain baselines.

Liu et al. (NeurIPS 2020) write one DPOSG iteration on worker ``i`` as::

    z_i^k = sum_j (W^t)_ij x_j^{k-1} - lr * d(z_i^{k-1})     # extrapolation
    x_i^k = sum_j (W^t)_ij x_j^{k-1} - lr * d(z_i^k)         # anchor update

with ``d = g`` (OSG) or an Adam-preconditioned ``g`` (optimistic Adam). Only one gradient is computed per iteration,
at the live parameters ``z``. An optimizer ``step()`` here receives the gradient at ``z^k`` and therefore performs
the anchor update of iteration ``k`` followed by the extrapolation of iteration ``k+1``; the anchors ``x`` and the
last direction ``d`` live in the optimizer state. Mixing (the ``W^t`` sums) is not done here: ``optim`` knows
nothing of torch.distributed. :class:`~lightning_dpgan.strategy.DecentralizedStrategy` mixes :meth:`anchors`
after ``step()`` and calls :meth:`extrapolate` again. Without it (one process, or ``strategy="ddp"`` averaging
gradients) ``step()`` alone is centralized OSG/OAdam (CPOSG): on one worker it is
``z^{k+1} = z^k - 2 lr d_k + lr d_{k-1}`` (Daskalakis et al., 2018).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


class _Optimistic(Optimizer):
    """Anchors, directions and the two updates; subclasses say how a gradient becomes a direction.

    The first step a parameter takes has no anchor update: at ``k = 0`` there is only ``z^0 = x^0`` and its
    gradient, which the algorithm uses for the extrapolation ``z^1 = x̃^0 - lr d(z^0)`` alone.
    """

    def _state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "anchor" not in state:
            state["step"] = 0
            state["anchor"] = p.detach().clone(memory_format=torch.preserve_format)
            state["direction"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _set_direction(self, group: dict[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue  # e.g. G in a discriminator-only iteration: its anchor and direction stay
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self._state(p)
                state["step"] += 1
                grad = p.grad if group["weight_decay"] == 0 else p.grad.add(p, alpha=group["weight_decay"])
                self._set_direction(group, p, grad, state)
                if state["step"] > 1:
                    state["anchor"].add_(state["direction"], alpha=-group["lr"])
        self.extrapolate()
        return loss

    def anchors(self) -> list[Tensor]:
        """The anchors ``x``, one per parameter in ``param_groups`` order; the same tensor objects every call."""
        return [self._state(p)["anchor"] for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def extrapolate(self) -> None:
        """Write ``z = x - lr * d`` into the live parameters, in place, from the current (possibly mixed) anchors."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self._state(p)
                torch.add(state["anchor"], state["direction"], alpha=-group["lr"], out=p)


def _check(name: str, value: float, low: float = 0.0, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low or (high is not None and not value < high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name} must be a number {allowed}, got {value!r}")


class OptimisticSGD(_Optimistic):
    """Optimistic stochastic gradient (OSG): direction ``d = g`` (plus ``weight_decay * z``)."""

    def __init__(self, params: ParamsT, lr: float = 1e-2, weight_decay: float = 0.0) -> None:
        _check("lr", lr)
        _check("weight_decay", weight_decay)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    def _set_direction(self, group: dict[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any]) -> None:
        state["direction"].copy_(grad)


class OptimisticAdam(_Optimistic):
    """Optimistic Adam: ``d = m̂ / (sqrt(v̂) + eps)`` with Adam's bias-corrected moments, kept in the state."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        _check("lr", lr)
        _check("betas[0]", betas[0], 0.0, 1.0)
        _check("betas[1]", betas[1], 0.0, 1.0)
        _check("eps", eps)
        _check("weight_decay", weight_decay)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _set_direction(self, group: dict[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any]) -> None:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        step = state["step"]
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denominator = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        torch.div(state["exp_avg"], denominator, out=state["direction"]).div_(1 - beta1**step)


#: Optimizers by name, for DPGAN and the configs. ``adam`` and ``sgd`` are the non-optimistic baselines: with
#: DPGAN's single fused step they are simultaneous gradient descent/ascent (Adam-GDA, GDA).
OPTIMIZERS: dict[str, type[Optimizer]] = {
    "optimistic_adam": OptimisticAdam,
    "optimistic_sgd": OptimisticSGD,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}
