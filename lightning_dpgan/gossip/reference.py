"""The single-process reference a mix is tested against: a dense ``W^t`` product in numpy."""

from __future__ import annotations

import numpy as np

from lightning_dpgan.topology import Topology


def dense_mix(stacked: np.ndarray, topology: Topology, rounds: int, phase: int = 0) -> np.ndarray:
    """``W^t @ stacked`` (rows are workers), the rounds' matrices taken from ``phase`` on."""
    return topology.mixing_product(rounds, phase) @ np.asarray(stacked, dtype=np.float64)
