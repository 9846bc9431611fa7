"""Decentralized parallel optimistic GAN training (DPOSG) as a PyTorch Lightning strategy.

Importing the package registers the strategy names with Lightning: ``Trainer(strategy="decentralized")`` and
``Fabric(strategy="decentralized")`` (and ``"decentralized_spawn"``) work after ``import lightning_dpgan``.
"""

from __future__ import annotations

from lightning_dpgan._version import __version__
from lightning_dpgan.fabric import DecentralizedFabricStrategy
from lightning_dpgan.gan import DPGAN
from lightning_dpgan.gossip import GossipEngine, GossipOptions, GossipPeerError
from lightning_dpgan.guard import NonFiniteError, NonFiniteGuard
from lightning_dpgan.mix_sets import AnchoredOptimizer
from lightning_dpgan.optim import OptimisticAdam, OptimisticSGD
from lightning_dpgan.replicas import CheckpointError
from lightning_dpgan.strategy import DecentralizedStrategy
from lightning_dpgan.topology import Topology, TopologyError, build_topology

__all__ = [
    "AnchoredOptimizer",
    "CheckpointError",
    "DPGAN",
    "DecentralizedFabricStrategy",
    "DecentralizedStrategy",
    "GossipEngine",
    "GossipOptions",
    "GossipPeerError",
    "NonFiniteError",
    "NonFiniteGuard",
    "OptimisticAdam",
    "OptimisticSGD",
    "Topology",
    "TopologyError",
    "__version__",
    "build_topology",
]
