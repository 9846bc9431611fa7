"""An in-process transport: N gossip engines in N threads of one process, exchanging through mailboxes.

It implements :class:`lightning_dpgan.gossip.Transport` with buffered sends (a send completes when posted, its data
copied then) and receives and collectives that block until their counterpart arrives. The engine's arithmetic,
headers, stop announcements and variants can then be tested in one process, fast, besides the real gloo tests.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

from lightning_dpgan.gossip.transport import GossipPeerError, Posted


class Hub:
    """The mailboxes and collective rendezvous shared by the transports of one fake world."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.cond = threading.Condition()
        self.mail: dict[tuple[int, int, int], deque[Tensor]] = defaultdict(deque)  # (src, dst, stream)
        self.contributions: dict[int, dict[int, Tensor]] = defaultdict(dict)
        self.receives: dict[tuple[int, int, int], deque[_Receive]] = defaultdict(deque)
        self.sent_bytes = [0] * world_size

    def transports(self) -> list[LoopbackTransport]:
        return [LoopbackTransport(self, r) for r in range(self.world_size)]


class _Receive:
    """A posted receive: it takes the next message of its stream when that arrives (in posting order)."""

    def __init__(self, hub: Hub, src: int, dst: int, stream: int, into: Tensor) -> None:
        self.hub, self.src, self.dst, self.into = hub, src, dst, into
        self.box = hub.mail[(src, dst, stream)]
        self.queue = hub.receives[(src, dst, stream)]
        self.queue.append(self)
        self.completed = False

    def _take(self) -> bool:
        """Receives take messages in the order they were posted (under the hub's lock)."""
        while self.queue and self.box and not self.completed:
            first = self.queue.popleft()
            first.into.copy_(self.box.popleft())
            first.completed = True
        return self.completed

    def wait(self, timeout: timedelta | None) -> None:
        with self.hub.cond:
            if not self.hub.cond.wait_for(self._take, None if timeout is None else timeout.total_seconds()):
                raise RuntimeError(f"timed out waiting for rank {self.src}")

    def is_completed(self) -> bool:
        with self.hub.cond:
            return self._take()


class _Collective:
    def __init__(self, hub: Hub, seq: int, rank: int, tensor: Tensor, combine: Callable[[list[Tensor]], Tensor], out: Tensor) -> None:
        self.hub, self.seq, self.out, self.combine = hub, seq, out, combine
        with hub.cond:
            hub.contributions[seq][rank] = tensor.clone()
            hub.cond.notify_all()

    def wait(self, timeout: timedelta | None) -> None:
        parts = self.hub.contributions[self.seq]
        with self.hub.cond:
            if not self.hub.cond.wait_for(lambda: len(parts) == self.hub.world_size, None if timeout is None else timeout.total_seconds()):
                raise RuntimeError("timed out waiting for a collective")
            ordered = [parts[r] for r in range(self.hub.world_size)]
        self.out.copy_(self.combine(ordered))


class LoopbackTransport:
    """One rank's end of a :class:`Hub`."""

    def __init__(self, hub: Hub, rank: int) -> None:
        self.hub, self.rank = hub, rank
        self._collectives = 0

    def exchange(self, send: Tensor | None, received: Tensor | None, send_to: Sequence[int], receive_from: Sequence[int], stream: int = 0) -> list[Posted]:
        with self.hub.cond:
            for dst in send_to if send is not None else ():
                self.hub.mail[(self.rank, dst, stream)].append(send.clone())
                self.hub.sent_bytes[self.rank] += send.numel() * send.element_size()
            self.hub.cond.notify_all()
            receives = [_Receive(self.hub, src, self.rank, stream, received[k]) for k, src in enumerate(receive_from)] if received is not None else []
        return [Posted([r], r.src, "gossip exchange") for r in receives]

    def post_receive(self, received: Tensor, peer: int, stream: int = 0) -> Posted:
        (posted,) = self.exchange(None, received, (), (peer,), stream)
        return posted

    def close(self) -> None:
        pass

    def done(self, posted: Posted) -> bool:
        return all(work.is_completed() for work in posted.works)

    def _collective(self, tensor: Tensor, combine: Callable[[list[Tensor]], Tensor], out: Tensor, what: str, peer: int | None = None) -> Posted:
        self._collectives += 1
        return Posted([_Collective(self.hub, self._collectives, self.rank, tensor, combine, out)], peer, what)

    def all_reduce(self, tensor: Tensor) -> Posted:
        return self._collective(tensor, lambda parts: torch.stack(parts).sum(0), tensor, "all_reduce")

    def all_gather(self, output: Tensor, tensor: Tensor) -> Posted:
        return self._collective(tensor, lambda parts: torch.cat([p.reshape(-1) for p in parts]), output, "all_gather")

    def broadcast(self, tensor: Tensor, src: int) -> Posted:
        return self._collective(tensor, lambda parts: parts[src], tensor, "broadcast", src)

    def wait(self, posted: Posted, timeout: timedelta | None, gossip_round: int) -> None:
        try:
            for work in posted.works:
                if hasattr(work, "wait"):
                    work.wait(timeout)
        except RuntimeError as err:
            raise GossipPeerError(f"rank {self.rank}: {posted.what} with rank {posted.peer} failed: {err}") from err


def run_ranks(world_size: int, body: Callable[[int, LoopbackTransport], Any], timeout: float = 60) -> list[Any]:
    """Run ``body(rank, transport)`` in one thread per rank; returns each rank's result, re-raising the first error."""
    hub = Hub(world_size)
    transports = hub.transports()
    results: list[Any] = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def target(rank: int) -> None:
        try:
            results[rank] = body(rank, transports[rank])
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            errors[rank] = err

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    for err in errors:
        if err is not None:
            raise err
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"ranks still running after {timeout} s")
    return results
