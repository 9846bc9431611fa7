"""``SynchronousGossip`` and ``OverlappedGossip``: plain gossip, ``t`` rounds of ``W`` per mixing step.

* :class:`SynchronousGossip`: mix now, all ``t`` rounds (DPOSG as written);
* :class:`OverlappedGossip`: land the previous step's mix, then put this one on the wire and return, so that it
  travels while the next forward and backward run.

The two share one file because they are one machinery: the same rounds, posted and landed by the same methods; the
overlapped variant only lands a step's first round one step later (:meth:`SynchronousGossip.start_mix`,
:meth:`SynchronousGossip.finish_mix`) and adds the correction ``W^t x - x`` instead of overwriting.

Each round every worker sends its packed tensors to its out-neighbours and combines what its in-neighbours sent
(:mod:`.combine`); a complete graph is one ``all_reduce`` instead. On CPU a round goes in up to
``SEGMENTS`` segments: every receive is posted first, then each segment is packed (or cast) and sent in turn, and
each is combined as soon as it has arrived. On hosts sharing cores the passes over the data then run while the
wire is busy, not before and after it. An optional wire dtype (bf16/fp16) applies to
the bytes on the wire only: the local copy and the sum stay in the tensors' own precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from typing_extensions import override

from lightning_dpgan.gossip.base import AllAverage, GossipEngine
from lightning_dpgan.gossip.buffers import Bucket, Plan, Segment, payload
from lightning_dpgan.gossip.combine import Into, combine, lerps
from lightning_dpgan.gossip.options import GossipOptions
from lightning_dpgan.gossip.transport import Posted, Transport
from lightning_dpgan.topology import Neighbours, Topology

#: most segments a CPU round is cut into: enough to hide all but an eighth of the passes over the data behind the
#: wire; and each at least this many chunks, so that a small message is not cut into calls that cost more CPU than
#: they hide
SEGMENTS, SEGMENT_CHUNKS = 8, 4


@dataclass
class _Round:
    """One bucket's posted gossip round, until its result is combined ``into`` its destination."""

    bucket: Bucket
    received: Tensor  # messages, one row per in-neighbour
    neighbours: Neighbours
    weights: Tensor  # the in-neighbours' weights, on the bucket's device
    segments: list[Segment]
    posted: list[list[Posted]]  # each segment's receives and sends
    into: Into
    wire_dtype: torch.dtype
    unpack: bool  # copy each combined segment of the flat buffer back into the tensors


class PendingMix:
    """A mix on the wire, from :meth:`SynchronousGossip.start_mix` until :meth:`SynchronousGossip.finish_mix`: its
    first round posted, and the packed tensors as they were when it started (``x``), from which the correction is
    formed."""

    def __init__(self, plan: Plan, rounds: int, posted: list[_Round | AllAverage], snapshots: list[Tensor] | None) -> None:
        self.plan = plan
        self.rounds = rounds  # rounds still to run, the posted one included
        self.posted = posted
        # x as it was at the start, when rounds after the first overwrite the flat buffer (None: a one-round mix
        # adds its correction straight into the tensors)
        self.snapshots = snapshots


