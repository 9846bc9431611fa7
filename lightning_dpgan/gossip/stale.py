"""``StaleGossip``: bounded-staleness gossip, so that a slow neighbour holds a worker back only when it is far behind.

With staleness ``s``, the mix of step ``k`` on worker ``i`` is::

    x_i <- w_ii x_i^k + sum_j w_ij x_j^(m_j)        with  m_j >= k - s

where ``x_j^(m)`` is the message of neighbour ``j``'s step ``m`` (its anchors after its update of step ``m``) and
``m_j`` is the newest such message ``i`` holds (a neighbour ahead may already have sent a newer one than ``k``). A worker waits only when a neighbour's newest message is more than
``s`` steps old. The weights are those of ``W``; ``s = 0`` would be DPOSG as written (that case is
:class:`~lightning_dpgan.gossip.synchronous.SynchronousGossip`, bit for bit).

Every message carries its step (:mod:`.control`): a message is received once, into a slot, and taken as the
neighbour's newest copy; a copy is mixed again on later steps until a newer one replaces it. Sends and receives
stay posted across steps: each worker keeps ``s + 1`` receives posted per neighbour, so a neighbour up to ``s``
steps ahead can always hand its messages over, and ``s + 1`` send buffers, one per step in flight. Messages of
different tensor lists (one per optimizer) travel as separate streams.

At a checkpoint or the end of training (:meth:`StaleGossip.flush`) every worker takes every message its neighbours
sent so far; at the end it also fills the receives its neighbours still hold posted, so nothing is left waiting.

With ``catch_up`` (:meth:`StaleGossip.skips_next_step`), a worker that finds a neighbour ``s`` steps ahead, waiting
on it, while it has waited for no one in its last ``s + 1`` steps, skips its computation for the coming step and
only mixes, and goes on skipping until no neighbour is ahead: a host up to ``s + 1`` times slower than its neighbours
keeps their pace by contributing fewer gradients, instead of holding everyone to its own pace (docs/guide.md:
catching up).

When a message is taken is decided in one method, :meth:`StaleGossip._takes_now` (as soon as it has arrived), and
what a mix uses is formed in one, :meth:`StaleGossip._combine`: a subclass that replays a seeded delivery schedule or
records which message each mix used overrides those (tests/stale_replay.py), not this class.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from typing_extensions import override

from lightning_dpgan.gossip.base import GossipEngine
from lightning_dpgan.gossip.buffers import Bucket, Plan, payload
from lightning_dpgan.gossip.options import GossipOptions
from lightning_dpgan.gossip.transport import GossipPeerError, Posted, Transport
from lightning_dpgan.topology import Topology

_END = -1  # the tag of the messages that fill a neighbour's last posted receives when training ends


@dataclass
class _Slot:
    """A posted receive of one neighbour's stream."""

    message: Tensor  # (1, bytes)
    posted: Posted


@dataclass
class _Stream:
    """One bucket's messages: its send buffers and, per in-neighbour, posted receives and the newest copy."""

    number: int
    bucket: Bucket
    sends: deque[tuple[Tensor, list[Posted]]] = field(default_factory=deque)
    free: list[Tensor] = field(default_factory=list)
    slots: dict[int, deque[_Slot]] = field(default_factory=dict)
    newest: Tensor | None = None  # (in-neighbours, numel): the newest copy of each neighbour, in the bucket's dtype
    newest_tag: dict[int, int] = field(default_factory=dict)
    sent: int = 0
    taken: dict[int, int] = field(default_factory=dict)


