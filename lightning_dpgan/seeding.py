"""Every random stream a replica owns: per-rank seeds, and the states a checkpoint saves and restores.

Ranks started from one ``seed_everything`` draw the same numbers; replicas must draw their own noise and batches.
The state of the streams is saved as tensors and plain tuples only, so that replica files load with
``torch.load(weights_only=True)`` (numpy's state is an array, which a weights-only load refuses).
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def rank_seed(base: int, rank: int) -> int:
    """``rank``'s seed from the run's ``base`` seed: deterministic, different per rank."""
    return (base + 1_000_003 * rank) % (2**32)


def seed_for_rank(rank: int) -> None:
    """Reseed Python, numpy and torch from the global seed and ``rank`` (deterministic, different per rank)."""
    seed = rank_seed(int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())), rank)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(include_cuda: bool = False) -> dict[str, Any]:
    """The state of torch's, numpy's and Python's global generators, as tensors and tuples of numbers."""
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(position), int(has_gauss), float(cached_gauss)),
        "python": random.getstate(),
    }
    if include_cuda and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
