"""``GossipEngine``: the contract every gossip variant keeps, and the parts they all share.

A variant is one subclass in one module (``synchronous``, ``stale``, ``choco``, ``none``), named in
:data:`~lightning_dpgan.gossip.registry.ENGINES`. This module holds what none of them may do differently: the step
count and the stop agreement (:mod:`.control`), the phase, the peer timeouts, the world-size guard, and the
collectives over all workers (broadcast, exact average, consensus distance). How a step exchanges messages with the
neighbours is each variant's own.
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

from lightning_dpgan.gossip.buffers import Bucket, Plan, PlanCache
from lightning_dpgan.gossip.control import HEADER_BYTES, Control, Stop, StopReason
from lightning_dpgan.gossip.options import PEER_TIMEOUT_FLOOR_S, PEER_TIMEOUT_STEPS, GossipOptions
from lightning_dpgan.gossip.transport import GossipPeerError, Posted, Transport, resolve_wire_dtype
from lightning_dpgan.topology import Topology


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


@dataclass
class AllAverage:
    """One bucket's exact average over all workers: :meth:`post` puts its all_reduce on the wire (and the all_gather
    of the headers that travels with a mix's), :meth:`land` waits for it and leaves the average in the flat buffer."""

    bucket: Bucket
    posted: list[Posted]
    reduced: Tensor  # the flat buffer itself or its wire-dtype copy
    headers: Tensor | None  # every rank's header (a complete graph's step), or None for a plain average
    unpack: bool  # copy the average back into the tensors

    @classmethod
    def post(cls, engine: GossipEngine, bucket: Bucket, with_headers: bool, pack: bool, unpack: bool) -> AllAverage:
        """Pack the bucket (``pack``) and post its all_reduce in the wire dtype; with ``with_headers`` the all_gather
        of every rank's header too (a complete graph's mix checks the steps with it). Nothing waits yet."""
        if pack:
            bucket.pack()
        wire_dtype = engine._wire_dtype(bucket)
        reduced = bucket.flat if wire_dtype == bucket.dtype else bucket.scratch("send", wire_dtype).copy_(bucket.flat)
        posted = [engine.transport.all_reduce(reduced)]
        headers = None
        if with_headers:
            engine.control.write(bucket.message, engine.steps)
            headers = engine._headers_buffer(bucket.device)
            posted.append(engine.transport.all_gather(headers, bucket.message[:HEADER_BYTES]))
            headers = headers.view(engine.world_size, HEADER_BYTES)
        engine.messages_sent += 1
        return cls(bucket, posted, reduced, headers, unpack)

    def land(self, engine: GossipEngine) -> None:
        """Wait, and leave the average in the flat buffer (and the tensors, with ``unpack``). A mix's wait is a
        neighbour's (the peer timeout); a plain average's is a collective's."""
        timeout = engine.timeout() if self.headers is not None else engine.collective_timeout
        for posted in self.posted:
            engine.transport.wait(posted, timeout, engine.phase)
        flat = self.bucket.flat
        if self.reduced is not flat:
            flat.copy_(self.reduced)
        flat.div_(engine.world_size)
        if self.headers is not None:
            engine._check_tags(engine.control.read(self.headers), list(range(engine.world_size)))
        if self.unpack:
            self.bucket.unpack()


