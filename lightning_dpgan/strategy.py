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
* checkpoints hold the consensus (average) model, plus one file per rank with that replica, its optimizer
  state, RNG state and gossip phase (:mod:`lightning_dpgan.replicas`), so ``fit(ckpt_path=...)`` resumes every
  replica exactly.

What each step mixes is decided in :mod:`lightning_dpgan.mix_sets`; how it travels, in :mod:`lightning_dpgan.gossip`.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, Strategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dpgan.gossip import DEFAULT_CHUNK_BYTES, GossipEngine, PendingMix, check_chunk_bytes, resolve_wire_dtype
from lightning_dpgan.mix_sets import (
    AnchoredOptimizer,
    MixSet,
    build_mix_set,
    metric_prefixes,
    own_buffers,
    own_parameters,
    submodule_names,
)
from lightning_dpgan.replicas import (
    CHECKPOINT_KEY,
    consensus_restart_reason,
    read_replica,
    remove_replica,
    replica_file,
    replica_path,
    replicas_meta,
)
from lightning_dpgan.seeding import seed_for_rank
from lightning_dpgan.signals import stop_on_sigterm_without_collectives
from lightning_dpgan.topology import TOPOLOGIES, Topology, TopologyError, build_topology, check_rounds


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
        chunk_bytes: on CPU (gloo), messages go out in chunks of this size, receives posted before sends, which
            keeps both directions of a link busy (:mod:`lightning_dpgan.gossip.transport`); ``None`` sends each
            message whole.
        overlap: leave each step's mix on the wire while the next forward and backward run, and apply it after
            the next optimizer step (its correction ``W^t x - x`` is added to the updated state). The gradient is
            then taken before the latest mix has arrived: a variant of DPOSG that lets communication hide behind
            compute, as DDP hides its all-reduce behind the backward pass. Checkpoints, consensus measurements and
            the end of training finish the mix in flight first.
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
        chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
        overlap: bool = False,
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
        check_rounds(gossip_rounds)
        resolve_wire_dtype(wire_dtype)
        check_chunk_bytes(chunk_bytes)
        if isinstance(consensus_every, bool) or not isinstance(consensus_every, int) or consensus_every < 0:
            raise ValueError(f"consensus_every must be an integer >= 0 (0 turns it off), got {consensus_every!r}")
        if not isinstance(timeout, timedelta):
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
                raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
            timeout = timedelta(seconds=float(timeout))
        for flag, value in (("mix_buffers", mix_buffers), ("mixing", mixing), ("overlap", overlap)):
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
        self.topology: Topology | None = None
        self.engine: GossipEngine | None = None
        #: latest consensus distance per top-level submodule, identical on every rank
        self.consensus_distance: dict[str, float] = {}
        self._mix_sets: dict[int, MixSet] = {}
        self._step_counts: dict[int, int] = {}
        self._in_flight: dict[int, PendingMix | None] = {}  # optimizer id -> its mix on the wire (overlap)
        self._pending_replica: dict[str, Any] | None = None
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
            chunk_bytes=self.chunk_bytes, group=self._gossip_group,
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
        tensors = [p.data for p in own_parameters(module)] + own_buffers(module)
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
        state = mix_set.state(optimizer)
        if self.mixing and self.overlap:
            self.engine.finish_mix(self._in_flight.pop(id(optimizer), None))  # the previous step's mix
        elif self.mixing:
            self.engine.mix(state + mix_set.buffers, self.gossip_rounds)
        if mix_set.anchored:
            optimizer.extrapolate()
        count = self._step_counts.get(id(optimizer), 0) + 1
        self._step_counts[id(optimizer)] = count
        if self.consensus_every and count % self.consensus_every == 0 and self.engine.world_size > 1:
            self._record_consensus(state, mix_set.group_ids)
        if self.mixing and self.overlap:
            self._in_flight[id(optimizer)] = self.engine.start_mix(state + mix_set.buffers, self.gossip_rounds)

    def _finish_in_flight(self) -> None:
        """Apply every mix still on the wire (overlap), leaving the live parameters as they are: a DPOSG replica
        keeps its extrapolation until its next step, so a run that stops here and resumes follows the same path."""
        if self.engine is not None:
            for optimizer_id in list(self._in_flight):
                self.engine.finish_mix(self._in_flight.pop(optimizer_id))

    def _mix_set(self, optimizer: Optimizer) -> MixSet:
        cached = self._mix_sets.get(id(optimizer))
        if cached is not None and len(cached.params) == sum(len(g["params"]) for g in optimizer.param_groups):
            return cached
        module = self.lightning_module
        assert module is not None
        mix_set = build_mix_set(module, optimizer, self.optimizers, self.mix_buffers)
        self._mix_sets[id(optimizer)] = mix_set
        return mix_set

    def _record_consensus(self, tensors: list[Tensor], group_ids: list[int]) -> None:
        assert self.engine is not None
        module = self.lightning_module
        assert module is not None
        names = submodule_names(module)
        values = self.engine.consensus_distance(tensors, group_ids, len(names))
        for gid in sorted(set(group_ids)):
            name = names[gid]
            value = float(values[gid])
            self.consensus_distance[name] = value
            if module._current_fx_name is not None and module._trainer is not None:
                module.log(f"consensus/{name}", value, on_step=True, on_epoch=False, sync_dist=False)

    def measure_consensus(self) -> dict[str, float]:
        """Consensus distance of all parameters now, per top-level submodule (a collective: call on every rank)."""
        module = self.lightning_module
        assert module is not None and self.engine is not None
        self._finish_in_flight()
        names = submodule_names(module)
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
        self._finish_in_flight()  # the optimizer states and replica files are read after this
        state = module.state_dict()
        if self.engine is None or self.engine.world_size == 1:
            return state
        metrics = metric_prefixes(module)
        keys = [
            k for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point() and not k.startswith(metrics)
        ]
        averaged = self.engine.average([state[k] for k in keys])
        return {**state, **dict(zip(keys, averaged))}

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        if self.engine is not None and self.engine.world_size > 1 and "optimizer_states" in checkpoint:
            assert self.topology is not None
            token = self.broadcast(uuid.uuid4().hex if self.is_global_zero else None)
            meta = replicas_meta(token, self.engine.world_size, self.topology.name, self.gossip_rounds, self.engine.state_dict())
            checkpoint[CHECKPOINT_KEY] = meta
            module = self.lightning_module
            assert module is not None
            rng_states = _collect_rng_states(include_cuda=self.root_device.type == "cuda")
            replica = replica_file(meta, self.global_rank, module.state_dict(), checkpoint["optimizer_states"], rng_states)
            self.checkpoint_io.save_checkpoint(replica, replica_path(filepath, self.global_rank), storage_options)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        super().remove_checkpoint(filepath)
        remove_replica(filepath, self.global_rank, self.is_global_zero)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._pending_replica = None
        self._pending_consensus_restart = False
        meta = checkpoint.get(CHECKPOINT_KEY)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if meta is None or trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        assert self.engine is not None
        replica = read_replica(self.checkpoint_io, checkpoint_path, meta, self.global_rank, self.engine.world_size)
        have_all = self.reduce(torch.tensor(float(replica is not None), device=self.root_device), reduce_op="min")
        if bool(have_all.item() == 1.0):
            self._pending_replica = replica
        else:
            reason = consensus_restart_reason(meta, self.engine.world_size)
            rank_zero_warn(f"Resuming from {checkpoint_path}: {reason}; every replica restarts from the consensus model.")
            self._pending_consensus_restart = True
        self.engine.load_state_dict(meta["gossip"])
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        source = self._pending_replica if self._pending_replica is not None else checkpoint
        super().load_model_state_dict(source, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        # The last restore step before the fit loop draws from the RNG (its dataloader iterator does), so
        # the random streams are put back here, as they were when the checkpoint was written.
        source = self._pending_replica if self._pending_replica is not None else checkpoint
        super().load_optimizer_state_dict(source)
        if self._pending_replica is not None:
            _set_rng_states(self._pending_replica["rng_states"])
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
        self._pending_replica = None
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
            self.engine.forget()
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


if "decentralized" not in StrategyRegistry:
    DecentralizedStrategy.register_strategies(StrategyRegistry)
