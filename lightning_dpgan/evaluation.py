"""``GANEvaluation``: quality numbers and pictures of a DPGAN while it trains, for the consensus or every replica.

* ``model="consensus"`` (default): the generator's parameters and buffers (BatchNorm statistics too) are
  averaged over ranks for the evaluation and put back afterwards; every rank generates its share of the
  samples and the metrics are synchronised, so the numbers describe the one average model.
* ``model="local"``: every replica is evaluated on its own samples; the logs hold the mean and the worst.

Metrics live in this callback, not in the LightningModule, so they are never gossiped, averaged or
checkpointed. Every rank calls ``compute()`` (a collective). The noise is :func:`evaluation_noise`: the same
``num_samples`` vectors at every evaluation, split over the ranks, and the same ones ``validate`` scores a
checkpoint with, so a run's last evaluation and ``validate`` on its checkpoint agree; it comes from its own seeded
generator, so evaluating does not change the training run. Pictures and ``evaluation.csv`` go to ``output_dir`` (the
logger's folder by default) on rank 0, and images are also sent to TensorBoard or wandb when those log.
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from lightning_dpgan.checks import check_choice, check_int
from lightning_dpgan.data.gaussians import MIXTURES, mixture_modes
from lightning_dpgan.metrics.image_quality import (
    ensure_inception_weights,
    fid_metric,
    inception_score_metric,
    to_unit_range,
    uses_embedded_extractor,
)
from lightning_dpgan.metrics.mode_coverage import ModeCoverage

MODELS = ("consensus", "local")
#: for each logged number, whether a larger value is better (decides the worst replica)
HIGHER_IS_BETTER = {"modes": True, "high_quality": True, "reverse_kl": False, "fid": False, "inception_score": True}


def members(trainer: pl.Trainer) -> tuple[int, int]:
    """This rank's index among the workers in the run and their number: the global rank and world size, or a live
    run's current members once they changed (``strategy.members``; a worker that joined sees one process alone)."""
    return getattr(trainer.strategy, "members", None) or (trainer.global_rank, trainer.world_size)


def _gather_rows(strategy: Any, tensor: Tensor) -> list[Tensor]:
    """Every rank's ``tensor`` (a metric state; its first dimension may differ between ranks), in rank order."""
    if tensor.dim() == 0:
        return list(strategy.all_gather(tensor.reshape(1)).reshape(-1).unbind(0))
    shape = torch.tensor(tensor.shape, dtype=torch.long, device=tensor.device)
    shapes = strategy.all_gather(shape).reshape(-1, tensor.dim())
    if bool((shapes == shape).all()):
        return list(strategy.all_gather(tensor.contiguous()).reshape(-1, *tensor.shape).unbind(0))
    longest = int(shapes[:, 0].max())
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: len(tensor)] = tensor
    rows = strategy.all_gather(padded).reshape(-1, *padded.shape)
    return [row[: int(n)] for row, n in zip(rows, shapes[:, 0])]


