"""Decentralized parallel optimistic GAN training (DPOSG) as a PyTorch Lightning strategy.

Importing the package registers the strategy names with Lightning: ``Trainer(strategy="decentralized")`` and
``Fabric(strategy="decentralized")`` (and ``"decentralized_spawn"``) work after ``import lightning_dpgan``.
"""

from __future__ import annotations

import gc as _gc
import importlib.util as _importlib_util
import os as _os
import sys as _sys

# The checkout's top-level conf/ is the subpackage lightning_dpgan.conf (pyproject's package-dir). Installed, it sits
# inside the package; imported from a checkout (python -m lightning_dpgan run from the clone's root, which shadows an
# installed wheel), the package's folder has no conf/: that one subpackage is then registered from the root (and
# nothing else of the checkout becomes importable as lightning_dpgan.*).
_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout_conf = _os.path.join(_os.path.dirname(_here), "conf")
if (
    "lightning_dpgan.conf" not in _sys.modules
    and not _os.path.isdir(_os.path.join(_here, "conf"))
    and _importlib_util.find_spec("lightning_dpgan.conf") is None
    and _os.path.isfile(_os.path.join(_checkout_conf, "config.yaml"))
):
    _spec = _importlib_util.spec_from_file_location(
        "lightning_dpgan.conf", _os.path.join(_checkout_conf, "__init__.py"), submodule_search_locations=[_checkout_conf]
    )
    if _spec is not None and _spec.loader is not None:
        conf = _sys.modules["lightning_dpgan.conf"] = _importlib_util.module_from_spec(_spec)
        _spec.loader.exec_module(conf)

# Importing torch, Lightning and torchmetrics (lightning.fabric imports all three) leaves about 450,000 objects and
# no garbage, and the collector's passes over them took a third of a start, which every worker of a run pays. So
# the collector waits for the import, and then what is alive is frozen: later full passes skip it too.
_collecting = _gc.isenabled()
_gc.disable()
try:
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
finally:
    if _collecting:
        _gc.freeze()
        _gc.enable()

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
