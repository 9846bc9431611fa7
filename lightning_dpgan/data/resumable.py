"""A training DataLoader that Lightning can resume mid-epoch.

Lightning saves the ``state_dict`` of every training loader that has one and hands it back to ``load_state_dict``
before it draws the first batch of a resumed run; without one it restarts the interrupted epoch from its first
batch (with a warning), so a resumed run sees other data than the uninterrupted one. The CLI checkpoints every
1000 steps, mid-epoch as a rule, so this is the common case, not a corner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_dpgan.data.sharding import ShardSampler


class ResumableDataLoader(DataLoader):
    """Batches of a :class:`ShardSampler` (``drop_last``), whose state is the epoch and the batches trained in it.

    Args:
        position: returns ``(epoch, batches)``, where training stands: the batches it has *trained on* in epoch
            ``epoch``. It comes from the trainer, not from counting here, because a loader cannot tell the batches
            it has handed out (a fetcher or worker processes may have drawn ahead) from those trained on.
    """

    def __init__(
        self, dataset: Dataset, *, batch_size: int, sampler: ShardSampler, position: Callable[[], tuple[int, int]], **kwargs: Any
    ) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self._position = position
        self._resuming_mid_epoch = False

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self._position()
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        epoch, batches = state_dict["epoch"], state_dict["batches"]
        if batches >= len(self):  # saved with other shards or batches: the position means nothing here
            rank_zero_warn(
                f"the checkpoint's data position (batch {batches} of epoch {epoch}) lies beyond this run's epoch of"
                f" {len(self)} batches (another world size or batch size?); epoch {epoch} restarts from its first batch"
            )
            batches = 0
        self.sampler.resume_at(epoch, batches * self.batch_size)  # type: ignore[attr-defined]
        self._resuming_mid_epoch = batches > 0

    @override
    def __iter__(self) -> Iterator[Any]:
        if not self._resuming_mid_epoch:
            return super().__iter__()
        # A new iterator draws its workers' base seed from torch's global generator. The uninterrupted run drew it
        # at the epoch's start, before the checkpoint's RNG state was taken, so drawing it again would shift every
        # later random number (the latent noise) by one draw. (Worker processes are seeded from another base seed
        # than in the uninterrupted run; no shipped dataset draws random numbers in them.)
        self._resuming_mid_epoch = False
        state = torch.get_rng_state()
        iterator = super().__iter__()
        torch.set_rng_state(state)
        return iterator
