"""``StepProgressBar``: Lightning's progress bar over the run's iterations, not over one epoch.

A worker's shard of a small dataset is an epoch of a few steps (digits on 8 workers: 5), and runs are measured in
steps (``max_steps``), so a bar that restarts every epoch says nothing about how far the run is.

Each update draws the bar once, with its numbers: where the output is not a terminal (a log file, a batch job),
every draw is a line of its own, so the step and its losses come together and an epoch's start or end draws nothing,
and the bar draws about :data:`LOG_LINES` times over the run instead of every step (the main job's 3,800).
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override


LOG_LINES = 100  # where the output is not a terminal: about this many progress lines per run


class StepProgressBar(TQDMProgressBar):
    """One bar from the first step to ``max_steps`` (per epoch when ``max_steps`` is not set)."""

    _every = 1  # steps between draws: the refresh rate on a terminal, max_steps / LOG_LINES elsewhere

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            super().on_train_epoch_start(trainer)
            return
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # the first epoch (or a resumed run's): the bar starts where the run is
            self._every = self.refresh_rate if sys.stdout.isatty() else max(self.refresh_rate, trainer.max_steps // LOG_LINES)
            bar.reset(total=trainer.max_steps)
            bar.initial = 0
            bar.set_description("Steps", refresh=False)
            self._set(trainer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if trainer.global_step % self._every == 0 or trainer.global_step == trainer.max_steps:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            self._set(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            super().on_train_epoch_end(trainer, pl_module)
        elif not self.train_progress_bar.disable:  # the bar goes on; the next update draws these numbers
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)

    def _set(self, trainer: pl.Trainer) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.refresh()
