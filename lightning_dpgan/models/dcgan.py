"""DCGAN-style convolutional nets (Radford et al., 2016) for 8×8, 28×28, 32×32 and 64×64 images.

Both nets double or halve the resolution with stride-2, 4×4 convolutions from a small base map:
8 = 2·2², 28 = 7·2², 32 = 4·2³, 64 = 4·2⁴.
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from lightning_dpgan.checks import check_choice

#: image size -> (base map size, number of stride-2 stages)
STAGES = {8: (2, 2), 28: (7, 2), 32: (4, 3), 64: (4, 4)}
NORMS = ("batch", "spectral", "none")


def _stages(image_size: int) -> tuple[int, int]:
    check_choice("DCGAN image_size", image_size, STAGES)
    return STAGES[image_size]


class DCGANGenerator(nn.Module):
    """Noise -> Linear to a ``base×base`` map -> [ConvTranspose ×2, BatchNorm, ReLU]* -> Tanh image in [-1, 1]."""

    def __init__(self, image_size: int = 32, channels: int = 3, latent_dim: int = 100, width: int = 64) -> None:
        super().__init__()
        base, stages = _stages(image_size)
        self.latent_dim, self.image_size, self.channels = latent_dim, image_size, channels
        top = width * 2 ** (stages - 1)
        self.project = nn.Sequential(nn.Linear(latent_dim, top * base * base, bias=False), nn.Unflatten(1, (top, base, base)), nn.BatchNorm2d(top), nn.ReLU(True))
        layers: list[nn.Module] = []
        for i in range(stages - 1):
            c_in = top // 2**i
            layers += [nn.ConvTranspose2d(c_in, c_in // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c_in // 2), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, noise: Tensor) -> Tensor:
        return self.body(self.project(noise))


class DCGANDiscriminator(nn.Module):
    """Image (or its flattened pixels) -> [Conv 4×4 stride 2, norm, LeakyReLU]* -> one score per image.

    ``norm="batch"`` is DCGAN's; use ``"spectral"`` or ``"none"`` with WGAN-GP, whose penalty is per sample.
    """

    def __init__(self, image_size: int = 32, channels: int = 3, width: int = 64, norm: str = "batch") -> None:
        super().__init__()
        base, stages = _stages(image_size)
        check_choice("norm", norm, NORMS)
        self.image_shape = (channels, image_size, image_size)
        wrap = spectral_norm if norm == "spectral" else (lambda m: m)
        layers: list[nn.Module] = []
        c_in = channels
        for i in range(stages):
            c_out = width * 2**i
            layers.append(wrap(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=norm != "batch" or i == 0)))
            if norm == "batch" and i > 0:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, True))
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.head = wrap(nn.Linear(c_in * base * base, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x[0].numel() != math.prod(self.image_shape):  # a reshape would cut other-sized images into wrong ones
            raise ValueError(f"{type(self).__name__} takes images of shape {self.image_shape}, got a batch of {tuple(x.shape)}")
        return self.head(self.body(x.reshape(-1, *self.image_shape)).flatten(1)).squeeze(1)
