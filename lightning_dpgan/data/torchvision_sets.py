"""MNIST, CIFAR-10 and image folders through torchvision, scaled to [-1, 1].

Downloading is opt-in (``download=True``). Without it, missing files are reported when the datamodule is
built, before any worker process starts, with what to do about it.
"""

from __future__ import annotations

import os

import numpy as np
from torch.utils.data import Dataset

from lightning_dpgan.checks import check_choice
from lightning_dpgan.data.base import ShardedDataModule

DATASETS = ("mnist", "cifar10", "imagefolder")


class DatasetNotFoundError(ValueError):
    """The files are not there, or could not be downloaded."""


class TorchvisionDataModule(ShardedDataModule):
    """``name`` under ``root``: ``mnist`` (28×28, 1 channel), ``cifar10`` (32×32, 3), or ``imagefolder``
    (``root/<class>/<image>``, resized to ``image_size``)."""

    def __init__(
        self,
        name: str,
        root: str = "data",
        download: bool = False,
        image_size: int | None = None,
        batch_size: int = 64,
        shard: str = "iid",
        val_size: int = 0,
        **kwargs: int,
    ) -> None:
        super().__init__(batch_size=batch_size, shard=shard, val_size=val_size, **kwargs)
        check_choice("torchvision dataset", name, DATASETS)
        if name == "imagefolder" and image_size is None:
            raise ValueError("imagefolder needs image_size (the images are resized and center-cropped to it)")
        self.name, self.root, self.download, self.image_size = name, os.fspath(root), download, image_size
        if not download:
            self._dataset()  # fail now, in the launching process, if the files are missing

    def prepare_data(self) -> None:
        if self.download:
            self._dataset(download=True)

    def load(self) -> tuple[Dataset, np.ndarray]:
        dataset = self._dataset()
        return dataset, np.asarray(dataset.targets)

    def _dataset(self, download: bool = False) -> Dataset:
        from torchvision import datasets, transforms

        steps = [transforms.Resize(self.image_size), transforms.CenterCrop(self.image_size)] if self.image_size else []
        transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(0.5, 0.5)])
        try:
            if self.name == "mnist":
                return datasets.MNIST(self.root, train=True, download=download, transform=transform)
            if self.name == "cifar10":
                return datasets.CIFAR10(self.root, train=True, download=download, transform=transform)
            return datasets.ImageFolder(self.root, transform=transform)
        except (RuntimeError, OSError) as err:
            if download:
                raise DatasetNotFoundError(
                    f"could not download {self.name} to {self.root!r} ({err}). Without network, download it on "
                    f"another machine and copy it to {self.root!r}, then use download=False"
                ) from None
            what = "an image folder (root/<class>/<image>)" if self.name == "imagefolder" else f"{self.name}"
            raise DatasetNotFoundError(
                f"{what} not found under {self.root!r} ({err}). Pass download=True (on the command line: dataset.download=true) "
                f"on a machine with network, or "
                f"copy the files to {self.root!r}"
            ) from None
