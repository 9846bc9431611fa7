"""Datamodules with per-rank shards. Data shipped inside installed packages (digits, mnist5k) or generated from a
seed (gaussians) needs no download; torchvision sets download only when asked."""

from lightning_dpgan.data.base import ShardedDataModule
from lightning_dpgan.data.digits import DigitsDataModule
from lightning_dpgan.data.gaussians import GaussianMixtureDataModule, mixture_modes, sample_mixture
from lightning_dpgan.data.mnist5k import MNIST5kDataModule
from lightning_dpgan.data.resumable import ResumableDataLoader
from lightning_dpgan.data.sharding import SHARDS, ShardSampler, shard_indices
from lightning_dpgan.data.torchvision_sets import DatasetNotFoundError, TorchvisionDataModule

__all__ = [
    "SHARDS",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "GaussianMixtureDataModule",
    "MNIST5kDataModule",
    "ResumableDataLoader",
    "ShardSampler",
    "ShardedDataModule",
    "TorchvisionDataModule",
    "mixture_modes",
    "sample_mixture",
    "shard_indices",
]
