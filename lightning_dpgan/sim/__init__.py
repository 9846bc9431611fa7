"""Many replicas of a decentralized run in one process: :class:`Simulator` (issue 45, item 1)."""

from lightning_dpgan.sim.simulator import Simulator, replica_streams

__all__ = ["Simulator", "replica_streams"]
