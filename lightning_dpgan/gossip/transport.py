"""The wire: moving messages to and from neighbours, and waiting for them with the peer named on failure.

:class:`Transport` is what the engine needs; :class:`DistributedTransport` does it with ``torch.distributed``
(gloo or NCCL). Tests hand the engine an in-process transport instead (``tests/fake_transport.py``).

Every cut of a message happens here: on CPU (gloo) a round's message goes in up to ``SEGMENTS`` segments
(:func:`segment_count`, :func:`post_segments`), each made and sent in turn, and each exchange goes out in chunks of
``chunk_bytes``, the chunks to and from all neighbours posted together, every receive before any send. Why:

* gloo serves the operations posted to one peer in order, so one large send posted before the matching receive
  makes the two directions of a link take turns; interleaved chunks keep both busy (docs/wire.md);
* a receive tells its peer it is ready with a small notice that gloo queues behind the data already queued to
  that peer, and the peer sends nothing before the notice arrives; receives posted first do not wait.

NCCL needs neither: its buffers go out whole.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dpgan.gossip.options import WIRE_DTYPE_NAMES
from lightning_dpgan.gossip.reports import Loss, PeerReports, ranks_phrase

WIRE_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "float32": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
assert tuple(WIRE_DTYPES) == WIRE_DTYPE_NAMES

Scheduled = tuple[Literal["send", "recv"], int, int]  # (kind, peer, chunk)


class GossipPeerError(RuntimeError):
    """A neighbour stopped answering: it died, or did not reach the same gossip call within the timeout.

    ``ranks``: the workers found to have died or stalled (:mod:`.reports`), which need not be this rank's neighbours;
    empty when nothing more is known than the peer the message names."""

    def __init__(self, message: str, ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ranks = ranks


def peer_failure(
    rank: int, what: str, peer: int | None, timeout: timedelta | None, gossip_round: int, err: BaseException, group: Any
) -> GossipPeerError:
    """The error for a failed wait on ``group``, after reporting it: named by the worker the ranks' reports lead to
    (:mod:`.reports`), then what failed here. One line."""
    who = f"rank {peer}" if peer is not None else "a peer"
    detail = (
        f"rank {rank}: {what} with {who} failed at gossip round {gossip_round}"
        f" (peer died or stalled past the {timeout or 'process-group'} timeout): {_first_line(err)}"
    )
    reports = PeerReports.of(group)
    timed_out = isinstance(err, TimeoutError) or "timed out" in str(err).lower()
    named = reports.culprits(Loss(rank, peer, timed_out)) if reports is not None else ()
    return GossipPeerError(f"{ranks_phrase(named)} died or stalled; {detail}" if named else detail, named)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def resolve_wire_dtype(wire_dtype: str | None) -> torch.dtype | None:
    """The dtype a message travels in; ``None`` for the tensors' own. (Names are checked by ``GossipOptions``.)"""
    return None if wire_dtype is None else WIRE_DTYPES[wire_dtype]


@dataclass
class Posted:
    """An operation on the wire, with the peer it concerns (``None`` for a collective)."""

    works: list[Any]
    peer: int | None
    what: str
    completed: bool = False  # waited for once already (a gloo work must not be waited for twice)
    arrived: threading.Event | None = None  # set by a watcher that waited for the works (post_receive)
    error: BaseException | None = None  # what the watcher's wait raised


class Transport(Protocol):
    """Point-to-point and collective operations over the workers, each waited for with a timeout."""

    rank: int

    def exchange(
        self, send: Tensor | None, received: Tensor | None, send_to: Sequence[int], receive_from: Sequence[int], stream: int = 0
    ) -> list[Posted]:
        """Post ``send`` to every out-neighbour and receive row ``k`` of ``received`` from ``receive_from[k]``
        (either may be ``None``: only receives, or only sends). Messages of one ``stream`` between two workers
        arrive in the order they were posted; streams do not mix."""
        ...

    def post_receive(self, received: Tensor, peer: int, stream: int = 0) -> Posted:
        """Post a receive of row 0 of ``received`` from ``peer`` whose arrival :meth:`done` can tell without waiting."""
        ...

    def done(self, posted: Posted) -> bool:
        """Whether ``posted`` has completed, without waiting (for a receive: one from :meth:`post_receive`)."""
        ...

    def all_reduce(self, tensor: Tensor) -> Posted: ...

    def all_gather(self, output: Tensor, tensor: Tensor) -> Posted:
        """``output`` (flat, world size times ``tensor``'s size) receives every rank's ``tensor`` in rank order."""
        ...

    def broadcast(self, tensor: Tensor, src: int) -> Posted: ...

    def wait(self, posted: Posted, timeout: timedelta | None, gossip_round: int) -> None:
        """Wait for ``posted``; :class:`GossipPeerError` naming the peer if it fails or times out."""
        ...

    def close(self) -> None:
        """Release what :meth:`post_receive` set up, once nothing it posted is pending."""
        ...