class SynchronousGossip(GossipEngine):
    """Every mixing step mixes now, all ``t`` rounds: DPOSG as written."""

    @override
    def step(self, tensors: Sequence[Tensor]) -> None:
        self._begin_step()
        if self.mixes_now():
            self.mix(tensors)

    # ------------------------------------------------------------------ mixing primitives
    @torch.no_grad()
    def mix(self, tensors: Sequence[Tensor], rounds: int | None = None) -> None:
        """Replace every worker's tensors by ``W^t`` times the stacked tensors, in place.

        Rounds combine into the packed flat buffer, which is then unpacked; a one-round mix with one in-neighbour
        (one-peer exponential) is a lerp straight into the tensors instead, with nothing to pack or unpack.
        """
        rounds = rounds or self.options.rounds
        plan = self._plan_for(tensors, rounds)
        if plan is None:
            return
        if self.topology.is_complete:  # one exact average whatever t
            for bucket in plan.buckets:
                bucket.pack()
            self._run(plan, [self._post_average(bucket, with_headers=True) for bucket in plan.buckets], 1, rounds)
            for bucket in plan.buckets:
                bucket.unpack()
            return
        nb = self._neighbours[self.phase % self.topology.period]
        into: Into = "tensors" if rounds == 1 and lerps(nb.self_weight, nb.receive_weights) else "flat"
        unpack = into == "flat"  # the last round's segments go back into the tensors as they are combined
        # a lerp into the tensors with a wire dtype of its own casts straight from them: nothing to pack
        posted: list[_Round | AllAverage] = [
            self._post_round(b, into, pack=unpack or self._wire_dtype(b) == b.dtype, unpack=unpack and rounds == 1)
            for b in plan.buckets
        ]
        self._run(plan, posted, rounds, unpack=unpack)

    @torch.no_grad()
    def start_mix(self, tensors: Sequence[Tensor], rounds: int | None = None) -> PendingMix | None:
        """Put the first round of a mix of the tensors as they are now on the wire and return at once.

        :meth:`finish_mix` completes it. The tensors may change in between (an optimizer step, BatchNorm
        statistics updated by a forward pass): finishing adds the mix's correction ``W^t x - x``, with ``x`` as
        it was here, instead of overwriting, so those changes are kept. Rounds after the first run in
        ``finish_mix``. ``None`` when there is nothing to send (one worker, no tensors).
        """
        rounds = rounds or self.options.rounds
        plan = self._plan_for(tensors, rounds)
        if plan is None:
            return None
        for bucket in plan.buckets:
            bucket.pack()
        self._plans.mark_in_flight(plan)
        if self.topology.is_complete:  # one exact average whatever t
            snapshots = [b.scratch("snapshot", b.dtype).copy_(b.flat) for b in plan.buckets]
            self.phase += rounds
            return PendingMix(plan, 1, [self._post_average(b, with_headers=True) for b in plan.buckets], snapshots)
        # one round: the received rows combine into the correction, from the flat buffer that still holds x
        snapshots = None if rounds == 1 else [b.scratch("snapshot", b.dtype).copy_(b.flat) for b in plan.buckets]
        into: Into = "correction" if rounds == 1 else "flat"
        posted: list[_Round | AllAverage] = [self._post_round(b, into, pack=False, unpack=False) for b in plan.buckets]
        self.phase += 1
        return PendingMix(plan, rounds, posted, snapshots)

    @torch.no_grad()
    def finish_mix(self, pending: PendingMix | None) -> None:
        """Wait for a mix begun by :meth:`start_mix` and add its correction to the tensors as they are now."""
        if pending is None:
            return
        self._plans.release(pending.plan)
        self._finish_rounds(pending.plan, pending.posted, pending.rounds)
        if pending.snapshots is None:
            return  # the one round already added the correction
        for bucket, snapshot in zip(pending.plan.buckets, pending.snapshots):
            bucket.flat.sub_(snapshot)  # the correction W^t x - x, seen through the views
            torch._foreach_add_(bucket.tensors, bucket.views)

    # ------------------------------------------------------------------ rounds
    def _plan_for(self, tensors: Sequence[Tensor], rounds: int) -> Plan | None:
        """The buffers of a mix of these tensors, or ``None`` when there is nothing to exchange."""
        if self._nothing_to_exchange(tensors, rounds):
            return None
        plan = self._plans.get(tensors)
        for bucket in plan.buckets:
            if not bucket.flat.is_floating_point():
                raise ValueError(f"gossip averages floating-point tensors only, got one of dtype {bucket.dtype}")
        return plan

    def _run(
        self, plan: Plan, posted: list[_Round | AllAverage], rounds: int, phases: int | None = None, unpack: bool = False
    ) -> None:
        """Finish the posted first round and run the others; the phase moves on by ``phases`` (default: rounds)."""
        self.phase += phases if phases is not None else 1
        self._finish_rounds(plan, posted, rounds, unpack)

    def _finish_rounds(self, plan: Plan, posted: list[_Round | AllAverage], rounds: int, unpack: bool = False) -> None:
        """Apply the posted round, then post and apply the remaining ``rounds - 1``, each into the flat buffer (the
        last one also unpacked into the tensors, segment by segment, with ``unpack``)."""
        for exchange in posted:
            self._apply(exchange)
        for r in range(1, rounds):
            last = r == rounds - 1
            exchanges = [self._post_round(b, "flat", pack=False, unpack=unpack and last) for b in plan.buckets]
            self.phase += 1
            for exchange in exchanges:
                self._apply(exchange)

    def _segments(self, bucket: Bucket, wire_dtype: torch.dtype) -> list[Segment]:
        """How a round of this bucket is cut: on CPU, with chunked messages, into up to ``SEGMENTS`` of at least
        ``SEGMENT_CHUNKS`` chunks each; whole otherwise (NCCL sends whole buffers, and with whole messages, as on
        loopback, there is no wire to hide behind)."""
        chunk = self.options.chunk_bytes
        if bucket.device.type != "cpu" or chunk is None:
            return bucket.segments(1)
        payload_bytes = bucket.numel * wire_dtype.itemsize
        return bucket.segments(min(SEGMENTS, payload_bytes // (SEGMENT_CHUNKS * chunk)))

    def _post_round(self, bucket: Bucket, into: Into, pack: bool, unpack: bool) -> _Round:
        """Post one round's messages for the current phase; nothing waits yet. Each segment is packed from the
        tensors first (``pack``) and cast to the wire dtype. A whole round posts its receives and sends together
        (NCCL needs them in one group); a segmented one (CPU) posts every receive, then each segment's sends as soon
        as that segment is ready."""
        phase = self.phase % self.topology.period
        nb = self._neighbours[phase]
        wire_dtype = self._wire_dtype(bucket)
        segments = self._segments(bucket, wire_dtype)
        received = bucket.messages("received", wire_dtype, len(nb.receive_from))
        message = bucket.send_message(wire_dtype)
        self.control.write(message, self.steps)
        send = payload(message, bucket.numel, wire_dtype) if wire_dtype != bucket.dtype else None
        if len(segments) == 1:
            self._prepare(segments[0], send, into, pack)
            posted = [self.transport.exchange(message, received, nb.send_to, nb.receive_from)]
        else:
            spans = [segment.message_bytes(wire_dtype) for segment in segments]
            receives = [self.transport.exchange(None, received[:, lo:hi], (), nb.receive_from) for lo, hi in spans]
            posted = []
            for segment, (low, high), receive in zip(segments, spans, receives):
                self._prepare(segment, send, into, pack)
                posted.append(receive + self.transport.exchange(message[low:high], None, nb.send_to, ()))
        self.messages_sent += len(nb.send_to)
        weights = self._round_weights(bucket, phase)
        return _Round(bucket, received, nb, weights, segments, posted, into, wire_dtype, unpack)

    @staticmethod
    def _prepare(segment: Segment, send: Tensor | None, into: Into, pack: bool) -> None:
        """Make a segment of the outgoing message: pack it from the tensors (``pack``), then cast it into ``send``
        (``None``: the message is the flat buffer itself)."""
        flat = segment.bucket.flat
        if pack:
            torch._foreach_copy_(segment.pieces(flat), segment.tensors())
        if send is None:
            return
        if into == "tensors" and not pack:  # nothing was packed: cast straight from the tensors
            torch._foreach_copy_(segment.pieces(send), segment.tensors())
        else:
            send[segment.start : segment.stop].copy_(flat[segment.start : segment.stop])

    def _apply(self, exchange: _Round | AllAverage) -> None:
        if isinstance(exchange, AllAverage):
            self._land_average(exchange)
            return
        timeout = self.timeout()
        nb, bucket = exchange.neighbours, exchange.bucket
        rows = payload(exchange.received, bucket.numel, exchange.wire_dtype)
        for k, (segment, posted) in enumerate(zip(exchange.segments, exchange.posted)):
            for p in posted:  # the segment's receives, and its sends: the flat buffer may be what was sent
                self.transport.wait(p, timeout, self.phase)
            if k == 0:  # the headers came with the first segment
                self._check_tags(self.control.read(exchange.received), nb.receive_from)
            combine(segment, rows, nb.self_weight, exchange.weights, nb.receive_weights, exchange.into)
            if exchange.unpack:  # set for "flat" rounds only
                torch._foreach_copy_(segment.tensors(), segment.pieces(bucket.flat))


class OverlappedGossip(SynchronousGossip):
    """Each step lands the previous step's mix (adding its correction ``W^t x - x`` to the tensors as they are now)
    and puts this one on the wire, so that it travels while the next forward and backward run."""

    lag_steps = 1

    def __init__(self, topology: Topology, rank: int, transport: Transport, options: GossipOptions) -> None:
        super().__init__(topology, rank, transport, options)
        self._in_flight: PendingMix | None = None

    @override
    def step(self, tensors: Sequence[Tensor]) -> None:
        self.flush()  # the previous step's mix, whose messages carry the step count it was started at: this one
        self._begin_step()
        if self.mixes_now():
            self._in_flight = self.start_mix(tensors)

    @override
    def flush(self) -> None:
        pending, self._in_flight = self._in_flight, None
        self.finish_mix(pending)

    @override
    def forget(self) -> None:
        self._in_flight = None
        super().forget()
