"""``SynchronousGossip`` and ``OverlappedGossip``: plain gossip, ``t`` rounds of ``W`` per mixing step.

* :class:`SynchronousGossip`: mix now, all ``t`` rounds (DPOSG as written);
* :class:`OverlappedGossip`: land the previous step's mix, then put this one on the wire and return, so that it
  travels while the next forward and backward run.

The two share one file because they are one machinery: the same rounds, posted and landed by the same methods; the
overlapped variant only lands a step's first round one step later (:meth:`SynchronousGossip.start_mix`,
:meth:`SynchronousGossip.finish_mix`) and adds the correction ``W^t x - x`` instead of overwriting.

Each round every worker sends its packed tensors to its out-neighbours and combines what its in-neighbours sent
(:mod:`.combine`); a complete graph is one ``all_reduce`` instead. A round is one object (:class:`_Round`, or
:class:`~lightning_dpgan.gossip.base.AllAverage`): posted, then landed. On CPU it goes in segments, cut by the
transport (:func:`~lightning_dpgan.gossip.transport.segment_count`): every receive is posted first, then each
segment is packed (or cast) and sent in turn, and each is combined as soon as it has arrived. On hosts sharing cores the passes over the data then run while the
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
from lightning_dpgan.gossip.transport import Posted, Transport, post_segments, segment_count
from lightning_dpgan.topology import Neighbours, Topology


@dataclass
class _Round:
    """One bucket's gossip round with its in-neighbours: :meth:`post` puts it on the wire, :meth:`land` waits for it
    and combines it, segment by segment, ``into`` its destination."""

    bucket: Bucket
    received: Tensor  # messages, one row per in-neighbour
    neighbours: Neighbours
    weights: Tensor  # the in-neighbours' weights, on the bucket's device
    segments: list[Segment]
    posted: list[list[Posted]]  # each segment's receives and sends
    into: Into
    wire_dtype: torch.dtype
    unpack: bool  # copy each combined segment of the flat buffer back into the tensors

    @classmethod
    def post(cls, engine: SynchronousGossip, bucket: Bucket, into: Into, pack: bool, unpack: bool) -> _Round:
        """Post the round of the current phase; nothing waits yet. With ``pack`` each segment is packed from the
        tensors just before it goes (straight into the message, for a lerp whose wire dtype is not the tensors')."""
        phase = engine.phase % engine.topology.period
        nb = engine._neighbours[phase]
        wire_dtype = engine._wire_dtype(bucket)
        segments = bucket.segments(segment_count(bucket.numel * wire_dtype.itemsize, bucket.device, engine.options.chunk_bytes))
        received = bucket.messages("received", wire_dtype, len(nb.receive_from))
        message = bucket.send_message(wire_dtype)
        engine.control.write(message, engine.steps)
        send = payload(message, bucket.numel, wire_dtype)  # the flat buffer itself when the wire has its dtype
        # where the tensors are packed: the flat buffer (a combine into it needs x), or, for a lerp into the tensors,
        # straight the message; then the flat buffer is cast into the message, where the wire has a dtype of its own
        packs_message = pack and into == "tensors"
        pack_into = send if packs_message else bucket.flat if pack else None
        cast = wire_dtype != bucket.dtype and not packs_message

        def prepare(k: int) -> None:
            segment = segments[k]
            if pack_into is not None:
                torch._foreach_copy_(segment.pieces(pack_into), segment.tensors())
            if cast:
                send[segment.start : segment.stop].copy_(bucket.flat[segment.start : segment.stop])

        spans = [segment.message_bytes(wire_dtype) for segment in segments]
        posted = post_segments(engine.transport, message, received, spans, nb.send_to, nb.receive_from, prepare)
        engine.messages_sent += len(nb.send_to)
        weights = engine._round_weights(bucket, phase)
        return cls(bucket, received, nb, weights, segments, posted, into, wire_dtype, unpack)

    def land(self, engine: SynchronousGossip) -> None:
        """Wait for each segment (its receives, and its sends: the flat buffer may be what was sent) and combine it."""
        timeout = engine.timeout()
        nb, bucket = self.neighbours, self.bucket
        rows = payload(self.received, bucket.numel, self.wire_dtype)
        for k, (segment, posted) in enumerate(zip(self.segments, self.posted)):
            for p in posted:
                engine.transport.wait(p, timeout, engine.phase)
            if k == 0:  # the headers came with the first segment
                engine._check_tags(engine.control.read(self.received), nb.receive_from)
            combine(segment, rows, nb.self_weight, self.weights, nb.receive_weights, self.into)
            if self.unpack:  # set for "flat" rounds only
                torch._foreach_copy_(segment.tensors(), segment.pieces(bucket.flat))


class PendingMix:
    """A mix on the wire, from posting its first round until it has landed (:meth:`SynchronousGossip.start_mix`,
    :meth:`SynchronousGossip.finish_mix`): the rounds still to land, and, for a started mix, the packed tensors as
    they were when it started (``x``), from which the correction is formed."""

    def __init__(
        self, plan: Plan, rounds: int, posted: list[_Round] | list[AllAverage], unpack: bool, snapshots: list[Tensor] | None
    ) -> None:
        self.plan = plan
        self.rounds = rounds  # rounds still to land, the posted one included
        self.posted = posted
        self.unpack = unpack  # the last round goes back into the tensors
        # x as it was at the start, when rounds after the first overwrite the flat buffer (None: a one-round mix
        # adds its correction straight into the tensors, or the mix overwrites them)
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

        Rounds combine into the packed flat buffer, each segment of the last one unpacked as it lands; a one-round
        mix with one in-neighbour (one-peer exponential) is a lerp straight into the tensors instead, with nothing to
        pack or unpack.
        """
        rounds = rounds or self.options.rounds
        plan = self._plan_for(tensors, rounds)
        if plan is None:
            return
        nb = self._neighbours[self.phase % self.topology.period]
        into: Into = "tensors" if rounds == 1 and lerps(nb.self_weight, nb.receive_weights) else "flat"
        self._land(self._post(plan, rounds, into, started=False))

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
        # one round of neighbours: the received rows combine into the correction, from the flat buffer that still
        # holds x; otherwise x is kept aside, as the rounds (or the average) overwrite the flat buffer
        into: Into = "correction" if rounds == 1 and not self.topology.is_complete else "flat"
        snapshots = [b.scratch("snapshot", b.dtype).copy_(b.flat) for b in plan.buckets] if into == "flat" else None
        pending = self._post(plan, rounds, into, started=True)
        pending.snapshots = snapshots
        return pending

    @torch.no_grad()
    def finish_mix(self, pending: PendingMix | None) -> None:
        """Wait for a mix begun by :meth:`start_mix` and add its correction to the tensors as they are now."""
        if pending is None:
            return
        self._plans.release(pending.plan)
        self._land(pending)
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

    def _post(self, plan: Plan, rounds: int, into: Into, started: bool) -> PendingMix:
        """Post a mix's first round (a complete graph's one exact average, whatever ``rounds``), and move the phase
        on. A started mix was packed already and keeps its result in the flat buffer; a mix packs as it posts, and
        its last round goes back into the tensors."""
        if self.topology.is_complete:  # one exact average whatever t
            averages = [AllAverage.post(self, b, with_headers=True, pack=not started, unpack=not started) for b in plan.buckets]
            self.phase += rounds
            return PendingMix(plan, 1, averages, not started, None)
        unpack = not started and into == "flat"
        posted = [_Round.post(self, b, into, pack=not started, unpack=unpack and rounds == 1) for b in plan.buckets]
        self.phase += 1
        return PendingMix(plan, rounds, posted, unpack, None)

    def _land(self, pending: PendingMix) -> None:
        """Land the posted round, then post and land the others, each into the flat buffer (the last one also into
        the tensors, segment by segment, when the mix unpacks)."""
        for r in range(pending.rounds):
            if r:
                last = pending.unpack and r == pending.rounds - 1
                pending.posted = [_Round.post(self, b, "flat", pack=False, unpack=last) for b in pending.plan.buckets]
                self.phase += 1
            for exchange in pending.posted:
                exchange.land(self)


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
