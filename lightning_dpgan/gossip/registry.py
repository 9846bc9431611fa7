"""The gossip variants by name, and :func:`build_engine`, which builds the one a ``GossipOptions`` asks for.

:attr:`GossipOptions.variant <lightning_dpgan.gossip.options.GossipOptions.variant>` names the variant; a new
variant is one module with a :class:`~lightning_dpgan.gossip.base.GossipEngine` subclass and one line in
:data:`ENGINES` (docs/development.md: adding a gossip variant).
"""

from __future__ import annotations

from lightning_dpgan.gossip.base import GossipEngine
from lightning_dpgan.gossip.choco import ChocoGossip
from lightning_dpgan.gossip.live import LiveGossip
from lightning_dpgan.gossip.none import NoGossip
from lightning_dpgan.gossip.options import GossipOptions
from lightning_dpgan.gossip.stale import StaleGossip
from lightning_dpgan.gossip.synchronous import OverlappedGossip, SynchronousGossip
from lightning_dpgan.gossip.transport import DistributedTransport, Transport
from lightning_dpgan.topology import Topology

#: every variant, by the name :attr:`GossipOptions.variant` gives it
ENGINES: dict[str, type[GossipEngine]] = {
    "synchronous": SynchronousGossip,
    "overlapped": OverlappedGossip,
    "stale": StaleGossip,
    "choco": ChocoGossip,
    "live": LiveGossip,
    "none": NoGossip,
}


def engine_class(options: GossipOptions) -> type[GossipEngine]:
    """The variant ``options`` asks for (its topology not checked: :func:`build_engine` does that)."""
    return ENGINES[options.variant]


def build_engine(
    topology: Topology, rank: int, options: GossipOptions | None = None, transport: Transport | None = None
) -> GossipEngine:
    """The engine variant that ``options`` asks for, over ``transport`` (default: ``torch.distributed``'s default
    process group), once the topology is checked to suit it (:meth:`GossipOptions.check_topology`)."""
    options = options or GossipOptions()
    options.check_topology(topology)
    if transport is None:
        transport = DistributedTransport(rank, None, options.chunk_bytes)
    return engine_class(options)(topology, rank, transport, options)
