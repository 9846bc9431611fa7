"""``ChocoGossip``: compressed gossip with error feedback (CHOCO-gossip, Koloskova et al., ICML 2019).

Every worker keeps public copies ``x_hat`` of itself and of each in-neighbour, identical on every worker that
holds them. On a mixing step worker ``i``::

    q_i     = Q(x_i - x_hat_i)                                   sent to the out-neighbours
    x_hat_j = x_hat_j + q_j            for j = i and every in-neighbour (the q each sent)
    x_i     = x_i + gamma * sum_j w_ij (x_hat_j - x_hat_i)

with ``Q`` a compressor (:mod:`.compression`) and ``gamma`` the consensus step
(:meth:`~lightning_dpgan.gossip.options.GossipOptions.default_consensus_step`). What ``Q`` drops stays in
``x - x_hat`` and is sent later (error feedback): with int8 and top-k the replicas reach consensus to float
precision, with sign they stall at a floor. With ``Q`` the identity and ``gamma = 1`` this is plain gossip,
``x <- W x``.

The copies only have to be identical wherever they are held; any common start works. They start at rank 0's
tensors, broadcast at the first mix of a list of tensors (one model-sized collective, once), so that the first
rounds send the replicas' differences from it rather than the whole model; zeros would be sent in pieces over
``1 / topk_fraction`` rounds. The copies are part of each replica's checkpoint (:meth:`ChocoGossip.replica_state`),
restored exactly at the same world size on the same graph (the main file records the graph's
:meth:`~lightning_dpgan.topology.Topology.fingerprint`), and start afresh from a consensus model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_dpgan.gossip.base import GossipEngine
from lightning_dpgan.gossip.buffers import Bucket, Plan, framed_bytes
from lightning_dpgan.gossip.compression import Compressor, build_compressor
from lightning_dpgan.gossip.control import HEADER_BYTES
from lightning_dpgan.gossip.options import GossipOptions
from lightning_dpgan.gossip.transport import Transport
from lightning_dpgan.topology import Topology


@dataclass
class _Copies:
    """One bucket's public copies: row 0 is this worker's own, then one row per in-neighbour."""

    bucket: Bucket
    copies: Tensor  # (1 + in-neighbours, numel), in the bucket's dtype
    send: Tensor  # this worker's message
    received: Tensor  # (in-neighbours, message bytes)
    decoded: Tensor  # (numel,) scratch


class ChocoGossip(GossipEngine):
    """Compressed gossip (``GossipOptions(compression=...)``) on a static topology, one round per mixing step."""

    def __init__(self, topology: Topology, rank: int, transport: Transport, options: GossipOptions) -> None:
        super().__init__(topology, rank, transport, options)
        assert options.compression is not None
        self.compressor: Compressor = build_compressor(options.compression, options.topk_fraction)
        self.consensus_step = options.resolved_consensus_step()
        self._nb = self._neighbours[0]
        # the tensors' ids -> their plan and one entry per bucket. The plan holds the tensors, so no id in a key can
        # be recycled while its entry lives; and the entries are not evicted with the engine's plan cache, which
        # would restart one rank's copies alone
        self._copies: dict[tuple[int, ...], tuple[Plan, list[_Copies]]] = {}
        self._restored: list[Tensor] = []  # copies read from a checkpoint, taken by the plans in the order they come

    @override
    @torch.no_grad()
    def step(self, tensors: Sequence[Tensor]) -> None:
        self._begin_step()
        if not self.mixes_now() or self._nothing_to_exchange(tensors, 1):
            return
        entries = self._copies_of(tensors)
        posted = []
        for entry in entries:
            bucket, own = entry.bucket, entry.copies[0]
            bucket.pack()
            payload = entry.send[HEADER_BYTES:]
            torch.sub(bucket.flat, own, out=entry.decoded)  # x - x_hat, in the scratch buffer the decode then reuses
            self.compressor.encode(entry.decoded, payload)
            self.compressor.decode(payload, entry.decoded)
            own.add_(entry.decoded)
            self.control.write(entry.send, self.steps)
            posted.append(self.transport.exchange(entry.send, entry.received, self._nb.send_to, self._nb.receive_from))
            self.messages_sent += len(self._nb.send_to)
        for entry, exchange in zip(entries, posted):
            for p in exchange:
                self.transport.wait(p, self.timeout(), self.phase)
            self._check_tags(self.control.read(entry.received), self._nb.receive_from)
            own = entry.copies[0]
            for k, weight in enumerate(self._nb.receive_weights):
                self.compressor.decode(entry.received[k, HEADER_BYTES:], entry.decoded)
                entry.copies[k + 1].add_(entry.decoded)
                entry.bucket.flat.add_(entry.copies[k + 1] - own, alpha=self.consensus_step * weight)
            entry.bucket.unpack()
        self.phase += 1

    @override
    def state_dict(self) -> dict[str, Any]:
        """With the graph's fingerprint: the copies belong to particular neighbours, and a resume checks them."""
        return {**super().state_dict(), "graph": self.topology.fingerprint()}

    @override
    def replica_state(self) -> dict[str, Any]:
        """The public copies, per bucket in the order the plans were first mixed (each replica's own)."""
        taken = [entry.copies.clone() for _, entries in self._copies.values() for entry in entries]
        return {"choco_copies": taken + [t.clone() for t in self._restored]}  # restored ones not mixed yet stay

    @override
    def load_replica_state(self, state: dict[str, Any]) -> None:
        self._copies.clear()
        self._restored = list(state.get("choco_copies", []))

    @override
    def forget(self) -> None:
        self._copies.clear()
        super().forget()

    def _copies_of(self, tensors: Sequence[Tensor]) -> list[_Copies]:
        key = tuple(id(t) for t in tensors)
        held = self._copies.get(key)
        if held is not None:
            return held[1]
        plan = self._plans.get(tensors)  # refuses a tensor listed twice
        entries = []
        rows = 1 + len(self._nb.receive_from)
        for bucket in plan.buckets:
            if not bucket.flat.is_floating_point():
                raise ValueError(f"gossip averages floating-point tensors only, got one of dtype {bucket.dtype}")
            size = framed_bytes(self.compressor.wire_bytes(bucket.numel, bucket.dtype))
            copies = torch.empty(rows, bucket.numel, dtype=bucket.dtype, device=bucket.device)
            if self._restored:
                restored = self._restored.pop(0)
                if restored.shape != copies.shape:
                    raise ValueError(
                        f"the checkpoint's CHOCO copies have shape {tuple(restored.shape)}, this run's "
                        f"{tuple(copies.shape)}: resume with the same model and topology"
                    )
                copies.copy_(restored)
            else:  # every holder starts every copy at rank 0's tensors: identical bits wherever they are held
                start = bucket.pack().clone()
                self.transport.wait(self.transport.broadcast(start, 0), self.collective_timeout, self.phase)
                copies.copy_(start.expand_as(copies))
            entries.append(_Copies(
                bucket, copies, torch.zeros(size, dtype=torch.uint8, device=bucket.device),
                torch.empty(len(self._nb.receive_from), size, dtype=torch.uint8, device=bucket.device),
                torch.empty(bucket.numel, dtype=bucket.dtype, device=bucket.device),
            ))
        self._copies[key] = (plan, entries)
        return entries
