"""DPGAN's fused step against an independent recomputation of each player's gradient."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_dpgan import DPGAN
from lightning_dpgan.models import MLPDiscriminator, MLPGenerator


def test_fused_step_gives_each_player_the_gradient_of_its_own_loss_at_the_same_point(tmp_path):
    """One plain-SGD iteration moves D by -lr_d ∇_D L_D and G by -lr_g ∇_G L_G, both taken at the starting
    parameters, on the one real batch and the one noise batch of that iteration. The reference takes each gradient
    on its own with ``autograd.grad`` and the non-saturating losses written out here, so a step that let G's loss
    reach D, drew fresh noise for G, or stepped one player before the other's gradient would not match."""
    torch.manual_seed(0)
    gan = DPGAN(MLPGenerator(hidden=16, depth=2), MLPDiscriminator(hidden=16, depth=2), optimizer="sgd",
                lr_g=0.5, lr_d=0.25)
    g0, d0 = copy.deepcopy(gan.generator), copy.deepcopy(gan.discriminator)
    real = torch.randn(64, 2) * 2
    noises: list[torch.Tensor] = []
    gan.generator.register_forward_pre_hook(lambda module, args: noises.append(args[0].detach().clone()))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(gan, DataLoader(TensorDataset(real), batch_size=64))
    (noise,) = noises  # one noise batch for the whole iteration

    fake = g0(noise)
    loss_d = F.softplus(-d0(real)).mean() + F.softplus(d0(fake.detach())).mean()
    loss_g = F.softplus(-d0(fake)).mean()
    grad_d = torch.autograd.grad(loss_d, list(d0.parameters()))
    grad_g = torch.autograd.grad(loss_g, list(g0.parameters()), retain_graph=True)
    leak = torch.autograd.grad(loss_g, list(d0.parameters()))
    assert max(float(g.abs().max()) for g in leak) > 1e-2  # had G's loss reached D, D's step would show it

    for after, before, grad in zip(gan.discriminator.parameters(), d0.parameters(), grad_d):
        torch.testing.assert_close(after.detach(), before.detach() - 0.25 * grad, rtol=1e-5, atol=1e-6)
    for after, before, grad in zip(gan.generator.parameters(), g0.parameters(), grad_g):
        torch.testing.assert_close(after.detach(), before.detach() - 0.5 * grad, rtol=1e-5, atol=1e-6)


def test_every_row_the_logger_writes_has_the_losses(tmp_path):
    """DPGAN logs only on the iterations the logger writes (``log_every_n_steps``); each of those rows must carry
    the losses and gradient norms, none may miss them."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from lightning_dpgan.data import GaussianMixtureDataModule

    gan = DPGAN(MLPGenerator(hidden=16), MLPDiscriminator(hidden=16))
    logger = CSVLogger(tmp_path, name="log")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=40, log_every_n_steps=10, logger=logger,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(gan, datamodule=GaussianMixtureDataModule("grid", num_samples=5000, batch_size=64))
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [9, 19, 29, 39]
    for key in ("loss/d", "loss/g", "grad_norm/generator", "grad_norm/discriminator"):
        assert all(r[key] for r in rows), key


def test_mlp_generator_output_scale_multiplies_the_last_layer():
    torch.manual_seed(0)
    plain, scaled = MLPGenerator(latent_dim=5), MLPGenerator(latent_dim=5, output_scale=4.0)
    scaled.load_state_dict(plain.state_dict())
    noise = torch.randn(7, 5)
    torch.testing.assert_close(scaled(noise), 4.0 * plain(noise))
    for bad in (0, -1.0, "4", True):
        with pytest.raises(ValueError, match=rf"output_scale must be a finite number > 0, got {bad!r}"):
            MLPGenerator(output_scale=bad)


def test_the_generators_moving_average_is_the_ema_of_its_steps(tmp_path):
    """``generator_ema`` after four iterations against the EMA written out from the live generator's parameters
    after each step: the first step's copied, then ``e <- d e + (1 - d) g``."""
    torch.manual_seed(0)
    decay = 0.9
    gan = DPGAN(MLPGenerator(hidden=8, depth=2), MLPDiscriminator(hidden=8, depth=2), ema_decay=decay)
    history: list[list[torch.Tensor]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            history.append([p.detach().clone() for p in module.generator.parameters()])

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[Record()], default_root_dir=tmp_path)
    trainer.fit(gan, DataLoader(TensorDataset(torch.randn(256, 2)), batch_size=64))
    expected = history[0]
    for step in history[1:]:
        expected = [decay * e + (1 - decay) * g for e, g in zip(expected, step)]
    for got, want in zip(gan.generator_ema.module.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert not any(p.requires_grad for p in gan.generator_ema.parameters())
