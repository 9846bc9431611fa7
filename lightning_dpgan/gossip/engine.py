"""Gossip engines: mix tensors in place with ``W^t`` by exchanges with graph neighbours, one step at a time.

:class:`GossipEngine` holds what every variant shares: the topology, the transport it is handed, message buffers,
the step count and stop announcements (:mod:`.control`), exact averages and consensus measurements. A variant
decides what one optimizer step's :meth:`~GossipEngine.step` does:

* :class:`SynchronousGossip`: mix now, all ``t`` rounds (DPOSG as written);
* :class:`OverlappedGossip`: land the previous step's mix, then put this one on the wire and return, so that it
  travels while the next forward and backward run;
* :class:`NoGossip`: nothing (``mixing=False``, an ablation);
* :class:`~lightning_dpgan.gossip.stale.StaleGossip` (bounded staleness) and
  :class:`~lightning_dpgan.gossip.choco.ChocoGossip` (compressed, with error feedback), in modules of their own.

With ``every = H`` a variant mixes on every ``H``-th step only (local steps in between).

:func:`build_engine` picks the variant from :class:`~lightning_dpgan.gossip.options.GossipOptions`.

Each round every worker sends its packed tensors to its out-neighbours and combines what its in-neighbours sent
(:mod:`.combine`); a complete graph is one ``all_reduce`` instead. On CPU a round goes in up to
``SEGMENTS`` segments: every receive is posted first, then each segment is packed (or cast) and sent in turn, and
each is combined as soon as it has arrived. On hosts sharing cores the passes over the data then run while the
wire is busy, not before and after it. An optional wire dtype (bf16/fp16) applies to
the bytes on the wire only: the local copy and the sum stay in the tensors' own precision.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

from lightning_dpgan.gossip.buffers import Bucket, Plan, PlanCache, Segment, payload
from lightning_dpgan.gossip.combine import Into, combine, lerps
from lightning_dpgan.gossip.control import HEADER_BYTES, Control, Stop, StopReason
from lightning_dpgan.gossip.options import PEER_TIMEOUT_FLOOR_S, PEER_TIMEOUT_STEPS, GossipOptions
from lightning_dpgan.gossip.transport import GossipPeerError, Posted, Transport, resolve_wire_dtype
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


@dataclass
class _AllAverage:
    """One bucket's posted all_reduce, and the all_gather of the headers that travels with it."""

    bucket: Bucket
    posted: list[Posted]
    reduced: Tensor  # the flat buffer itself or its wire-dtype copy
    headers: Tensor | None  # every rank's header (a complete graph's step), or None for a plain average


class PendingMix:
    """A mix on the wire, from :meth:`GossipEngine.start_mix` until :meth:`GossipEngine.finish_mix`: its first round
    posted, and the packed tensors as they were when it started (``x``), from which the correction is formed."""

    def __init__(self, plan: Plan, rounds: int, posted: list[_Round | _AllAverage], snapshots: list[Tensor] | None) -> None:
        self.plan = plan
        self.rounds = rounds  # rounds still to run, the posted one included
        self.posted = posted
        # x as it was at the start, when rounds after the first overwrite the flat buffer (None: a one-round mix
        # adds its correction straight into the tensors)
        self.snapshots = snapshots


class PeerTimeout:
    """How long to wait for a neighbour: fixed, or (``None``) following the run's median step time.

    The start-up timeout bounds the waits of the warm-up instead: the first exchange, which every worker's first
    step reaches however slow (data loaders starting, compilation, an evaluation before training), and the steps
    that lateness takes to spread through the graph (a neighbour's neighbour waits for it one exchange later):
    ``warmup()`` steps, the stop horizon. Every later wait, for a neighbour or in a collective, is bounded by the peer
    timeout, so that a worker that stops after the warm-up, or inside a checkpoint, is found within it."""

    def __init__(self, fixed: float | None, startup: float, warmup: Callable[[], int] = lambda: 1) -> None:
        self.fixed, self.startup, self._warmup = fixed, startup, warmup
        self._durations: deque[float] = deque(maxlen=50)
        self._last: float | None = None
        self._steps = 0
        self._warm_from: int | None = None  # the first step past the warm-up, once the first exchange has begun

    def tick(self) -> None:
        now = time.monotonic()
        if self._last is not None:
            self._durations.append(now - self._last)
        self._last = now
        self._steps += 1

    @property
    def warm(self) -> bool:
        """Whether the warm-up is over: every wait, collectives included, gets the peer timeout."""
        return self._warm_from is not None and self._steps >= self._warm_from

    def seconds(self) -> float:
        """The timeout of a wait now: the start-up timeout during the warm-up, then the peer timeout."""
        if not self.warm:
            return self.startup
        if self.fixed is not None:
            return self.fixed
        median = statistics.median(self._durations) if self._durations else 0.0
        return max(PEER_TIMEOUT_FLOOR_S, PEER_TIMEOUT_STEPS * median)

    def __call__(self) -> timedelta:
        """The timeout of a wait for a neighbour's message (the first one starts the warm-up)."""
        if self._warm_from is None:
            self._warm_from = self._steps + max(1, self._warmup())
        return timedelta(seconds=self.seconds())


