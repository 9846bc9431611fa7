"""Which worker failed: every rank that loses a peer says so in the c10d store before it gives up.

A rank sees only its neighbours. When rank 2 of a ring of 4 dies, ranks 1 and 3 lose it; rank 0, the one that
reports to the user, then sees rank 1 or 3 leave, and would name them. So each rank that loses a peer (or a
collective) writes ``(its rank, the peer, whether it timed out)`` to the store of the default process group, which
every rank reaches (rank 0 or torchrun's agent hosts it), before it raises; and a failing rank follows the reports
from the peer it lost to the one that nobody heard from and that did not report itself: that is the worker named.

A lost peer may be alive and stuck behind another, or have given up a moment earlier (gloo closes a rank's
connections when one of its waits times out, before it has reported): every failing rank reads the reports
``REPORT_WAIT_S`` after writing its own. A collective names no peer: then the ranks that have not reported are named.

Every store operation is bounded by ``STORE_TIMEOUT_S`` (the store's host may be the stalled rank): without the
store the error names the rank's own peer, as before.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

#: how long a failing rank waits for the others' reports before it names a rank
REPORT_WAIT_S = 3.0
#: the longest any store operation may take once something has failed (the store's host may be stalled)
STORE_TIMEOUT_S = 2.0
_PREFIX = "lightning_dpgan/lost"


@dataclass(frozen=True)
class Loss:
    """What one rank lost: a ``peer`` (``None``: a collective, any rank), by a timeout or by the peer leaving."""

    rank: int
    peer: int | None
    timed_out: bool

    def encode(self) -> str:
        return f"{-1 if self.peer is None else self.peer}:{int(self.timed_out)}"

    @classmethod
    def decode(cls, rank: int, value: bytes) -> Loss:
        peer, timed_out = value.decode().split(":")
        return cls(rank, None if int(peer) < 0 else int(peer), timed_out == "1")


class PeerReports:
    """The losses of one process group's ranks, in a c10d store (``scope`` keeps groups and fits apart)."""

    def __init__(self, store: Any, world_size: int, scope: str) -> None:
        self.store, self.world_size, self.prefix = store, world_size, f"{_PREFIX}/{scope}/"
        with contextlib.suppress(Exception):
            store.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))  # we are failing: nothing else waits on it

    @classmethod
    def of(cls, group: Any) -> PeerReports | None:
        """The reports of ``group``'s ranks in the default group's store; ``None`` without one."""
        if not dist.is_available() or not dist.is_initialized():
            return None
        try:
            store = dist.distributed_c10d._get_default_store()
        except Exception:  # no store to share (another init method): the error names the rank's own peer
            return None
        scope = (getattr(group, "group_name", None) if group is not None else None) or "world"
        return cls(store, dist.get_world_size(), scope)

    def report(self, loss: Loss) -> None:
        with contextlib.suppress(Exception):  # the store's host may be the one that stalled
            self.store.set(f"{self.prefix}{loss.rank}", loss.encode())

    def read(self) -> dict[int, Loss]:
        losses: dict[int, Loss] = {}
        with contextlib.suppress(Exception):
            for rank in range(self.world_size):
                key = f"{self.prefix}{rank}"
                if self.store.check([key]):  # get() would wait for a key that is not there
                    losses[rank] = Loss.decode(rank, self.store.get(key))
        return losses

    def culprits(self, own: Loss) -> tuple[int, ...]:
        """Report ``own``, then name the ranks the reports lead to ``REPORT_WAIT_S`` later (empty when they say
        nothing more). The wait is for every case: a peer that timed out closes its connections before it reports."""
        self.report(own)
        time.sleep(REPORT_WAIT_S)
        return follow({**self.read(), own.rank: own}, own, self.world_size)


def follow(losses: dict[int, Loss], own: Loss, world_size: int) -> tuple[int, ...]:
    """From ``own``'s peer, go to the peer each reporting rank lost, until a rank that did not report: the one
    named. A collective names no peer: then every rank that has not reported is named."""
    loss, seen = own, {own.rank}
    while loss.peer is not None and loss.peer in losses and loss.peer not in seen:
        seen.add(loss.peer)
        loss = losses[loss.peer]
    if loss.peer is None:
        return tuple(r for r in range(world_size) if r not in losses)
    if loss.peer in seen:  # ranks that lost each other: nothing more to say than the own error
        return ()
    return (loss.peer,)


def ranks_phrase(ranks: tuple[int, ...]) -> str:
    """``rank 2``, ``ranks 1 and 2``, ``ranks 1, 2 and 3``."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return f"ranks {', '.join(map(str, ranks[:-1]))} and {ranks[-1]}"
