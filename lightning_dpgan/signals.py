"""SIGTERM stops a multi-process fit instead of hanging it: workarounds for Lightning 2.6's SIGTERM handling.

Lightning (2.6) answers SIGTERM with a handler that forwards the signal to the launcher's child processes and then
broadcasts a flag from rank 0 *inside the handler*. Python runs a handler only between bytecodes, so a rank that is
blocked in a collective or a gossip exchange cannot run its own until that call returns, and the call waits for
rank 0, which is waiting in the handler's broadcast: a ``DecentralizedStrategy`` run hangs until the gossip
timeout, and a ``DDPStrategy`` run fails on mismatched collectives. Here the handler forwards the signal and
records it, with no collective. What happens next is the strategy's: ``DecentralizedStrategy`` announces a stop
step through its gossip, so that every rank stops after the same step and saves a checkpoint there; with any other
strategy (:class:`StopOnSigterm`) every rank ends the step it is in and exits.

Lightning also broadcasts rank 0's SIGTERM flag at the start of every training step, a global synchronisation that
the strategy's own agreement makes unnecessary: :func:`skip_step_broadcast` removes it for ``DecentralizedStrategy``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


def replace_sigterm_notifier(trainer: pl.Trainer, on_signal: Callable[[], None]) -> bool:
    """Swap Lightning's SIGTERM notifier, in the handler the trainer registered, for one that forwards the signal to
    the launcher's children and calls ``on_signal``, with no collective. Returns whether it was swapped.

    Other SIGTERM handlers the trainer composed with it (yours, SLURM's) stay. Call it after the trainer registered
    its handlers (they are registered after ``Strategy.setup``; ``on_train_start`` is after that).
    """
    if threading.current_thread() is not threading.main_thread():
        return False  # signal handlers can only be changed from the main thread
    connector = trainer._signal_connector
    registered = signal.getsignal(signal.SIGTERM)
    handlers = getattr(registered, "signal_handlers", None)  # Lightning's _HandlersCompose
    if not isinstance(handlers, list) or connector._sigterm_notifier_fn not in handlers:
        return False  # not Lightning's handler (another version, or already swapped): leave it alone
    forwarded = False

    def notify_without_collective(signum: int, frame: FrameType | None) -> None:
        nonlocal forwarded
        if not forwarded and trainer.strategy.launcher is not None:
            forwarded = True
            trainer.strategy.launcher.kill(signum)  # rank 0 of a popen/spawn launch: its children stop too
        on_signal()

    handlers[handlers.index(connector._sigterm_notifier_fn)] = notify_without_collective
    return True


def skip_step_broadcast(trainer: pl.Trainer) -> None:
    """Remove Lightning's per-step broadcast of rank 0's SIGTERM flag from this fit's training loop."""
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None  # type: ignore[method-assign]


class StopOnSigterm(Callback):
    """For strategies other than ``DecentralizedStrategy`` (the CLI adds it to DDP runs): a SIGTERM makes every rank
    end the step it is in and exit, instead of hanging on Lightning's in-handler broadcast."""

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def stop() -> None:
            trainer._signal_connector.received_sigterm = True

        replace_sigterm_notifier(trainer, stop)
