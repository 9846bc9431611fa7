"""The gossip wire: mix tensors across workers with ``W^t``.

``buffers`` packs tensors into reusable flat buffers, ``transport`` moves them to and from the neighbours,
``combine`` forms each round's weighted sum, ``engine`` puts the three together as :class:`GossipEngine`, and
``reference`` is the dense numpy product the tests compare with.
"""

from lightning_dpgan.gossip.engine import GossipEngine, PendingMix
from lightning_dpgan.gossip.reference import dense_mix
from lightning_dpgan.gossip.transport import (
    DEFAULT_CHUNK_BYTES,
    WIRE_DTYPES,
    GossipPeerError,
    check_chunk_bytes,
    resolve_wire_dtype,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "WIRE_DTYPES",
    "GossipEngine",
    "GossipPeerError",
    "PendingMix",
    "check_chunk_bytes",
    "dense_mix",
    "resolve_wire_dtype",
]
