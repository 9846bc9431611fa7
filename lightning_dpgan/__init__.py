"""Decentralized parallel optimistic GAN training (DPOSG) as a PyTorch Lightning strategy.

The public names are imported on first use, so that ``lightning_dpgan.topology`` (numpy only) and the command
line's input checks load without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AnchoredOptimizer": "lightning_dpgan.mix_sets",
    "DPGAN": "lightning_dpgan.gan",
    "DecentralizedStrategy": "lightning_dpgan.strategy",
    "GossipEngine": "lightning_dpgan.gossip",
    "GossipPeerError": "lightning_dpgan.gossip",
    "OptimisticAdam": "lightning_dpgan.optim",
    "OptimisticSGD": "lightning_dpgan.optim",
    "Topology": "lightning_dpgan.topology",
    "TopologyError": "lightning_dpgan.topology",
    "build_topology": "lightning_dpgan.topology",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_dpgan' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
