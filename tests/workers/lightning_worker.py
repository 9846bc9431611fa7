"""Scenarios for the strategy tests. Run as a script; Lightning's popen launcher re-runs it for ranks 1..n-1.

Usage: lightning_worker.py SCENARIO OUT_DIR [key=value ...]. Every rank writes what the test checks to OUT_DIR.

``lightning_worker.py suite OUT_DIR JSON`` runs many scenarios one after the other in the same processes, under
torchrun (Lightning starts no processes then, and each fit reuses the process group): JSON is a list of
``[scenario, subfolder, {key: value}]``. One launch then serves many tests (tests/conftest.py).
"""

from __future__ import annotations

import gc

gc.disable()  # while torch and Lightning import, as lightning_dpgan/__init__.py does for its own imports

import json
import os
import signal
import sys
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dpgan import DecentralizedStrategy, GossipOptions, NonFiniteError
from lightning_dpgan.data import DigitsDataModule
from lightning_dpgan.examples.alternating_gan import AlternatingGAN
from lightning_dpgan.data import GaussianMixtureDataModule
from lightning_dpgan.gan import DPGAN
from lightning_dpgan.evaluation import GANEvaluation
from lightning_dpgan.models import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator
from lightning_dpgan.optim import OPTIMIZERS, OptimisticSGD
from lightning_dpgan.signals import StopOnSigterm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reference import delivery_schedule  # noqa: E402
from stale_replay import ReplayedStale  # noqa: E402

gc.freeze()
gc.enable()


def digits(with_index: bool = False) -> TensorDataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    tensors = [torch.as_tensor(x, dtype=torch.float32) / 16.0, torch.as_tensor(y)]
    if with_index:
        tensors.append(torch.arange(len(y)))
    return TensorDataset(*tensors)


