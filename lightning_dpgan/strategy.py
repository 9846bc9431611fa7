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

The replica side (alignment, mixing, stops, checkpoint sets) is :class:`~lightning_dpgan.gossiper.Gossiper`, shared
with the Fabric strategy; what each step mixes is decided in :mod:`lightning_dpgan.mix_sets`; how it travels, in
:mod:`lightning_dpgan.gossip`.
"""

from __future__ import annotations

import gc
import io
import multiprocessing
import os
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dpgan.gossip import StopReason
from lightning_dpgan.gossip.live import LiveGossip
from lightning_dpgan.gossip.options import JOIN
from lightning_dpgan.gossip_strategy import DDP_ARGUMENTS, GossipStrategyMixin
from lightning_dpgan.gossiper import point_anchors_at_parameters
from lightning_dpgan.loading import safe_loads
from lightning_dpgan.processes import launch_watched, release_default_group
from lightning_dpgan.replicas import atomic_save, consensus_restart_reason, read_main, remove_other_sets, replica_set_of
from lightning_dpgan.seeding import rng_state, seed_for_rank, set_rng_state
from lightning_dpgan.signals import replace_sigterm_notifier, skip_step_broadcast



class _PatientLauncher(_SubprocessScriptLauncher):
    """Lightning's popen launcher with a :class:`PatientObserver`."""

    live: bool = False  # membership="live": the observer lets a failed worker go

    @override
    def launch(self, function: Callable, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        return launch_watched(self, function, args, kwargs)


class DecentralizedStrategy(GossipStrategyMixin, DDPStrategy):
    """Decentralized data-parallel training by gossip over a communication graph.

    Arguments as :class:`~lightning_dpgan.gossip_strategy.GossipStrategyMixin`'s: ``topology``, ``gossip``,
    ``topology_options``, ``consensus_every`` (logged as ``consensus/<submodule>``), ``mix_buffers``; then, by keyword,
    :class:`~lightning.pytorch.strategies.DDPStrategy`'s ``accelerator``, ``parallel_devices``,
    ``cluster_environment``, ``checkpoint_io``, ``precision_plugin``, ``process_group_backend`` and ``start_method``;
    its ``timeout`` is ``gossip.startup_timeout``.
    """

    strategy_name = "decentralized"
    popen_launcher, patient_launcher = _SubprocessScriptLauncher, _PatientLauncher
    ddp_arguments = DDP_ARGUMENTS | {"precision_plugin"}
    #: the strategy sets each rank's random streams itself (after the initial broadcast); see DPGAN.setup
    seeds_per_rank = True
    _pending_replica: dict[str, Any] | None = None  # this rank's replica, read by load_checkpoint until restored
    _pending_consensus_restart = False  # resuming every replica from the consensus model
    _own_state = False  # a checkpoint dict of this replica alone, for a joiner: no consensus average (a collective)

    # ------------------------------------------------------------------ launch and process group
    @override
    def setup_distributed(self) -> None:
        if self.num_nodes * self.num_processes == 1:
            # One worker has no one to talk to: no process group, so reduce/barrier/sync_dist cost nothing and a
            # one-process fit runs at a plain Trainer's speed.
            self.set_world_ranks()
            return
        super().setup_distributed()

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Restore after the initial broadcast in ``setup``, or rank 0's weights would overwrite the replicas.
        return True

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        # DDPStrategy.setup minus the DDP wrapper and minus its state sync outside fitting, which would overwrite
        # distinct replicas in a validate/test after fit: Lightning has no hook to skip that sync (nor a public
        # accessor for sync_batchnorm's _layer_sync), so its few lines are repeated here.
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
            self.gossiper.attach(self.lightning_module, self.optimizers)
            if self.gossip.catch_up:
                self._install_catch_up()

    @override
    def configure_ddp(self) -> None:
        """No wrapper: start every replica from rank 0's weights, then give each rank its own random stream."""
        assert isinstance(self.model, pl.LightningModule)
        self.gossiper.align(self.model, self.global_rank)

    # ------------------------------------------------------------------ the step
    def _install_catch_up(self) -> None:
        """With ``catch_up`` only: this strategy's training step asks first whether to only mix (the hook is an
        instance attribute, so that without ``catch_up`` the step is Lightning's own, unchecked)."""
        module = self.lightning_module
        if module.automatic_optimization:
            raise ValueError(
                "catch_up=True replaces a training_step by a mix only, which Lightning's automatic optimization "
                "would skip without stepping: set automatic_optimization = False in the module (as DPGAN does), "
                "or leave catch_up=False"
            )
        compute = super().training_step

        def training_step(*args: Any, **kwargs: Any) -> STEP_OUTPUT:
            if not self.gossiper.skips_step():
                return compute(*args, **kwargs)
            # a neighbour waits on this replica, which only mixes this step; schedulers stepped every step advance
            # with it, as they would have
            self.gossiper.catch_up(module.optimizers())  # attach() allows one optimizer with staleness
            for config in module.trainer.lr_scheduler_configs:
                if config.interval == "step" and config.frequency == 1:
                    config.scheduler.step()
            return None

        self.training_step = training_step  # type: ignore[method-assign]

    @override
    # With manual optimization (DPGAN) the optimizer steps inside training_step, which torch.compile(model) compiles:
    # dynamo would trace the gossip (sends, receives, flat buffers) and the non-finite check into graphs. The step
    # runs eagerly instead; the model's forward and backward stay compiled.
    @torch.compiler.disable
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)  # an anchored one mixes inside
        consensus, stop = self.gossiper.after_step(optimizer, output)  # a non-finite value raises here
        module = self.lightning_module
        for name, value in consensus.items():
            # Lightning has no public "may this hook log": its own check reads _current_fx_name
            if module._current_fx_name is not None:
                module.log(f"consensus/{name}", value, on_step=True, on_epoch=False, sync_dist=False)
        if stop is not None:  # a SIGTERM: Lightning ends the batch, then raises SIGTERMException on every rank, and
            # on_exception saves the checkpoint; received_sigterm has no public setter (its signal handler sets it)
            module.trainer._signal_connector.received_sigterm = True
        return output

    def measure_consensus(self) -> dict[str, float]:
        """Consensus distance of all parameters now, per top-level submodule (a collective: call on every rank)."""
        module = self.lightning_module
        assert module is not None
        return self.gossiper.measure_consensus(module)

    # ------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The consensus model: floating entries averaged over ranks (collective; runs on every rank)."""
        module = self.lightning_module
        assert module is not None
        if self._own_state:
            return module.state_dict()
        return self.gossiper.consensus_state(module, module.state_dict(), self)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        engine = self.engine
        if engine is None or engine.world_size == 1:
            if self.is_global_zero:
                self._write_main(checkpoint, filepath, storage_options)
            return
        if "optimizer_states" not in checkpoint:  # weights only: no replicas, but every rank hears if it failed
            self.gossiper.commit_main(filepath, self, lambda: self._write_main(checkpoint, filepath, storage_options))
            return
        module = self.lightning_module
        assert module is not None
        replica = {
            "state_dict": module.state_dict(),
            "optimizer_states": checkpoint["optimizer_states"],
            "rng_states": rng_state(include_cuda=self.root_device.type == "cuda"),
        }
        write = lambda main: self._write_main(main, filepath, storage_options)  # noqa: E731
        self.gossiper.save_set(filepath, checkpoint["global_step"], checkpoint, replica, self, write)

    def _write_main(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None) -> None:
        if type(self.checkpoint_io) is TorchCheckpointIO and storage_options is None:
            atomic_save(checkpoint, filepath)  # fsync'd, then renamed over the old file: the set's commit
        else:
            self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.gossiper.deferred is not None:
            return  # the checkpoint meant to replace this one was not written (a member lost during it)
        super().remove_checkpoint(filepath)
        rank, writes_main, _ = self.gossiper.set_place(self)
        remove_other_sets(filepath, None, rank, writes_main)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        # Always weights-only, whatever Lightning passes: a checkpoint is data, and loading one never runs code.
        self._pending_replica = None
        self._pending_consensus_restart = False
        if checkpoint_path == JOIN:
            return self._join()
        checkpoint = read_main(checkpoint_path)
        replica_set = replica_set_of(checkpoint)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if replica_set is None or trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        self._pending_replica = self.gossiper.read_own_replica(checkpoint_path, checkpoint, self)
        if self._pending_replica is None:
            assert self.engine is not None
            reason = consensus_restart_reason(replica_set, self.engine.world_size)
            rank_zero_warn(f"Resuming from {checkpoint_path}: {reason}; every replica restarts from the consensus model.")
            self._pending_consensus_restart = True
        return checkpoint

    def _join(self) -> dict[str, Any]:
        """``ckpt_path=JOIN``: join the live run, and hand Lightning the donor's checkpoint of its own replica, which
        restores the model, optimizers, loops and callbacks as a resume does; then this worker's own random streams."""
        trainer = self.lightning_module.trainer
        if trainer.state.fn != TrainerFn.FITTING:
            raise ValueError(f"ckpt_path={JOIN!r} joins a live run, which only fit() can: got {trainer.state.fn.value}()")
        received = safe_loads(self.gossiper.join(), "the donor's replica")
        self.gossiper.resume_gossip(received["gossip"])
        engine = self.engine
        assert isinstance(engine, LiveGossip)
        seed_for_rank(engine.me)  # its own noise and batches, as every member has
        return received["checkpoint"]

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """At the step boundary before a join: the donor sends the joiner this replica's whole checkpoint."""
        super().on_train_batch_start(batch, batch_idx)
        engine = self.engine
        if isinstance(engine, LiveGossip) and engine.donation_due():
            engine.donate(self._replica_checkpoint())

    def _replica_checkpoint(self) -> bytes:
        """This replica's checkpoint as Lightning writes one (model, optimizers with anchors and moments, loops,
        callbacks), without the consensus average, and its gossip state, serialized. Lightning's ``dump_checkpoint``
        is the one way to get that dict; it has no public accessor."""
        trainer = self.lightning_module.trainer
        self._own_state = True
        try:
            # writes a dict, loads nothing: weights_only=False here keeps the optimizer and loop states in it; the
            # joiner reads the bytes with torch.load(weights_only=True) (loading.safe_loads)
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        finally:
            self._own_state = False
        buffer = io.BytesIO()
        torch.save({"checkpoint": checkpoint, "gossip": self.gossiper.gossip_state()}, buffer)
        return buffer.getvalue()

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
            point_anchors_at_parameters(self.optimizers)  # rank 0's optimizer state came with the main file

    # ------------------------------------------------------------------ collectives (the others: GossipStrategyMixin)
    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        if (live := self.gossiper.live_engine) is not None and isinstance(tensor, torch.Tensor):
            return _reduce_over_members(live, tensor, reduce_op)
        with self.gossiper.collective("reduce"):
            return super().reduce(tensor, group, reduce_op)

    # ------------------------------------------------------------------ starting and stopping
    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        trainer = self.lightning_module.trainer
        replace_sigterm_notifier(trainer, self.gossiper.signal)  # or a SIGTERM hangs the gossip
        skip_step_broadcast(trainer)  # the stop is agreed through the gossip instead
        self._pending_replica = None
        self._pending_consensus_restart = False

    @override
    def on_train_end(self) -> None:
        if self.engine is not None:
            if self.gossip.catch_up and self.engine.world_size > 1:
                skipped = self.all_gather(torch.tensor([self.engine.skipped], device=self.root_device)).reshape(-1)
                rank_zero_info(
                    f"catch_up: steps each rank only mixed, of {self.engine.steps}: {', '.join(str(int(n)) for n in skipped)}"
                )
            self.engine.close()
            if isinstance(self.engine, LiveGossip):
                self.engine.report()
        super().on_train_end()

    @override
    def teardown(self) -> None:
        super().teardown()
        if self._start_method == "popen" or multiprocessing.parent_process() is None:
            return
        # A worker the spawn launcher started ends with this fit; nothing of the launcher's own after this
        # (collecting rank 0's results) is a collective. Walking every object of torch and Lightning at the exit
        # takes seconds; frozen, they are left to the operating system.
        release_default_group()
        gc.freeze()

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        if isinstance(self.engine, LiveGossip):
            self.engine.report()  # a stop or a failure ends the fit without on_train_end
        stop = self.stopped
        if not isinstance(exception, SIGTERMException) or stop is None or stop.reason != StopReason.SIGNAL:
            return
        trainer = self.lightning_module.trainer
        saved = _save_last_checkpoint(trainer)
        where = f"checkpoint {saved}" if saved else "no checkpoint (no ModelCheckpoint callback)"
        rank_zero_info(f"stopped at step {trainer.global_step} on SIGTERM: every rank finished it; {where}")

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