#: most segments a CPU round is cut into: enough to hide all but an eighth of the passes over the data behind the
#: wire; and each at least this many chunks, so that a small message is not cut into calls that cost more CPU than
#: they hide
SEGMENTS, SEGMENT_CHUNKS = 8, 4


def chunk_size(device: torch.device, chunk_bytes: int | None) -> int | None:
    """The bytes a message on ``device`` is cut into: ``chunk_bytes`` on CPU (gloo), ``None`` (whole) otherwise, as
    NCCL sends whole buffers."""
    return chunk_bytes if device.type == "cpu" else None


def segment_count(payload_bytes: int, device: torch.device, chunk_bytes: int | None) -> int:
    """How many segments a round's message is cut into: with chunks, up to ``SEGMENTS`` of at least
    ``SEGMENT_CHUNKS`` chunks each; one otherwise (with whole messages, as on loopback, there is no wire to hide
    behind)."""
    chunk = chunk_size(device, chunk_bytes)
    return 1 if chunk is None else max(1, min(SEGMENTS, payload_bytes // (SEGMENT_CHUNKS * chunk)))


def post_segments(
    transport: Transport,
    message: Tensor,
    received: Tensor,
    spans: Sequence[tuple[int, int]],
    send_to: Sequence[int],
    receive_from: Sequence[int],
    prepare: Callable[[int], None],
) -> list[list[Posted]]:
    """Post one round's messages cut into segments (byte ``spans`` of the message), each segment's receives and sends.

    One segment goes out whole, its receives and sends posted together (NCCL needs them in one group); several
    (CPU) post every receive first, then each segment's sends as soon as ``prepare(k)`` has made segment ``k``."""
    if len(spans) == 1:
        prepare(0)
        return [transport.exchange(message, received, send_to, receive_from)]
    receives = [transport.exchange(None, received[:, low:high], (), receive_from) for low, high in spans]
    posted = []
    for k, ((low, high), receive) in enumerate(zip(spans, receives)):
        prepare(k)
        posted.append(receive + transport.exchange(message[low:high], None, send_to, ()))
    return posted


def chunk_ranges(numel: int, chunk_elements: int | None) -> list[tuple[int, int]]:
    if chunk_elements is None or numel <= chunk_elements:
        return [(0, numel)]
    return [(start, min(start + chunk_elements, numel)) for start in range(0, numel, chunk_elements)]


def schedule(send_to: Sequence[int], receive_from: Sequence[int], num_chunks: int) -> list[Scheduled]:
    """One round's operations in posting order: every receive, chunk by chunk across peers, then every send."""
    receives: list[Scheduled] = [("recv", peer, c) for c in range(num_chunks) for peer in receive_from]
    sends: list[Scheduled] = [("send", peer, c) for c in range(num_chunks) for peer in send_to]
    return receives + sends


class DistributedTransport:
    """:class:`Transport` over a ``torch.distributed`` process group (the default one unless ``group`` is given)."""

    def __init__(self, rank: int, group: dist.ProcessGroup | None = None, chunk_bytes: int | None = None) -> None:
        self.rank = rank
        self.group = group
        self.chunk_bytes = chunk_bytes
        self._watchers: dict[tuple[int, int], _Watcher] = {}
        self._coalescing: dict[torch.device, bool] = {}  # per device, asked once: exchange runs every round

    def exchange(
        self, send: Tensor | None, received: Tensor | None, send_to: Sequence[int], receive_from: Sequence[int], stream: int = 0
    ) -> list[Posted]:
        send_to = send_to if send is not None else ()
        receive_from = receive_from if received is not None else ()
        if not send_to and not receive_from:
            return []
        row = {peer: k for k, peer in enumerate(receive_from)}
        like = send if send is not None else received
        assert like is not None
        chunking = chunk_size(like.device, self.chunk_bytes)
        ranges = chunk_ranges(like.shape[-1], None if chunking is None else max(1, chunking // like.element_size()))
        ops: list[tuple[Callable[..., Any], Tensor, int]] = []  # (isend or irecv, tensor, peer), in posting order
        for kind, peer, chunk in schedule(send_to, receive_from, len(ranges)):
            start, stop = ranges[chunk]
            if kind == "send":
                ops.append((dist.isend, send[start:stop], peer))  # type: ignore[index]
            else:
                ops.append((dist.irecv, received[row[peer], start:stop], peer))  # type: ignore[index]
        by_peer: dict[int, list[Any]] = {}
        if like.device not in self._coalescing:
            self._coalescing[like.device] = _coalesces(self.group, like.device)
        if self._coalescing[like.device]:  # NCCL: one group, posted together (its failures surface at the wait)
            batch = [dist.P2POp(op, tensor, peer, self.group, tag=stream) for op, tensor, peer in ops]
            for work, (_, _, peer) in zip(dist.batch_isend_irecv(batch), ops):
                by_peer.setdefault(peer, []).append(work)
            return [Posted(works, peer, "gossip exchange") for peer, works in by_peer.items()]
        for op, tensor, peer in ops:  # gloo: one by one (batch_isend_irecv would too), so a failed post names its peer
            try:
                work = op(tensor, peer, self.group, stream)
            except Exception as err:  # noqa: BLE001 - gloo raises at the post when the peer's connection is closed
                failed = Posted([], peer, "gossip exchange", error=err)  # raised, named, by the first wait
                return [failed] + [Posted(works, p, "gossip exchange") for p, works in by_peer.items()]
            by_peer.setdefault(peer, []).append(work)
        return [Posted(works, peer, "gossip exchange") for peer, works in by_peer.items()]

    def post_receive(self, received: Tensor, peer: int, stream: int = 0) -> Posted:
        (posted,) = self.exchange(None, received, (), (peer,), stream)
        if received.device.type == "cpu":  # gloo: a receive tells it arrived only by being waited for
            posted.arrived = threading.Event()
            watcher = self._watchers.get((peer, stream))
            if watcher is None:
                watcher = self._watchers[(peer, stream)] = _Watcher(f"gossip receives from rank {peer}, stream {stream}")
            watcher.watch(posted)
        return posted

    def done(self, posted: Posted) -> bool:
        if posted.completed:
            return True
        if posted.arrived is not None:
            return posted.arrived.is_set()
        return all(work.is_completed() for work in posted.works)

    def close(self) -> None:
        """Let the watcher threads end once the receives they hold are in (they are daemons: they never hold up an
        exit)."""
        for watcher in self._watchers.values():
            watcher.stop()
        self._watchers.clear()

    def all_reduce(self, tensor: Tensor) -> Posted:
        return Posted([dist.all_reduce(tensor, group=self.group, async_op=True)], None, "all_reduce")

    def all_gather(self, output: Tensor, tensor: Tensor) -> Posted:
        return Posted([dist.all_gather_into_tensor(output, tensor, group=self.group, async_op=True)], None, "all_gather")

    def broadcast(self, tensor: Tensor, src: int) -> Posted:
        return Posted([dist.broadcast(tensor, src=src, group=self.group, async_op=True)], src, "broadcast")

    def wait(self, posted: Posted, timeout: timedelta | None, gossip_round: int) -> None:
        if posted.completed:
            return
        try:
            if posted.error is not None and posted.arrived is None:  # its post failed
                raise posted.error
            if posted.arrived is not None:  # a watcher waits for it: only it may (a gloo work is waited for once)
                if not posted.arrived.wait(None if timeout is None else timeout.total_seconds()):
                    raise TimeoutError(f"no message within {timeout}")
                if posted.error is not None:
                    raise posted.error
                posted.completed = True
                return
            for work in posted.works:
                if timeout is not None:
                    work.wait(timeout)
                else:
                    work.wait()
            posted.completed = True
        except Exception as err:  # gloo/nccl raise RuntimeError or DistBackendError
            raise peer_failure(self.rank, posted.what, posted.peer, timeout, gossip_round, err, self.group) from err


def _coalesces(group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether ``group``'s backend on ``device`` posts a batch of sends and receives as one (NCCL), as
    ``torch.distributed.batch_isend_irecv`` decides it."""
    group = group if group is not None else dist.group.WORLD
    return bool(getattr(group._get_backend(device), "supports_coalescing", False))  # type: ignore[union-attr]


class _Watcher:
    """A thread that waits for the receives posted from one peer on one stream, in posting order, and marks each
    arrived. A gloo receive says it has completed only once waited for (``is_completed()`` stays ``False`` until
    then, and a wait that times out closes the connection), so bounded staleness could not otherwise tell a message
    that has arrived from one still on its way. The wait releases the GIL; training goes on meanwhile."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Posted | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def watch(self, posted: Posted) -> None:
        self._queue.put(posted)

    def stop(self) -> None:
        self._queue.put(None)

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the thread to end after :meth:`stop`: a daemon thread inside a call into torch
        (a wait, or freeing a work) when the interpreter exits wakes into a finishing interpreter, which aborts the
        process."""
        self._thread.join(timeout)

    def _run(self) -> None:
        while (posted := self._queue.get()) is not None:
            assert posted.arrived is not None
            try:
                for work in posted.works:
                    work.wait()  # the process group's timeout; the waiting thread applies the peer timeout
            except Exception as err:  # the peer died or the group was torn down: the waiting thread reports it
                posted.error = err
            posted.arrived.set()
