"""``DecentralizedStrategy``: Lightning's DDP machinery with neighbour gossip in place of gradient all-reduce.

It subclasses :class:`~lightning.pytorch.strategies.DDPStrategy` because the Trainer keys the distributed
sampler, ``sync_dist`` logging and launchers off that type; ``reduce``/``barrier``/``broadcast`` stay global so
callbacks (ModelCheckpoint, EarlyStopping) keep working. Only parameter mixing is local, on a process group of
its own so that Lightning's collectives never queue behind a mix on the wire:

* no DDP wrapper, so gradients stay local; rank 0's weights are broadcast once when fitting starts, then every
  rank is reseeded so replicas draw different noise and batches;
* every optimizer step mixes with ``W^t``: an optimizer with anchors (:class:`AnchoredOptimizer`) has them mixed by
  an anchor hook inside its ``step()``, between the anchor update and the extrapolation (DPOSG); any other has its
  parameters mixed after its step (adapt-then-combine). How the mix runs is the engine's
  (:func:`~lightning_dpgan.gossip.build_engine` from :class:`~lightning_dpgan.gossip.GossipOptions`);
* a training step talks to graph neighbours only: stops (SIGTERM, a non-finite value) are agreed through the
  gossip messages (:mod:`lightning_dpgan.gossip.control`), so every rank stops after the same step;
* checkpoints hold the consensus (average) model, plus one file per rank with that replica, its optimizer state,
  RNG state and gossip state, committed as one set (:mod:`lightning_dpgan.replicas`), so ``fit(ckpt_path=...)``
  resumes every replica exactly.

What each step mixes is decided in :mod:`lightning_dpgan.mix_sets`; how it travels, in :mod:`lightning_dpgan.gossip`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, TorchCheckpointIO
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, Strategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_dpgan.checks import check_int
from lightning_dpgan.gossip import DistributedTransport, GossipEngine, GossipOptions, Stop, StopReason, build_engine
from lightning_dpgan.guard import NonFiniteError, first_nonfinite, nonfinite_message
from lightning_dpgan.mix_sets import AnchoredOptimizer, MixSet, build_mix_set, metric_prefixes, own_buffers, own_parameters, submodule_names
from lightning_dpgan.replicas import (
    CHECKPOINT_KEY,
    CheckpointError,
    ReplicaSet,
    atomic_save,
    consensus_restart_reason,
    main_meta,
    read_main,
    read_replica,
    remove_other_sets,
    replica_set_of,
    write_replica,
)
from lightning_dpgan.seeding import rng_state, seed_for_rank, set_rng_state
from lightning_dpgan.signals import replace_sigterm_notifier, skip_step_broadcast
from lightning_dpgan.topology import TOPOLOGIES, Topology, TopologyError, build_topology

_PR_SET_PDEATHSIG = 1


class DecentralizedStrategy(DDPStrategy):
    """Decentralized data-parallel training by gossip over a communication graph.

    Args:
        topology: a name from :data:`lightning_dpgan.topology.TOPOLOGIES`, or a built :class:`Topology`.
        gossip: how replicas gossip (:class:`~lightning_dpgan.gossip.GossipOptions`, or a dict of its fields):
            rounds ``t``, wire dtype, overlap, timeouts, ...
        topology_options: extra arguments for the named topology (``shape`` for a torus, ``degree``/``seed``
            for random_regular, ``matrix``/``edges`` for custom, ``weights``).
        consensus_every: log the consensus distance every this many steps of each optimizer (0: never).
        mix_buffers: also mix floating-point buffers such as BatchNorm running statistics.

    The other arguments are :class:`~lightning.pytorch.strategies.DDPStrategy`'s; its ``timeout`` is
    ``gossip.startup_timeout``.
    """

    strategy_name = "decentralized"
    #: the strategy sets each rank's random streams itself (after the initial broadcast); see DPGAN.setup
    seeds_per_rank = True

    def __init__(
        self,
        topology: str | Topology = "ring",
        gossip: GossipOptions | Mapping[str, Any] | None = None,
        topology_options: Mapping[str, Any] | None = None,
        consensus_every: int = 50,
        mix_buffers: bool = True,
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
        options = GossipOptions.build(dict(gossip) if isinstance(gossip, Mapping) else gossip)
        check_int("consensus_every", consensus_every, 0)
        if not isinstance(mix_buffers, bool):
            raise ValueError(f"mix_buffers must be True or False, got {mix_buffers!r}")
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timedelta(seconds=options.startup_timeout),
            start_method=start_method,
        )
        self.topology_spec = topology
        self.topology_options = dict(topology_options or {})
        self.gossip = options
        self.consensus_every = consensus_every
        self.mix_buffers = mix_buffers
        self.topology: Topology | None = None
        self.engine: GossipEngine | None = None
        #: latest consensus distance per top-level submodule, identical on every rank
        self.consensus_distance: dict[str, float] = {}
        #: the stop every rank took, once taken (a SIGTERM or a non-finite value)
        self.stopped: Stop | None = None
        self._mix_sets: dict[int, MixSet] = {}
        self._hooks: list[RemovableHandle] = []
        self._step_counts: dict[int, int] = {}
        self._signalled = False
        self._signal_announced = False
        self._nonfinite: tuple[int, int] | None = None  # (step, submodule) where this rank first saw one
        self._pending_replica: dict[str, Any] | None = None
        self._pending_consensus_restart = False
        self._gossip_group: torch.distributed.ProcessGroup | None = None
        self._run_id = uuid.uuid4().hex[:12]

    # ------------------------------------------------------------------ launch and process group
    @override
    def _configure_launcher(self) -> None:
        # Runs in the launching process before any worker starts: the place to reject a bad world size or port.
        self.topology = self._build_topology(self.num_nodes * self.num_processes)
        super()._configure_launcher()
        starts_workers = self._launcher is not None and not self.cluster_environment.creates_processes_externally
        if starts_workers and self.num_nodes == 1 and self.num_processes > 1:
            check_master_port_free()

    @override
    def setup_environment(self) -> None:
        if self.cluster_environment is not None and self.cluster_environment.creates_processes_externally:
            _die_with_parent()
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
        transport = DistributedTransport(self.global_rank, self._gossip_group, self.gossip.chunk_bytes)
        self.engine = build_engine(self.topology, self.global_rank, self.gossip, transport)
        if world_size > 1:
            self._run_id = self.broadcast(self._run_id)

    def _new_gossip_group(self) -> torch.distributed.ProcessGroup:
        """The gossip's own process group, over connections of its own, so that Lightning's collectives never
        queue behind a mix still on the wire to the same peer."""
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
            self._install_anchor_hooks()
        self._mix_sets.clear()
        self._step_counts.clear()
        self.stopped, self._nonfinite, self._signalled, self._signal_announced = None, None, False, False

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

    def _install_anchor_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = [
            optimizer.register_anchor_hook(self._mix_anchors) for optimizer in self.optimizers if isinstance(optimizer, AnchoredOptimizer)
        ]

    # ------------------------------------------------------------------ the step
    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        output = Strategy.optimizer_step(self, optimizer, closure, model, **kwargs)  # an anchored one mixes inside
        mix_set = self._mix_set(optimizer)
        if not mix_set.anchored:
            self._mix(mix_set, mix_set.params)
        if isinstance(output, Tensor) and not bool(torch.isfinite(output.detach()).all()):
            self._announce_nonfinite(len(submodule_names(self.lightning_module)))  # "the loss"
        count = self._step_counts.get(id(optimizer), 0) + 1
        self._step_counts[id(optimizer)] = count
        assert self.engine is not None
        if self.consensus_every and count % self.consensus_every == 0 and self.engine.world_size > 1:
            self._record_consensus(mix_set.state(optimizer), mix_set.group_ids)
        self._take_due_stop()
        return output

    def _mix_anchors(self, optimizer: Optimizer, anchors: list[Tensor]) -> None:
        """The anchor hook: mix the anchors the optimizer just updated, before it extrapolates from them."""
        self._mix(self._mix_set(optimizer), anchors)

    def _mix(self, mix_set: MixSet, state: list[Tensor]) -> None:
        assert self.engine is not None
        if self._nonfinite is None:
            bad = first_nonfinite(state)
            if bad is not None:
                self._announce_nonfinite(mix_set.group_ids[bad])
        if self._signalled and not self._signal_announced:
            self._signal_announced = True
            self.engine.announce_stop(StopReason.SIGNAL)
        self.engine.step(state + mix_set.buffers)

    def _announce_nonfinite(self, group: int) -> None:
        """Remember where this rank first saw a non-finite value (checkpoints ask), and announce the stop."""
        assert self.engine is not None
        if self._nonfinite is None:
            self._nonfinite = (self.engine.steps + 1, group)  # the step in progress, counted from 1
            self.engine.announce_stop(StopReason.NONFINITE, group)

    def _take_due_stop(self) -> None:
        """After a step: once every rank has heard of a stop, take it, all at this same step."""
        assert self.engine is not None
        stop = self.engine.due_stop()
        if stop is None or self.stopped is not None:
            return
        self.stopped = stop
        if stop.reason == StopReason.NONFINITE:
            raise NonFiniteError(nonfinite_message(self._player(stop.detail), stop.origin_rank, stop.origin_step, stop.step))
        # Lightning ends the batch, then raises SIGTERMException on every rank; on_exception saves the checkpoint
        self.lightning_module.trainer._signal_connector.received_sigterm = True

    def _player(self, group: int) -> str:
        names = submodule_names(self.lightning_module)
        return "the loss" if group >= len(names) else f"the {names[group]}"

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
        self.engine.flush()
        names = submodule_names(module)
        params = list(module.named_parameters())
        values = self.engine.consensus_distance(
            [p for _, p in params], [names.index(n.split(".", 1)[0]) for n, _ in params], len(names)
        )
        return {name: float(values[i]) for i, name in enumerate(names[:-1])}

    def average(self, tensors: list[Tensor]) -> list[Tensor]:
        """The exact average of the tensors over all replicas, as new tensors (a collective: call on every rank)."""
        assert self.engine is not None
        return self.engine.average(tensors)

    # ------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The consensus model: floating entries averaged over ranks (collective; runs on every rank)."""
        module = self.lightning_module
        assert module is not None
        if self.engine is not None:
            self.engine.flush()  # the optimizer states and replica files are read after this
        self._refuse_nonfinite_checkpoint()
        state = module.state_dict()
        if self.engine is None or self.engine.world_size == 1:
            return state
        metrics = metric_prefixes(module)
        keys = [k for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point() and not k.startswith(metrics)]
        averaged = self.engine.average([state[k] for k in keys])
        return {**state, **dict(zip(keys, averaged))}

    def _refuse_nonfinite_checkpoint(self) -> None:
        """Every rank is here at the same step: if any of them has announced a non-finite value, they all stop now
        instead of writing it into a checkpoint."""
        assert self.engine is not None
        report = [-1, 0, 0, 0] if self._nonfinite is None else [self._nonfinite[0], self.global_rank, self._nonfinite[1], 1]
        if self.engine.world_size > 1:
            gathered = self.all_gather(torch.tensor(report, dtype=torch.long, device=self.root_device)).reshape(-1, 4).tolist()
        else:
            gathered = [report]
        announced = sorted(row for row in gathered if row[3] == 1)
        if announced:
            origin_step, origin_rank, detail, _ = announced[0]
            self.stopped = Stop(self.engine.steps, origin_step, origin_rank, int(StopReason.NONFINITE), detail)
            raise NonFiniteError(nonfinite_message(self._player(detail), origin_rank, origin_step, self.engine.steps))

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        if self.engine is None or self.engine.world_size == 1 or "optimizer_states" not in checkpoint:
            if self.is_global_zero:
                self._write_main(checkpoint, filepath, storage_options)
            return
        assert self.topology is not None
        token = self.broadcast(uuid.uuid4().hex[:8] if self.is_global_zero else None)
        replica_set = ReplicaSet(self._run_id, int(checkpoint["global_step"]), token, self.engine.world_size, self.topology.name)
        checkpoint[CHECKPOINT_KEY] = main_meta(replica_set, self.engine.state_dict())
        module = self.lightning_module
        assert module is not None
        contents = {
            "state_dict": module.state_dict(),
            "optimizer_states": checkpoint["optimizer_states"],
            "rng_states": rng_state(include_cuda=self.root_device.type == "cuda"),
        }
        write_replica(filepath, replica_set, self.global_rank, contents)
        self.barrier("replicas written")  # every replica is on disk before the main file commits the set
        if self.is_global_zero:
            self._write_main(checkpoint, filepath, storage_options)
        self.barrier("checkpoint committed")  # only then may the older sets go
        remove_other_sets(filepath, replica_set, self.global_rank, self.is_global_zero)

    def _write_main(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None) -> None:
        if type(self.checkpoint_io) is TorchCheckpointIO and storage_options is None:
            atomic_save(checkpoint, filepath)  # fsync'd, then renamed over the old file: the set's commit
        else:
            self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        super().remove_checkpoint(filepath)
        remove_other_sets(filepath, None, self.global_rank, self.is_global_zero)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        # Always weights-only, whatever Lightning passes: a checkpoint is data, and loading one never runs code.
        checkpoint = read_main(checkpoint_path)
        self._pending_replica = None
        self._pending_consensus_restart = False
        replica_set = replica_set_of(checkpoint)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if replica_set is None or trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        assert self.engine is not None
        if replica_set.world_size != self.engine.world_size:
            reason = consensus_restart_reason(replica_set, self.engine.world_size)
            rank_zero_warn(f"Resuming from {checkpoint_path}: {reason}; every replica restarts from the consensus model.")
            self._pending_consensus_restart = True
            return checkpoint
        error = None
        try:
            self._pending_replica = read_replica(checkpoint_path, replica_set, self.global_rank)
        except CheckpointError as err:
            error = str(err)
        failed = self.all_gather(torch.tensor([error is not None], device=self.root_device)).reshape(-1).tolist()
        if any(failed):
            ranks = ", ".join(str(r) for r, bad in enumerate(failed) if bad)
            raise CheckpointError(
                f"cannot resume every replica from {os.fspath(checkpoint_path)!r}: the replica files of rank(s) {ranks} are "
                f"missing or belong to another checkpoint{f' ({error})' if error else ''}. Copy the checkpoint's "
                f"{os.path.basename(os.fspath(checkpoint_path))}.replicas folder with it, or start a new fit from its "
                f"consensus model (load_from_checkpoint)"
            )
        self.engine.load_state_dict(checkpoint[CHECKPOINT_KEY]["gossip"])
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
            set_rng_state(self._pending_replica["rng_states"])
        if self._pending_consensus_restart:
            # rank 0's optimizer state came with the main file: point its anchors at the consensus model
            for optimizer in self.optimizers:
                if isinstance(optimizer, AnchoredOptimizer):
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    with torch.no_grad():
                        for anchor, param in zip(optimizer.anchors(), params):
                            anchor.copy_(param)

    # ------------------------------------------------------------------ starting and stopping
    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        trainer = self.lightning_module.trainer
        replace_sigterm_notifier(trainer, self._on_signal)  # or a SIGTERM hangs the gossip
        skip_step_broadcast(trainer)  # the stop is agreed through the gossip instead
        self._pending_replica = None
        self._pending_consensus_restart = False

    def _on_signal(self) -> None:
        self._signalled = True  # announced with the next step's mix

    @override
    def on_train_end(self) -> None:
        if self.engine is not None:
            self.engine.flush()
        super().on_train_end()

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        stop = self.stopped
        if not isinstance(exception, SIGTERMException) or stop is None or stop.reason != StopReason.SIGNAL:
            return
        trainer = self.lightning_module.trainer
        saved = _save_last_checkpoint(trainer)
        where = f"checkpoint {saved}" if saved else "no checkpoint (no ModelCheckpoint callback)"
        rank_zero_info(f"stopped at step {trainer.global_step} on SIGTERM: every rank finished it; {where}")

    @override
    def teardown(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._mix_sets.clear()
        if self.engine is not None:
            self.engine.forget()  # after an error the peers may be gone: nothing left to wait for
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


def _save_last_checkpoint(trainer: pl.Trainer) -> str | None:
    """Write ``last.ckpt`` of the first ModelCheckpoint (a collective: every rank calls it at the same step)."""
    callback = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)  # type: ignore[attr-defined]
    if callback is None or callback.dirpath is None:
        return None
    path = os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
    trainer.save_checkpoint(path)
    callback.last_model_path = path
    return path


def _die_with_parent() -> None:
    """A worker started by a launcher (Lightning's popen, torchrun, SLURM) dies with it, never living on as an
    orphan: Linux delivers SIGKILL when the parent exits, also to a worker stopped with SIGSTOP."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent was already gone before the request took effect
            os.kill(os.getpid(), signal.SIGKILL)


def check_master_port_free() -> None:
    """Before Lightning starts workers on one machine: a ``MASTER_PORT`` that another program holds would make rank 0
    fail after a long rendezvous wait while the others wait on. Say so now instead (``RuntimeError``)."""
    port = os.environ.get("MASTER_PORT")
    if not port:
        return  # Lightning picks a free one
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", int(port)))
        except OSError as err:
            raise RuntimeError(
                f"MASTER_PORT={port} is already in use on this machine ({err.strerror}); choose a free port, or unset "
                f"MASTER_PORT to let Lightning pick one"
            ) from None


if "decentralized" not in StrategyRegistry:
    DecentralizedStrategy.register_strategies(StrategyRegistry)
