"""A round's arithmetic: ``x_i <- w_ii x_i + sum_j w_ij x_j`` from the received rows, in as few passes as possible.

Three ways, by where the result goes:

* ``"flat"``: one ``addmv`` over the packed flat buffer (any number of neighbours; the result is unpacked or
  sent on by a later round);
* ``"tensors"``: one in-neighbour whose weight and the worker's own sum to 1 (one-peer exponential) is a lerp,
  done straight into the tensors, so nothing is packed or unpacked;
* ``"correction"``: a started mix (``start_mix``) whose flat buffer still holds ``x`` as it was then adds
  ``W x - x`` to the tensors as they are now, keeping what changed while the mix was on the wire.

On hosts sharing cores every pass over the data sits on the wire's critical path, hence the special cases. Each
works on one :class:`~lightning_dpgan.gossip.buffers.Segment` of the bucket, so that a segment can be combined as
soon as it has arrived while the next is still on the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_dpgan.gossip.buffers import Segment

Into = Literal["flat", "tensors", "correction"]


def lerps(self_weight: float, receive_weights: Sequence[float]) -> bool:
    """Whether the combination is one lerp: one in-neighbour, the two weights summing to exactly 1."""
    return len(receive_weights) == 1 and self_weight + receive_weights[0] == 1.0


def combine(
    segment: Segment, received: Tensor, self_weight: float, weights: Tensor, weight_values: Sequence[float], into: Into
) -> None:
    """Combine the segment's part of the received rows (one per in-neighbour, in ``weights`` order) into ``into``."""
    rows = _in_bucket_dtype(segment, received)
    if into == "tensors":
        (row,) = rows
        # (1 - w) x_i + w x_j = w_ii x_i + w_ij x_j, as w_ii + w_ij == 1
        torch._foreach_lerp_(segment.tensors(), segment.pieces(row), weight_values[0])
        return
    correction = into == "correction"
    flat = segment.bucket.flat
    # one pass: flat <- beta flat + rows^T weights; for a correction beta drops x_i itself
    flat[segment.start : segment.stop].addmv_(
        rows[:, segment.start : segment.stop].t(), weights, beta=self_weight - 1 if correction else self_weight
    )
    if correction:
        torch._foreach_add_(segment.tensors(), segment.pieces(flat))


def _in_bucket_dtype(segment: Segment, received: Tensor) -> Tensor:
    """The received rows in the tensors' dtype (``addmv`` and ``lerp`` take one dtype); only the segment's
    elements are cast."""
    bucket = segment.bucket
    if received.dtype == bucket.flat.dtype:
        return received
    upcast = bucket.scratch("received_upcast", bucket.flat.dtype, received.shape[0])
    upcast[:, segment.start : segment.stop].copy_(received[:, segment.start : segment.stop])
    return upcast
