"""The GAN losses and the R1 penalty against their formulas written out in numpy, and R1's place in DPGAN's step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_dpgan.losses import build_loss, r1_penalty


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


@pytest.mark.parametrize(
    "name,d_loss,g_loss",
    [
        ("ns", lambda r, f: softplus(-r).mean() + softplus(f).mean(), lambda f: softplus(-f).mean()),
        ("hinge", lambda r, f: np.maximum(0, 1 - r).mean() + np.maximum(0, 1 + f).mean(), lambda f: -f.mean()),
        ("wgan-gp", lambda r, f: f.mean() - r.mean(), lambda f: -f.mean()),
    ],
)
def test_losses_match_their_formulas(name, d_loss, g_loss):
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal(50) * 3, rng.standard_normal(50) * 3
    loss = build_loss(name)
    assert float(loss.discriminator(torch.tensor(real), torch.tensor(fake))) == pytest.approx(d_loss(real, fake))
    assert float(loss.generator(torch.tensor(fake))) == pytest.approx(g_loss(fake))


def test_r1_penalty_is_the_mean_squared_input_gradient():
    """D(x) = Σ_k v_k tanh(a_k·x + c_k), so ∇ₓD = Σ_k v_k (1 - tanh²(a_k·x + c_k)) a_k; its gradient in v by
    central differences of that closed form."""
    rng = np.random.default_rng(1)
    a, c, v, x = rng.standard_normal((5, 3)), rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal((40, 3))

    def penalty(v: np.ndarray) -> float:
        slope = 1 - np.tanh(x @ a.T + c) ** 2  # (40, 5)
        grad_x = (slope * v) @ a  # (40, 3)
        return float((grad_x**2).sum(1).mean())

    layer = nn.Linear(3, 5).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(a))
        layer.bias.copy_(torch.tensor(c))
    v_t = torch.tensor(v, requires_grad=True)
    inputs = torch.tensor(x, requires_grad=True)
    value = r1_penalty(torch.tanh(layer(inputs)) @ v_t, inputs)
    assert float(value) == pytest.approx(penalty(v), rel=1e-12)
    (grad_v,) = torch.autograd.grad(value, v_t)
    step = 1e-6
    numeric = [(penalty(v + step * e) - penalty(v - step * e)) / (2 * step) for e in np.eye(5)]
    np.testing.assert_allclose(grad_v.numpy(), numeric, rtol=1e-6)


def test_r1_adds_gamma_w_to_a_linear_discriminators_step(tmp_path):
    """With D(x) = w·x + b, R1 = ||w||², so one SGD step (lr 1) of DPGAN with r1 = γ moves w by exactly -γ w₀ more
    than the same step without it, and leaves b and G alone."""
    import lightning.pytorch as pl

    from lightning_dpgan import DPGAN
    from lightning_dpgan.data import GaussianMixtureDataModule
    from lightning_dpgan.models import MLPGenerator

    gamma = 0.3

    def one_step(r1: float) -> tuple[torch.Tensor, DPGAN]:
        torch.manual_seed(7)
        gan = DPGAN(MLPGenerator(hidden=8), nn.Sequential(nn.Linear(2, 1), nn.Flatten(0)), optimizer="sgd",
                    lr_g=1.0, lr_d=1.0, r1=r1)
        w0 = gan.discriminator[0].weight.detach().clone()
        pl.seed_everything(3)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
        trainer.fit(gan, datamodule=GaussianMixtureDataModule("grid", num_samples=512, batch_size=64))
        return w0, gan

    (w0, plain), (w0_again, penalised) = one_step(0.0), one_step(gamma)
    assert torch.equal(w0, w0_again)
    d_plain, d_pen = plain.discriminator[0], penalised.discriminator[0]
    assert (d_plain.weight - w0).abs().max() > 1e-3  # the plain step moved w, so the comparison is not trivial
    torch.testing.assert_close(d_pen.weight, d_plain.weight - gamma * w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(d_pen.bias, d_plain.bias, rtol=0, atol=1e-7)
    for p, q in zip(plain.generator.parameters(), penalised.generator.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("value", [-1.0, "1", True])
def test_bad_r1_is_named(value):
    with pytest.raises(ValueError, match=r"r1 must be a finite number >= 0, got "):
        build_loss("ns", r1=value)