class GossipEngine:
    """One worker's gossip: mixes its tensors with its neighbours', one optimizer step at a time.

    Build one with :func:`~lightning_dpgan.gossip.registry.build_engine`, which picks the variant that
    :attr:`GossipOptions.variant <lightning_dpgan.gossip.options.GossipOptions.variant>` names.

    Args:
        topology: the mixing matrices; ``topology.world_size`` must be the transport's world size.
        rank: this worker's rank.
        transport: how messages move (:class:`~lightning_dpgan.gossip.transport.DistributedTransport`).
        options: the gossip settings.

    The contract. A variant must implement:

    * :meth:`step`: one optimizer step's mix of its tensors (anchors, or parameters, and buffers). It starts with
      :meth:`_begin_step` (the step count, the timeouts) and moves :attr:`phase` on by the rounds it ran; the world-size
      guard :meth:`_nothing_to_exchange` does both for a step with nothing to send.

    A variant may override, each default being right for a variant that keeps nothing between steps:

    * :meth:`flush`: land whatever is still on the wire (before a checkpoint, a consensus measurement, the end);
    * :meth:`close`: the end of training on every worker: land everything, leave nothing posted;
    * :meth:`forget`: drop cached buffers and anything in flight (after an error, the peers may be gone);
    * :meth:`skips_next_step`: whether the coming step should only mix, without computing (catching up);
    * :meth:`replica_state` / :meth:`load_replica_state`: what this worker alone holds, in its replica's file;
    * :meth:`state_dict` / :meth:`load_state_dict`: what every worker holds alike (call ``super()``'s);
    * :attr:`lag_steps`: how many steps late a message may be applied, beyond its rounds (a stop is announced that
      much earlier).

    Everything else here is shared and not overridden: the stop agreement (:meth:`announce_stop`, :meth:`due_stop`,
    :attr:`stop_horizon`), the collectives over all workers (:meth:`broadcast`, :meth:`average`,
    :meth:`consensus_distance`), :attr:`phase` and :attr:`steps`. ``phase`` counts gossip rounds since the start and
    selects the matrix of a time-varying topology, so every worker walks the same cycle in lockstep; ``steps``
    counts :meth:`step` calls. Both are checkpointed.
    """

    #: how many steps late a message may be applied, beyond its rounds (a stop is announced this much earlier)
    lag_steps = 0
    #: steps whose computation this worker skipped, only mixing (``catch_up``)
    skipped = 0

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

    # ------------------------------------------------------------------ the contract
    def step(self, tensors: Sequence[Tensor]) -> None:
        """Mix this step's tensors (anchors, or parameters, and buffers) as the variant does."""
        raise NotImplementedError(f"{type(self).__name__} must implement step")

    def flush(self) -> None:
        """Land anything still on the wire (before a checkpoint, a consensus measurement, the end of training)."""

    def close(self) -> None:
        """The end of training, on every worker: land everything, and leave nothing posted on the wire."""
        self.flush()

    def forget(self) -> None:
        """Drop every cached buffer and any mix in flight (after an error the peers may be gone)."""
        self._plans.clear()

    def skips_next_step(self) -> bool:
        """Whether the coming step should mix without computing, to catch up with neighbours ahead (only
        :class:`~lightning_dpgan.gossip.stale.StaleGossip` with ``catch_up`` ever says yes)."""
        return False

    def replica_state(self) -> dict[str, Any]:
        """What this worker alone holds (a replica's checkpoint carries it); nothing for most variants."""
        return {}

    def load_replica_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`replica_state` (an empty dict: start afresh, as from a consensus model)."""

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "steps": self.steps, "topology": self.topology.name, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase = int(state["phase"])
        self.steps = int(state.get("steps", 0))

    # ------------------------------------------------------------------ for the variants' steps
    def _begin_step(self) -> None:
        self.timeout.tick()
        self.steps += 1

    def mixes_now(self) -> bool:
        """Whether this step mixes (``every``: local steps between mixes)."""
        return self.steps % self.options.every == 0

    def _nothing_to_exchange(self, tensors: Sequence[Tensor], rounds: int) -> bool:
        """The world-size guard: one worker, or no tensors, sends nothing; the phase still moves on by the mix's
        ``rounds``, as on every other worker."""
        if self.world_size == 1 or not tensors:
            self.phase += rounds
            return True
        return False

    def _wire_dtype(self, bucket: Bucket) -> torch.dtype:
        """The wire dtype for floating-point buckets, the bucket's own otherwise."""
        if self.wire_dtype is not None and bucket.flat.is_floating_point():
            return self.wire_dtype
        return bucket.dtype

    def _round_weights(self, bucket: Bucket, phase: int) -> Tensor:
        """The in-neighbours' weights of a phase's matrix, on the bucket's device and in its dtype (made once)."""
        key = (phase, bucket.device, bucket.dtype)
        if key not in self._weights:
            weights = self._neighbours[phase].receive_weights
            self._weights[key] = torch.tensor(weights, dtype=bucket.dtype, device=bucket.device)
        return self._weights[key]

    def _check_tags(self, tags: list[int], peers: Sequence[int]) -> None:
        for tag, peer in zip(tags, peers):
            if tag != self.steps:
                raise GossipPeerError(
                    f"rank {self.rank}: rank {peer} sent the message of its gossip step {tag} while this rank mixes step "
                    f"{self.steps}; the ranks' steps have diverged (a rank skipped or repeated an optimizer step)"
                )

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

    # ------------------------------------------------------------------ collectives over all workers
    @torch.no_grad()
    def average(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The exact average over all workers (one all_reduce per dtype), as new tensors; inputs are untouched."""
        out = [t.detach().clone() for t in tensors]
        if self.world_size == 1:
            return out
        for bucket in Plan(out).buckets:
            AllAverage.post(self, bucket, with_headers=False, pack=True, unpack=True).land(self)
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

    def _headers_buffer(self, device: torch.device) -> Tensor:
        """Every rank's header, gathered (one buffer per device, reused)."""
        headers = self._gathered_headers.get(device)
        if headers is None:
            headers = self._gathered_headers[device] = torch.empty(self.world_size * HEADER_BYTES, dtype=torch.uint8, device=device)
        return headers
