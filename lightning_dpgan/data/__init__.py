"""Datasets that ship inside installed packages, so training and tests never download anything."""

from lightning_dpgan.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
