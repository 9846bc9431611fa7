"""The gossip wire: mix tensors in place with ``W^t`` by point-to-point exchange with graph neighbours.

Tensors are packed into one flat buffer per (device, dtype). Each round every worker sends its buffer to its
out-neighbours and receives its in-neighbours' buffers with one ``batch_isend_irecv``, then forms
``w_ii x_i + sum_j w_ij x_j`` in a single ``addmv`` pass. A one-round mix (``t = 1``, the default) skips some
copies: with one in-neighbour (one-peer exponential) it lerps the tensors in place and casts a bf16 wire copy
straight from them (bf16: three passes over the data instead of five); with several in-neighbours, a bf16 wire
and large tensors it scales the tensors and adds each received row to them, with nothing to pack, upcast or
unpack; a started mix needs no snapshot. On hosts sharing cores these passes are time on the wire's critical path.
A complete graph is one ``all_reduce`` instead.
All buffers (flat, receive, wire cast) are allocated once per tensor list and reused on every step.
``start_mix``/``finish_mix`` split a mix so that compute can run while its first round is on the wire.

On CPU (gloo) the buffer goes out in chunks of ``chunk_bytes`` (with ``staged=True``, one neighbour at a time),
each posting's receives before its sends.
Gloo serves the operations posted to one peer in order, so one large send posted before its matching receive
makes a pair's two directions take turns: a naive exchange ran at 2× its bandwidth floor on a rate-limited
link, the interleaved chunks at 1.05× (README, "The wire on an emulated cluster"). Receives go first
(``_schedule`` says why): posted after each chunk's sends, 4.35 MB mixes ran 2-11 % slower there. NCCL needs no
chunking.

An optional wire dtype (bf16/fp16) is used for the bytes on the wire only; the local copy and the
accumulation stay in the tensors' own precision.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dpgan.topology import Topology, _check_rounds

WIRE_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "float32": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


# Mean elements per tensor from which a one-round mix with several in-neighbours and a narrower wire adds each
# received row straight into the tensors. CPU ``_foreach`` ops loop over their tensors one call at a time (a few
# microseconds each), which a pass per neighbour pays once per neighbour: on one core, against the packed ``addmv``,
# it broke even at about 10K elements per tensor and took 0.56-0.80x the time from 27K (benchmarks/combine_passes.py).
SCALE_ADD_MIN_MEAN_NUMEL = 16384


_Into = Literal["flat", "tensors", "correction"]  # where a round's result goes (_Round.into)


class GossipPeerError(RuntimeError):
    """A neighbour stopped answering: it died, or did not reach the same gossip call within the timeout."""


def resolve_wire_dtype(wire_dtype: str | torch.dtype | None) -> torch.dtype | None:
    if wire_dtype is None or isinstance(wire_dtype, torch.dtype):
        return None if wire_dtype == torch.float32 else wire_dtype
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire_dtype {wire_dtype!r}; allowed: {', '.join(WIRE_DTYPES)}")
    return WIRE_DTYPES[wire_dtype]


def check_chunk_bytes(chunk_bytes: Any) -> None:
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive integer (bytes per gossip message chunk), got {chunk_bytes!r}")


class _Bucket:
    """One flat buffer holding a list of same-device, same-dtype tensors, plus its per-round scratch buffers."""

    def __init__(self, tensors: Sequence[Tensor], tag: int = 0) -> None:
        self.tensors = list(tensors)
        # a point-to-point tag of its own, for receives posted a stage early (``run_ahead_chunks``): gloo matches a
        # peer's messages to posted receives in order per tag, and they would otherwise jump another bucket's queue
        self.tag = tag
        first = self.tensors[0]
        self.numel = sum(t.numel() for t in self.tensors)
        self.flat = torch.empty(self.numel, dtype=first.dtype, device=first.device)
        self._scratch: dict[tuple[str, torch.dtype, int], Tensor] = {}
        self._shaped: dict[tuple[int, torch.dtype], list[Tensor]] = {}
        self.views = self.shaped(self.flat)

    def pack(self) -> Tensor:
        torch._foreach_copy_(self.views, self.tensors)
        return self.flat

    def unpack(self) -> None:
        torch._foreach_copy_(self.tensors, self.views)

    def scratch(self, kind: str, dtype: torch.dtype, rows: int = 0) -> Tensor:
        """A reusable buffer of ``rows`` x ``numel`` (or ``numel`` when ``rows == 0``)."""
        key = (kind, dtype, rows)
        if key not in self._scratch:
            shape = (rows, self.numel) if rows else (self.numel,)
            self._scratch[key] = torch.empty(shape, dtype=dtype, device=self.flat.device)
        return self._scratch[key]

    def shaped(self, buffer: Tensor) -> list[Tensor]:
        """Views of a ``numel``-long buffer (the flat one, a scratch row) shaped like the tensors, cached."""
        key = (buffer.data_ptr(), buffer.dtype)
        if key not in self._shaped:
            self._shaped[key] = [view.view_as(t) for view, t in zip(buffer.split([t.numel() for t in self.tensors]), self.tensors)]
        return self._shaped[key]


class _Plan:
    """The buckets for one list of tensors, cached so repeated mixes of the same tensors allocate nothing."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = list(tensors)  # strong references keep the ids in the cache key valid
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for t in self.tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        self.buckets = [_Bucket(ts, tag) for tag, ts in enumerate(groups.values())]


