"""Datasets that ship inside installed packages, so training and tests never download anything."""

from lightning_dpgan.data.digits import DigitsDataModule
from lightning_dpgan.data.gaussians import GaussianMixtureDataModule, mixture_modes, mode_coverage, sample_mixture

__all__ = ["DigitsDataModule", "GaussianMixtureDataModule", "mixture_modes", "mode_coverage", "sample_mixture"]