class GANEvaluation(pl.Callback):
    """Evaluate the generator every ``every_n_steps`` optimizer steps and when training ends.

    Args:
        dataset: ``ring``/``grid`` (mode coverage and a scatter plot) or an image dataset (FID, IS, image grid):
            ``digits``/``mnist5k`` use the shipped extractor, anything else torchmetrics' Inception. ``None``: the
            datamodule's ``name``.
        every_n_steps: 0 evaluates only at the end.
        num_samples: generated samples per evaluation (the whole ensemble's in consensus mode, each replica's in
            local mode). PacGAN's mode numbers use 2500.
        model: ``consensus`` or ``local``.
        use_ema: evaluate ``generator_ema`` when the module has one.
        num_real: at most this many real images (the datamodule's ``val_set``, else ``train_set``) for FID.
        output_dir: where PNGs and ``evaluation.csv`` go; default: the logger's folder.
        seed: the evaluation noise.
        inception_weights: for natural images, torch-fidelity's Inception weights file
            (``weights-inception-2015-12-05-6726825d.pth``); ``None`` downloads it on first use into torch's hub
            cache (:func:`~lightning_dpgan.metrics.ensure_inception_weights` says where).
    """

    def __init__(
        self,
        dataset: str | None = None,
        every_n_steps: int = 500,
        num_samples: int = 2500,
        model: str = "consensus",
        use_ema: bool = True,
        num_real: int = 10_000,
        output_dir: str | None = None,
        seed: int = 1234,
        inception_weights: str | None = None,
    ) -> None:
        check_choice("evaluation model", model, MODELS)
        for name, value, low in (("every_n_steps", every_n_steps, 0), ("num_samples", num_samples, 1), ("num_real", num_real, 2)):
            check_int(name, value, low)
        self.dataset, self.every_n_steps, self.num_samples, self.model = dataset, every_n_steps, num_samples, model
        self.use_ema, self.num_real, self.output_dir, self.seed = use_ema, num_real, output_dir, seed
        self.inception_weights = inception_weights
        self.metrics: dict[str, Metric] = {}
        self.history: list[dict[str, float]] = []
        self._real_done = False
        self._last_step = -1
        self._train_start = time.perf_counter()
        self._evaluating_s = 0.0

    @property
    def is_mixture(self) -> bool:
        return self.dataset in MIXTURES

    def check(self, datamodule: Any) -> None:
        """Before any worker starts: the metrics this evaluation needs can be built here (for natural images, the
        Inception weights are there or can be downloaded now). Raises ``ValueError`` saying what to do."""
        dataset = self.dataset or getattr(datamodule, "name", None)
        if dataset and dataset not in MIXTURES and not uses_embedded_extractor(dataset):
            ensure_inception_weights(self.inception_weights)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._build_metrics(trainer.datamodule, pl_module.device, sync=self.model == "consensus")
        if self.output_dir is None:
            self.output_dir = trainer.log_dir or trainer.default_root_dir

    def _build_metrics(self, datamodule: Any, device: torch.device, sync: bool) -> None:
        if self.dataset is None:
            self.dataset = getattr(datamodule, "name", None)
            if not self.dataset:
                raise ValueError("GANEvaluation needs dataset=..., or a datamodule with a name (e.g. 'grid', 'digits')")
        if self.is_mixture:
            self.metrics = {"coverage": ModeCoverage(*mixture_modes(self.dataset), sync_on_compute=sync)}
        else:
            self.metrics = {
                "fid": fid_metric(self.dataset, self.inception_weights, sync_on_compute=sync),
                "inception_score": inception_score_metric(self.dataset, self.inception_weights, sync_on_compute=sync),
            }
        for metric in self.metrics.values():
            metric.to(device)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start, self._evaluating_s = time.perf_counter(), 0.0
        if not self.history and trainer.global_step > 0 and self.output_dir is not None:
            # resumed into the directory of the run it continues: keep the evaluations it made up to here
            rows = _read_rows(os.path.join(self.output_dir, "evaluation.csv"))
            self.history = [row for row in rows if row["step"] <= trainer.global_step]

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """One evaluation (a collective: every rank must call it); returns what was logged.

        ``evaluation.csv`` also gets ``train_s``: seconds of training so far, evaluations excluded (time to quality).
        """
        started = time.perf_counter()
        train_s = started - self._train_start - self._evaluating_s
        self._last_step = trainer.global_step
        generator = self._generator(pl_module)
        rank, world_size = members(trainer)
        self._sync_over_members(trainer, world_size)
        if not self.is_mixture and not self._real_done:
            split = (rank, world_size) if self.model == "consensus" else (0, 1)
            self._add_real_images(trainer.datamodule, pl_module.device, *split)
        noise = evaluation_noise(self.seed, self.num_samples, pl_module.latent_dim)
        if self.model == "consensus":
            noise = noise.tensor_split(world_size)[rank]  # the ranks score num_samples together
        with self._consensus(trainer, generator):
            samples = self._generate(generator, pl_module, noise)
        if not self._all_finite(trainer, samples):
            # a diverged replica: the strategy stops the run within a few steps; scoring NaN would only raise
            rank_zero_warn(f"evaluation at step {trainer.global_step} skipped: the generator's samples are not finite")
            self._evaluating_s += time.perf_counter() - started
            return {}
        logged = self._summarise(trainer, self._score(samples))
        # a strategy whose replicas differ (DecentralizedStrategy) says how far apart they are
        consensus = trainer.strategy.measure_consensus() if hasattr(trainer.strategy, "measure_consensus") and world_size > 1 else {}
        logged.update({f"consensus/{k}": v for k, v in consensus.items()})
        lost = getattr(trainer.strategy, "member_lost", None)
        if lost is not None:  # a live run lost a member during it: the gathers gave this worker's own values
            rank_zero_warn(f"evaluation at step {trainer.global_step} skipped: {lost}")
            self._evaluating_s += time.perf_counter() - started
            return {}
        shown, title = self._picture_samples(trainer, samples)
        if trainer.is_global_zero:
            self.history.append({"step": trainer.global_step, "train_s": train_s, **logged})
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"eval/{k}" if not k.startswith("consensus/") else k: v for k, v in logged.items()}, step=trainer.global_step)
            self._save_picture(trainer, shown, title)
            self._write_history(trainer)  # after every evaluation: a run stopped early keeps what it measured
        self._evaluating_s += time.perf_counter() - started
        return logged

    def _sync_over_members(self, trainer: pl.Trainer, count: int) -> None:
        """Once the members changed (a live run lost or gained a worker), the metrics gather their states over the
        members (``trainer.strategy.all_gather``), not over torch's default group, which still holds the worker that
        left, and which a worker that joined does not have."""
        if getattr(trainer.strategy, "members", None) is not None:
            for metric in self.metrics.values():
                metric.dist_sync_fn = lambda tensor, group=None: _gather_rows(trainer.strategy, tensor)
                metric.distributed_available_fn = lambda: count > 1

    @staticmethod
    def _all_finite(trainer: pl.Trainer, samples: Tensor) -> bool:
        """Whether every rank's samples are finite (every rank gets the same answer)."""
        finite = torch.tensor(float(torch.isfinite(samples).all()), device=samples.device)
        if members(trainer)[1] > 1:
            finite = trainer.strategy.reduce(finite, reduce_op=torch.distributed.ReduceOp.MIN)
        return bool(finite > 0)

    def evaluate_module(self, pl_module: pl.LightningModule, datamodule: Any, picture: str | None = None) -> dict[str, float]:
        """Score one model in this process alone, with no trainer (the ``validate`` verb); ``picture``: a PNG path."""
        self._build_metrics(datamodule, pl_module.device, sync=False)
        if not self.is_mixture:
            self._add_real_images(datamodule, pl_module.device, 0, 1)
        noise = evaluation_noise(self.seed, self.num_samples, pl_module.latent_dim)
        samples = self._generate(self._generator(pl_module), pl_module, noise)
        if picture is not None:
            shown = f"all {self.num_samples} scored samples" if self.is_mixture else f"the first {min(64, self.num_samples)} of {self.num_samples} scored samples"
            save_samples_picture(samples, self.dataset, picture, f"{shown}")
        return self._score(samples)

    def _generator(self, pl_module: pl.LightningModule) -> nn.Module:
        ema = getattr(pl_module, "generator_ema", None)
        return ema if self.use_ema and ema is not None else pl_module.generator

    def _score(self, samples: Tensor) -> dict[str, float]:
        for metric in self.metrics.values():
            metric.reset()
        if self.is_mixture:
            self.metrics["coverage"].update(samples)
            return {k: float(v) for k, v in self.metrics["coverage"].compute().items()}
        self.metrics["fid"].update(samples, real=False)
        self.metrics["inception_score"].update(samples if uses_embedded_extractor(self.dataset) else to_unit_range(samples))
        return {"fid": float(self.metrics["fid"].compute()), "inception_score": float(self.metrics["inception_score"].compute()[0])}

    def _summarise(self, trainer: pl.Trainer, values: dict[str, float]) -> dict[str, float]:
        if self.model == "consensus" or members(trainer)[1] == 1:
            return values
        gathered = trainer.strategy.all_gather(torch.tensor(list(values.values()), dtype=torch.float64, device=trainer.strategy.root_device))
        out: dict[str, float] = {}
        for i, name in enumerate(values):
            column = gathered[:, i]
            out[f"{name}_mean"] = float(column.mean())
            out[f"{name}_worst"] = float(column.min() if HIGHER_IS_BETTER[name] else column.max())
        return out

    @contextlib.contextmanager
    def _consensus(self, trainer: pl.Trainer, generator: nn.Module) -> Iterator[None]:
        """The generator averaged over ranks (``trainer.strategy.reduce``, any strategy) while the block runs."""
        if self.model != "consensus" or members(trainer)[1] == 1:
            yield
            return
        tensors = [p.data for p in generator.parameters()] + [b for b in generator.buffers() if b.is_floating_point()]
        saved = [t.clone() for t in tensors]
        with torch.no_grad():
            for t in tensors:
                t.copy_(trainer.strategy.reduce(t.clone(), reduce_op="mean"))
        try:
            yield
        finally:
            with torch.no_grad():
                for t, s in zip(tensors, saved):
                    t.copy_(s)

    @staticmethod
    def _generate(generator: nn.Module, pl_module: pl.LightningModule, noise: Tensor) -> Tensor:
        was_training = generator.training
        generator.eval()
        try:
            with torch.no_grad():
                noise = noise.to(pl_module.device)
                return torch.cat([generator(chunk) for chunk in noise.split(512)]).float()
        finally:
            generator.train(was_training)

    def _picture_samples(self, trainer: pl.Trainer, samples: Tensor) -> tuple[Tensor, str]:
        """What the picture shows, and its title saying so (a collective for a mixture's consensus evaluation).

        A mixture's scatter shows every scored sample: the ranks' shares are gathered. An image grid shows the first
        64, which rank 0 holds (the shares are consecutive slices of the same noise ``validate`` uses)."""
        step = f"step {trainer.global_step}"
        if self.model == "local":
            return samples, f"{step}: rank {trainer.global_rank}'s replica, {len(samples)} samples"
        if not self.is_mixture:
            return samples, f"{step}: the first {min(64, len(samples))} of {self.num_samples} scored samples"
        rank, world_size = members(trainer)
        if world_size > 1:  # each rank's share in its place, zeros elsewhere, summed: exact
            start = int(torch.arange(self.num_samples).tensor_split(world_size)[rank][0]) if len(samples) else 0
            everything = torch.zeros(self.num_samples, *samples.shape[1:], dtype=samples.dtype, device=samples.device)
            everything[start : start + len(samples)] = samples
            samples = trainer.strategy.reduce(everything, reduce_op="sum")
        return samples, f"{step}: all {len(samples)} scored samples"

    def _add_real_images(self, datamodule: Any, device: torch.device, rank: int, world_size: int) -> None:
        """FID's real statistics; ranks split the images when the metric is synchronised (each is seen once)."""
        real_set = getattr(datamodule, "val_set", None) or getattr(datamodule, "train_set", None)
        if real_set is None:
            raise ValueError("GANEvaluation needs a datamodule with val_set or train_set for FID's real statistics")
        indices = list(range(min(len(real_set), self.num_real)))[rank::world_size]
        for start in range(0, len(indices), 512):
            batch = torch.stack([real_set[i][0] for i in indices[start : start + 512]]).to(device)
            self.metrics["fid"].update(batch, real=True)
        self._real_done = True

    # ------------------------------------------------------------------ pictures
    def _save_picture(self, trainer: pl.Trainer, samples: Tensor, title: str) -> None:
        assert self.output_dir is not None
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, f"samples_step{trainer.global_step:07d}.png")
        save_samples_picture(samples, self.dataset, path, title)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                from torchvision.io import read_image

                logger.experiment.add_image("samples", read_image(path)[:3], trainer.global_step)
            elif isinstance(logger, WandbLogger):
                logger.log_image("samples", [path], step=trainer.global_step)

    def _write_history(self, trainer: pl.Trainer | None = None) -> None:
        assert self.output_dir is not None
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        path = os.path.join(self.output_dir, "evaluation.csv")
        with open(path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)
        os.replace(path + ".tmp", path)  # readers never see a half-written table
        curves = (_logged_consensus(trainer) if trainer is not None else {}) or {
            k: [(row["step"], row[k]) for row in self.history if k in row] for k in keys if k.startswith("consensus/")
        }
        if curves:
            _plot_consensus(curves, os.path.join(self.output_dir, "consensus.png"))


