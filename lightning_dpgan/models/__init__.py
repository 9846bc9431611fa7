"""Generators and discriminators for DPGAN. Every generator has ``latent_dim``; every discriminator returns (N,) scores."""

from lightning_dpgan.models.dcgan import DCGANDiscriminator, DCGANGenerator
from lightning_dpgan.models.mlp import MLPDiscriminator, MLPGenerator
from lightning_dpgan.models.resnet import SNGANDiscriminator, SNGANGenerator

__all__ = [
    "DCGANDiscriminator",
    "DCGANGenerator",
    "MLPDiscriminator",
    "MLPGenerator",
    "SNGANDiscriminator",
    "SNGANGenerator",
]