class Classifier(pl.LightningModule):
    """Automatic optimization, BatchNorm, a validation loss: the ordinary Lightning model."""

    def __init__(self, lr: float = 0.1, batchnorm: bool = True, record_indices: bool = False) -> None:
        super().__init__()
        self.lr = lr
        layers: list[nn.Module] = [nn.Linear(64, 32)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(32))
        layers += [nn.ReLU(), nn.Linear(32, 10)]
        self.body = nn.Sequential(*layers)
        self.record_indices = record_indices
        self.seen: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        if self.record_indices and self.current_epoch == 0:
            self.seen += batch[2].tolist()
        loss = F.cross_entropy(self.body(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self.body(batch[0]), batch[1]), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Quadratic(pl.LightningModule):
    """Rank r minimises 0.5 ||z - c_r||^2; manual optimization with OptimisticSGD (anchored)."""

    def __init__(self, dim: int, lr: float) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.z = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        target = torch.as_tensor(quadratic_targets(self.trainer.world_size, self.z.numel())[self.global_rank])
        loss = 0.5 * ((self.z - target) ** 2).sum()
        self.manual_backward(loss)
        opt.step()
        opt.zero_grad()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OptimisticSGD(self.parameters(), lr=self.lr)


class RecordBatches(pl.LightningModule):
    """Records the (point, label) batches this rank trains on in its first epoch."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out, self.seen = out, []
        self.weight = nn.Parameter(torch.zeros(1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.seen.append(torch.cat([batch[0], batch[1][:, None].float()], dim=1))
        return (self.weight * 0).sum()

    def on_train_epoch_end(self) -> None:
        np.save(os.path.join(self.out, f"seen_rank{self.global_rank}.npy"), torch.cat(self.seen).numpy())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class BilinearGame(pl.LightningModule):
    """Rank r plays min_x max_y x^T A_r y with its own A_r (see :func:`bilinear_matrices`); one fused optimizer."""

    def __init__(self, optimizer: str, lr: float, iterations_per_batch: int = 1, slow: tuple[int, float] | None = None,
                 **optimizer_kwargs: Any) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.slow = slow  # (rank, seconds): that rank's every gradient computation takes this much longer
        start = np.random.default_rng(7).standard_normal(2 * BILINEAR_DIM)
        self.x = nn.Parameter(torch.as_tensor(start[:BILINEAR_DIM]))
        self.y = nn.Parameter(torch.as_tensor(start[BILINEAR_DIM:]))
        self.optimizer, self.lr, self.kwargs = optimizer, lr, optimizer_kwargs
        self.iterations_per_batch = iterations_per_batch

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        a = torch.as_tensor(bilinear_matrices(self.trainer.world_size)[1][self.global_rank])
        if self.slow is not None and self.slow[0] == self.global_rank:
            time.sleep(self.slow[1])
        for _ in range(self.iterations_per_batch):
            opt.zero_grad()
            value = self.x @ a @ self.y
            self.manual_backward(value, inputs=[self.x], retain_graph=True)  # x minimises
            self.manual_backward(-value, inputs=[self.y])  # y maximises
            opt.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": [self.x]}, {"params": [self.y]}]
        return OPTIMIZERS[self.optimizer](groups, lr=self.lr, **self.kwargs)


BILINEAR_DIM = 12


def bilinear_matrices(world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A well-conditioned A (singular values 0.5..1) and per-rank A_r that average to A.

    Rank r holds only its block of A's rows (scaled by n): each local game alone has a whole subspace of
    equilibria, so without mixing a worker stops wherever its start projects; only the average game pins
    (0, 0). At the equilibrium every local gradient is zero, so DPOSG with a constant step can reach it exactly.
    """
    rng = np.random.default_rng(11)
    q1, _ = np.linalg.qr(rng.standard_normal((BILINEAR_DIM, BILINEAR_DIM)))
    q2, _ = np.linalg.qr(rng.standard_normal((BILINEAR_DIM, BILINEAR_DIM)))
    a = q1 @ np.diag(np.linspace(0.5, 1.0, BILINEAR_DIM)) @ q2.T
    parts = np.zeros((world_size, BILINEAR_DIM, BILINEAR_DIM))
    for r, rows in enumerate(np.array_split(np.arange(BILINEAR_DIM), world_size)):
        parts[r, rows] = world_size * a[rows]
    return a, parts


def quadratic_targets(world_size: int, dim: int) -> np.ndarray:
    return np.random.default_rng(1234).standard_normal((world_size, dim))


def worker_id(trainer: pl.Trainer) -> int:
    """A worker's id in a live run (a worker that joined has its own; Lightning sees one process there), else its
    global rank."""
    return getattr(getattr(trainer.strategy, "engine", None), "me", trainer.global_rank)


class SaveReplica(Callback):
    """Writes each rank's parameters (and anything the scenario adds) at a chosen hook, or after step K
    (``when="stepK"``)."""

    def __init__(self, out: str, when: str = "end") -> None:
        self.out, self.when = out, when

    def _save(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        torch.save(state, os.path.join(self.out, f"{self.when}_rank{worker_id(trainer)}.pt"))

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.when == "start":
            self._save(trainer, module)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if self.when == f"step{trainer.global_step}":
            self._save(trainer, module)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.when == "end":
            self._save(trainer, module)
            if getattr(module, "seen", None) is not None:
                with open(os.path.join(self.out, f"seen_rank{trainer.global_rank}.json"), "w") as f:
                    json.dump(module.seen, f)


class LogBatches(Callback):
    """Appends each training batch's epoch, index and checksum to ``batches_rank{r}.jsonl``, across resumed runs."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        with open(os.path.join(self.out, f"batches_rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps([trainer.current_epoch, batch_idx, float(batch[0].double().sum())]) + "\n")


class ConsensusHistory(Callback):
    def __init__(self, out: str) -> None:
        self.out = out
        self.history: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        values = dict(trainer.strategy.consensus_distance)
        if values and (not self.history or values != self.history[-1]):
            self.history.append(values)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            with open(os.path.join(self.out, "consensus.json"), "w") as f:
                json.dump(self.history, f)
            with open(os.path.join(self.out, "buffers.json"), "w") as f:
                json.dump({"plans": len(trainer.strategy.engine._plans)}, f)


class MessageCount(Callback):
    """Gossip messages this rank sent in each training batch (one DPGAN iteration)."""

    def __init__(self, out: str) -> None:
        self.out, self.per_batch, self._before = out, [], 0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._before = trainer.strategy.engine.messages_sent

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.per_batch.append(trainer.strategy.engine.messages_sent - self._before)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        with open(os.path.join(self.out, f"messages_rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"per_batch": self.per_batch, "consensus": trainer.strategy.consensus_distance}, f)


class Snapshots(Callback):
    """Rank 0's module state every ``every`` steps, to follow training in one run."""

    def __init__(self, out: str, every: int) -> None:
        self.out, self.every = out, every

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if trainer.is_global_zero and trainer.global_step % self.every == 0:
            torch.save(module.state_dict(), os.path.join(self.out, f"step{trainer.global_step}.pt"))


class NoiseAtFirstBatch(Callback):
    """The noise this rank's DPGAN draws in its first iteration (the global RNG's next draw there)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 0:
            state = torch.random.get_rng_state()
            torch.save(torch.randn(8, module.latent_dim), os.path.join(self.out, f"noise_rank{trainer.global_rank}.pt"))
            torch.random.set_rng_state(state)


COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast_object_list",
               "barrier", "reduce", "gather", "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all")
POINT_TO_POINT = ("batch_isend_irecv", "send", "recv", "isend", "irecv")  # gloo posts isend/irecv one by one


class CountCollectives(Callback):
    """Counts the torch.distributed calls of every training step (collectives: every rank meets; point-to-point:
    neighbours only), by wrapping the module's functions while the fit runs. Written to ``calls_rank{r}.json``."""

    def __init__(self, out: str) -> None:
        self.out, self.steps, self._saved, self._now = out, [], {}, {"collective": 0, "p2p": 0}

    def setup(self, trainer: pl.Trainer, module: Any, stage: str) -> None:
        for kind, names in (("collective", COLLECTIVES), ("p2p", POINT_TO_POINT)):
            for name in names:
                original = getattr(torch.distributed, name, None)
                if original is None:
                    continue
                self._saved[name] = original

                def counted(*args: Any, _original: Any = original, _kind: str = kind, **kwargs: Any) -> Any:
                    self._now[_kind] += 1
                    return _original(*args, **kwargs)

                setattr(torch.distributed, name, counted)

    def on_train_start(self, *args: Any) -> None:
        self._now.update(collective=0, p2p=0)

    def on_train_batch_end(self, *args: Any) -> None:
        """A step is everything since the previous step's end: the loop's own per-batch calls come before
        ``on_train_batch_start``."""
        self.steps.append(dict(self._now))
        self._now.update(collective=0, p2p=0)

    def teardown(self, trainer: pl.Trainer, module: Any, stage: str) -> None:
        for name, original in self._saved.items():
            setattr(torch.distributed, name, original)
        with open(os.path.join(self.out, f"calls_rank{trainer.global_rank}.json"), "w") as f:
            json.dump(self.steps, f)


class DeliverOnSchedule(Callback):
    """Bounded staleness replaying a seeded schedule (tests/reference.py): each rank takes its neighbours' messages
    at the steps the schedule says, so that the run can be compared with numpy."""

    def __init__(self, staleness: int, seed: int) -> None:
        self.staleness, self.seed = staleness, seed

    def setup(self, trainer: pl.Trainer, module: Any, stage: str) -> None:
        schedule = delivery_schedule(trainer.world_size, self.staleness, self.seed)
        rank = trainer.global_rank
        ReplayedStale.replacing(trainer.strategy).delivery = lambda sender, tag: schedule(rank, sender, tag)


class GossipTrace(Callback):
    """Each rank's bounded-staleness trace (which steps it skipped, which neighbour step each mix used), written to
    ``trace_rank{r}.json`` for a replay in numpy."""

    def __init__(self, out: str) -> None:
        self.out = out

    def setup(self, trainer: pl.Trainer, module: Any, stage: str) -> None:
        ReplayedStale.replacing(trainer.strategy)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        with open(os.path.join(self.out, f"trace_rank{trainer.global_rank}.json"), "w") as f:
            json.dump(trainer.strategy.engine.trace, f)


class KillRank(Callback):
    """Rank ``rank`` sends itself ``sig`` (SIGKILL: dies; SIGSTOP: stalls) when it reaches ``step``; with
    ``in_checkpoint``, as it writes the first checkpoint from ``step`` on (the others are in the same save)."""

    def __init__(self, rank: int, step: int, sig: int = signal.SIGKILL, in_checkpoint: bool = False) -> None:
        self.rank, self.step, self.sig, self.in_checkpoint = rank, step, sig, in_checkpoint

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        if not self.in_checkpoint:
            self._kill(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, module: Any, checkpoint: dict[str, Any]) -> None:
        if self.in_checkpoint:
            self._kill(trainer)

    def _kill(self, trainer: pl.Trainer) -> None:
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            with open(os.path.join(trainer.default_root_dir, f"pid_rank{self.rank}.txt"), "w") as f:
                f.write(str(os.getpid()))
            with open(os.path.join(trainer.default_root_dir, f"killed_rank{self.rank}.txt"), "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), self.sig)


def die_building_the_group() -> None:
    """This worker dies (SIGKILL) when it starts building a new generation's group: a member of a set already fixed
    that never comes to its group."""
    from lightning_dpgan.gossip.membership import Membership

    def group(self: Membership, generation: Any, timeout: float) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)

    Membership.group = group  # type: ignore[method-assign]


def die_donating() -> None:
    """This worker dies (SIGKILL) when it is about to send a joiner its replica: a donor lost during a join."""
    from lightning_dpgan.gossip.live import LiveGossip

    def donate(self: LiveGossip, replica: bytes) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    LiveGossip.donate = donate  # type: ignore[method-assign]


class RecordChanges(Callback):
    """Every surviving rank writes the changes of members it went through (``membership="live"``)."""

    def __init__(self, out: str) -> None:
        self.out = out

        self.ends: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(time.time())

    def on_train_end(self, trainer: pl.Trainer, module: Any) -> None:
        engine = trainer.strategy.engine
        changes = [{"step": c.step, "left": list(c.left), "joined": list(c.joined), "members": list(c.members), "topology": c.topology}
                   for c in getattr(engine, "changes", [])]
        with open(os.path.join(self.out, f"changes_rank{worker_id(trainer)}.json"), "w") as f:
            json.dump({"changes": changes, "steps": engine.steps, "global_step": trainer.global_step, "step_ends": self.ends}, f)

    def on_exception(self, trainer: pl.Trainer, module: Any, exception: BaseException) -> None:
        """A stop (SIGTERM) ends the fit without on_train_end: the record and the replica as they are."""
        self.on_train_end(trainer, module)
        SaveReplica(self.out)._save(trainer, module)


class Pace(Callback):
    """Every worker takes ``seconds`` longer a step, and the members wait at step ``hold`` until a worker asks to
    join (however long the joiner's start takes on a loaded machine, it joins mid-run); worker 0 writes the steps
    done to ``progress.txt``, and each its parameters at every step's start to ``params_rank{id}.pt``."""

    def __init__(self, out: str, seconds: float, hold: int = -1, in_checkpoint: bool = False) -> None:
        self.out, self.seconds, self.hold, self.in_checkpoint, self.params = out, seconds, hold, in_checkpoint, {}

    def _hold(self, trainer: pl.Trainer) -> None:
        engine = trainer.strategy.engine
        if trainer.global_step == self.hold and not engine.changes and engine.membership is not None:
            deadline = time.monotonic() + 150  # the membership thread sees the request's key within 0.1 s
            while not engine.membership.changing.is_set() and time.monotonic() < deadline:
                time.sleep(0.02)

    def on_save_checkpoint(self, trainer: pl.Trainer, module: Any, checkpoint: dict[str, Any]) -> None:
        if self.in_checkpoint:  # the request then comes in the middle of a checkpoint set's agreements
            self._hold(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        time.sleep(self.seconds)
        if not self.in_checkpoint:
            self._hold(trainer)
        self.params[trainer.global_step] = torch.cat([p.detach().clone().reshape(-1) for p in module.parameters()])
        if worker_id(trainer) == 0:
            with open(os.path.join(self.out, "progress.txt"), "w") as f:
                f.write(str(trainer.global_step))

    def on_train_end(self, trainer: pl.Trainer, module: Any) -> None:
        torch.save(self.params, os.path.join(self.out, f"params_rank{worker_id(trainer)}.pt"))


class DieInSetup(Callback):
    """Rank ``rank`` exits at once in ``setup``, after the process group is up and the others wait for it."""

    def __init__(self, out: str, rank: int) -> None:
        self.out, self.rank = out, rank

    def setup(self, trainer: pl.Trainer, module: Any, stage: str) -> None:
        with open(os.path.join(self.out, f"pid_rank{trainer.global_rank}.txt"), "w") as f:
            f.write(str(os.getpid()))
        if trainer.global_rank == self.rank:
            time.sleep(2.0)  # the others reach the initial broadcast and wait there
            os._exit(3)


class Poison(Callback):
    """Rank ``rank`` writes a NaN into the generator's first weight when ``step`` steps are done."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            with torch.no_grad():
                next(module.generator.parameters()).view(-1)[0] = float("nan")


class RecordNonFinite(Callback):
    """Every rank records the step it stopped at and the message it stopped with."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_exception(self, trainer: pl.Trainer, module: Any, exception: BaseException) -> None:
        with open(os.path.join(self.out, f"stopped_rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"step": trainer.global_step, "exception": type(exception).__name__, "message": str(exception)}, f)


class SigtermRankZeroWhileOthersWait(Callback):
    """SIGTERM rank 0 at ``step`` while the others wait for it in a collective or exchange; every rank records the
    step it stopped at."""

    def __init__(self, out: str, step: int) -> None:
        self.out, self.step = out, step

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank == 0 and trainer.global_step == self.step:
            time.sleep(1.0)  # the others reach this step's collective and block in it, waiting for rank 0
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs now, while they are blocked
            time.sleep(1.0)

    def on_exception(self, trainer: pl.Trainer, module: Any, exception: BaseException) -> None:
        with open(os.path.join(self.out, f"stopped_rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"step": trainer.global_step, "exception": type(exception).__name__}, f)


def decentralized(opts: dict[str, str], topology: str = "ring", **kwargs: Any) -> DecentralizedStrategy:
    """The strategy a scenario asks for: ``rounds``, ``wire_dtype``, ``overlap``, ``mixing``, ``staleness``, ``catch_up``,
    ``gossip_every``, ``compression``, ``topk_fraction``, ``timeout`` options (``every`` is a checkpoint cadence)."""
    gossip = GossipOptions(
        rounds=int(opts.get("rounds", 1)),
        wire_dtype=opts.get("wire_dtype"),
        overlap=opts.get("overlap", "0") == "1",
        mixing=opts.get("mixing", "1") == "1",
        staleness=int(opts.get("staleness", 0)),
        catch_up=opts.get("catch_up", "0") == "1",
        every=int(opts.get("gossip_every", 1)),
        compression=opts.get("compression"),
        topk_fraction=float(opts.get("topk_fraction", 0.01)),
        peer_timeout=float(opts["timeout"]) if "timeout" in opts else None,
        membership=opts.get("membership", "fixed"),
    )
    return DecentralizedStrategy(opts.get("topology", topology), gossip=gossip, **kwargs)


def fabric_bilinear(out: str, opts: dict[str, str], steps: int, save_at: int | None = None, resume_from: int | None = None) -> Any:
    """The bilinear game of :class:`BilinearGame` trained by a Fabric loop with ``DecentralizedFabricStrategy``."""
    from lightning.fabric import Fabric

    from lightning_dpgan.fabric import DecentralizedFabricStrategy

    gossip = GossipOptions(rounds=int(opts.get("rounds", 1)), compression=opts.get("compression"),
                           staleness=int(opts.get("staleness", 0)), catch_up=opts.get("catch_up", "0") == "1")
    fabric = Fabric(accelerator="cpu", devices=int(opts.get("devices", 4)), strategy=DecentralizedFabricStrategy(opts.get("topology", "ring"), gossip=gossip))
    fabric.launch()
    slow = fabric.global_rank == int(opts.get("slow_rank", -1))
    if opts.get("trace") == "1":
        ReplayedStale.replacing(fabric.strategy)
    game = BilinearGame(opts["optimizer"], float(opts["lr"]), **json.loads(opts.get("kwargs", "{}")))
    optimizer = game.configure_optimizers()
    game, optimizer = fabric.setup(game, optimizer)
    a = torch.as_tensor(bilinear_matrices(fabric.world_size)[1][fabric.global_rank])
    path = os.path.join(out, "fabric.ckpt")
    start = 0
    if resume_from is not None:
        fabric.load(path, {"game": game, "optimizer": optimizer})
        start = resume_from
    for step in range(start, steps):
        if fabric.strategy.catch_up(optimizer):
            continue  # a neighbour waits on this replica: the step only mixed
        if slow:
            time.sleep(float(opts["slow_s"]))
        optimizer.zero_grad()
        value = game.x @ a @ game.y
        fabric.backward(value, inputs=[game.module.x], retain_graph=True)  # x minimises
        fabric.backward(-value, inputs=[game.module.y])  # y maximises
        optimizer.step()
        if save_at is not None and step + 1 == save_at:
            fabric.save(path, {"game": game, "optimizer": optimizer})
    game.module.rank = fabric.global_rank
    if opts.get("trace") == "1":
        with open(os.path.join(out, f"trace_rank{fabric.global_rank}.json"), "w") as f:
            json.dump(fabric.strategy.engine.trace, f)
    fabric.strategy.engine.close()
    return game.module


def trainer(out: str, strategy: Any, devices: int = 4, **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=CSVLogger(out, name="log"),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def main() -> None:
    scenario, out, *pairs = sys.argv[1:]
    if scenario == "suite":
        for name, folder, options in json.loads(pairs[0]):
            where = os.path.join(out, folder)
            started = time.monotonic()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run(name, where, {k: str(v) for k, v in options.items()})
            if torch.distributed.get_rank() == 0:  # where a shared launch spends its time
                with open(os.path.join(out, "seconds.txt"), "a") as f:
                    f.write(f"{time.monotonic() - started:.1f} {folder}\n")
            with open(os.path.join(where, f"warnings_rank{torch.distributed.get_rank()}.txt"), "a") as f:
                f.writelines(f"{w.message}\n" for w in caught)
        return
    run(scenario, out, dict(p.split("=", 1) for p in pairs))


def run(scenario: str, out: str, opts: dict[str, str]) -> None:
    os.makedirs(out, exist_ok=True)
    pl.seed_everything(int(opts.get("seed", 0)), verbose=False)
    devices = int(opts.get("devices", 4))

    if scenario == "sgd":  # plain SGD, automatic optimization, no BatchNorm: complete gossip == DDP
        strategy = "ddp" if opts["strategy"] == "ddp" else decentralized(opts, "complete")
        t = trainer(out, strategy, devices, max_steps=20, callbacks=[SaveReplica(out)])
        t.fit(Classifier(lr=0.2, batchnorm=False), DataLoader(digits(), batch_size=16, shuffle=True))

    elif scenario == "gan":  # Lightning-example GAN: two optimizers, alternating, BatchNorm in G
        strategy = decentralized(opts, consensus_every=5)
        t = trainer(out, strategy, devices, max_steps=2 * int(opts.get("batches", 60)), callbacks=[ConsensusHistory(out), SaveReplica(out)])
        t.fit(AlternatingGAN(lr=1e-3), datamodule=DigitsDataModule(batch_size=32))

    elif scenario == "resume":  # save at epoch ends (or every `every` steps), stop, resume, compare with the uninterrupted run
        stop, every = int(opts.get("stop", -1)), int(opts.get("every", 0))
        ckpt = ModelCheckpoint(
            dirpath=os.path.join(out, "ckpt"), save_last=True, save_top_k=-1, every_n_train_steps=every or None
        )
        callbacks = [SaveReplica(out, opts.get("save", "end")), LogBatches(out), ckpt]
        strategy = decentralized({"rounds": "2", **opts}, consensus_every=3)
        t = trainer(
            out, strategy, devices, max_epochs=int(opts["epochs"]), max_steps=stop, callbacks=callbacks, enable_checkpointing=True
        )
        t.fit(AlternatingGAN(), datamodule=DigitsDataModule(batch_size=64), ckpt_path=opts.get("ckpt"))

    elif scenario == "kill":  # a rank dies (SIGKILL) or stalls (sig=STOP) at step 6
        sig = signal.SIGSTOP if opts.get("sig") == "STOP" else signal.SIGKILL
        t = trainer(out, decentralized(opts), devices, max_steps=400, callbacks=[KillRank(int(opts["rank"]), 6, sig)], default_root_dir=out)
        t.fit(AlternatingGAN(), datamodule=DigitsDataModule(batch_size=16))

    elif scenario == "die_in_setup":  # rank 0, the launching process, dies while its workers wait for it
        t = trainer(out, decentralized(opts), devices, max_steps=50, callbacks=[DieInSetup(out, 0)])
        t.fit(AlternatingGAN(), datamodule=DigitsDataModule(batch_size=16))

    elif scenario == "nonfinite":  # a NaN on one rank: every rank stops at one step, no NaN checkpoint
        every = int(opts.get("every", 2))
        ckpt = ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_top_k=-1, every_n_train_steps=every, save_last=True)
        callbacks = [RecordNonFinite(out), ckpt, Poison(int(opts["poison_rank"]), int(opts["poison_step"]))]
        t = trainer(out, decentralized(opts), devices, max_steps=200, callbacks=callbacks, enable_checkpointing=True)
        gan = DPGAN(MLPGenerator(hidden=32), MLPDiscriminator(hidden=32), lr_g=1e-3, lr_d=1e-3)
        try:
            t.fit(gan, datamodule=GaussianMixtureDataModule("grid", num_samples=20_000, batch_size=64))
        except NonFiniteError:
            pass  # recorded by RecordNonFinite; the next scenario of the suite goes on

    elif scenario == "sigterm":  # SIGTERM to rank 0 while the others wait for it: every rank stops, none hangs
        strategy = DDPStrategy() if opts["strategy"] == "ddp" else decentralized(opts)
        callbacks = [SigtermRankZeroWhileOthersWait(out, 5)]
        if opts["strategy"] == "ddp":
            callbacks.append(StopOnSigterm())  # what the CLI adds; DecentralizedStrategy needs nothing
        t = trainer(out, strategy, devices, max_steps=200, callbacks=callbacks)
        t.fit(Classifier(), DataLoader(digits(), batch_size=16, shuffle=True))

    elif scenario == "features":  # automatic optimization with clipping, bf16 autocast, sampler, callbacks
        strategy = decentralized(opts, "torus", consensus_every=4)
        callbacks = [
            SaveReplica(out),
            EarlyStopping("val_loss", patience=2),
            ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), monitor="val_loss", save_top_k=2),
        ]
        t = trainer(
            out, strategy, devices, max_epochs=4, callbacks=callbacks, enable_checkpointing=True,
            gradient_clip_val=0.5, precision="bf16-mixed", log_every_n_steps=2,
        )
        data = digits(with_index=True)
        t.fit(
            Classifier(lr=0.1, record_indices=True),
            DataLoader(data, batch_size=32, shuffle=True),
            DataLoader(data, batch_size=256),
        )
        if t.is_global_zero:
            with open(os.path.join(out, "best.json"), "w") as f:
                json.dump({"best": t.checkpoint_callback.best_model_path}, f)

    elif scenario == "anchored":  # DPOSG-form optimizer through the strategy; launcher chosen by the test
        dim, lr, steps = 6, 0.3, int(opts.get("steps", 5))
        strategy = decentralized(opts, start_method=opts.get("start_method", "popen"), consensus_every=0)
        nodes = int(opts.get("nodes", 1))
        t = trainer(out, strategy, devices, num_nodes=nodes, max_steps=steps, callbacks=[SaveReplica(out)])
        batches = DataLoader(TensorDataset(torch.zeros(steps * devices * nodes, 1)), batch_size=1)
        t.fit(Quadratic(dim, lr), batches)
    elif scenario == "bilinear":  # DPOSG on a bilinear game split across ranks
        steps, per_batch = int(opts["steps"]), int(opts.get("per_batch", 1))
        strategy = decentralized(opts, consensus_every=int(opts.get("consensus_every", 0)))
        kwargs = json.loads(opts.get("kwargs", "{}"))
        callbacks: list[Callback] = [SaveReplica(out)]
        if "schedule" in opts:
            callbacks.append(DeliverOnSchedule(int(opts["staleness"]), int(opts["schedule"])))
        if opts.get("trace") == "1":
            callbacks.append(GossipTrace(out))
        t = trainer(out, strategy, devices, max_steps=steps, callbacks=callbacks)
        batches = DataLoader(TensorDataset(torch.zeros(steps * devices, 1)), batch_size=1)
        slow = (int(opts["slow_rank"]), float(opts["slow_s"])) if "slow_rank" in opts else None
        t.fit(BilinearGame(opts["optimizer"], float(opts["lr"]), per_batch, slow=slow, **kwargs), batches)

    elif scenario == "live_leave":  # membership="live", one process per node started by hand: rank `kill` dies at `at`
        steps, nodes = int(opts["steps"]), int(opts.get("nodes", 4))
        strategy = decentralized({"membership": "live", **opts}, consensus_every=int(opts.get("consensus_every", 0)))
        sig = signal.SIGSTOP if opts.get("sig") == "STOP" else signal.SIGKILL  # STOP: a host gone silent
        kill = KillRank(int(opts["kill"]), int(opts["at"]), sig, in_checkpoint=opts.get("kill_in") == "checkpoint")
        callbacks = [SaveReplica(out), RecordChanges(out), kill]
        if int(os.environ.get("RANK", -1)) == int(opts.get("die_in_group", -2)):  # a second death: after the set is fixed
            die_building_the_group()
        if opts.get("die_donating") == "1":  # the donor of a joiner dies as it is about to send its replica
            die_donating()
        if "sigterm_at" in opts:  # after the change: rank 0's SIGTERM still stops every member at one step
            callbacks.append(SigtermRankZeroWhileOthersWait(out, int(opts["sigterm_at"])))
        if "pace" in opts:
            callbacks.append(Pace(out, float(opts["pace"]), int(opts.get("hold", -1)), opts.get("hold_in") == "checkpoint"))
        joins = opts.get("join") == "1"  # started alone, later: joins the run from a member's replica
        if joins or "resume" in opts:
            callbacks.append(SaveReplica(out, "start"))
        if "every" in opts:  # checkpoint sets, every `every` steps
            callbacks.append(ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_top_k=-1, every_n_train_steps=int(opts["every"])))
        t = trainer(out, strategy, 1, num_nodes=1 if joins else nodes, max_steps=steps, callbacks=callbacks, default_root_dir=out,
                    enable_checkpointing="every" in opts)
        batches = DataLoader(TensorDataset(torch.zeros(steps * nodes, 1)), batch_size=1)
        game = BilinearGame(opts["optimizer"], float(opts["lr"]), **json.loads(opts.get("kwargs", "{}")))
        t.fit(game, batches, ckpt_path="join" if joins else opts.get("resume"))
        return  # no barrier on the default group: it holds a rank that died

    elif scenario == "fabric_catch_up":  # the bilinear game in a Fabric loop, a slow rank catching up
        game = fabric_bilinear(out, opts, int(opts["steps"]))
        torch.save({"x": game.x.detach(), "y": game.y.detach()}, os.path.join(out, f"end_rank{game.rank}.pt"))
        return

    elif scenario == "fabric_bilinear":  # the bilinear game in a Fabric loop; saved at step 3, and resumed from there
        steps, saved = int(opts["steps"]), int(opts["save_at"])
        first = fabric_bilinear(out, opts, steps, save_at=saved)
        second = fabric_bilinear(out, opts, steps, resume_from=saved)
        torch.save({"x": first.x.detach(), "y": first.y.detach()}, os.path.join(out, f"end_rank{first.rank}.pt"))
        torch.save({"x": second.x.detach(), "y": second.y.detach()}, os.path.join(out, f"resumed_rank{second.rank}.pt"))
        return

    elif scenario == "shards":  # what each rank's datamodule hands it in one epoch
        data = GaussianMixtureDataModule("grid", num_samples=int(opts["n"]), batch_size=50, shard=opts["shard"], val_size=int(opts.get("val", 0)))
        t = trainer(out, decentralized(opts, consensus_every=0), devices, max_epochs=1, num_sanity_val_steps=0, limit_val_batches=0)
        t.fit(RecordBatches(out), datamodule=data)

    elif scenario == "evaluate":  # GANEvaluation during a short DPGAN run (or the same run without it)
        image = opts.get("dataset", "grid") == "digits"
        callbacks: list[Callback] = [SaveReplica(out)]
        if opts.get("eval", "1") == "1":
            callbacks.append(GANEvaluation(
                opts.get("dataset", "grid"), every_n_steps=10, num_samples=int(opts.get("samples", 400)),
                model=opts.get("model", "consensus"), output_dir=os.path.join(out, "eval"),
            ))
        strategy = decentralized(opts, consensus_every=5)
        logger = CSVLogger(out, name="log") if opts.get("logger", "csv") == "csv" else TensorBoardLogger(out, name="tb")
        t = pl.Trainer(
            accelerator="cpu", devices=devices, strategy=strategy, max_steps=int(opts.get("steps", 30)), logger=logger,
            callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )
        if image:
            gan = DPGAN(DCGANGenerator(8, channels=1, latent_dim=16, width=16), DCGANDiscriminator(8, channels=1, width=16), ema_decay=0.9)
            t.fit(gan, datamodule=DigitsDataModule(batch_size=32, val_size=360))
        else:
            gan = DPGAN(MLPGenerator(hidden=64), MLPDiscriminator(hidden=64), lr_g=1e-3, lr_d=1e-3)
            t.fit(gan, datamodule=GaussianMixtureDataModule("grid", num_samples=20_000, batch_size=64))

    elif scenario == "compile":  # torch.compile(DPGAN) under the strategy, as a user writes it; or the same run eager
        import torch._inductor.config as inductor_config

        torch.manual_seed(0)
        gan = DPGAN(MLPGenerator(latent_dim=16, hidden=128, output_scale=4.0), MLPDiscriminator(hidden=128), lr_g=3e-3, lr_d=3e-3,
                    ema_decay=0.99, optimizer_kwargs={"betas": (0.5, 0.9)})  # the command line's model
        # consensus and logs every 2 steps: the step's gossip, consensus measurement and logging all run
        t = trainer(out, decentralized(opts, consensus_every=2), devices, max_steps=int(opts["steps"]), callbacks=[SaveReplica(out)],
                    log_every_n_steps=2)
        data = GaussianMixtureDataModule("grid", num_samples=4000, batch_size=64)
        # inductor draws its own random numbers unless told to take eager's: then both runs draw the same noise
        with inductor_config.patch(fallback_random=True):
            t.fit(torch.compile(gan) if opts.get("compile") == "1" else gan, datamodule=data)
        with open(os.path.join(out, f"compiled_rank{t.global_rank}.json"), "w") as f:
            json.dump(compiled_functions(), f)
        torch._dynamo.reset()  # the next scenario compiles nothing of this one

    elif scenario == "grid":  # DPGAN with OptimisticAdam on the grid of 25 Gaussians
        strategy = decentralized(opts, consensus_every=int(opts.get("consensus_every", 50)))
        callbacks = [SaveReplica(out), Snapshots(out, int(opts.get("snapshot_every", 10**9))), NoiseAtFirstBatch(out)]
        if "save_at" in opts:
            callbacks.append(SaveReplica(out, when=f"step{opts['save_at']}"))
        if opts.get("count") == "1":
            callbacks.append(CountCollectives(out))
        if opts.get("strategy") == "ddp":  # centralized OSG (CPOSG): gradients all-reduced, same optimizer
            strategy = DDPStrategy(find_unused_parameters=int(opts.get("n_critic", 1)) > 1)
        else:
            callbacks.append(MessageCount(out))
        t = trainer(out, strategy, devices, max_steps=int(opts["steps"]), callbacks=callbacks, log_every_n_steps=int(opts.get("log_every", 1)))
        hidden = int(opts.get("hidden", 128))
        generator = MLPGenerator(latent_dim=int(opts.get("latent", 2)), hidden=hidden, output_scale=float(opts.get("output_scale", 1)))
        gan = DPGAN(
            generator, MLPDiscriminator(hidden=hidden), optimizer=opts.get("optimizer", "optimistic_adam"),
            lr_g=float(opts.get("lr", 1e-3)), lr_d=float(opts.get("lr", 1e-3)), optimizer_kwargs={"betas": (0.5, 0.9)},
            loss=opts.get("loss", "ns"), n_critic=int(opts.get("n_critic", 1)), ema_decay=float(opts.get("ema", 0)) or None,
            r1=float(opts.get("r1", 0)),
        )
        t.fit(gan, datamodule=GaussianMixtureDataModule("grid", batch_size=int(opts.get("batch_size", 128))))
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    _release(t)


def compiled_functions() -> list[str]:
    """The functions of DPGAN and of the step's machinery (optimizer, gossip, guard) that dynamo compiled a frame of."""
    import importlib
    import inspect
    import pkgutil

    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    import lightning_dpgan.gossip

    names = ["gan", "optim", "gossiper", "guard", "strategy", "mix_sets"]
    names += [f"gossip.{m.name}" for m in pkgutil.iter_modules(lightning_dpgan.gossip.__path__)]
    found = []
    for name in names:
        module = importlib.import_module(f"lightning_dpgan.{name}")
        members = [(n, m) for n, m in vars(module).items() if getattr(m, "__module__", None) == module.__name__]
        functions = [(n, f) for n, f in members if inspect.isfunction(f)]
        functions += [(f"{n}.{a}", f) for n, c in members if inspect.isclass(c) for a, f in vars(c).items() if inspect.isfunction(f)]
        for qualname, function in functions:
            code = inspect.unwrap(function).__code__
            if _debug_get_cache_entry_list(code):
                found.append(f"{name}.{qualname}")
    return found


def _release(t: pl.Trainer) -> None:
    """Between the fits of a suite: every rank is done with this one before the next starts."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
    gc.freeze()  # exiting would walk every object of torch and Lightning: seconds per rank
