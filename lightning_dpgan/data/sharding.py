"""Per-rank data shards: disjoint, covering the dataset, and the same number of batches on every rank.

Decentralized workers each own their data; ``shard="by_label"`` gives every rank only some labels, the
heterogeneous case that gossip has to overcome. Equal epoch lengths matter more here than under DDP: a rank
that ran out of batches early would leave its neighbours waiting for a gossip message that never comes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from lightning_dpgan.checks import check_choice

SHARDS = ("iid", "by_label")


def shard_indices(
    size: int, num_replicas: int, rank: int, shard: str = "iid", labels: Sequence[int] | np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    """The dataset indices rank ``rank`` owns. Over all ranks they are disjoint and cover ``range(size)``.

    ``iid``: a seeded permutation cut into ``num_replicas`` near-equal parts. ``by_label``: the sorted distinct
    labels cut into ``num_replicas`` contiguous groups; a rank owns every sample of its labels.
    """
    check_choice("shard", shard, SHARDS)
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank!r}")
    if shard == "iid":
        if size < num_replicas:
            raise ValueError(f"{size} samples cannot be split over {num_replicas} ranks")
        order = np.random.default_rng(seed).permutation(size)
        return np.sort(np.array_split(order, num_replicas)[rank])
    if labels is None:
        raise ValueError("shard='by_label' needs the dataset's labels")
    labels = np.asarray(labels)
    if len(labels) != size:
        raise ValueError(f"got {len(labels)} labels for {size} samples")
    distinct = np.unique(labels)
    if len(distinct) < num_replicas:
        raise ValueError(
            f"shard='by_label' needs at least one label per rank: {len(distinct)} labels for {num_replicas} ranks"
        )
    mine = np.array_split(distinct, num_replicas)[rank]
    return np.flatnonzero(np.isin(labels, mine))


class ShardSampler(DistributedSampler):
    """Samples rank ``rank``'s shard, reshuffled every epoch, ``ceil(size / num_replicas)`` indices per epoch.

    A shard smaller than that repeats some of its own samples; a larger one (``by_label``) shows a different
    subset each epoch. Being a ``DistributedSampler``, Lightning keeps it instead of inserting its own.
    :meth:`resume_at` starts the next pass part-way through its epoch, for a mid-epoch resume.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        shard: str = "iid",
        labels: Sequence[int] | np.ndarray | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        size = len(dataset)  # type: ignore[arg-type]
        self.shard = shard
        self.indices = shard_indices(size, num_replicas, rank, shard, labels, seed)
        self.num_samples = math.ceil(size / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self._start = 0

    def resume_at(self, epoch: int, start: int) -> None:
        """The next pass yields epoch ``epoch``'s order from its ``start``-th index on; later passes are whole."""
        if not 0 <= start < self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}), got {start!r}")
        self.set_epoch(epoch)
        self._start = start

    def __iter__(self) -> Iterator[int]:
        order = self.indices
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + 7919 * self.epoch + 104729 * self.rank)
            order = order[torch.randperm(len(order), generator=generator).numpy()]
        repeats = math.ceil(self.num_samples / len(order))
        start, self._start = self._start, 0
        return iter(np.tile(order, repeats)[start : self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples
