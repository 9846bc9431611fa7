"""Per-rank seeds: ranks started from one ``seed_everything`` must still draw their own noise and batches."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_for_rank(rank: int) -> None:
    """Reseed Python, numpy and torch from the global seed and ``rank`` (deterministic, different per rank)."""
    base = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
    seed = (base + 1_000_003 * rank) % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
