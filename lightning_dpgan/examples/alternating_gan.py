"""A GAN written like Lightning's own GAN example: two optimizers, alternating G and D steps, BatchNorm in G.

Nothing here knows about decentralized training. Adding ``strategy=DecentralizedStrategy(...)`` to the Trainer
turns it into adapt-then-combine gossip: each optimizer step is followed by mixing that optimizer's
parameters (and G's BatchNorm statistics) with the neighbours.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _block(n_in: int, n_out: int, normalize: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(n_in, n_out)]
    if normalize:
        layers.append(nn.BatchNorm1d(n_out))
    layers.append(nn.LeakyReLU(0.2))
    return layers


class Generator(nn.Module):
    def __init__(self, latent_dim: int, data_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            *_block(latent_dim, hidden, normalize=False),
            *_block(hidden, 2 * hidden),
            nn.Linear(2 * hidden, data_dim),
            nn.Tanh(),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self, data_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(*_block(data_dim, 2 * hidden, False), *_block(2 * hidden, hidden, False))
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.net(x))


class AlternatingGAN(pl.LightningModule):
    """Non-saturating GAN with Adam and alternating updates, manual optimization."""

    def __init__(
        self, data_dim: int = 64, latent_dim: int = 32, hidden: int = 128, lr: float = 2e-4, b1: float = 0.5
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = Generator(latent_dim, data_dim, hidden)
        self.discriminator = Discriminator(data_dim, hidden)

    def forward(self, z: Tensor) -> Tensor:
        return self.generator(z)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        real = batch[0].flatten(1)  # (N, 1, 8, 8) digits or already flat
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], self.hparams.latent_dim, device=real.device, dtype=real.dtype)
        ones = torch.ones(real.shape[0], 1, device=real.device, dtype=real.dtype)
        zeros = torch.zeros_like(ones)

        self.toggle_optimizer(opt_g)
        fake = self(z)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)

        self.toggle_optimizer(opt_d)
        real_loss = F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
        fake_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), zeros)
        d_loss = (real_loss + fake_loss) / 2
        self.manual_backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)

        self.log_dict({"g_loss": g_loss, "d_loss": d_loss}, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = (self.hparams.b1, 0.999)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr, betas=betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr, betas=betas)
        return [opt_g, opt_d]