@dataclass
class _AllAverage:
    """One bucket's posted all_reduce (a complete graph, or :meth:`GossipEngine.average`)."""

    bucket: _Bucket
    work: Any
    reduced: Tensor  # the buffer being reduced: the flat buffer itself or its wire-dtype copy
    divisor: int

    def apply(self, engine: GossipEngine) -> None:
        engine._wait(self.work, "all_reduce")
        flat = self.bucket.flat
        if self.reduced is not flat:
            flat.copy_(self.reduced)
        flat.div_(self.divisor)


@dataclass
class _Round:
    """One bucket's gossip round, stage by stage, from posting to the combined tensors.

    ``into`` says where ``w_ii x_i + sum_j w_ij x_j`` goes. ``"flat"``: into the packed flat buffer, for a later
    round or for the caller to unpack. The last round of a one-round mix skips some of those copies:
    ``"correction"`` (a started mix) turns the flat buffer, still ``x_i`` as it was at the start, into ``W x - x``
    and adds that to the tensors, so it needs no snapshot; ``"tensors"`` combines straight into the tensors,
    with nothing to unpack, from a wire copy cast from them (``cast_from_tensors``), with nothing to pack: with one
    in-neighbour and ``w_ii + w_ij = 1`` it lerps them towards the neighbour's; with several it scales them by
    ``w_ii`` and adds each received row, wire dtype and all (the add upcasts as it reads, so there is no upcast
    pass either). A pass per neighbour pays CPU ``_foreach`` ops' call per tensor each time, so the engine takes
    it for large tensors only (``SCALE_ADD_MIN_MEAN_NUMEL``); otherwise one ``addmv`` over the flat buffer.
    Cast and combine are whole-buffer passes: doing them chunk by chunk as chunks go out and arrive was
    measured and cost more CPU than it hid (docs/benchmarks.md, "Why the multi-peer settings miss 1.15×").
    """

    bucket: _Bucket
    send: Tensor  # the flat buffer, or its wire-dtype copy
    received: Tensor  # one row per in-neighbour, in receive order
    self_weight: float
    weights: Tensor  # the in-neighbours' weights, in receive order
    weight_values: Sequence[float]  # the same, as numbers (no device read on a GPU)
    # per posting, in order: its operations, their peers and the stage each belongs to (a receive posted one
    # posting early belongs to the next stage and is waited for there)
    postings: list[tuple[list[dist.P2POp], list[int], list[int]]]
    into: _Into = "flat"
    cast_from_tensors: bool = False
    waits: list[list[tuple[Any, int]]] = field(init=False)  # per stage: (work, peer)
    posted: int = 0  # postings made so far

    def __post_init__(self) -> None:
        self.waits = [[] for _ in self.postings]

    def post_next_stage(self) -> None:
        if not self.posted and self.send is not self.bucket.flat:
            if self.cast_from_tensors:
                torch._foreach_copy_(self.bucket.shaped(self.send), self.bucket.tensors)
            else:
                self.send.copy_(self.bucket.flat)
        ops, peers, owners = self.postings[self.posted]
        self.posted += 1
        if not ops:  # every receive of this stage went out early and it sends nothing
            return
        for work, peer, stage in zip(dist.batch_isend_irecv(ops), peers, owners):
            self.waits[stage].append((work, peer))

    def apply(self, engine: GossipEngine) -> None:
        for stage in range(len(self.postings)):
            if stage == self.posted:
                self.post_next_stage()
            for work, peer in self.waits[stage]:
                engine._wait(work, "gossip exchange", peer)
        if self.into == "tensors":
            self._combine_into_tensors()
            return
        # x_i <- w_ii x_i + sum_j w_ij x_j (or, for a correction, minus x_i), one pass over the data
        bucket = self.bucket
        correction = self.into == "correction"
        beta = self.self_weight - 1 if correction else self.self_weight
        bucket.flat.addmv_(self._upcast().t(), self.weights, beta=beta)
        if correction:
            torch._foreach_add_(bucket.tensors, bucket.views)

    def _upcast(self) -> Tensor:
        """The received rows in the tensors' dtype (``addmv`` and ``lerp`` take one dtype)."""
        bucket = self.bucket
        if self.received.dtype == bucket.flat.dtype:
            return self.received
        return bucket.scratch("recv_acc", bucket.flat.dtype, self.received.shape[0]).copy_(self.received)

    def _combine_into_tensors(self) -> None:
        tensors = self.bucket.tensors
        if _lerps(self.self_weight, self.weight_values):
            (row,) = self._upcast()
            # (1 - w) x_i + w x_j = w_ii x_i + w_ij x_j, as w_ii + w_ij == 1
            torch._foreach_lerp_(tensors, self.bucket.shaped(row), self.weight_values[0])
            return
        torch._foreach_mul_(tensors, self.self_weight)
        for row, weight in zip(self.received, self.weight_values):
            torch._foreach_add_(tensors, self.bucket.shaped(row), alpha=weight)