class StaleGossip(GossipEngine):
    """Bounded-staleness gossip (``GossipOptions(staleness=s)``, ``s >= 1``) on a static topology, one round a step."""

    def __init__(self, topology: Topology, rank: int, transport: Transport, options: GossipOptions) -> None:
        super().__init__(topology, rank, transport, options)
        self.staleness = options.staleness
        self.lag_steps = options.staleness  # a stop is announced this much earlier
        self._nb = self._neighbours[0]
        self._streams: dict[int, list[_Stream]] = {}  # id(plan) -> one stream per bucket
        self._first_step = 0  # messages before this step were never sent to this worker (it started here)
        self.catch_up = options.catch_up
        self.skipped = 0
        self._catching_up = False
        self._skipping = False  # the step in progress computed nothing
        self._waited_at = 0  # the last step whose mix waited for a neighbour's message

    # ------------------------------------------------------------------ the step
    @override
    @torch.no_grad()
    def step(self, tensors: Sequence[Tensor]) -> None:
        self._begin_step()
        if self._nothing_to_exchange(tensors, 1):
            return
        if not self._first_step:
            self._first_step = self.steps
        plan = self._plans.get(tensors)
        streams = self._streams_of(plan)
        for stream in streams:
            stream.bucket.pack()
            self._send(stream)
        required = max(self.steps - self.staleness, self._first_step)
        for stream in streams:
            self._take(stream, required)
        for stream in streams:
            self._combine(stream)
            stream.bucket.unpack()
        self._skipping = False
        self.phase += 1

    @override
    def skips_next_step(self) -> bool:
        """With ``catch_up``: whether the coming step should skip its computation and only mix. A worker starts skipping
        when a neighbour is ``s`` steps ahead (that neighbour waits for this worker's next message) and its own last
        ``s + 1`` mixes waited for no one (a worker held back by another slow one is not the one to skip), and stops
        once no neighbour is ahead or it waits again. Looks only at messages that have arrived: never waits."""
        if not self.catch_up or not self._streams:
            return False
        ahead = -self.staleness
        for streams in self._streams.values():
            for stream in streams:
                self._take(stream, required=-1)  # whatever :meth:`_takes_now` takes, without waiting
                ahead = max(ahead, max(stream.newest_tag.values(), default=self.steps) - self.steps)
        if ahead <= 0 or self.steps - self._waited_at <= self.staleness:
            self._catching_up = False
        elif ahead >= self.staleness:
            self._catching_up = True
        self._skipping = self._catching_up
        self.skipped += self._skipping
        return self._skipping

    @override
    def flush(self) -> None:
        """Take every message the neighbours have sent so far (they are all at this step: a checkpoint, the end)."""
        for streams in self._streams.values():
            for stream in streams:
                self._drain_sends(stream, keep=0)
                for peer in self._nb.receive_from:
                    while stream.taken[peer] < stream.sent:
                        self._take_one(stream, peer, forced=True)

    @override
    def close(self) -> None:
        """The end of training: after :meth:`flush`, fill each neighbour's receives still posted with end messages,
        and take theirs, so that no operation is left waiting on the wire."""
        self.flush()
        for streams in self._streams.values():
            for stream in streams:
                for _ in range(self.staleness + 1):
                    message = self._buffer(stream)
                    self.control.write(message, _END)
                    posted = self.transport.exchange(message, None, self._nb.send_to, (), stream.number)
                    stream.sends.append((message, posted))
                for peer in self._nb.receive_from:
                    for slot in stream.slots[peer]:
                        self.transport.wait(slot.posted, self.timeout(), self.phase)
                    stream.slots[peer].clear()
                self._drain_sends(stream, keep=0)
        self._streams.clear()
        self.transport.close()

    @override
    def forget(self) -> None:
        self._streams.clear()
        self.transport.close()
        super().forget()

    # ------------------------------------------------------------------ internals
    def _streams_of(self, plan: Plan) -> list[_Stream]:
        streams = self._streams.get(id(plan))
        if streams is None:
            if any(bucket.device.type != "cpu" for bucket in plan.buckets):
                raise ValueError(
                    f"staleness={self.staleness} keeps receives posted ahead of sends and tells streams apart by tag, "
                    "which gloo (CPU tensors) does and NCCL does not: train on CPU, or leave staleness=0"
                )
            first = sum(len(s) for s in self._streams.values())
            streams = [_Stream(first + k, bucket) for k, bucket in enumerate(plan.buckets)]
            for stream in streams:
                stream.newest = stream.bucket.scratch("newest", stream.bucket.dtype, len(self._nb.receive_from))
                for peer in self._nb.receive_from:
                    stream.slots[peer] = deque()
                    stream.newest_tag[peer] = -1
                    stream.taken[peer] = 0
                    for _ in range(self.staleness + 1):
                        self._post_receive(stream, peer)
            self._streams[id(plan)] = streams
        return streams

    def _buffer(self, stream: _Stream) -> Tensor:
        """A send buffer of this stream, free once the send that used it has completed."""
        self._drain_sends(stream, keep=self.staleness)
        if stream.free:
            return stream.free.pop()
        wire = self._wire_dtype(stream.bucket)
        return torch.empty_like(stream.bucket.messages("send", wire))

    def _drain_sends(self, stream: _Stream, keep: int) -> None:
        """Wait for sends until at most ``keep`` are in flight; their buffers become free."""
        while len(stream.sends) > keep:
            message, posted = stream.sends.popleft()
            for p in posted:
                self.transport.wait(p, self.timeout(), self.phase)
            stream.free.append(message)

    def _send(self, stream: _Stream) -> None:
        bucket = stream.bucket
        wire = self._wire_dtype(bucket)
        message = self._buffer(stream)
        payload(message, bucket.numel, wire).copy_(bucket.flat)
        self.control.write(message, self.steps)
        posted = self.transport.exchange(message, None, self._nb.send_to, (), stream.number)
        stream.sends.append((message, posted))
        stream.sent += 1
        self.messages_sent += len(self._nb.send_to)

    def _post_receive(self, stream: _Stream, peer: int) -> None:
        wire = self._wire_dtype(stream.bucket)
        message = torch.empty_like(stream.bucket.messages("received", wire, 1))
        stream.slots[peer].append(_Slot(message, self.transport.post_receive(message, peer, stream.number)))

    def _take(self, stream: _Stream, required: int) -> None:
        """Take, from every in-neighbour, the messages :meth:`_takes_now` takes, and wait only while its newest is
        older than step ``required``."""
        for peer in self._nb.receive_from:
            while True:
                slot = stream.slots[peer][0]
                behind = stream.newest_tag[peer] < required
                if not behind and not self._takes_now(stream, peer, slot):
                    break
                if behind and not self.transport.done(slot.posted):
                    self._waited_at = self.steps  # this worker waits on a neighbour: it is not the one holding others back
                self._take_one(stream, peer, forced=behind)

    def _takes_now(self, stream: _Stream, peer: int, slot: _Slot) -> bool:
        """Whether to take a neighbour's next message now, when no wait is needed: once it has arrived, unless the
        neighbour has finished (its end messages are taken at :meth:`close`). Never waits."""
        return self.transport.done(slot.posted) and self.control.peek(slot.message) != _END

    def _take_one(self, stream: _Stream, peer: int, forced: bool) -> None:
        slot = stream.slots[peer].popleft()
        self.transport.wait(slot.posted, self.timeout(), self.phase)
        (tag,) = self.control.read(slot.message)
        if tag <= stream.newest_tag[peer]:
            raise GossipPeerError(
                f"rank {self.rank}: rank {peer} sent the message of its step {tag} after that of step "
                f"{stream.newest_tag[peer]}; its messages must come in step order"
            )
        k = self._nb.receive_from.index(peer)
        assert stream.newest is not None
        stream.newest[k].copy_(payload(slot.message[0], stream.bucket.numel, self._wire_dtype(stream.bucket)))
        stream.newest_tag[peer] = tag
        stream.taken[peer] += 1
        self._post_receive(stream, peer)

    def _combine(self, stream: _Stream) -> None:
        """``x <- w_ii x + sum_j w_ij newest_j``, into the flat buffer."""
        bucket = stream.bucket
        assert stream.newest is not None
        weights = self._round_weights(bucket, 0)
        bucket.flat.addmv_(stream.newest.t(), weights, beta=self._nb.self_weight)