class GossipEngine:
    """What every gossip variant shares. Build one with :func:`build_engine`.

    Args:
        topology: the mixing matrices; ``topology.world_size`` must be the transport's world size.
        rank: this worker's rank.
        transport: how messages move (:class:`~lightning_dpgan.gossip.transport.DistributedTransport`).
        options: the gossip settings.

    ``phase`` counts gossip rounds since the start and selects the matrix of a time-varying topology, so every
    worker walks the same cycle in lockstep; ``steps`` counts :meth:`step` calls. Both are checkpointed.
    """

    #: how many steps late a message may be applied, beyond its rounds (a stop is announced this much earlier)
    lag_steps = 0

    def __init__(self, topology: Topology, rank: int, transport: Transport, options: GossipOptions) -> None:
        if not 0 <= rank < topology.world_size:
            raise ValueError(f"rank {rank} is outside the topology's world size {topology.world_size}")
        self.topology, self.rank, self.transport, self.options = topology, rank, transport, options
        self.wire_dtype = resolve_wire_dtype(options.wire_dtype)
        self.phase = 0
        self.steps = 0
        self.messages_sent = 0
        self.control = Control(rank)
        self.timeout = PeerTimeout(options.peer_timeout, options.startup_timeout, lambda: self.stop_horizon)
        self._plans = PlanCache()
        self._neighbours = [topology.neighbours(rank, p) for p in range(topology.period)]
        self._weights: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}
        self._gathered_headers: dict[torch.device, Tensor] = {}

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def collective_timeout(self) -> timedelta:
        """All workers meet (the initial broadcast, checkpoints, consensus, evaluations): the start-up timeout during
        the warm-up, the peer timeout after it."""
        return timedelta(seconds=self.timeout.seconds())

    # ------------------------------------------------------------------ one optimizer step
    def step(self, tensors: Sequence[Tensor]) -> None:
        """Mix this step's tensors (anchors, or parameters, and buffers) as the variant does."""
        raise NotImplementedError

    def flush(self) -> None:
        """Land anything still on the wire (before a checkpoint, a consensus measurement, the end of training)."""

    def close(self) -> None:
        """The end of training, on every worker: land everything, and leave nothing posted on the wire."""
        self.flush()

    def _begin_step(self) -> None:
        self.timeout.tick()
        self.steps += 1

    def mixes_now(self) -> bool:
        """Whether this step mixes (``every``: local steps between mixes)."""
        return self.steps % self.options.every == 0

    #: steps whose computation this worker skipped, only mixing (``catch_up``)
    skipped = 0

    def skips_next_step(self) -> bool:
        """Whether the coming step should mix without computing, to catch up with neighbours ahead (only
        :class:`~lightning_dpgan.gossip.stale.StaleGossip` with ``catch_up`` ever says yes)."""
        return False

    def replica_state(self) -> dict[str, Any]:
        """What this worker alone holds (a replica's checkpoint carries it); nothing for most variants."""
        return {}

    def load_replica_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`replica_state` (an empty dict: start afresh, as from a consensus model)."""

    # ------------------------------------------------------------------ stopping together
    @property
    def stop_horizon(self) -> int:
        """Steps between announcing a stop and taking it: enough for the news to reach every worker."""
        if self.world_size == 1:
            return 0
        rounds = self.topology.flood_rounds()
        return (math.ceil(rounds / self.options.rounds) * (1 + self.lag_steps) + 1) * self.options.every

    def announce_stop(self, reason: StopReason, detail: int = 0) -> Stop:
        """This worker must stop: announce a step at which every worker will have heard, and stop after it."""
        stop = Stop(self.steps + self.stop_horizon, self.steps + 1, self.rank, int(reason), detail)  # during step steps+1
        self.control.announce(stop)
        return stop

    def due_stop(self) -> Stop | None:
        """The agreed stop, once this worker has finished its step."""
        stop = self.control.stop
        return stop if stop is not None and self.steps >= stop.step else None

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
            self._run(plan, [self._post_all_average(bucket, with_headers=True) for bucket in plan.buckets], 1, rounds)
            for bucket in plan.buckets:
                bucket.unpack()
            return
        nb = self._neighbours[self.phase % self.topology.period]
        into: Into = "tensors" if rounds == 1 and lerps(nb.self_weight, nb.receive_weights) else "flat"
        unpack = into == "flat"  # the last round's segments go back into the tensors as they are combined
        # a lerp into the tensors with a wire dtype of its own casts straight from them: nothing to pack
        posted: list[_Round | _AllAverage] = [
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
            return PendingMix(plan, 1, [self._post_all_average(b, with_headers=True) for b in plan.buckets], snapshots)
        # one round: the received rows combine into the correction, from the flat buffer that still holds x
        snapshots = None if rounds == 1 else [b.scratch("snapshot", b.dtype).copy_(b.flat) for b in plan.buckets]
        into: Into = "correction" if rounds == 1 else "flat"
        posted: list[_Round | _AllAverage] = [self._post_round(b, into, pack=False, unpack=False) for b in plan.buckets]
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

    @torch.no_grad()
    def average(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The exact average over all workers (one all_reduce per dtype), as new tensors; inputs are untouched."""
        out = [t.detach().clone() for t in tensors]
        if self.world_size == 1:
            return out
        for bucket in Plan(out).buckets:
            bucket.pack()
            self._apply(self._post_all_average(bucket, with_headers=False))
            bucket.unpack()
        return out

    @torch.no_grad()
    def broadcast(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        """Overwrite every worker's tensors with ``src``'s, one broadcast per dtype."""
        if self.world_size == 1 or not tensors:
            return
        for bucket in Plan(tensors).buckets:
            bucket.pack()
            self.transport.wait(self.transport.broadcast(bucket.flat, src), self.collective_timeout, self.phase)
            bucket.unpack()

    @torch.no_grad()
    def consensus_distance(self, tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int) -> Tensor:
        """``mean_i ||x_i - x_bar||^2`` for each group of tensors, identical on every worker.

        One model-sized all_reduce gives ``x_bar``; the squared deviations are then computed exactly (no
        ``E||x||^2 - ||x_bar||^2`` cancellation) and summed with one small all_reduce.
        """
        sums = torch.zeros(num_groups, dtype=torch.float64)
        if self.world_size == 1 or not tensors:
            return sums
        plan = self._plans.get(tensors, "consensus")
        ids = dict(zip(map(id, tensors), group_ids))
        for bucket in plan.buckets:
            mean = bucket.scratch("mean", bucket.dtype)
            mean.copy_(bucket.pack())
            self.transport.wait(self.transport.all_reduce(mean), self.collective_timeout, self.phase)
            mean.div_(self.world_size).sub_(bucket.flat)
            for t, deviation in zip(bucket.tensors, bucket.shaped(mean)):
                sums[ids[id(t)]] += float(torch.sum(deviation.double() ** 2))
        total = sums.to(plan.buckets[0].device)
        self.transport.wait(self.transport.all_reduce(total), self.collective_timeout, self.phase)
        return total.cpu() / self.world_size

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "steps": self.steps, "topology": self.topology.name, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase = int(state["phase"])
        self.steps = int(state.get("steps", 0))

    def forget(self) -> None:
        """Drop every cached buffer and any mix in flight (after an error the peers may be gone)."""
        self._plans.clear()

    # ------------------------------------------------------------------ internals
    def _plan_for(self, tensors: Sequence[Tensor], rounds: int) -> Plan | None:
        """The buffers of a mix of these tensors, or ``None`` when there is nothing to exchange."""
        if self.world_size == 1 or not tensors:
            self.phase += rounds
            return None
        plan = self._plans.get(tensors)
        for bucket in plan.buckets:
            if not bucket.flat.is_floating_point():
                raise ValueError(f"gossip averages floating-point tensors only, got one of dtype {bucket.dtype}")
        return plan

    def _run(
        self, plan: Plan, posted: list[_Round | _AllAverage], rounds: int, phases: int | None = None, unpack: bool = False
    ) -> None:
        """Finish the posted first round and run the others; the phase moves on by ``phases`` (default: rounds)."""
        self.phase += phases if phases is not None else 1
        self._finish_rounds(plan, posted, rounds, unpack)

    def _finish_rounds(self, plan: Plan, posted: list[_Round | _AllAverage], rounds: int, unpack: bool = False) -> None:
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

    def _wire_dtype(self, bucket: Bucket) -> torch.dtype:
        """The wire dtype for floating-point buckets, the bucket's own otherwise."""
        if self.wire_dtype is not None and bucket.flat.is_floating_point():
            return self.wire_dtype
        return bucket.dtype

    def _round_weights(self, bucket: Bucket, phase: int) -> Tensor:
        key = (phase, bucket.device, bucket.dtype)
        if key not in self._weights:
            weights = self._neighbours[phase].receive_weights
            self._weights[key] = torch.tensor(weights, dtype=bucket.dtype, device=bucket.device)
        return self._weights[key]

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

    def _post_all_average(self, bucket: Bucket, with_headers: bool) -> _AllAverage:
        wire_dtype = self._wire_dtype(bucket)
        reduced = bucket.flat if wire_dtype == bucket.dtype else bucket.scratch("send", wire_dtype).copy_(bucket.flat)
        posted = [self.transport.all_reduce(reduced)]
        headers = None
        if with_headers:
            self.control.write(bucket.message, self.steps)
            headers = self._gathered_headers.get(bucket.device)
            if headers is None:
                headers = self._gathered_headers[bucket.device] = torch.empty(self.world_size * HEADER_BYTES, dtype=torch.uint8, device=bucket.device)
            posted.append(self.transport.all_gather(headers, bucket.message[:HEADER_BYTES]))
            headers = headers.view(self.world_size, HEADER_BYTES)
        self.messages_sent += 1
        return _AllAverage(bucket, posted, reduced, headers)

    def _apply(self, exchange: _Round | _AllAverage) -> None:
        timeout = self.timeout() if isinstance(exchange, _Round) or exchange.headers is not None else self.collective_timeout
        if isinstance(exchange, _AllAverage):
            for posted in exchange.posted:
                self.transport.wait(posted, timeout, self.phase)
            flat = exchange.bucket.flat
            if exchange.reduced is not flat:
                flat.copy_(exchange.reduced)
            flat.div_(self.world_size)
            if exchange.headers is not None:
                self._check_tags(self.control.read(exchange.headers), list(range(self.world_size)))
            return
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

    def _check_tags(self, tags: list[int], peers: Sequence[int]) -> None:
        for tag, peer in zip(tags, peers):
            if tag != self.steps:
                raise GossipPeerError(
                    f"rank {self.rank}: rank {peer} sent the message of its gossip step {tag} while this rank mixes step "
                    f"{self.steps}; the ranks' steps have diverged (a rank skipped or repeated an optimizer step)"
                )


class SynchronousGossip(GossipEngine):
    """Every step mixes now, all ``t`` rounds: DPOSG as written."""

    def step(self, tensors: Sequence[Tensor]) -> None:
        self._begin_step()
        if self.mixes_now():
            self.mix(tensors)


class OverlappedGossip(GossipEngine):
    """Each step lands the previous step's mix (adding its correction ``W^t x - x`` to the tensors as they are now)
    and puts this one on the wire, so that it travels while the next forward and backward run."""

    lag_steps = 1

    def __init__(self, topology: Topology, rank: int, transport: Transport, options: GossipOptions) -> None:
        super().__init__(topology, rank, transport, options)
        self._in_flight: PendingMix | None = None

    def step(self, tensors: Sequence[Tensor]) -> None:
        self.flush()  # the previous step's mix, whose messages carry the step count it was started at: this one
        self._begin_step()
        if self.mixes_now():
            self._in_flight = self.start_mix(tensors)

    def flush(self) -> None:
        pending, self._in_flight = self._in_flight, None
        self.finish_mix(pending)

    def forget(self) -> None:
        self._in_flight = None
        super().forget()


class NoGossip(GossipEngine):
    """No mixing (``mixing=False``): each replica trains alone; consensus is still measured. Headers still go to the
    neighbours each step, so that a stop is still agreed on."""

    def step(self, tensors: Sequence[Tensor]) -> None:
        self._begin_step()
        if not self.mixes_now():
            return
        if self.world_size > 1:
            nb = self._neighbours[self.phase % self.topology.period]
            message = torch.empty(HEADER_BYTES, dtype=torch.uint8)
            received = torch.empty(len(nb.receive_from), HEADER_BYTES, dtype=torch.uint8)
            self.control.write(message, self.steps)
            posted = self.transport.exchange(message, received, nb.send_to, nb.receive_from)
            for p in posted:
                self.transport.wait(p, self.timeout(), self.phase)
            self._check_tags(self.control.read(received), nb.receive_from)
        self.phase += self.options.rounds


def build_engine(
    topology: Topology, rank: int, options: GossipOptions | None = None, transport: Transport | None = None
) -> GossipEngine:
    """The engine variant that ``options`` asks for, over ``transport`` (default: ``torch.distributed``'s default
    process group)."""
    options = options or GossipOptions()
    if transport is None:
        from lightning_dpgan.gossip.transport import DistributedTransport

        transport = DistributedTransport(rank, None, options.chunk_bytes)
    if not options.mixing:
        return NoGossip(topology, rank, transport, options)
    if options.compression is not None:
        from lightning_dpgan.gossip.choco import ChocoGossip

        return ChocoGossip(topology, rank, transport, options)
    if options.staleness:
        from lightning_dpgan.gossip.stale import StaleGossip

        return StaleGossip(topology, rank, transport, options)
    if options.overlap:
        return OverlappedGossip(topology, rank, transport, options)
    return SynchronousGossip(topology, rank, transport, options)
