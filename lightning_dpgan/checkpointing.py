"""A ``ModelCheckpoint`` whose ``last.ckpt`` holds the model ``fit`` ended with, also in a run folder that moved."""

from __future__ import annotations

import os
from typing import Any

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

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning forgets the checkpoints it wrote when the folder they are in moved (the saved ``dirpath`` differs),
        and then writes ``last-v1.ckpt`` beside the old ``last.ckpt``: a resume in the moved folder keeps one
        ``last.ckpt`` and prunes its own older checkpoints, as it would have where it was written."""
        saved_dir = state_dict.get("dirpath")
        if self.dirpath is None or saved_dir is None or saved_dir == self.dirpath:
            super().load_state_dict(state_dict)
            return
        moved = lambda path: os.path.join(self.dirpath, os.path.basename(path)) if path else path  # noqa: E731
        state = dict(state_dict, dirpath=self.dirpath)
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if key in state:
                state[key] = moved(state[key])
        if "best_k_models" in state:
            state["best_k_models"] = {moved(path): score for path, score in state["best_k_models"].items()}
        super().load_state_dict(state)

    @override
    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """Lightning's ``ckpt_path="last"`` takes the newest *file* of these; this hook (private: Lightning has no
        public one for it) gives it the newest *step*, which a copied or moved folder's times do not show."""
        newest = newest_last(str(self.dirpath)) if self.dirpath else None
        return {newest} if newest else super()._find_last_checkpoints(trainer)


def newest_last(folder: str) -> str | None:
    """The ``last*.ckpt`` in ``folder`` at the highest step (a folder written before it moved may hold
    ``last.ckpt`` and a newer ``last-v1.ckpt``; a copy's file time says nothing), or ``None``; a file that is no
    checkpoint raises :class:`~lightning_dpgan.loading.CheckpointError`."""
    from lightning_dpgan.replicas import read_main

    steps = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.startswith("last") and name.endswith(".ckpt"):
            path = os.path.join(folder, name)
            steps[path] = read_main(path, mmap=True).get("global_step")
    if not steps:
        return None
    return max(steps, key=lambda path: (int(steps[path]) if isinstance(steps[path], int) else -1, os.path.getmtime(path)))
