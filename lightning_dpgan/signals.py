"""SIGTERM stops a multi-process fit instead of hanging it: a workaround for Lightning 2.6's SIGTERM handler.

Lightning (2.6) answers SIGTERM with a handler that forwards the signal to the launcher's child processes and then
broadcasts a flag from rank 0 *inside the handler*. Python runs a handler only between bytecodes, so a rank that is
blocked in a collective or a gossip exchange cannot run its own until that call returns, and the call waits for
rank 0, which is waiting in the handler's broadcast: a ``DecentralizedStrategy`` run hangs until the gossip
timeout, and a ``DDPStrategy`` run fails on mismatched collectives. Here the handler forwards the signal and sets
the flag, with no collective: every rank ends the step it is in (the training loop checks the flag after every
step) and exits, and a rank still waiting on one that has exited gets a closed connection instead of a hang.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


def stop_on_sigterm_without_collectives(trainer: pl.Trainer) -> None:
    """Swap Lightning's SIGTERM notifier, in the handler the trainer registered, for one without a broadcast.

    Other SIGTERM handlers the trainer composed with it (yours, SLURM's) stay. Call it after the trainer registered
    its handlers (they are registered after ``Strategy.setup``; ``on_train_start`` is after that).
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be changed from the main thread
    connector = trainer._signal_connector
    registered = signal.getsignal(signal.SIGTERM)
    handlers = getattr(registered, "signal_handlers", None)  # Lightning's _HandlersCompose
    if not isinstance(handlers, list) or connector._sigterm_notifier_fn not in handlers:
        return  # not Lightning's handler (another version, or already swapped): leave it alone

    def notify_without_collective(signum: int, frame: FrameType | None) -> None:
        if not connector.received_sigterm and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)  # rank 0 of a popen/spawn launch: its children stop too
        connector.received_sigterm = True

    handlers[handlers.index(connector._sigterm_notifier_fn)] = notify_without_collective


class StopOnSigterm(Callback):
    """:func:`stop_on_sigterm_without_collectives` for any strategy (the CLI adds it; ``DecentralizedStrategy``
    applies it itself)."""

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stop_on_sigterm_without_collectives(trainer)