def evaluation_noise(seed: int, n: int, latent_dim: int) -> Tensor:
    """The ``n`` latent vectors an evaluation scores: ``torch.randn`` on the CPU from ``seed`` alone.

    Every evaluation of a run draws the same vectors (its curve follows the model, not the noise); the ranks of a
    consensus evaluation take consecutive shares of them; ``validate`` scores a checkpoint with all of them. So the
    last evaluation of a run and ``validate`` on its ``last.ckpt`` score the same samples, on any device.
    """
    return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))


def _logged_consensus(trainer: pl.Trainer) -> dict[str, list[tuple[float, float]]]:
    """The strategy's consensus distances in the CSV logger's ``metrics.csv``, every ``consensus_every`` steps (of
    the state it mixes). The evaluations' rows measure the live parameters, another quantity: they are left out
    unless the strategy logged none. Empty without a CSV logger (the evaluations' own rows are plotted then)."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            logger.save()  # rows the logger still buffers (flush_logs_every_n_steps) go to the file first
            rows = _read_rows(os.path.join(logger.log_dir, "metrics.csv"))
            rows = [row for row in rows if not any(k.startswith("eval/") for k in row)] or rows
            keys = dict.fromkeys(k for row in rows for k in row if k.startswith("consensus/"))
            return {k: [(row["step"], row[k]) for row in rows if k in row and "step" in row] for k in keys}
    return {}


def _read_rows(path: str) -> list[dict[str, float]]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return [{k: int(float(v)) if k == "step" else float(v) for k, v in row.items() if k and v not in ("", None)} for row in csv.DictReader(f)]


def save_samples_picture(samples: Tensor, dataset: str, path: str, title: str = "") -> None:
    """A scatter of every sample over the true modes (mixtures) or an 8×8 grid of the first 64 images, as a PNG large
    enough to see (small images are enlarged without smoothing). ``title`` should say which samples these are; it
    is also the PNG's ``Title`` text (``PIL.Image.open(path).text``)."""
    if dataset in MIXTURES:
        _scatter(samples.detach().cpu().numpy(), dataset, path, title)
        return
    from torchvision.utils import make_grid

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = make_grid(to_unit_range(samples[:64].detach().float()).cpu(), nrow=8, padding=1, pad_value=1.0)
    fig, ax = plt.subplots(figsize=(6.4, 6.8))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{dataset}: {title}" if title else dataset)
    fig.tight_layout()
    fig.savefig(path + ".tmp", dpi=100, format="png", metadata={"Title": ax.get_title()})
    plt.close(fig)
    os.replace(path + ".tmp", path)


