"""The compute time of one training step, measured: the time model's one input that comes from this machine.

A step is what one worker does between two mixes: the forward and backward of both players and the optimizer's
update, run by a plain Lightning ``Trainer`` on one CPU process with no strategy, so no communication is in it. The
threads default to one, as on the emulated hosts and under Lightning's launcher with one process per core; give
more for a host with several cores per worker. The first ``warmup`` steps (allocation, the data loader's start)
are left out; an iteration is the time from one step's end to the next's (the next batch loaded, the
step, Lightning's loop), and the median counts, so one step disturbed by the machine's other work does not.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from lightning_dpgan.checks import check_int


def step_seconds(model: Any, datamodule: Any, steps: int = 20, warmup: int = 5, threads: int = 1) -> float:
    """The median wall seconds of one training step of ``model`` on ``datamodule``, on one process."""
    import lightning.pytorch as pl
    import torch

    check_int("steps", steps, 1)
    check_int("warmup", warmup, 0)
    check_int("threads", threads, 1)
    stamps: list[float] = []

    class _Stamps(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            stamps.append(time.perf_counter())

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=warmup + steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[_Stamps()],
        )
        trainer.fit(model, datamodule=datamodule)
    finally:
        torch.set_num_threads(previous)
    durations = [end - start for start, end in zip(stamps, stamps[1:])]  # a whole iteration: loading, step, loop
    if len(durations) < warmup + steps - 1:
        raise RuntimeError(f"the compute probe ran {len(durations)} steps, {warmup + steps} asked")
    return statistics.median(durations[max(0, warmup - 1):])
