"""SNGAN's ResNet for 32×32 images (Miyato et al., 2018, CIFAR-10 architecture, appendix B.4)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


class _UpBlock(nn.Module):
    """BN-ReLU-Upsample-Conv-BN-ReLU-Conv, plus an upsampled 1×1 shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)
        self.conv1, self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1), nn.Conv2d(channels, channels, 3, 1, 1)
        self.shortcut = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2)
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + self.shortcut(F.interpolate(x, scale_factor=2))


class _DownBlock(nn.Module):
    """(ReLU)-Conv-ReLU-Conv(-AvgPool) with spectral norm, and a 1×1 shortcut when shapes change."""

    def __init__(self, c_in: int, c_out: int, downsample: bool, first: bool) -> None:
        super().__init__()
        self.conv1 = spectral_norm(nn.Conv2d(c_in, c_out, 3, 1, 1))
        self.conv2 = spectral_norm(nn.Conv2d(c_out, c_out, 3, 1, 1))
        self.shortcut = spectral_norm(nn.Conv2d(c_in, c_out, 1)) if downsample or c_in != c_out else None
        self.downsample, self.first = downsample, first

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        skip = x
        if self.first:  # SNGAN's optimized first block: pool before the shortcut conv
            skip = F.avg_pool2d(skip, 2)
        if self.shortcut is not None:
            skip = self.shortcut(skip)
        if self.downsample:
            h = F.avg_pool2d(h, 2)
            if not self.first:
                skip = F.avg_pool2d(skip, 2)
        return h + skip


class SNGANGenerator(nn.Module):
    """z (128) -> 4×4×width -> three up-blocks -> BN-ReLU-Conv3×3-Tanh, a 32×32 image."""

    def __init__(self, latent_dim: int = 128, channels: int = 3, width: int = 256) -> None:
        super().__init__()
        self.latent_dim, self.width = latent_dim, width
        self.project = nn.Linear(latent_dim, 4 * 4 * width)
        self.blocks = nn.Sequential(_UpBlock(width), _UpBlock(width), _UpBlock(width))
        self.out = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, channels, 3, 1, 1), nn.Tanh())

    def forward(self, noise: Tensor) -> Tensor:
        return self.out(self.blocks(self.project(noise).view(-1, self.width, 4, 4)))


class SNGANDiscriminator(nn.Module):
    """Four spectrally normalised residual blocks (two downsampling), ReLU, global sum pooling, linear score."""

    def __init__(self, channels: int = 3, width: int = 128) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            _DownBlock(channels, width, downsample=True, first=True),
            _DownBlock(width, width, downsample=True, first=False),
            _DownBlock(width, width, downsample=False, first=False),
            _DownBlock(width, width, downsample=False, first=False),
        )
        self.head = spectral_norm(nn.Linear(width, 1))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.blocks(x.reshape(x.shape[0], -1, 32, 32))).sum(dim=(2, 3))
        return self.head(h).squeeze(1)
