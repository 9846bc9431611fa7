"""MLPs for low-dimensional data such as the 2-D Gaussian mixtures (PacGAN's ring and grid benchmarks)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from lightning_dpgan.checks import check_number


def _mlp(n_in: int, hidden: int, depth: int, n_out: int, activation: Callable[[], nn.Module]) -> nn.Sequential:
    if depth < 1 or hidden < 1:
        raise ValueError(f"an MLP needs depth >= 1 and hidden >= 1, got depth={depth!r}, hidden={hidden!r}")
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else hidden, hidden), activation()]
    layers.append(nn.Linear(hidden, n_out))
    return nn.Sequential(*layers)


class MLPGenerator(nn.Module):
    """``latent_dim`` noise to ``data_dim`` values, unbounded.

    ``output_scale`` multiplies the last layer's output: data that live on [-4, 4]² (the grid) start from samples
    near the origin otherwise, and the generator spends its first steps growing its weights.
    """

    def __init__(self, latent_dim: int = 2, data_dim: int = 2, hidden: int = 128, depth: int = 3, output_scale: float = 1.0) -> None:
        super().__init__()
        check_number("output_scale", output_scale, 0, low_open=True)
        self.latent_dim = latent_dim
        self.output_scale = float(output_scale)
        self.net = _mlp(latent_dim, hidden, depth, data_dim, nn.ReLU)

    def forward(self, noise: Tensor) -> Tensor:
        out = self.net(noise)
        return out * self.output_scale if self.output_scale != 1.0 else out


class MLPDiscriminator(nn.Module):
    def __init__(self, data_dim: int = 2, hidden: int = 128, depth: int = 3) -> None:
        super().__init__()
        self.net = _mlp(data_dim, hidden, depth, 1, lambda: nn.LeakyReLU(0.2))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1)).squeeze(1)
