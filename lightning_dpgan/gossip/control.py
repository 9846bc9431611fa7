"""The header every gossip message carries: its step, and what its sender knows of a stop.

Stopping every replica at the same step needs agreement, and agreement by a global collective on every step would
make every worker wait for the slowest. Instead a worker that must stop (SIGTERM, a non-finite value) *announces*
a stop step far enough ahead, and every message carries the earliest announcement its sender has heard. News
travels one hop per round, so an announcement made ``flood_rounds`` rounds (converted to steps) before its step
reaches every worker in time, and all of them stop after the same step. Concurrent announcements resolve to the
earliest (by step, then origin step, then origin rank), which every worker also hears in time.

The tag lets a receiver check that a message belongs to the step it is mixing: a replica never mixes a message of
another step, nor one message twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

HEADER_BYTES = 64  # eight int64 fields, keeping the payload after it aligned for any dtype
_FIELDS = 8
_NONE = -1


class StopReason(IntEnum):
    SIGNAL = 1  # SIGTERM (or another stop request of the whole run)
    NONFINITE = 2  # a non-finite parameter or loss; detail: the submodule's index


@dataclass(frozen=True, order=True)
class Stop:
    """Every worker stops after finishing step ``step``; announced by ``origin_rank`` at its step ``origin_step``."""

    step: int
    origin_step: int
    origin_rank: int
    reason: int
    detail: int = 0


class Control:
    """One worker's knowledge of stop announcements, and the header of its messages."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.stop: Stop | None = None

    def announce(self, stop: Stop) -> None:
        if self.stop is None or stop < self.stop:
            self.stop = stop

    def write(self, message: Tensor, tag: int) -> None:
        """Fill the header of a message (``uint8``, header first) with its step ``tag`` and the stop known now."""
        stop = self.stop
        values = [tag, _NONE, 0, 0, 0, 0, 0, 0] if stop is None else [
            tag, stop.step, stop.origin_step, stop.origin_rank, stop.reason, stop.detail, 0, 0
        ]
        header = message[..., :HEADER_BYTES].view(torch.int64)
        if header.device.type == "cpu":
            header.copy_(torch.tensor(values, dtype=torch.int64))
        else:
            header.copy_(torch.tensor(values, dtype=torch.int64), non_blocking=True)

    def read(self, messages: Tensor) -> list[int]:
        """Merge the stops announced in received messages (rows, header first); returns their tags."""
        rows = messages[..., :HEADER_BYTES].view(torch.int64).reshape(-1, _FIELDS).tolist()
        for row in rows:
            if row[1] != _NONE:
                self.announce(Stop(*row[1:6]))
        return [row[0] for row in rows]

    @staticmethod
    def peek(message: Tensor) -> int:
        """The step tag of one received message, without taking in its stop."""
        return int(message[..., :HEADER_BYTES].view(torch.int64).reshape(-1, _FIELDS)[0, 0])

    def state_dict(self) -> dict[str, list[int] | None]:
        stop = self.stop
        return {"stop": None if stop is None else [stop.step, stop.origin_step, stop.origin_rank, stop.reason, stop.detail]}
