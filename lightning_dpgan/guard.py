"""Non-finite values end a run, on every rank at the same step, before a checkpoint can keep them.

A diverged replica (an overflowing learning rate, a NaN loss) otherwise trains on in NaN, and its checkpoints
rotate the last good one out. :class:`~lightning_dpgan.DecentralizedStrategy` checks every state it mixes and
agrees on the stop through its gossip (:mod:`lightning_dpgan.gossip.control`); :class:`NonFiniteGuard` does the
same for any other strategy (DDP) with one small all-gather per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override


class NonFiniteError(RuntimeError):
    """A non-finite loss or parameter: every rank stopped, and no checkpoint was written after it appeared."""


def first_nonfinite(tensors: Sequence[Tensor]) -> int | None:
    """The index of the first tensor holding a NaN or an infinity, or ``None``.

    One fused norm per tensor first (a NaN or an infinity makes the norm non-finite); only when a norm is not
    finite, which an overflow of the norm itself can also cause, is that tensor checked element by element.
    """
    floating = [(i, t) for i, t in enumerate(tensors) if t.is_floating_point()]
    if not floating:
        return None
    norms = torch.stack(torch._foreach_norm([t.detach() for _, t in floating]))
    if bool(torch.isfinite(norms).all()):
        return None
    for (i, t), norm in zip(floating, norms.tolist()):
        if not torch.isfinite(torch.tensor(norm)) and not bool(torch.isfinite(t).all()):
            return i
    return None


def nonfinite_message(player: str, rank: int, step: int, stopped: int | None = None) -> str:
    stop = f"; every rank stopped after step {stopped}" if stopped is not None else "; every rank stopped"
    return (
        f"non-finite values in {player} on rank {rank} at optimizer step {step}{stop}, and no checkpoint was written "
        f"after they appeared (lower the learning rate, or resume from the last checkpoint)"
    )


def _players(module: pl.LightningModule) -> list[tuple[str, list[Tensor]]]:
    groups: dict[str, list[Tensor]] = {}
    for name, p in module.named_parameters():
        groups.setdefault(name.split(".", 1)[0], []).append(p)
    return list(groups.items())


class NonFiniteGuard(Callback):
    """For strategies other than ``DecentralizedStrategy``: after every training batch, check the loss (if the step
    returned one) and the parameters; if any rank holds a non-finite value, every rank raises
    :class:`NonFiniteError` naming the rank, the step and the top-level submodule. One all-gather of a few numbers
    per step: under DDP every step is a global synchronisation anyway."""

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        players = _players(pl_module)
        bad = -1
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            bad = len(players)  # "the loss"
        else:
            for index, (_, tensors) in enumerate(players):
                if first_nonfinite(tensors) is not None:
                    bad = index
                    break
        report = torch.tensor([bad, trainer.global_rank], dtype=torch.long, device=trainer.strategy.root_device)
        gathered = trainer.strategy.all_gather(report) if trainer.world_size > 1 else report[None]
        rows = [row for row in gathered.reshape(-1, 2).tolist() if row[0] >= 0]
        if rows:
            index, rank = rows[0]
            player = "the loss" if index == len(players) else f"the {players[index][0]}"
            raise NonFiniteError(nonfinite_message(player, rank, trainer.global_step, trainer.global_step))