def _scatter(points: Any, mixture: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes, _ = mixture_modes(mixture)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.4, label=f"generated ({len(points)})")
    ax.scatter(modes[:, 0], modes[:, 1], s=40, marker="x", color="red", label=f"true modes ({len(modes)})")
    limit = 1.0 + abs(modes).max() * 1.15
    ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal", xlabel="x₁ (first coordinate)", ylabel="x₂ (second coordinate)")
    ax.set_title(f"{mixture}: {title}" if title else mixture, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp", dpi=100, format="png", metadata={"Title": ax.get_title(), "Description": f"{len(points)} points"})
    plt.close(fig)
    os.replace(path + ".tmp", path)


def _plot_consensus(curves: dict[str, list[tuple[float, float]]], path: str) -> None:
    """One line per submodule; a marker per point only when there are few (a run logs one every 50 steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(steps) <= 40 else None, label=name.removeprefix("consensus/"))
    positive = [v for points in curves.values() for _, v in points if v > 0]
    if positive:  # logarithmic; linear near 0 when a value is 0 (2 replicas of a ring mix to their exact average)
        zeros = len(positive) < sum(len(points) for points in curves.values())
        ax.set_yscale("symlog", linthresh=min(positive)) if zeros else ax.set_yscale("log")
    ax.set(xlabel="optimizer step", ylabel="mean_i ||x_i - mean(x)||²", title="consensus distance")
    ax.legend()
    # the PNG says which steps it plots (PIL: Image.open(path).text["Description"])
    described = "; ".join(f"{name}: steps {' '.join(str(int(s)) for s, _ in points)}" for name, points in curves.items())
    fig.savefig(path + ".tmp", dpi=100, format="png", metadata={"Description": described})
    plt.close(fig)
    os.replace(path + ".tmp", path)