_Scheduled = tuple[Literal["send", "recv"], int, int, int]  # (kind, peer, chunk, stage)


def _schedule(stages: Sequence[tuple[Sequence[int], Sequence[int]]], num_chunks: int, head: int) -> list[list[_Scheduled]]:
    """A round's operations per posting, in posting order, as ``(kind, peer, chunk, stage)``: posting ``k`` holds
    stage ``k``'s receives, chunk by chunk, then its sends; but the receives of a stage's first ``head`` chunks
    (``run_ahead_chunks``) move to the posting before it.

    Receives before sends: a receive tells its peer it is ready with a small notice that gloo queues behind the
    data already queued to that peer, and the peer sends nothing before the notice arrives.
    """
    receives: list[list[_Scheduled]] = [[] for _ in stages]
    sends: list[list[_Scheduled]] = [[] for _ in stages]
    for k, (send_to, receive_from) in enumerate(stages):
        for c in range(num_chunks):
            sends[k] += [("send", peer, c, k) for peer in send_to]
            receives[k - 1 if k > 0 and c < head else k] += [("recv", peer, c, k) for peer in receive_from]
    return [r + s for r, s in zip(receives, sends)]


def _lerps(self_weight: float, receive_weights: Sequence[float]) -> bool:
    """Whether ``w_ii x_i + sum_j w_ij x_j`` is one lerp: one in-neighbour, the two weights summing to exactly 1."""
    return len(receive_weights) == 1 and self_weight + receive_weights[0] == 1.0


