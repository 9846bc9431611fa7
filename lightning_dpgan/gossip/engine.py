"""``GossipEngine``: mix tensors in place with ``W^t`` by exchanges with graph neighbours.

Each round every worker sends its packed tensors to its out-neighbours and combines what its in-neighbours sent
(:mod:`.transport`, :mod:`.combine`); a complete graph is one ``all_reduce`` instead. ``start_mix`` and
``finish_mix`` split a mix so that compute can run while its first round is on the wire.

An optional wire dtype (bf16/fp16) applies to the bytes on the wire only: the local copy and the accumulation
stay in the tensors' own precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dpgan.gossip.buffers import Bucket, Plan, PlanCache
from lightning_dpgan.gossip.combine import Into, combine, lerps
from lightning_dpgan.gossip.transport import DEFAULT_CHUNK_BYTES, Wire, resolve_wire_dtype
from lightning_dpgan.topology import Neighbours, Topology, check_rounds


@dataclass
class _Round:
    """One bucket's posted gossip round, until its result is combined ``into`` its destination."""

    bucket: Bucket
    received: Tensor  # one row per in-neighbour
    neighbours: Neighbours
    weights: Tensor  # the in-neighbours' weights, on the bucket's device
    works: list[tuple[Any, int]]  # (work, peer)
    into: Into

    def apply(self, engine: GossipEngine) -> None:
        for work, peer in self.works:
            engine._wire.wait(work, "gossip exchange", engine.phase, peer)
        nb = self.neighbours
        combine(self.bucket, self.received, nb.self_weight, self.weights, nb.receive_weights, self.into)


@dataclass
class _AllAverage:
    """One bucket's posted all_reduce (a complete graph, or :meth:`GossipEngine.average`)."""

    bucket: Bucket
    work: Any
    reduced: Tensor  # the flat buffer itself or its wire-dtype copy
    divisor: int

    def apply(self, engine: GossipEngine) -> None:
        engine._wire.wait(self.work, "all_reduce", engine.phase)
        flat = self.bucket.flat
        if self.reduced is not flat:
            flat.copy_(self.reduced)
        flat.div_(self.divisor)


class PendingMix:
    """A mix on the wire, from :meth:`GossipEngine.start_mix` until :meth:`GossipEngine.finish_mix`."""

    def __init__(
        self, plan: Plan, rounds: int, posted: list[_Round | _AllAverage], snapshots: list[Tensor] | None, written: bool
    ) -> None:
        self.plan = plan
        self.rounds = rounds  # rounds still to apply, the posted one included
        self.posted = posted
        self.snapshots = snapshots  # the packed tensors at start; None: overwrite instead of adding the correction
        self.written = written  # the last round wrote the tensors itself: nothing to unpack