def _reduce_over_members(live: LiveGossip, tensor: torch.Tensor, reduce_op: Any) -> torch.Tensor:
    """Lightning's ``reduce`` over the current members (after a change of members); ``min``/``max`` (the evaluation's
    finiteness check) through a gather, as the members' group sums only."""
    op = str(reduce_op).lower().rsplit(".", 1)[-1]
    if op in ("min", "max"):
        gathered = live.all_gather_tensor(tensor)
        return gathered.amin(dim=0) if op == "min" else gathered.amax(dim=0)
    if op not in ("mean", "avg", "sum"):
        raise ValueError(f"after a change of members, reduce supports reduce_op 'mean', 'sum', 'min' or 'max', got {reduce_op!r}")
    total, count = live.all_reduce_tensor(tensor)
    return total / count if op in ("mean", "avg") else total


def _save_last_checkpoint(trainer: pl.Trainer) -> str | None:
    """Write ``last.ckpt`` of the first ModelCheckpoint (a collective: every rank calls it at the same step)."""
    callback = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)  # type: ignore[attr-defined]
    if callback is None or callback.dirpath is None:
        return None
    path = os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
    trainer.save_checkpoint(path)
    callback.last_model_path = path
    return path


if "decentralized" not in StrategyRegistry:
    DecentralizedStrategy.register_strategies(StrategyRegistry)
