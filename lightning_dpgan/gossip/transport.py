"""The wire: one gossip round's messages to and from the neighbours, and waiting for them with a named peer.

On CPU (gloo) a message goes out in chunks of ``chunk_bytes``, the chunks to and from all neighbours posted
together, every receive before any send. Why:

* gloo serves the operations posted to one peer in order, so one large send posted before the matching receive
  makes the two directions of a link take turns; interleaved chunks keep both busy (docs/wire.md);
* a receive tells its peer it is ready with a small notice that gloo queues behind the data already queued to
  that peer, and the peer sends nothing before the notice arrives; receives posted first do not wait.

NCCL needs neither: its buffers go out whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_CHUNK_BYTES = 256 * 1024

WIRE_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "float32": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

Scheduled = tuple[Literal["send", "recv"], int, int]  # (kind, peer, chunk)


class GossipPeerError(RuntimeError):
    """A neighbour stopped answering: it died, or did not reach the same gossip call within the timeout."""


def resolve_wire_dtype(wire_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The dtype a message travels in; ``None`` for the tensors' own."""
    if wire_dtype is None or isinstance(wire_dtype, torch.dtype):
        return None if wire_dtype == torch.float32 else wire_dtype
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire_dtype {wire_dtype!r}; allowed: {', '.join(WIRE_DTYPES)}")
    return WIRE_DTYPES[wire_dtype]


def check_chunk_bytes(chunk_bytes: Any) -> None:
    if chunk_bytes is None:
        return
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(
            f"chunk_bytes must be a positive integer (bytes per gossip message chunk) or None (unchunked), got {chunk_bytes!r}"
        )


def chunk_ranges(buffer: Tensor, chunk_bytes: int | None) -> list[tuple[int, int]]:
    """Element ranges sent as separate messages: ``chunk_bytes`` each on CPU, the whole buffer otherwise."""
    numel = buffer.numel()
    if chunk_bytes is None or buffer.device.type != "cpu":
        return [(0, numel)]
    step = max(1, chunk_bytes // buffer.element_size())
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def schedule(send_to: Sequence[int], receive_from: Sequence[int], num_chunks: int) -> list[Scheduled]:
    """One round's operations in posting order: every receive, chunk by chunk across peers, then every send."""
    receives: list[Scheduled] = [("recv", peer, c) for c in range(num_chunks) for peer in receive_from]
    sends: list[Scheduled] = [("send", peer, c) for c in range(num_chunks) for peer in send_to]
    return receives + sends


class Wire:
    """Point-to-point and collective operations on one process group, each waited for with the peer it concerns."""

    def __init__(
        self, rank: int, group: dist.ProcessGroup | None, timeout: timedelta | None, chunk_bytes: int | None
    ) -> None:
        check_chunk_bytes(chunk_bytes)
        self.rank = rank
        self.group = group
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes

    def exchange(
        self, send: Tensor, received: Tensor, send_to: Sequence[int], receive_from: Sequence[int]
    ) -> list[tuple[Any, int]]:
        """Post ``send`` to every out-neighbour and receive row ``k`` of ``received`` from ``receive_from[k]``;
        returns ``(work, peer)`` pairs to wait for."""
        if not send_to and not receive_from:
            return []
        row = {peer: k for k, peer in enumerate(receive_from)}
        ranges = chunk_ranges(send, self.chunk_bytes)
        ops, peers = [], []
        for kind, peer, chunk in schedule(send_to, receive_from, len(ranges)):
            start, stop = ranges[chunk]
            if kind == "send":
                ops.append(dist.P2POp(dist.isend, send[start:stop], peer, self.group))
            else:
                ops.append(dist.P2POp(dist.irecv, received[row[peer], start:stop], peer, self.group))
            peers.append(peer)
        return list(zip(dist.batch_isend_irecv(ops), peers))

    def all_reduce(self, tensor: Tensor) -> Any:
        return dist.all_reduce(tensor, group=self.group, async_op=True)

    def broadcast(self, tensor: Tensor, src: int, gossip_round: int) -> None:
        self.wait(dist.broadcast(tensor, src=src, group=self.group, async_op=True), "broadcast", gossip_round, src)

    def wait(self, work: Any, what: str, gossip_round: int, peer: int | None = None) -> None:
        try:
            if self.timeout is not None:
                work.wait(self.timeout)
            else:
                work.wait()
        except Exception as err:  # gloo/nccl raise RuntimeError or DistBackendError
            who = f"rank {peer}" if peer is not None else "a peer"
            raise GossipPeerError(
                f"rank {self.rank}: {what} with {who} failed at gossip round {gossip_round}"
                f" (peer died or stalled past the {self.timeout or 'process-group'} timeout): {err}"
            ) from err