class GossipEngine:
    """Mixes tensors across a process group (the default one unless ``group`` is given) with a
    :class:`~lightning_dpgan.topology.Topology`. The group must hold every rank, in the default group's order.

    Args:
        topology: the mixing matrices; ``topology.world_size`` must be the group's size.
        rank: this worker's rank.
        wire_dtype: ``"bf16"``/``"fp16"`` to send half the bytes; ``None`` sends the tensors' own dtype.
        timeout: how long to wait for a peer before raising :class:`GossipPeerError`.
        chunk_bytes: on CPU (gloo), the size of the chunks a message is cut into (:mod:`.transport` says why);
            ``None`` sends each message whole.
        group: the process group; :class:`~lightning_dpgan.DecentralizedStrategy` gives the engine one of its
            own, so that Lightning's small collectives never queue behind a mix on the wire.

    ``phase`` counts gossip rounds since the start (it is checkpointed) and selects the matrix of a time-varying
    topology, so every worker walks the same cycle in lockstep.
    """

    def __init__(
        self,
        topology: Topology,
        rank: int,
        wire_dtype: str | torch.dtype | None = None,
        timeout: timedelta | None = None,
        chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if not 0 <= rank < topology.world_size:
            raise ValueError(f"rank {rank} is outside the topology's world size {topology.world_size}")
        self.topology = topology
        self.rank = rank
        self.wire_dtype = resolve_wire_dtype(wire_dtype)
        self._wire = Wire(rank, group, timeout, chunk_bytes)
        self.phase = 0
        self.messages_sent = 0
        self._plans = PlanCache()
        self._neighbours = [topology.neighbours(rank, p) for p in range(topology.period)]
        self._weights: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def chunk_bytes(self) -> int | None:
        return self._wire.chunk_bytes

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
        out = [t.detach().clone() for t in tensors]
        if self.world_size == 1:
            return out
        for bucket in Plan(out).buckets:
            bucket.pack()
            self._post_all_average(bucket).apply(self)
            bucket.unpack()
        return out

    @torch.no_grad()
    def broadcast(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        """Overwrite every worker's tensors with ``src``'s, one broadcast per dtype."""
        if self.world_size == 1 or not tensors:
            return
        for bucket in Plan(tensors).buckets:
            bucket.pack()
            self._wire.broadcast(bucket.flat, src, self.phase)
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
        plan = self._plans.get(tensors)
        ids = dict(zip(map(id, tensors), group_ids))
        for bucket in plan.buckets:
            mean = bucket.scratch("mean", bucket.flat.dtype)
            mean.copy_(bucket.pack())
            self._wire.wait(self._wire.all_reduce(mean), "all_reduce", self.phase)
            mean.div_(self.world_size).sub_(bucket.flat)
            for t, deviation in zip(bucket.tensors, bucket.shaped(mean)):
                sums[ids[id(t)]] += float(torch.sum(deviation.double() ** 2))
        total = sums.to(plan.buckets[0].flat.device)
        self._wire.wait(self._wire.all_reduce(total), "all_reduce", self.phase)
        return total.cpu() / self.world_size

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "topology": self.topology.name, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase = int(state["phase"])

    def forget(self) -> None:
        """Drop every cached buffer and any mix in flight (after an error the peers may be gone)."""
        self._plans.clear()

    # ------------------------------------------------------------------ internals
    def _post_mix(self, tensors: Sequence[Tensor], rounds: int, keep_changes: bool) -> PendingMix | None:
        check_rounds(rounds)
        if self.world_size == 1 or not tensors:
            self.phase += rounds
            return None
        plan = self._plans.get(tensors)
        for bucket in plan.buckets:
            if not bucket.flat.is_floating_point():
                raise ValueError(f"gossip averages floating-point tensors only, got one of dtype {bucket.flat.dtype}")
        into = self._last_round_into(rounds, keep_changes)
        for bucket in plan.buckets:
            if not (into == "tensors" and self._wire_dtype(bucket) != bucket.flat.dtype):
                bucket.pack()  # else the wire copy is cast straight from the tensors
        if keep_changes:
            self._plans.mark_in_flight(plan)
        snapshots = None
        if keep_changes and into != "correction":
            snapshots = [b.scratch("snapshot", b.flat.dtype).copy_(b.flat) for b in plan.buckets]
        if self.topology.is_complete:
            posted: list[_Round | _AllAverage] = [self._post_all_average(bucket) for bucket in plan.buckets]
            self.phase += rounds  # W^t = W for the complete graph: one exact average whatever t
            rounds = 1
        else:
            posted = [self._post_round(bucket, into) for bucket in plan.buckets]
            self.phase += 1
        return PendingMix(plan, rounds, posted, snapshots, written=into != "flat")

    def _last_round_into(self, rounds: int, keep_changes: bool) -> Into:
        """Where the last round writes (:mod:`.combine`). Only a one-round mix can skip the flat buffer: its
        flat buffer still holds ``x`` when the round combines."""
        if rounds > 1 or self.topology.is_complete:
            return "flat"
        if keep_changes:
            return "correction"
        nb = self._neighbours[self.phase % self.topology.period]
        return "tensors" if lerps(nb.self_weight, nb.receive_weights) else "flat"

    def _complete(self, pending: PendingMix | None) -> None:
        if pending is None:
            return
        self._plans.release(pending.plan)
        for exchange in pending.posted:
            exchange.apply(self)
        for _ in range(pending.rounds - 1):
            exchanges = [self._post_round(bucket, "flat") for bucket in pending.plan.buckets]
            self.phase += 1
            for exchange in exchanges:
                exchange.apply(self)
        if pending.written:
            return
        for k, bucket in enumerate(pending.plan.buckets):
            if pending.snapshots is None:
                bucket.unpack()
            else:
                bucket.flat.sub_(pending.snapshots[k])  # the correction W^t x - x, seen through the views
                torch._foreach_add_(bucket.tensors, bucket.views)

    def _wire_dtype(self, bucket: Bucket) -> torch.dtype:
        """The wire dtype for floating-point buckets, the bucket's own otherwise."""
        if self.wire_dtype is not None and bucket.flat.is_floating_point():
            return self.wire_dtype
        return bucket.flat.dtype

    def _round_weights(self, bucket: Bucket, phase: int) -> Tensor:
        key = (phase, bucket.flat.device, bucket.flat.dtype)
        if key not in self._weights:
            weights = self._neighbours[phase].receive_weights
            self._weights[key] = torch.tensor(weights, dtype=bucket.flat.dtype, device=bucket.flat.device)
        return self._weights[key]

    def _post_round(self, bucket: Bucket, into: Into) -> _Round:
        """Post one round's sends and receives for the current phase; nothing waits yet."""
        phase = self.phase % self.topology.period
        nb = self._neighbours[phase]
        flat = bucket.flat
        wire_dtype = self._wire_dtype(bucket)
        send = flat
        if wire_dtype != flat.dtype:
            send = bucket.scratch("send", wire_dtype)
            if into == "tensors":  # nothing was packed: cast straight from the tensors
                torch._foreach_copy_(bucket.shaped(send), bucket.tensors)
            else:
                send.copy_(flat)
        received = bucket.scratch("received", wire_dtype, len(nb.receive_from))
        works = self._wire.exchange(send, received, nb.send_to, nb.receive_from)
        self.messages_sent += len(nb.send_to)
        return _Round(bucket, received, nb, self._round_weights(bucket, phase), works, into)

    def _post_all_average(self, bucket: Bucket) -> _AllAverage:
        flat = bucket.flat
        wire_dtype = self._wire_dtype(bucket)
        reduced = flat if wire_dtype == flat.dtype else bucket.scratch("send", wire_dtype).copy_(flat)
        self.messages_sent += 1
        return _AllAverage(bucket, self._wire.all_reduce(reduced), reduced, self.world_size)
