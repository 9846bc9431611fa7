"""Flat buffers for the tensors a mix moves, allocated once per list of tensors and reused on every step.

A mix sends one message per neighbour for a whole model, not one per tensor: the tensors are packed into one flat
buffer per (device, dtype), a *bucket*. The buffers (flat, received rows, wire-dtype copy, snapshot) are kept with
the bucket, so repeated mixes of the same tensors (parameters, optimizer anchors) allocate nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

# Distinct tensor lists mixed in turn (one per optimizer, plus consensus measurements) stay well under this.
_MAX_CACHED_PLANS = 8


class Bucket:
    """Same-device, same-dtype tensors, their flat buffer and their reusable scratch buffers."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = list(tensors)
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
            parts = buffer.split([t.numel() for t in self.tensors])
            self._shaped[key] = [part.view_as(t) for part, t in zip(parts, self.tensors)]
        return self._shaped[key]


class Plan:
    """The buckets of one list of tensors."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = list(tensors)  # strong references keep the ids in the cache key valid
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for t in self.tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        self.buckets = [Bucket(ts) for ts in groups.values()]


class PlanCache:
    """Plans keyed by tensor identity (callers pass the same objects every step), least recently used first out.

    It also guards a started mix: its plan's buffers are still being sent from, so reusing them before the mix
    is finished raises instead of corrupting the message.
    """

    def __init__(self) -> None:
        self._plans: OrderedDict[tuple[int, ...], Plan] = OrderedDict()
        self._in_flight: set[int] = set()

    def __len__(self) -> int:
        return len(self._plans)

    def get(self, tensors: Sequence[Tensor]) -> Plan:
        key = tuple(id(t) for t in tensors)
        plan = self._plans.get(key)
        if plan is None:
            if len(set(key)) != len(key):  # a mix combines into the tensors in place: it would do it twice
                raise ValueError("a tensor appears more than once in the list to mix; pass each tensor once")
            plan = Plan(tensors)
            self._plans[key] = plan
            if len(self._plans) > _MAX_CACHED_PLANS:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        if id(plan) in self._in_flight:
            raise RuntimeError("these tensors have a mix in flight (start_mix): call finish_mix before using them again")
        return plan

    def mark_in_flight(self, plan: Plan) -> None:
        self._in_flight.add(id(plan))

    def release(self, plan: Plan) -> None:
        self._in_flight.discard(id(plan))

    def clear(self) -> None:
        self._plans.clear()
        self._in_flight.clear()