class PendingMix:
    """A mix on the wire, from :meth:`GossipEngine.start_mix` until :meth:`GossipEngine.finish_mix`."""

    def __init__(
        self,
        plan: _Plan,
        rounds: int,
        posted: list[_Round | _AllAverage],
        snapshots: list[Tensor] | None,
        written: list[bool],
    ) -> None:
        self.plan = plan
        self.rounds = rounds  # rounds still to apply, the posted one included
        self.posted = posted
        self.snapshots = snapshots  # the packed tensors at start; None: overwrite instead of adding the correction
        self.written = written  # per bucket: its round wrote the tensors (_Round.into), nothing to unpack


class GossipEngine:
    """Mixes tensors across a process group (the default one unless ``group`` is given) with a
    :class:`~lightning_dpgan.topology.Topology`. The group must hold every rank, in the default group's order.

    ``phase`` counts gossip rounds since the start (it is checkpointed) and selects the matrix of a
    time-varying topology, so every worker walks the same cycle in lockstep.

    ``staged=True`` (CPU only, like the chunks) sends a round's messages in
    :meth:`~lightning_dpgan.topology.Topology.stages`, one message out and one in per worker at a time, instead
    of all at once. On the emulated cluster one TCP flow per link ran at 1.05× the bandwidth floor and several
    sharing it at 1.1–1.4×. Staging pays for large messages on hosts with their own cores (16 MB: faster in 15 of
    18 mixes on two machines, 1.11–1.30× the floor against 1.14–1.34×), not for the 4.35 MB DCGAN there, and is
    mixed on shared cores: each stage ends with its slowest pair, and gloo sends nothing before the receiver has
    posted its receive. So it is off by default.
    A started mix (``start_mix``) is never staged: its later stages would wait for ``finish_mix``.

    ``run_ahead_chunks`` (staged only) posts the receives of the next stage's first chunks with the stage before,
    so that a neighbour that reaches the stage first can start sending before this worker has; like TCP's window,
    it bounds how far a sender runs ahead. Off by default: on 2 shared cores one chunk was within noise (12 of
    20 mixes faster, 0.95–1.09×) and more chunks slower; it has not been timed with a core per host.
    """

    def __init__(
        self,
        topology: Topology,
        rank: int,
        wire_dtype: str | torch.dtype | None = None,
        timeout: timedelta | None = None,
        max_cached_plans: int = 8,
        chunk_bytes: int = 256 * 1024,
        group: dist.ProcessGroup | None = None,
        staged: bool = False,
        run_ahead_chunks: int = 0,
    ) -> None:
        if not 0 <= rank < topology.world_size:
            raise ValueError(f"rank {rank} is outside the topology's world size {topology.world_size}")
        check_chunk_bytes(chunk_bytes)
        if isinstance(run_ahead_chunks, bool) or not isinstance(run_ahead_chunks, int) or run_ahead_chunks < 0:
            raise ValueError(f"run_ahead_chunks must be an integer >= 0 (0: none), got {run_ahead_chunks!r}")
        self.topology = topology
        self.rank = rank
        self.chunk_bytes = chunk_bytes
        self.wire_dtype = resolve_wire_dtype(wire_dtype)
        self.timeout = timeout
        self.group = group
        self.staged = staged
        self.run_ahead_chunks = run_ahead_chunks
        self.phase = 0
        self.messages_sent = 0
        self._plans: OrderedDict[tuple[int, ...], _Plan] = OrderedDict()
        self._in_flight: set[int] = set()  # ids of plans whose buffers a started mix is still sending from
        self._max_cached_plans = max_cached_plans
        self._neighbours = [topology.neighbours(rank, p) for p in range(topology.period)]
        self._weights: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def mix(self, tensors: Sequence[Tensor], rounds: int = 1) -> None:
        """Replace every worker's tensors by ``W^t`` times the stacked tensors, in place."""
        self._complete(self._post_mix(tensors, rounds, keep_changes=False))

    @torch.no_grad()
    def start_mix(self, tensors: Sequence[Tensor], rounds: int = 1) -> PendingMix | None:
        """Put the first round of a mix of the tensors as they are now on the wire and return at once.

        :meth:`finish_mix` completes it. The tensors may change in between (an optimizer step, BatchNorm
        statistics updated by a forward pass): finishing adds the mix's correction ``W^t x - x``, with ``x`` as
        it was here, instead of overwriting, so those changes are kept. Rounds after the first run in
        ``finish_mix``. ``None`` when there is nothing to send (one worker, no tensors).
        """
        return self._post_mix(tensors, rounds, keep_changes=True)

    @torch.no_grad()
    def finish_mix(self, pending: PendingMix | None) -> None:
        """Wait for a mix begun by :meth:`start_mix` and apply it."""
        self._complete(pending)

    @torch.no_grad()
    def average(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The exact average over all workers (one all_reduce per dtype), as new tensors; inputs are untouched."""
        if self.world_size == 1:
            return [t.detach().clone() for t in tensors]
        out = [t.detach().clone() for t in tensors]
        plan = _Plan(out)
        for bucket in plan.buckets:
            bucket.pack()
            self._post_all_average(bucket).apply(self)
            bucket.unpack()
        return out

    @torch.no_grad()
    def broadcast(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        """Overwrite every worker's tensors with ``src``'s, one broadcast per dtype."""
        if self.world_size == 1 or not tensors:
            return
        plan = _Plan(tensors)
        for bucket in plan.buckets:
            bucket.pack()
            self._wait(dist.broadcast(bucket.flat, src=src, group=self.group, async_op=True), "broadcast", src)
            bucket.unpack()

    @torch.no_grad()
    def consensus_distance(self, tensors: Sequence[Tensor], group_ids: Sequence[int], num_groups: int) -> Tensor:
        """``mean_i ||x_i - x_bar||^2`` for each group of tensors, identical on every worker.

        One model-sized all_reduce gives ``x_bar``; the squared deviations are then computed exactly (no
        ``E||x||^2 - ||x_bar||^2`` cancellation) and summed with one small all_reduce.
        """
        sums = torch.zeros(num_groups, dtype=torch.float64)
        if self.world_size > 1 and tensors:
            plan = self._plan(tensors)
            ids = dict(zip(map(id, tensors), group_ids))
            for bucket in plan.buckets:
                mean = bucket.scratch("mean", bucket.flat.dtype)
                mean.copy_(bucket.pack())
                self._wait(dist.all_reduce(mean, group=self.group, async_op=True), "all_reduce")
                mean.div_(self.world_size).sub_(bucket.flat)
                offset = 0
                for t in bucket.tensors:
                    dev = mean[offset : offset + t.numel()]
                    sums[ids[id(t)]] += float(torch.dot(dev.double(), dev.double()))
                    offset += t.numel()
            device = plan.buckets[0].flat.device
            total = sums.to(device)
            self._wait(dist.all_reduce(total, group=self.group, async_op=True), "all_reduce")
            sums = total.cpu() / self.world_size
        return sums

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "topology": self.topology.name, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase = int(state["phase"])

    # ------------------------------------------------------------------ internals
    def _plan(self, tensors: Sequence[Tensor]) -> _Plan:
        # Keyed by tensor identity: callers pass the same objects each step (parameters, optimizer state).
        key = tuple(id(t) for t in tensors)
        plan = self._plans.get(key)
        if plan is None:
            if len(set(key)) != len(key):  # a one-round mix combines into the tensors in place: it would do it twice
                raise ValueError("a tensor appears more than once in the list to mix; pass each tensor once")
            plan = _Plan(tensors)
            self._plans[key] = plan
            if len(self._plans) > self._max_cached_plans:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        if id(plan) in self._in_flight:
            raise RuntimeError("these tensors have a mix in flight (start_mix): call finish_mix before using them again")
        return plan

    def _round_weights(self, bucket: _Bucket) -> Tensor:
        phase = self.phase % self.topology.period
        key = (phase, bucket.flat.device, bucket.flat.dtype)
        if key not in self._weights:
            nb = self._neighbours[phase]
            self._weights[key] = torch.tensor(nb.receive_weights, dtype=bucket.flat.dtype, device=bucket.flat.device)
        return self._weights[key]

    def _post_mix(self, tensors: Sequence[Tensor], rounds: int, keep_changes: bool) -> PendingMix | None:
        _check_rounds(rounds)
        if self.world_size == 1 or not tensors:
            self.phase += rounds
            return None
        plan = self._plan(tensors)
        for bucket in plan.buckets:
            if not bucket.flat.is_floating_point():
                raise ValueError(f"gossip averages floating-point tensors only, got one of dtype {bucket.flat.dtype}")
        into = [self._last_round_into(bucket, rounds, keep_changes) for bucket in plan.buckets]
        for bucket, where in zip(plan.buckets, into):
            if not (where == "tensors" and self._wire_dtype(bucket) != bucket.flat.dtype):
                bucket.pack()
        if keep_changes:
            self._in_flight.add(id(plan))
        snapshots = None
        if keep_changes and "correction" not in into:
            snapshots = [b.scratch("snapshot", b.flat.dtype).copy_(b.flat) for b in plan.buckets]
        if self.topology.is_complete:
            posted: list[_Round | _AllAverage] = [self._post_all_average(bucket) for bucket in plan.buckets]
            self.phase += rounds  # W^t = W for the complete graph: one exact average whatever t
            rounds = 1
        else:
            # a started mix puts all its messages on the wire at once: staging would leave the later stages for
            # finish_mix, outside the compute they are meant to hide behind
            posted = [self._post_round(b, staged=not keep_changes, into=where) for b, where in zip(plan.buckets, into)]
            self.phase += 1
        return PendingMix(plan, rounds, posted, snapshots, written=[where != "flat" for where in into])

    def _last_round_into(self, bucket: _Bucket, rounds: int, keep_changes: bool) -> _Into:
        """Where a bucket's last round writes (:class:`_Round`): a one-round gossip mix finishes into the tensors
        from its round, as the flat buffer keeps ``x`` until the round combines. Straight into the tensors, with
        nothing to pack or unpack: with one in-neighbour whose weight and the worker's own sum to 1 (one-peer
        exponential, a lerp), or with a narrower wire and tensors large enough that a pass per neighbour beats the
        packed ``addmv``."""
        if rounds > 1 or self.topology.is_complete:
            return "flat"
        if keep_changes:
            return "correction"
        nb = self._neighbours[self.phase % self.topology.period]
        if _lerps(nb.self_weight, nb.receive_weights):
            return "tensors"
        narrow_wire = self._wire_dtype(bucket) != bucket.flat.dtype
        large = bucket.numel >= SCALE_ADD_MIN_MEAN_NUMEL * len(bucket.tensors)
        return "tensors" if narrow_wire and large else "flat"

    def _complete(self, pending: PendingMix | None) -> None:
        if pending is None:
            return
        self._in_flight.discard(id(pending.plan))
        for exchange in pending.posted:
            exchange.apply(self)
        for _ in range(pending.rounds - 1):
            exchanges = [self._post_round(bucket) for bucket in pending.plan.buckets]
            self.phase += 1
            for exchange in exchanges:
                exchange.apply(self)
        for k, bucket in enumerate(pending.plan.buckets):
            if pending.written[k]:
                continue
            if pending.snapshots is None:
                bucket.unpack()
            else:
                bucket.flat.sub_(pending.snapshots[k])  # the correction W^t x - x, seen through the views
                torch._foreach_add_(bucket.tensors, bucket.views)

    def _wire_dtype(self, bucket: _Bucket) -> torch.dtype:
        """The dtype a bucket travels in: the wire dtype for floating-point buckets, its own otherwise."""
        if self.wire_dtype is not None and bucket.flat.is_floating_point():
            return self.wire_dtype
        return bucket.flat.dtype

    def _post_round(
        self, bucket: _Bucket, staged: bool = True, into: _Into = "flat"
    ) -> _Round:
        """Post one round's sends and receives (interleaved chunks) for the current phase; nothing waits yet.
        ``into``: where the round's result goes (:class:`_Round`).

        Staged (an engine with ``staged=True`` on CPU, unless ``staged=False`` here): only the first of the round's
        :meth:`~lightning_dpgan.topology.Topology.stages` is posted here, the others as each one finishes.
        Each stage posts its receives with its sends, first (:func:`_schedule`; but for ``run_ahead_chunks``):
        posting every stage's receives here was measured slower in 12 of 18 mixes with a core per host (a sender
        that is ahead then shares a busy receiver's link).
        """
        phase = self.phase % self.topology.period
        nb = self._neighbours[phase]
        flat = bucket.flat
        wire_dtype = self._wire_dtype(bucket)
        send = bucket.scratch("send", wire_dtype) if wire_dtype != flat.dtype else flat
        recv = bucket.scratch("recv", wire_dtype, len(nb.receive_from))
        row = {peer: k for k, peer in enumerate(nb.receive_from)}
        staged = staged and self.staged and flat.device.type == "cpu"
        if staged:
            stages = self.topology.rank_stages(self.rank, phase)
        else:
            stages = [(nb.send_to, nb.receive_from)] if nb.send_to or nb.receive_from else []
        chunks = self._chunks(send)
        head = self.run_ahead_chunks if staged else 0
        tag = bucket.tag if head else 0  # the same on every rank, whatever its own stages
        postings = []
        for posting in _schedule(stages, len(chunks), head):
            ops = []
            for kind, peer, c, _ in posting:
                start, stop = chunks[c]
                buffer = send[start:stop] if kind == "send" else recv[row[peer], start:stop]
                ops.append(dist.P2POp(dist.isend if kind == "send" else dist.irecv, buffer, peer, self.group, tag))
            postings.append((ops, [peer for _, peer, _, _ in posting], [stage for _, _, _, stage in posting]))
        gossip = _Round(bucket, send, recv, nb.self_weight, self._round_weights(bucket), nb.receive_weights, postings,
                        into=into, cast_from_tensors=into == "tensors" and send is not flat)
        if postings:
            gossip.post_next_stage()
        self.messages_sent += len(nb.send_to)
        return gossip

    def _post_all_average(self, bucket: _Bucket) -> _AllAverage:
        flat = bucket.flat
        wire_dtype = self._wire_dtype(bucket)
        wire = flat if wire_dtype == flat.dtype else bucket.scratch("send", wire_dtype).copy_(flat)
        self.messages_sent += 1
        return _AllAverage(bucket, dist.all_reduce(wire, group=self.group, async_op=True), wire, self.world_size)

    def _chunks(self, buffer: Tensor) -> list[tuple[int, int]]:
        """Element ranges to send separately: ``chunk_bytes`` each on CPU (gloo), the whole buffer elsewhere."""
        numel = buffer.numel()
        if buffer.device.type != "cpu":
            return [(0, numel)]
        step = max(1, self.chunk_bytes // buffer.element_size())
        return [(start, min(start + step, numel)) for start in range(0, numel, step)]

    def _wait(self, work: Any, what: str, peer: int | None = None) -> None:
        try:
            if self.timeout is not None:
                work.wait(self.timeout)
            else:
                work.wait()
        except Exception as err:  # gloo/nccl raise RuntimeError or DistBackendError
            who = f"rank {peer}" if peer is not None else "a peer"
            raise GossipPeerError(
                f"rank {self.rank}: {what} with {who} failed at gossip round {self.phase}"
                f" (peer died or stalled past the {self.timeout or 'process-group'} timeout): {err}"
            ) from err


def dense_mix(stacked: np.ndarray, topology: Topology, rounds: int, phase: int = 0) -> np.ndarray:
    """Single-process reference: rows are workers; returns ``W^t @ stacked`` as the engine would compute it."""
    return topology.mixing_product(rounds, phase) @ np.asarray(stacked, dtype=np.float64)
