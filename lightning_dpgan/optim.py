"""Optimistic optimizers in DPOSG's anchored form, and the plain baselines.

Liu et al. (NeurIPS 2020) write one DPOSG iteration on worker ``i`` as::

    z_i^k = sum_j (W^t)_ij x_j^{k-1} - lr * d(z_i^{k-1})     # extrapolation
    x_i^k = sum_j (W^t)_ij x_j^{k-1} - lr * d(z_i^k)         # anchor update

with ``d = g`` (OSG) or an Adam-preconditioned ``g`` (optimistic Adam). Only one gradient is computed per iteration,
at the live parameters ``z``. An optimizer ``step()`` here receives the gradient at ``z^k`` and therefore performs
the anchor update of iteration ``k`` followed by the extrapolation of iteration ``k+1``; the anchors ``x`` and the
last direction ``d`` live in the optimizer state. Mixing (the ``W^t`` sums) is not done here: ``optim`` knows
nothing of torch.distributed. Between the anchor update and the extrapolation ``step()`` calls its *anchor hooks*
with the updated anchors; :class:`~lightning_dpgan.strategy.DecentralizedStrategy` registers one that mixes them
in place, so the extrapolation starts from the mixed anchors. Without a hook (one process, or ``strategy="ddp"``
averaging gradients) ``step()`` is centralized OSG/OAdam (CPOSG): on one worker it is
``z^{k+1} = z^k - 2 lr d_k + lr d_{k-1}`` (Daskalakis et al., 2018).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_dpgan.checks import check_number

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]
AnchorHook = Callable[[Optimizer, list[Tensor]], None]


class _Optimistic(Optimizer):
    """Anchors, directions and the two updates; subclasses say how a gradient becomes a direction.

    The first step a parameter takes has no anchor update: at ``k = 0`` there is only ``z^0 = x^0`` and its
    gradient, which the algorithm uses for the extrapolation ``z^1 = x̃^0 - lr d(z^0)`` alone.
    """

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self._anchor_hooks: OrderedDict[int, AnchorHook] = OrderedDict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_anchor_hooks", OrderedDict())  # hooks are not pickled with the optimizer

    def register_anchor_hook(self, hook: AnchorHook) -> RemovableHandle:
        """Call ``hook(optimizer, anchors)`` in every ``step()``, after the anchor update and before the
        extrapolation; it may change the anchors in place (a mix). ``handle.remove()`` takes it away."""
        handle = RemovableHandle(self._anchor_hooks)
        self._anchor_hooks[handle.id] = hook
        return handle

    def _state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "anchor" not in state:
            state["step"] = 0
            state["anchor"] = p.detach().clone(memory_format=torch.preserve_format)
            state["direction"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _set_directions(self, group: dict[str, Any], step: int, grads: list[Tensor], states: list[dict[str, Any]]) -> None:
        """Write each parameter's direction ``d`` into ``state["direction"]``; ``step`` counts from 1."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        # Every update is a ``_foreach`` op over a param group's tensors: one call per group instead of one per
        # tensor, which on a CPU costs more than a small model's arithmetic.
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # a parameter without a gradient (G in a discriminator-only iteration) keeps its anchor and direction
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            grads = [p.grad for p in params]
            if group["weight_decay"] and params:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            by_step: dict[int, tuple[list[Tensor], list[dict[str, Any]]]] = {}
            for p, grad in zip(params, grads):
                state = self._state(p)
                state["step"] += 1
                same = by_step.setdefault(state["step"], ([], []))
                same[0].append(grad)
                same[1].append(state)
            for step, (step_grads, states) in by_step.items():  # bias corrections depend on the step
                self._set_directions(group, step, step_grads, states)
                if step > 1:
                    torch._foreach_add_([s["anchor"] for s in states], [s["direction"] for s in states], alpha=-group["lr"])
        for hook in list(self._anchor_hooks.values()):
            hook(self, self.anchors())
        self.extrapolate()
        return loss

    def anchors(self) -> list[Tensor]:
        """The anchors ``x``, one per parameter in ``param_groups`` order; the same tensor objects every call."""
        return [self._state(p)["anchor"] for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def extrapolate(self) -> None:
        """Write ``z = x - lr * d`` into the live parameters, in place, from the current (mixed) anchors."""
        for group in self.param_groups:
            params = list(group["params"])
            if not params:
                continue
            states = [self._state(p) for p in params]
            torch._foreach_copy_(params, [s["anchor"] for s in states])
            torch._foreach_add_(params, [s["direction"] for s in states], alpha=-group["lr"])


class OptimisticSGD(_Optimistic):
    """Optimistic stochastic gradient (OSG): direction ``d = g`` (plus ``weight_decay * z``)."""

    def __init__(self, params: ParamsT, lr: float = 1e-2, weight_decay: float = 0.0) -> None:
        check_number("lr", lr, 0)
        check_number("weight_decay", weight_decay, 0)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    def _set_directions(self, group: dict[str, Any], step: int, grads: list[Tensor], states: list[dict[str, Any]]) -> None:
        torch._foreach_copy_([s["direction"] for s in states], grads)


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
        check_number("lr", lr, 0)
        check_number("betas[0]", betas[0], 0, 1)
        check_number("betas[1]", betas[1], 0, 1)
        check_number("eps", eps, 0)
        check_number("weight_decay", weight_decay, 0)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _set_directions(self, group: dict[str, Any], step: int, grads: list[Tensor], states: list[dict[str, Any]]) -> None:
        for state, grad in zip(states, grads):
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        directions = [s["direction"] for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denominators = torch._foreach_div(exp_avg_sqs, 1 - beta2**step)
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, group["eps"])
        torch._foreach_copy_(directions, torch._foreach_div(exp_avgs, denominators))
        torch._foreach_div_(directions, 1 - beta1**step)


#: Optimizers by name, for DPGAN and the configs. ``adam`` and ``sgd`` are the non-optimistic baselines: with
#: DPGAN's single fused step they are simultaneous gradient descent/ascent (Adam-GDA, GDA).
OPTIMIZERS: dict[str, type[Optimizer]] = {
    "optimistic_adam": OptimisticAdam,
    "optimistic_sgd": OptimisticSGD,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}
