"""What one optimizer step mixes: its parameters or its anchors, and the buffers of the modules it trains.

The rules, which :class:`~lightning_dpgan.DecentralizedStrategy` applies in every ``optimizer.step()``:

* an optimizer with anchors (:class:`AnchoredOptimizer`) has them mixed by its anchor hook, between its anchor
  update and its extrapolation (DPOSG); any other optimizer has its parameters mixed after its step (adapt, then
  combine);
* a floating buffer (BatchNorm running statistics) goes with the nearest enclosing module that has parameters,
  and is mixed by the first optimizer that trains any of them, so two optimizers never mix it twice;
* torchmetrics modules are never mixed: their state is the metric's, not the model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from torchmetrics import Metric

UNREGISTERED = "_unregistered"  # the group of a parameter that is no submodule's


@runtime_checkable
class AnchoredOptimizer(Protocol):
    """An optimizer whose gossiped state differs from its live parameters (DPOSG's anchors ``x``).

    ``anchors()`` returns one tensor per parameter, in ``param_groups`` order (the same objects every call).
    ``register_anchor_hook(hook)`` has ``step()`` call ``hook(optimizer, anchors)`` after updating the anchors and
    before writing the live parameters from them; the strategy mixes the anchors there.
    :class:`~lightning_dpgan.optim.OptimisticAdam` and :class:`~lightning_dpgan.optim.OptimisticSGD` implement it.
    """

    def anchors(self) -> list[Tensor]: ...

    def register_anchor_hook(self, hook: Callable[[Optimizer, list[Tensor]], None]) -> RemovableHandle: ...


@dataclass
class MixSet:
    """What one optimizer's step mixes, and which top-level submodule each parameter belongs to."""

    params: list[Tensor]
    buffers: list[Tensor]
    group_ids: list[int]  # per parameter, an index into submodule_names(module)
    anchored: bool

    def state(self, optimizer: Optimizer) -> list[Tensor]:
        """The tensors a step mixes, the same objects every step (so the engine reuses its buffers)."""
        return optimizer.anchors() if self.anchored else self.params  # type: ignore[attr-defined]

    def names(self, module_names: list[str]) -> list[str]:
        """The top-level submodule each mixed tensor belongs to (buffers: ``"buffers"``)."""
        return [module_names[g] for g in self.group_ids] + ["buffers"] * len(self.buffers)


def build_mix_set(module: nn.Module, optimizer: Optimizer, optimizers: list[Optimizer], mix_buffers: bool) -> MixSet:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = submodule_names(module)
    owner = {id(p): name.split(".", 1)[0] for name, p in module.named_parameters()}
    group_ids = [names.index(owner.get(id(p), UNREGISTERED)) for p in params]
    earlier: set[int] = set()  # parameters of the optimizers listed before this one
    for other in optimizers:
        if other is optimizer:
            break
        earlier.update(id(p) for g in other.param_groups for p in g["params"])
    buffers = _buffers_owned_by(module, {id(p) for p in params}, earlier) if mix_buffers else []
    return MixSet(params, buffers, group_ids, isinstance(optimizer, AnchoredOptimizer))


def submodule_names(module: nn.Module) -> list[str]:
    """The top-level submodules that hold parameters (consensus is reported per name), then ``UNREGISTERED``."""
    return list(dict.fromkeys(n.split(".", 1)[0] for n, _ in module.named_parameters())) + [UNREGISTERED]


def metric_prefixes(module: nn.Module) -> tuple[str, ...]:
    return tuple(f"{name}." for name, m in module.named_modules() if isinstance(m, Metric) and name)


def own_parameters(module: nn.Module) -> list[nn.Parameter]:
    prefixes = metric_prefixes(module)
    return [p for name, p in module.named_parameters() if not name.startswith(prefixes)]


def own_buffers(module: nn.Module) -> list[Tensor]:
    prefixes = metric_prefixes(module)
    return [b for name, b in module.named_buffers() if not name.startswith(prefixes)]


def _buffers_owned_by(module: nn.Module, params: set[int], claimed_earlier: set[int]) -> list[Tensor]:
    """Floating buffers whose nearest enclosing module with parameters has some in ``params`` and none in
    ``claimed_earlier``. Buffers of metric modules, or of modules no optimizer trains, are never mixed."""
    owned: list[Tensor] = []
    prefixes = metric_prefixes(module)
    modules = dict(module.named_modules())
    for name, buf in module.named_buffers():
        if not buf.is_floating_point() or name.startswith(prefixes):
            continue
        path = name.rsplit(".", 1)[0] if "." in name else ""
        while True:
            subtree = {id(p) for p in modules[path].parameters()}
            if subtree or not path:
                break
            path = path.rsplit(".", 1)[0] if "." in path else ""
        if subtree & params and not subtree & claimed_earlier:
            owned.append(buf)
    return owned
