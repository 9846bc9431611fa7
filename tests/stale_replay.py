"""``ReplayedStale``: bounded-staleness gossip that a test can replay in numpy (tests/reference.py).

A subclass of :class:`~lightning_dpgan.gossip.stale.StaleGossip`, so that production code carries no test hooks:

* ``delivery(sender, tag)``, when given, is the step at which this worker takes ``sender``'s message of step ``tag``
  (from ``tag`` to ``tag + s``, a seeded schedule) instead of as soon as it has arrived;
* ``trace`` gets one entry per step: ``(step, skipped, [{neighbour: step of the message mixed}, one per stream])``,
  all a replay needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor
from typing_extensions import override

from lightning_dpgan.gossip.base import GossipEngine
from lightning_dpgan.gossip.options import GossipOptions
from lightning_dpgan.gossip.stale import _END, StaleGossip, _Slot, _Stream
from lightning_dpgan.gossip.transport import Transport
from lightning_dpgan.topology import Topology


class ReplayedStale(StaleGossip):
    def __init__(
        self, topology: Topology, rank: int, transport: Transport, options: GossipOptions,
        delivery: Callable[[int, int], int] | None = None,
    ) -> None:
        super().__init__(topology, rank, transport, options)
        self.delivery = delivery
        self.trace: list[tuple[int, bool, list[dict[int, int]]]] = []
        self._mixed: list[dict[int, int]] = []

    @classmethod
    def replacing(cls, strategy: Any) -> ReplayedStale:
        """The strategy's engine, replaced by one of these over the same transport (once: later calls return it).
        Call it after the strategy has connected and before the first step."""
        engine: GossipEngine = strategy.gossiper.engine
        if not isinstance(engine, cls):
            engine = strategy.gossiper.engine = cls(engine.topology, engine.rank, engine.transport, engine.options)
        return engine

    @override
    def step(self, tensors: Sequence[Tensor]) -> None:
        skipping, self._mixed = self._skipping, []
        super().step(tensors)
        if self._mixed:
            self.trace.append((self.steps, skipping, self._mixed))

    @override
    def _takes_now(self, stream: _Stream, peer: int, slot: _Slot) -> bool:
        if self.delivery is None:
            return super()._takes_now(stream, peer, slot)
        if stream.newest_tag[peer] >= self.steps:
            return False  # the next message is of a later step: not due before that step
        self.transport.wait(slot.posted, self.timeout(), self.phase)
        tag = self.control.peek(slot.message)
        return tag != _END and self.delivery(peer, tag) <= self.steps  # arrived; the schedule may hand it over later

    @override
    def _combine(self, stream: _Stream) -> None:
        self._mixed.append(dict(stream.newest_tag))
        super()._combine(stream)
