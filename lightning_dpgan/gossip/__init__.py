"""The gossip wire: mix tensors across workers with ``W^t``.

``options`` holds every setting (:class:`GossipOptions`, which names the engine variant it asks for), ``buffers``
packs tensors into reusable messages, ``control`` is the header each message carries (its step, and the stop its
sender knows of), ``transport`` moves messages to and from the neighbours, ``combine`` forms each round's weighted
sum. ``base`` is the contract every engine variant keeps (:class:`GossipEngine`) and what they share; the variants
are ``synchronous`` (plain and overlapped), ``stale`` (bounded staleness), ``choco`` (compressed, its compressors in
``compression``), ``live`` (synchronous, its members agreed on again when one leaves, through ``membership``) and
``none`` (no mixing); ``registry`` names them and builds the one the options ask for
(:func:`build_engine`). ``reference`` is the dense numpy products the tests compare with.
"""

from lightning_dpgan.gossip.base import GossipEngine
from lightning_dpgan.gossip.choco import ChocoGossip
from lightning_dpgan.gossip.control import Stop, StopReason
from lightning_dpgan.gossip.live import LiveGossip
from lightning_dpgan.gossip.none import NoGossip
from lightning_dpgan.gossip.options import DEFAULT_CHUNK_BYTES, GossipOptions
from lightning_dpgan.gossip.reference import dense_mix
from lightning_dpgan.gossip.registry import ENGINES, build_engine
from lightning_dpgan.gossip.stale import StaleGossip
from lightning_dpgan.gossip.synchronous import OverlappedGossip, PendingMix, SynchronousGossip
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
    "ENGINES",
    "WIRE_DTYPES",
    "DistributedTransport",
    "GossipEngine",
    "GossipOptions",
    "GossipPeerError",
    "LiveGossip",
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
