"""``DecentralizedStrategy``: Lightning's DDP machinery with neighbour gossip in place of gradient all-reduce.

It subclasses :class:`~lightning.pytorch.strategies.DDPStrategy` because the Trainer keys the distributed
sampler, ``sync_dist`` logging and launchers off that type; ``reduce``/``barrier``/``broadcast`` stay global so
callbacks (ModelCheckpoint, EarlyStopping) keep working. Only parameter mixing is local, on a process group of
its own so that Lightning's collectives never queue behind a mix on the wire:

* no DDP wrapper, so gradients stay local; rank 0's weights are broadcast once when fitting starts, then every
  rank is reseeded so replicas draw different noise and batches;
* after every optimizer step the optimizer's parameters (and the floating buffers of the modules they belong
  to) are mixed with ``W^t`` (adapt-then-combine). An optimizer exposing ``anchors()`` and ``extrapolate()``
  (see :class:`AnchoredOptimizer`) has its anchors mixed instead, and then extrapolates: that is DPOSG;
  with ``overlap=True`` each mix stays on the wire until the next step ends (communication behind compute);
* checkpoints hold the consensus (average) model, plus one shard per rank with that replica, its optimizer
  state, RNG state and gossip phase, so ``fit(ckpt_path=...)`` resumes every replica exactly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, Strategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import Metric
from typing_extensions import override

from lightning_dpgan.gossip import GossipEngine, PendingMix, check_chunk_bytes, resolve_wire_dtype
from lightning_dpgan.seeding import seed_for_rank
from lightning_dpgan.signals import stop_on_sigterm_without_collectives
from lightning_dpgan.topology import TOPOLOGIES, Topology, TopologyError, _check_rounds, build_topology

CHECKPOINT_KEY = "decentralized"


@runtime_checkable
class AnchoredOptimizer(Protocol):
    """An optimizer whose gossiped state differs from its live parameters (DPOSG's anchors ``x``).

    ``anchors()`` returns one tensor per parameter, in ``param_groups`` order, that the strategy mixes in place
    after ``step()``; ``extrapolate()`` then rewrites the live parameters from the mixed anchors. ``step()`` may
    extrapolate too (so the optimizer is complete without this strategy): ``extrapolate()`` must be idempotent.
    :class:`~lightning_dpgan.optim.OptimisticAdam` and :class:`~lightning_dpgan.optim.OptimisticSGD` implement it.
    """

    def anchors(self) -> list[Tensor]: ...

    def extrapolate(self) -> None: ...


@dataclass
class _MixSet:
    """What one optimizer's step mixes, and which top-level submodule each parameter belongs to."""

    params: list[Tensor]
    buffers: list[Tensor]
    param_groups: list[int]
    anchored: bool


class DecentralizedStrategy(DDPStrategy):
    """Decentralized data-parallel training by gossip over a communication graph.

    Args:
        topology: a name from :data:`lightning_dpgan.topology.TOPOLOGIES`, or a built :class:`Topology`.
        gossip_rounds: ``t``, rounds of neighbour averaging per optimizer step (workers mix with ``W^t``).
        topology_options: extra arguments for the named topology (``shape`` for a torus, ``degree``/``seed``
            for random_regular, ``matrix``/``edges`` for custom, ``weights``).
        wire_dtype: ``"bf16"`` or ``"fp16"`` to halve the bytes on the wire; accumulation stays in fp32.
        consensus_every: log the consensus distance every this many steps of each optimizer (0: never).
        mix_buffers: also mix floating-point buffers such as BatchNorm running statistics.
        mixing: ``False`` turns communication off (local training, for ablations); consensus is still measured.
        timeout: seconds (or a timedelta) a worker waits for a peer before failing with the peer's rank.
        chunk_bytes: on CPU (gloo), messages go out in chunks of this size with sends and receives interleaved,
            which keeps both directions of a link busy (see :mod:`lightning_dpgan.gossip`).
        overlap: leave each step's mix on the wire while the next forward and backward run, and apply it after
            the next optimizer step (its correction ``W^t x - x`` is added to the updated state). The gradient is
            then taken before the latest mix has arrived: a variant of DPOSG that lets communication hide behind
            compute, as DDP hides its all-reduce behind the backward pass. Checkpoints, consensus measurements and
            the end of training finish the mix in flight first.
        staged: on CPU, exchange each round with one neighbour at a time (``Topology.stages``) instead of all at
            once; measured mixed on the emulated cluster, so off by default (see
            :class:`~lightning_dpgan.gossip.GossipEngine`).
    """

    strategy_name = "decentralized"

    def __init__(
        self,
        topology: str | Topology = "ring",
        gossip_rounds: int = 1,
        topology_options: Mapping[str, Any] | None = None,
        wire_dtype: str | torch.dtype | None = None,
        consensus_every: int = 50,
        mix_buffers: bool = True,
        mixing: bool = True,
        timeout: float | timedelta = 600.0,
        chunk_bytes: int = 256 * 1024,
        overlap: bool = False,
        staged: bool = False,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        if not isinstance(topology, Topology) and topology not in TOPOLOGIES:
            raise TopologyError(f"unknown topology {topology!r}; allowed: {', '.join(TOPOLOGIES)}")
        _check_rounds(gossip_rounds)
        resolve_wire_dtype(wire_dtype)
        check_chunk_bytes(chunk_bytes)
        if isinstance(consensus_every, bool) or not isinstance(consensus_every, int) or consensus_every < 0:
            raise ValueError(f"consensus_every must be an integer >= 0 (0 turns it off), got {consensus_every!r}")
        if not isinstance(timeout, timedelta):
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
                raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
            timeout = timedelta(seconds=float(timeout))
        for flag, value in (("overlap", overlap), ("staged", staged)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}")
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.topology_spec = topology
        self.topology_options = dict(topology_options or {})
        self.gossip_rounds = gossip_rounds
        self.wire_dtype = wire_dtype
        self.chunk_bytes = chunk_bytes
        self.consensus_every = consensus_every
        self.mix_buffers = mix_buffers
        self.mixing = mixing
        self.overlap = overlap
        self.staged = staged
        self.topology: Topology | None = None
        self.engine: GossipEngine | None = None
        #: latest consensus distance per top-level submodule, identical on every rank
        self.consensus_distance: dict[str, float] = {}
        self._mix_sets: dict[int, _MixSet] = {}
        self._step_counts: dict[int, int] = {}
        self._in_flight: dict[int, PendingMix | None] = {}  # optimizer id -> its mix on the wire (overlap)
        self._pending_shard: dict[str, Any] | None = None
        self._pending_consensus_restart = False
        self._gossip_group: torch.distributed.ProcessGroup | None = None

    # ------------------------------------------------------------------ launch and process group
    @override
    def _configure_launcher(self) -> None:
        # Runs in the launching process before any worker starts: the place to reject a bad world size.
        self.topology = self._build_topology(self.num_nodes * self.num_processes)
        super()._configure_launcher()

    @override
    def setup_environment(self) -> None:
        if self.num_nodes * self.num_processes == 1:
            # One worker has no one to talk to: skip the process group, so reduce/barrier/sync_dist cost
            # nothing and a one-process fit runs at a plain Trainer's speed.
            Strategy.setup_environment(self)
            self.set_world_ranks()
        else:
            super().setup_environment()
        world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if self.topology is None or self.topology.world_size != world_size:
            self.topology = self._build_topology(world_size)
        self._gossip_group = self._new_gossip_group() if world_size > 1 else None
        self.engine = GossipEngine(
            self.topology, self.global_rank, wire_dtype=self.wire_dtype, timeout=self._timeout,
            chunk_bytes=self.chunk_bytes, group=self._gossip_group, staged=self.staged,
        )

    def _new_gossip_group(self) -> torch.distributed.ProcessGroup:
        """The gossip's own process group, over connections of its own. Lightning broadcasts a SIGTERM flag from
        rank 0 at the start of every training step; on the default group (gloo) that message queues behind a mix
        still on the wire to the same peer, so with ``overlap`` every step waited for the whole mix."""
        return torch.distributed.new_group(backend=self._get_process_group_backend(), timeout=self._timeout)

    def _build_topology(self, world_size: int) -> Topology:
        return build_topology(self.topology_spec, world_size, **self.topology_options)

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Restore after the initial broadcast in ``setup``, or rank 0's weights would overwrite the replicas.
        return True

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        # DDPStrategy.setup minus the DDP wrapper and minus its state sync outside fitting, which would overwrite
        # distinct replicas in a validate/test after fit.
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and self._layer_sync:
            self.model = self._layer_sync.apply(self.model)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if fitting:
            self.configure_ddp()
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)
        self._mix_sets.clear()
        self._step_counts.clear()
        self._in_flight.clear()

    @override
    def configure_ddp(self) -> None:
        """No wrapper: start every replica from rank 0's weights, then give each rank its own random stream."""
        assert isinstance(self.model, pl.LightningModule)
        assert self.engine is not None
        if self.engine.world_size == 1:
            return  # one replica: nothing to align, and the random stream is left as a plain Trainer leaves it
        module = self.model
        tensors = [p.data for p in _own_parameters(module)] + [b for _, b in _own_buffers(module)]
        self.engine.broadcast(tensors, src=0)
        seed_for_rank(self.global_rank)  # replicas start alike but draw their own noise and batches

    # ------------------------------------------------------------------ the step
    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        output = Strategy.optimizer_step(self, optimizer, closure, model, **kwargs)
        self._gossip(optimizer)
        return output

    def _gossip(self, optimizer: Optimizer) -> None:
        assert self.engine is not None
        mix_set = self._mix_set(optimizer)
        # the same tensor objects every step, so the engine reuses its cached buffers (``p.data`` is a new object)
        state = optimizer.anchors() if mix_set.anchored else mix_set.params
        if self.mixing and self.overlap:
            self.engine.finish_mix(self._in_flight.pop(id(optimizer), None))  # the previous step's mix
        elif self.mixing:
            self.engine.mix(state + mix_set.buffers, self.gossip_rounds)
        if mix_set.anchored:
            optimizer.extrapolate()
        count = self._step_counts.get(id(optimizer), 0) + 1
        self._step_counts[id(optimizer)] = count
        if self.consensus_every and count % self.consensus_every == 0 and self.engine.world_size > 1:
            self._record_consensus(state, mix_set.param_groups)
        if self.mixing and self.overlap:
            self._in_flight[id(optimizer)] = self.engine.start_mix(state + mix_set.buffers, self.gossip_rounds)

    def _finish_in_flight(self) -> None:
        """Apply every mix still on the wire (overlap), leaving the live parameters as they are: a DPOSG replica
        keeps its extrapolation until its next step, so a run that stops here and resumes follows the same path."""
        if self.engine is not None:
            for optimizer_id in list(self._in_flight):
                self.engine.finish_mix(self._in_flight.pop(optimizer_id))

    def _mix_set(self, optimizer: Optimizer) -> _MixSet:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        cached = self._mix_sets.get(id(optimizer))
        if cached is not None and len(cached.params) == len(params):
            return cached
        module = self.lightning_module
        assert module is not None
        names = self._group_names()
        owner = {id(p): name.split(".", 1)[0] for name, p in module.named_parameters()}
        group_ids = [names.index(owner.get(id(p), "_unregistered")) for p in params]
        buffers = _buffers_owned_by(module, {id(p) for p in params}, self._other_params(optimizer))
        anchored = isinstance(optimizer, AnchoredOptimizer)
        mix_set = _MixSet(params, buffers if self.mix_buffers else [], group_ids, anchored)
        self._mix_sets[id(optimizer)] = mix_set
        return mix_set

    def _other_params(self, optimizer: Optimizer) -> set[int]:
        """Parameters of the optimizers listed before this one: a shared buffer goes with the first optimizer."""
        earlier: set[int] = set()
        for opt in self.optimizers:
            if opt is optimizer:
                break
            earlier.update(id(p) for g in opt.param_groups for p in g["params"])
        return earlier

    def _group_names(self) -> list[str]:
        module = self.lightning_module
        assert module is not None
        names = list(dict.fromkeys(n.split(".", 1)[0] for n, _ in module.named_parameters()))
        return names + ["_unregistered"]

    def _record_consensus(self, tensors: list[Tensor], group_ids: list[int]) -> None:
        assert self.engine is not None
        names = self._group_names()
        values = self.engine.consensus_distance(tensors, group_ids, len(names))
        module = self.lightning_module
        for gid in sorted(set(group_ids)):
            name = names[gid]
            value = float(values[gid])
            self.consensus_distance[name] = value
            if module is not None and module._current_fx_name is not None and module._trainer is not None:
                module.log(f"consensus/{name}", value, on_step=True, on_epoch=False, sync_dist=False)

    def measure_consensus(self) -> dict[str, float]:
        """Consensus distance of all parameters now, per top-level submodule (a collective: call on every rank)."""
        module = self.lightning_module
        assert module is not None and self.engine is not None
        self._finish_in_flight()
        names = self._group_names()
        params = list(module.named_parameters())
        values = self.engine.consensus_distance(
            [p for _, p in params], [names.index(n.split(".", 1)[0]) for n, _ in params], len(names)
        )
        return {name: float(values[i]) for i, name in enumerate(names[:-1])}

    # ------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The consensus model: floating entries averaged over ranks (collective; runs on every rank)."""
        module = self.lightning_module
        assert module is not None
        self._finish_in_flight()  # the optimizer states and per-rank shards are read after this
        state = module.state_dict()
        if self.engine is None or self.engine.world_size == 1:
            return state
        metric_prefixes = _metric_prefixes(module)
        keys = [
            k
            for k, v in state.items()
            if isinstance(v, Tensor) and v.is_floating_point() and not k.startswith(metric_prefixes)
        ]
        averaged = self.engine.average([state[k] for k in keys])
        return {**state, **dict(zip(keys, averaged))}

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        if self.engine is not None and self.engine.world_size > 1 and "optimizer_states" in checkpoint:
            token = self.broadcast(uuid.uuid4().hex if self.is_global_zero else None)
            meta = self._checkpoint_meta(token)
            checkpoint[CHECKPOINT_KEY] = meta
            module = self.lightning_module
            assert module is not None
            shard = {
                **meta,
                "rank": self.global_rank,
                "state_dict": module.state_dict(),
                "optimizer_states": checkpoint["optimizer_states"],
                "rng_states": _collect_rng_states(include_cuda=self.root_device.type == "cuda"),
            }
            self.checkpoint_io.save_checkpoint(shard, shard_path(filepath, self.global_rank), storage_options)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def _checkpoint_meta(self, token: str) -> dict[str, Any]:
        assert self.engine is not None and self.topology is not None
        return {
            "token": token,
            "world_size": self.engine.world_size,
            "topology": self.topology.name,
            "gossip_rounds": self.gossip_rounds,
            "gossip": self.engine.state_dict(),
        }

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        # Every rank removes its own shard (node-local disks); rank 0 also removes the folder, tolerating the
        # other ranks deleting their files at the same moment.
        super().remove_checkpoint(filepath)
        shard = shard_path(filepath, self.global_rank)
        fs = get_filesystem(shard)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(shard)
        if self.is_global_zero:
            folder = os.path.dirname(shard)
            if isinstance(fs, LocalFileSystem):
                shutil.rmtree(folder, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(folder, recursive=True)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._pending_shard = None
        self._pending_consensus_restart = False
        meta = checkpoint.get(CHECKPOINT_KEY)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if meta is None or trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        assert self.engine is not None
        shard = None
        if meta["world_size"] == self.engine.world_size:
            path = shard_path(checkpoint_path, self.global_rank)
            if get_filesystem(path).exists(path):
                loaded = self.checkpoint_io.load_checkpoint(path, weights_only=False)
                if loaded.get("token") == meta["token"] and loaded.get("rank") == self.global_rank:
                    shard = loaded
        have_all = self.reduce(torch.tensor(float(shard is not None), device=self.root_device), reduce_op="min")
        if bool(have_all.item() == 1.0):
            self._pending_shard = shard
        else:
            reason = (
                f"it was written by {meta['world_size']} workers and this run has {self.engine.world_size}"
                if meta["world_size"] != self.engine.world_size
                else "some ranks' replica shards are missing or do not match it"
            )
            rank_zero_warn(f"Resuming from {checkpoint_path}: {reason}; every replica restarts from the consensus model.")
            self._pending_consensus_restart = True
        self.engine.load_state_dict(meta["gossip"])
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        source = self._pending_shard if self._pending_shard is not None else checkpoint
        super().load_model_state_dict(source, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        # The last restore step before the fit loop draws from the RNG (its dataloader iterator does), so
        # the random streams are put back here, as they were when the checkpoint was written.
        source = self._pending_shard if self._pending_shard is not None else checkpoint
        super().load_optimizer_state_dict(source)
        if self._pending_shard is not None:
            _set_rng_states(self._pending_shard["rng_states"])
        if self._pending_consensus_restart:
            # rank 0's optimizer state came with the main file: point its anchors at the consensus model
            for optimizer in self.optimizers:
                if isinstance(optimizer, AnchoredOptimizer):
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    with torch.no_grad():
                        for anchor, param in zip(optimizer.anchors(), params):
                            anchor.copy_(param)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        stop_on_sigterm_without_collectives(self.lightning_module.trainer)  # or a SIGTERM hangs the gossip
        self._pending_shard = None
        self._pending_consensus_restart = False

    @override
    def on_train_end(self) -> None:
        self._finish_in_flight()
        super().on_train_end()

    @override
    def teardown(self) -> None:
        self._in_flight.clear()  # after an error the peers may be gone: nothing left to wait for
        self._mix_sets.clear()
        if self.engine is not None:
            self.engine._plans.clear()
            self.engine._in_flight.clear()
        if self._gossip_group is not None and torch.distributed.is_initialized():
            with contextlib.suppress(Exception):  # local for gloo; after an error the peers may be gone
                torch.distributed.destroy_process_group(self._gossip_group)
        self._gossip_group = None
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (("decentralized", "popen"), ("decentralized_spawn", "spawn")):
            strategy_registry.register(
                name,
                cls,
                description=f"Decentralized gossip strategy with start_method '{start_method}'",
                start_method=start_method,
            )


def shard_path(checkpoint_path: _PATH, rank: int) -> str:
    """Where rank ``rank`` keeps its replica for the checkpoint at ``checkpoint_path``."""
    return os.path.join(f"{checkpoint_path}.replicas", f"rank{rank}.pt")


def _metric_prefixes(module: nn.Module) -> tuple[str, ...]:
    return tuple(f"{name}." for name, m in module.named_modules() if isinstance(m, Metric) and name)


def _own_parameters(module: nn.Module) -> list[nn.Parameter]:
    prefixes = _metric_prefixes(module)
    return [p for name, p in module.named_parameters() if not name.startswith(prefixes)]


def _own_buffers(module: nn.Module) -> list[tuple[str, Tensor]]:
    prefixes = _metric_prefixes(module)
    return [(name, b) for name, b in module.named_buffers() if not name.startswith(prefixes)]


def _buffers_owned_by(module: nn.Module, params: set[int], claimed_earlier: set[int]) -> list[Tensor]:
    """Floating buffers that go with an optimizer holding ``params``.

    A buffer belongs to the nearest enclosing module that has parameters; it goes with the first optimizer
    holding any of that module's parameters (``claimed_earlier`` are those of the optimizers before this one).
    Buffers of metric modules, or of modules no optimizer trains, are never mixed.
    """
    owned: list[Tensor] = []
    prefixes = _metric_prefixes(module)
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


if "decentralized" not in StrategyRegistry:
    DecentralizedStrategy.register_strategies(StrategyRegistry)
