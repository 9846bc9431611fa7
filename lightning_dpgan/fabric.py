"""``DecentralizedFabricStrategy``: the same gossip for a Lightning Fabric training loop.

``Fabric(strategy=DecentralizedFabricStrategy(...))``, or ``Fabric(strategy="decentralized")`` after
``import lightning_dpgan``. It subclasses Fabric's :class:`~lightning.fabric.strategies.DDPStrategy` for its
launchers and process group, and does what :class:`~lightning_dpgan.DecentralizedStrategy` does for the Trainer
(:class:`~lightning_dpgan.gossiper.Gossiper`): no DDP wrapper, rank 0's weights broadcast once in
``fabric.setup``, a random stream per rank, and every ``optimizer.step()`` mixed with ``W^t`` (anchors through an
anchored optimizer's hook: DPOSG with :class:`~lightning_dpgan.OptimisticAdam`). ``fabric.save`` writes the
consensus model and, beside it, every replica as one checkpoint set; ``fabric.load`` restores each rank's own
replica (the consensus model at another world size). A non-finite value stops every rank after the same step
with :class:`~lightning_dpgan.NonFiniteError`. Fabric has no SIGTERM handling of its own, so neither does this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy
from lightning.fabric.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.fabric.utilities.types import _PATH, Optimizable
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dpgan.gossip_strategy import DDP_ARGUMENTS, GossipStrategyMixin
from lightning_dpgan.gossiper import point_anchors_at_parameters
from lightning_dpgan.replicas import (
    CHECKPOINT_KEY,
    REPLICA_KEY,
    atomic_save,
    consensus_restart_reason,
    replica_contents,
    replica_own,
    replica_set_of,
    safe_load,
)
from lightning_dpgan.processes import launch_watched
from lightning_dpgan.seeding import rng_state, set_rng_state


class _PatientLauncher(_SubprocessScriptLauncher):
    """Fabric's popen launcher with a :class:`~lightning_dpgan.processes.PatientObserver`."""

    live: bool = False  # membership="live": the observer lets a failed worker go

    @override
    def launch(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        return launch_watched(self, function, args, kwargs)


class DecentralizedFabricStrategy(GossipStrategyMixin, DDPStrategy):
    """Decentralized training by gossip for Fabric. Arguments as :class:`~lightning_dpgan.DecentralizedStrategy`'s,
    with Fabric's ``precision`` for ``precision_plugin`` (``consensus_every`` fills :attr:`consensus_distance`; a Fabric
    loop logs what it likes)."""

    strategy_name = "decentralized"
    popen_launcher, patient_launcher = _SubprocessScriptLauncher, _PatientLauncher
    ddp_arguments = DDP_ARGUMENTS | {"precision"}
    _module: nn.Module | None = None  # set up by setup_module
    _optimizers: list[Optimizer]  # set up by setup_module, filled by setup_optimizer

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        """No DDP wrapper: the replicas start from rank 0's weights and then draw their own random numbers."""
        self.gossiper.align(module, self.global_rank)
        self._module, self._optimizers = module, []
        return module

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """From now on every step of this optimizer is mixed (set up the module first, as ``fabric.setup`` does)."""
        if self._module is None:
            raise RuntimeError("set up the module before its optimizers: fabric.setup(module, optimizer)")
        self._optimizers.append(optimizer)
        self.gossiper.attach(self._module, self._optimizers)
        return optimizer

    @override
    @torch.compiler.disable  # as the Trainer strategy's: a compiled step function must not trace the gossip
    def optimizer_step(self, optimizer: Optimizable, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, **kwargs)  # an anchored optimizer mixes inside its step
        self.gossiper.after_step(optimizer, output)  # type: ignore[arg-type]  # NonFiniteError on every rank at the agreed step
        return output

    def catch_up(self, optimizer: Any) -> bool:
        """With ``GossipOptions(staleness=s, catch_up=True)``, ask before each step's computation. When a neighbour is
        waiting on this replica, this steps ``optimizer`` (the one ``fabric.setup`` returned) without gradients, which
        mixes, and returns ``True``: skip the step's computation then. ``False``: compute the step as usual."""
        if not self.gossiper.skips_step():
            return False
        self.gossiper.catch_up(optimizer)
        return True

    # ------------------------------------------------------------------ collectives (the others: GossipStrategyMixin)
    # Fabric's (fabric.barrier, fabric.save, ...): after the warm-up bounded by the peer timeout, and a worker that
    # does not come is named (GossipPeerError), as in the gossip.
    @override
    def all_reduce(self, tensor: torch.Tensor, group: Any | None = None, reduce_op: Any = "mean") -> torch.Tensor:
        with self.gossiper.collective("all_reduce"):
            return super().all_reduce(tensor, group, reduce_op)

    # ------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(
        self,
        path: _PATH,
        state: dict[str, nn.Module | Optimizer | Any],
        storage_options: Any | None = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,
    ) -> None:
        """The consensus model (every module of ``state`` averaged over the replicas) in ``path``; each rank's own
        state beside it, committed with it as one set."""
        replica = self._convert_stateful_objects_in_state(state, filter=filter or {})
        main = dict(replica)
        for key, obj in state.items():
            if isinstance(obj, nn.Module):
                main[key] = self.gossiper.consensus_state(obj, replica[key], self)

        def write(checkpoint: dict[str, Any]) -> None:
            if storage_options is None:
                atomic_save(checkpoint, path)
            else:
                self.checkpoint_io.save_checkpoint(checkpoint=checkpoint, path=path, storage_options=storage_options)

        engine = self.engine
        if engine is None or engine.world_size == 1:
            if self.is_global_zero:
                write(main)
            return
        step = engine.steps
        self.gossiper.save_set(path, step, main, replica, self, write, own={"rng_states": rng_state(self.root_device.type == "cuda")})

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        state: nn.Module | Optimizer | dict[str, nn.Module | Optimizer | Any] | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """This rank's own replica where the set has one per rank of this world size, else the consensus model
        (its optimizers' anchors then point at it). Always read as data (``weights_only=True``)."""
        checkpoint = safe_load(path)
        replica = self.gossiper.read_own_replica(path, checkpoint, self) if isinstance(checkpoint, dict) else None
        if replica is None and isinstance(checkpoint, dict) and replica_set_of(checkpoint) is not None:
            reason = consensus_restart_reason(replica_set_of(checkpoint), self.gossiper.engine.world_size)  # type: ignore[arg-type, union-attr]
            rank_zero_warn(f"Loading {path}: {reason}; every replica restarts from the consensus model.")
        # what the user saved: our replica entry and the main file's set record are not theirs
        source = replica_contents(replica) if replica is not None else {k: v for k, v in checkpoint.items() if k != CHECKPOINT_KEY}
        if not state or not isinstance(state, dict):
            return super().load_checkpoint(path, state, strict, weights_only=True) if state else source
        remaining = dict(source)
        for name, obj in list(state.items()):
            if name not in remaining:
                continue
            value = remaining.pop(name)
            if isinstance(obj, nn.Module):
                self.load_module_state_dict(obj, value, strict=strict)
            elif hasattr(obj, "load_state_dict"):
                obj.load_state_dict(value)
            else:
                state[name] = value
        if replica is not None:
            set_rng_state(replica_own(replica)["rng_states"] if REPLICA_KEY in replica else remaining.pop("rng_states"))
        else:
            point_anchors_at_parameters([o for o in state.values() if isinstance(o, Optimizer)])
        return remaining

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, start_method in (("decentralized", "popen"), ("decentralized_spawn", "spawn")):
            strategy_registry.register(
                name, cls, description=f"Decentralized gossip strategy with start_method '{start_method}'", start_method=start_method
            )


if "decentralized" not in STRATEGY_REGISTRY:
    DecentralizedFabricStrategy.register_strategies(STRATEGY_REGISTRY)
