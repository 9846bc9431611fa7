"""Decentralized parallel optimistic GAN training (DPOSG) as a PyTorch Lightning strategy."""

from lightning_dpgan.gan import DPGAN
from lightning_dpgan.gossip import GossipEngine, GossipPeerError
from lightning_dpgan.optim import OptimisticAdam, OptimisticSGD
from lightning_dpgan.strategy import AnchoredOptimizer, DecentralizedStrategy
from lightning_dpgan.topology import Topology, TopologyError, build_topology

__version__ = "0.1.0"
__all__ = [
    "AnchoredOptimizer",
    "DPGAN",
    "DecentralizedStrategy",
    "GossipEngine",
    "GossipPeerError",
    "OptimisticAdam",
    "OptimisticSGD",
    "Topology",
    "TopologyError",
    "build_topology",
]
