"""A ``ModelCheckpoint`` whose ``last.ckpt`` holds the model ``fit`` ended with."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


class FinalModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``; with ``save_last``, ``last.ckpt`` is also written when training ends.

    Lightning writes ``last.ckpt`` at the end of training only if it saved nothing during it, so with
    ``every_n_train_steps=1000`` a run of 2500 iterations left ``last.ckpt`` at iteration 2000, and ``validate``,
    ``sample`` and a resume all took a model 500 iterations older than the one ``fit`` reported on.
    """

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # skips a step already saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
