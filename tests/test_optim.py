"""OptimisticSGD / OptimisticAdam against the numpy form of the paper's equations, and on the bilinear game."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from lightning_dpgan.optim import OPTIMIZERS, OptimisticAdam, OptimisticSGD

from reference import dposg

DIM_A, DIM_B = 3, 2
LR_A, LR_B = 0.1, 0.05


def quadratic() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    m = rng.standard_normal((DIM_A + DIM_B,) * 2)
    return m @ m.T / 5 + np.eye(DIM_A + DIM_B), rng.standard_normal(DIM_A + DIM_B), rng.standard_normal(DIM_A + DIM_B)


def run_torch(make, steps: int) -> tuple[np.ndarray, list[torch.nn.Parameter], torch.optim.Optimizer]:
    """``steps`` iterations on 0.5 zᵀHz - bᵀz with z split into two param groups (lr 0.1 and 0.05)."""
    h, b, z0 = quadratic()
    a_part = torch.nn.Parameter(torch.tensor(z0[:DIM_A]))
    b_part = torch.nn.Parameter(torch.tensor(z0[DIM_A:]))
    opt = make([{"params": [a_part], "lr": LR_A}, {"params": [b_part], "lr": LR_B}])
    for _ in range(steps):
        opt.zero_grad()
        z = torch.cat([a_part, b_part])
        (0.5 * z @ torch.tensor(h) @ z - torch.tensor(b) @ z).backward()
        opt.step()
    return torch.cat([a_part, b_part]).detach().numpy(), [a_part, b_part], opt


def reference(steps: int, adam=None) -> np.ndarray:
    h, b, z0 = quadratic()
    lr = np.array([LR_A] * DIM_A + [LR_B] * DIM_B)
    return dposg(lambda z: z @ h - b, z0[None], np.eye(1), steps, lr, adam)[0]


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_optimistic_sgd_matches_the_equations(steps):
    z, _, _ = run_torch(lambda g: OptimisticSGD(g), steps)
    np.testing.assert_allclose(z, reference(steps), atol=1e-6, rtol=0)
    if steps > 1:
        assert np.abs(z - quadratic()[2]).max() > 1e-2  # it moved


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_optimistic_adam_matches_the_equations(steps):
    z, _, _ = run_torch(lambda g: OptimisticAdam(g, betas=(0.5, 0.9), eps=1e-8), steps)
    np.testing.assert_allclose(z, reference(steps, adam=((0.5, 0.9), 1e-8)), atol=1e-6, rtol=0)


def test_osg_is_daskalakis_optimistic_gradient_descent():
    """One worker: z^{k+1} = z^k - 2 lr g(z^k) + lr g(z^{k-1}), the single-sequence form (Daskalakis et al., 2018)."""
    h, b, z0 = quadratic()
    lr = np.array([LR_A] * DIM_A + [LR_B] * DIM_B)
    grad = lambda z: h @ z - b  # noqa: E731
    zs = [z0, z0 - lr * grad(z0)]  # the first iteration extrapolates only
    for _ in range(4):
        zs.append(zs[-1] - 2 * lr * grad(zs[-1]) + lr * grad(zs[-2]))
    z, _, _ = run_torch(lambda g: OptimisticSGD(g), 5)
    np.testing.assert_allclose(z, zs[-1], atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["optimistic_sgd", "optimistic_adam"])
def test_state_dict_round_trip_resumes_exactly(name):
    uninterrupted, _, _ = run_torch(lambda g: OPTIMIZERS[name](g), 4)
    _, params, opt = run_torch(lambda g: OPTIMIZERS[name](g), 2)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    h, b, _ = quadratic()
    fresh = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = OPTIMIZERS[name]([{"params": [fresh[0]], "lr": LR_A}, {"params": [fresh[1]], "lr": LR_B}])
    opt2.load_state_dict(saved["opt"])
    for _ in range(2):
        opt2.zero_grad()
        z = torch.cat(fresh)
        (0.5 * z @ torch.tensor(h) @ z - torch.tensor(b) @ z).backward()
        opt2.step()
    np.testing.assert_array_equal(torch.cat(fresh).detach().numpy(), uninterrupted)


def test_updates_are_in_place_and_anchors_are_stable_objects():
    p = torch.nn.Parameter(torch.ones(4))
    storage, opt = p.data_ptr(), OptimisticAdam([p], lr=0.1)
    first = opt.anchors()
    for _ in range(3):
        p.grad = torch.ones(4)
        opt.step()
    assert p.data_ptr() == storage and opt.param_groups[0]["params"][0] is p
    assert all(a is b for a, b in zip(first, opt.anchors()))
    assert not torch.equal(p.detach(), torch.ones(4))


def test_parameters_without_gradient_keep_their_point():
    """A discriminator-only iteration: G has no gradient, so its anchor and direction stay and z is rewritten as before."""
    g, d = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = OptimisticSGD([{"params": [g]}, {"params": [d]}], lr=0.1)
    g.grad, d.grad = torch.full((3,), 2.0), torch.full((3,), 1.0)
    opt.step()
    g_before = g.detach().clone()
    g.grad = None
    d.grad = torch.full((3,), 1.0)
    opt.step()
    assert torch.equal(g.detach(), g_before)  # z_G = x_G - lr d_G, unchanged
    np.testing.assert_allclose(d.detach().numpy(), 1 - 0.1 - 0.1, atol=1e-7)  # x_D = 1 - 0.1, z_D = x_D - 0.1


def bilinear_distance(make, steps: int) -> float:
    """min_x max_y xᵀAy with A 10×10, singular values 0.5..1: ||(x, y)|| / ||(x0, y0)|| after ``steps``."""
    rng = np.random.default_rng(0)
    q1, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    q2, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    a = torch.tensor(q1 @ np.diag(np.linspace(0.5, 1.0, 10)) @ q2.T)
    x = torch.nn.Parameter(torch.tensor(rng.standard_normal(10)))
    y = torch.nn.Parameter(torch.tensor(rng.standard_normal(10)))
    start = float(torch.cat([x, y]).detach().norm())
    opt = make([{"params": [x]}, {"params": [y]}])
    for _ in range(steps):
        opt.zero_grad()
        value = x @ a @ y
        (x.grad,) = torch.autograd.grad(value, x, retain_graph=True)  # x descends
        (y.grad,) = torch.autograd.grad(-value, y)  # y ascends
        opt.step()
    return float(torch.cat([x, y]).detach().norm()) / start


def test_bilinear_game_gda_diverges_optimism_converges():
    assert bilinear_distance(lambda g: torch.optim.SGD(g, lr=0.1), 2000) > 100  # simultaneous GDA spirals out
    assert bilinear_distance(lambda g: torch.optim.Adam(g, lr=0.01, betas=(0.5, 0.999)), 2000) > 0.3  # no convergence
    assert bilinear_distance(lambda g: OptimisticSGD(g, lr=0.2), 3000) < 1e-3
    # Adam's normalised step has size ~lr whatever the gradient, so a constant-lr Adam ends in an lr-sized orbit;
    # once |g| < eps the step becomes lr * g / eps and optimism converges linearly, as OSG does.
    assert bilinear_distance(lambda g: OptimisticAdam(g, lr=0.02, betas=(0.0, 0.9), eps=0.1), 3000) < 1e-3


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: OptimisticSGD(p, lr=-1), r"lr must be a finite number >= 0, got -1"),
        (lambda p: OptimisticSGD(p, lr=float("nan")), r"lr must be a finite number >= 0, got nan"),
        (lambda p: OptimisticAdam(p, betas=(1.0, 0.9)), r"betas\[0\] must be a finite number in \[0, 1\), got 1.0"),
        (lambda p: OptimisticAdam(p, eps="x"), r"eps must be a finite number >= 0, got 'x'"),
    ],
)
def test_bad_hyperparameters_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make([torch.nn.Parameter(torch.zeros(1))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_state_lives_on_the_parameters_device():
    p = torch.nn.Parameter(torch.ones(4, device="cuda"))
    opt = OptimisticAdam([p], lr=0.1)
    p.grad = torch.ones(4, device="cuda")
    opt.step()
    assert all(t.is_cuda for t in opt.anchors()) and p.is_cuda
    assert all(v.is_cuda for v in opt.state[p].values() if isinstance(v, torch.Tensor))
