"""Flat buffers and messages for the tensors a mix moves, allocated once per list of tensors and reused every step.

A mix sends one message per neighbour for a whole model, not one per tensor: the tensors are packed into one flat
buffer per (device, dtype), a *bucket*. A message is bytes, a header (:mod:`.control`) then the payload; when the
wire carries the tensors' own dtype the flat buffer *is* the payload of the bucket's message, so packing is the
only copy before sending. Buffers are kept with the bucket, so repeated mixes of the same tensors (parameters,
optimizer anchors) allocate nothing.

On CPU a bucket is also cut into a few segments (:class:`Segment`), so that a mix can send the first part while
it still casts the rest, and combine each part as it arrives; how many is the transport's decision
(:func:`~lightning_dpgan.gossip.transport.segment_count`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dpgan.gossip.control import HEADER_BYTES

# Distinct tensor lists mixed in turn (one per optimizer, plus consensus measurements) stay well under this.
_MAX_CACHED_PLANS = 8


def message_bytes(numel: int, dtype: torch.dtype) -> int:
    """A message's size: the header, then ``numel`` elements padded to 8 bytes (so rows of messages stay aligned)."""
    return framed_bytes(numel * torch.empty((), dtype=dtype).element_size())


def framed_bytes(payload_bytes: int) -> int:
    """The size of a message whose payload takes ``payload_bytes``: the header, then the payload padded to 8 bytes."""
    return HEADER_BYTES + -(-payload_bytes // 8) * 8


def mix_message_bytes(numel: int, dtype: torch.dtype, wire_dtype: str | None = None, compression: str | None = None,
                      topk_fraction: float = 0.01) -> int:
    """What a worker sends each neighbour in one round of a mix of ``numel`` elements of ``dtype``: the tensors in
    the wire dtype, or CHOCO's compressed difference. The engines size their messages with the same rules, and the
    time model (:mod:`lightning_dpgan.sim.timing`) and the benchmarks count bytes with this."""
    from lightning_dpgan.gossip.compression import build_compressor
    from lightning_dpgan.gossip.transport import resolve_wire_dtype

    if compression is not None:
        return framed_bytes(build_compressor(compression, topk_fraction).wire_bytes(numel, dtype))
    return message_bytes(numel, resolve_wire_dtype(wire_dtype) or dtype)


def payload(messages: Tensor, numel: int, dtype: torch.dtype) -> Tensor:
    """The payload of a message (or of each row of messages) as ``numel`` elements of ``dtype``."""
    size = numel * torch.empty((), dtype=dtype).element_size()
    return messages[..., HEADER_BYTES : HEADER_BYTES + size].view(dtype)


@dataclass(frozen=True)
class Segment:
    """Elements ``start:stop`` of a bucket's flat buffer, and the parts of its tensors they hold.

    The whole bucket is one segment whose pieces are the tensors themselves (any strides); a part of it is 1-D
    pieces of contiguous tensors, made afresh at each use (a tensor's storage may be swapped between mixes)."""

    start: int
    stop: int
    parts: tuple[tuple[int, int, int], ...]  # (tensor index, first element, end element) in this range
    bucket: Bucket

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.bucket.numel

    def tensors(self) -> list[Tensor]:
        """The tensors' pieces in this range."""
        if self.whole:
            return self.bucket.tensors
        return [self.bucket.tensors[i].view(-1)[low:high] for i, low, high in self.parts]

    def pieces(self, buffer: Tensor) -> list[Tensor]:
        """This segment's range of a ``numel``-long buffer (the flat one, a payload row), cut like its tensors."""
        if self.whole:
            return self.bucket.shaped(buffer)
        return list(buffer[self.start : self.stop].split([high - low for _, low, high in self.parts]))

    def message_bytes(self, dtype: torch.dtype) -> tuple[int, int]:
        """The bytes of a ``dtype`` message that carry this segment: the first also carries the header, the last
        the padding."""
        size = dtype.itemsize
        low = 0 if self.start == 0 else HEADER_BYTES + self.start * size
        if self.stop == self.bucket.numel:
            return low, message_bytes(self.bucket.numel, dtype)
        return low, HEADER_BYTES + self.stop * size


class Bucket:
    """Same-device, same-dtype tensors, their flat buffer, their message and their reusable scratch buffers."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = list(tensors)
        first = self.tensors[0]
        self.dtype, self.device = first.dtype, first.device
        self.numel = sum(t.numel() for t in self.tensors)
        self.message = torch.empty(message_bytes(self.numel, self.dtype), dtype=torch.uint8, device=self.device)
        self.flat = payload(self.message, self.numel, self.dtype)
        self._scratch: dict[tuple[str, torch.dtype, int], Tensor] = {}
        self._shaped: dict[tuple[int, torch.dtype], list[Tensor]] = {}
        self._segments: dict[int, list[Segment]] = {}
        self.views = self.shaped(self.flat)

    def pack(self) -> Tensor:
        torch._foreach_copy_(self.views, self.tensors)
        return self.flat

    def unpack(self) -> None:
        torch._foreach_copy_(self.tensors, self.views)

    def segments(self, count: int) -> list[Segment]:
        """The bucket cut into ``count`` segments of about equal size (one when a tensor is not contiguous)."""
        count = max(1, min(count, self.numel))
        if count > 1 and not all(t.is_contiguous() for t in self.tensors):
            count = 1
        if count not in self._segments:
            bounds = [self.numel * k // count for k in range(count + 1)]
            self._segments[count] = [Segment(a, b, self._parts(a, b), self) for a, b in zip(bounds, bounds[1:])]
        return self._segments[count]

    def _parts(self, start: int, stop: int) -> tuple[tuple[int, int, int], ...]:
        """Which elements of which tensors fall in ``start:stop`` of the flat buffer."""
        parts, offset = [], 0
        for i, t in enumerate(self.tensors):
            low, high = max(start, offset), min(stop, offset + t.numel())
            if low < high:
                parts.append((i, low - offset, high - offset))
            offset += t.numel()
        return tuple(parts)

    def scratch(self, kind: str, dtype: torch.dtype, rows: int = 0) -> Tensor:
        """A reusable buffer of ``rows`` x ``numel`` (or ``numel`` when ``rows == 0``)."""
        key = (kind, dtype, rows)
        if key not in self._scratch:
            shape = (rows, self.numel) if rows else (self.numel,)
            self._scratch[key] = torch.empty(shape, dtype=dtype, device=self.device)
        return self._scratch[key]

    def messages(self, kind: str, dtype: torch.dtype, rows: int = 0) -> Tensor:
        """Reusable messages (``uint8``, one per row, or one when ``rows == 0``) for a payload of ``dtype``."""
        key = (f"messages:{kind}", dtype, rows)
        if key not in self._scratch:
            size = message_bytes(self.numel, dtype)
            self._scratch[key] = torch.empty((rows, size) if rows else (size,), dtype=torch.uint8, device=self.device)
        return self._scratch[key]

    def send_message(self, dtype: torch.dtype) -> Tensor:
        """The message this bucket sends with a ``dtype`` payload: its own when that is the tensors' dtype."""
        return self.message if dtype == self.dtype else self.messages("send", dtype)

    def shaped(self, buffer: Tensor) -> list[Tensor]:
        """Views of a ``numel``-long buffer (the flat one, a payload row) shaped like the tensors, cached."""
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
        self._plans: OrderedDict[tuple[str | int, ...], Plan] = OrderedDict()
        self._in_flight: set[int] = set()

    def __len__(self) -> int:
        return len(self._plans)

    def get(self, tensors: Sequence[Tensor], purpose: str = "mix") -> Plan:
        """The plan of these tensors for ``purpose`` (a consensus measurement keeps its own buffers, so it can read
        tensors whose mix is still in flight)."""
        key = (purpose, *(id(t) for t in tensors))
        plan = self._plans.get(key)
        if plan is None:
            if len(set(key[1:])) != len(key) - 1:  # a mix combines into the tensors in place: it would do it twice
                raise ValueError("a tensor appears more than once in the list to mix; pass each tensor once")
            plan = Plan(tensors)
            self._plans[key] = plan
            if len(self._plans) > _MAX_CACHED_PLANS:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        if id(plan) in self._in_flight:
            raise RuntimeError("these tensors have a mix in flight: finish it before using them again")
        return plan

    def mark_in_flight(self, plan: Plan) -> None:
        self._in_flight.add(id(plan))

    def release(self, plan: Plan) -> None:
        self._in_flight.discard(id(plan))

    def clear(self) -> None:
        self._plans.clear()
        self._in_flight.clear()
