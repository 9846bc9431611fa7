"""The gossip wire: mix tensors across workers with ``W^t``.

``options`` holds every setting (:class:`GossipOptions`), ``buffers`` packs tensors into reusable messages,
``control`` is the header each message carries (its step, and the stop its sender knows of), ``transport`` moves
messages to and from the neighbours, ``combine`` forms each round's weighted sum, ``engine`` puts them together as
the engine variants, ``stale`` is the bounded-staleness variant, ``choco`` the compressed one (its compressors in
``compression``), and ``reference`` is the dense numpy products the
tests compare with.
"""

from lightning_dpgan.gossip.choco import ChocoGossip
from lightning_dpgan.gossip.control import Stop, StopReason
from lightning_dpgan.gossip.engine import (
    GossipEngine,
    NoGossip,
    OverlappedGossip,
    PendingMix,
    SynchronousGossip,
    build_engine,
)
from lightning_dpgan.gossip.options import DEFAULT_CHUNK_BYTES, GossipOptions
from lightning_dpgan.gossip.reference import dense_mix
from lightning_dpgan.gossip.stale import StaleGossip
from lightning_dpgan.gossip.transport import (
    WIRE_DTYPES,
    DistributedTransport,
    GossipPeerError,
    Transport,
    resolve_wire_dtype,
)

__all__ = [
    "ChocoGossip",
    "DEFAULT_CHUNK_BYTES",
    "WIRE_DTYPES",
    "DistributedTransport",
    "GossipEngine",
    "GossipOptions",
    "GossipPeerError",
    "NoGossip",
    "OverlappedGossip",
    "PendingMix",
    "StaleGossip",
    "Stop",
    "StopReason",
    "SynchronousGossip",
    "Transport",
    "build_engine",
    "dense_mix",
    "resolve_wire_dtype",
]
