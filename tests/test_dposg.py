"""DPOSG end to end on real gloo processes (the shared torchrun launches of conftest.py): exactness, convergence,
the fused step, a GAN."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_dpgan.data import mixture_modes
from lightning_dpgan.metrics import ModeCoverage
from lightning_dpgan.models import MLPGenerator
from lightning_dpgan.topology import complete, ring

from conftest import BILINEAR_CONVERGENCE, BILINEAR_EQUATIONS
from helpers import WORKERS
from reference import dposg

sys.path.insert(0, str(WORKERS))
from lightning_worker import BILINEAR_DIM, BilinearGame, bilinear_matrices  # noqa: E402

N = 4


def replicas(out: Path, n: int = N) -> list[dict[str, torch.Tensor]]:
    return [torch.load(out / f"end_rank{r}.pt", weights_only=True) for r in range(n)]


def bilinear_result(out: Path) -> np.ndarray:
    """The workers' final (x, y), one row per rank."""
    return np.stack([np.concatenate([r["x"].numpy(), r["y"].numpy()]) for r in replicas(out)])


def bilinear_gradient(z: np.ndarray) -> np.ndarray:
    """Each rank's (∇_x, ∇_y) of its own x^T A_r y, x descending and y ascending."""
    _, parts = bilinear_matrices(N)
    x, y = z[:, :BILINEAR_DIM], z[:, BILINEAR_DIM:]
    return np.concatenate([np.einsum("rij,rj->ri", parts, y), -np.einsum("rij,ri->rj", parts, x)], axis=1)


def start() -> np.ndarray:
    game = BilinearGame("optimistic_sgd", 0.1)  # only to read the common starting point
    return np.tile(np.concatenate([game.x.detach().numpy(), game.y.detach().numpy()]), (N, 1))


MIXING = {
    "complete": lambda rounds: complete(N).matrix(),  # exact averaging, whatever t
    "ring": lambda rounds: np.linalg.matrix_power(ring(N).matrix(), rounds),
}


@pytest.mark.parametrize("index", range(len(BILINEAR_EQUATIONS)), ids=[
    f"{c['topology']}-t{c['rounds']}-{c['optimizer']}{'-overlap' if c['overlap'] else ''}" for c in BILINEAR_EQUATIONS
])
def test_strategy_equals_the_dposg_equations(suite4, index):
    """Six steps of the bilinear game through the strategy against DPOSG written out in numpy; the overlapped variant
    (the mix left in flight during the next gradient) with consensus measured on the way."""
    case = BILINEAR_EQUATIONS[index]
    lr, steps = 0.05, 6
    z = bilinear_result(suite4 / f"bilinear_equations{index}")
    adam = (tuple(case["kwargs"]["betas"]), 1e-8) if case["optimizer"] == "optimistic_adam" else None
    mixing = MIXING[case["topology"]](case["rounds"])
    expected = dposg(bilinear_gradient, start(), mixing, steps, lr, adam, overlap=bool(case["overlap"]))
    np.testing.assert_allclose(z, expected, atol=1e-10, rtol=0)
    assert np.abs(z - start()).max() > 1e-2 and np.abs(z - z.mean(0)).max() > 1e-6  # moved, and replicas differ
    if case["overlap"]:  # and the variant is a different algorithm from the synchronous one, so the test can tell them apart
        assert np.abs(z - dposg(bilinear_gradient, start(), mixing, steps, lr, adam)).max() > 1e-6


def test_decentralized_bilinear_game_reaches_the_average_games_equilibrium(suite4):
    """Rank r only sees its rows of A: the local games have whole subspaces of equilibria, the average game only 0."""
    start_norm = np.linalg.norm(start()[0])
    results = {}
    for name in BILINEAR_CONVERGENCE:
        z = bilinear_result(suite4 / f"bilinear_{name}")
        mean = z.mean(0)
        results[name] = (np.linalg.norm(mean) / start_norm, float(((z - mean) ** 2).sum(1).mean()))
    for name in ("t1", "t3", "t1_overlap"):
        distance, consensus = results[name]
        # measured 8.8e-5 (t=1) and 4.0e-4 (t=3) after 500 steps in numpy; the overlapped variant also converges
        assert distance < 1e-3, results
        assert consensus < 1e-6, results
    assert results["local"][0] > 0.3, results  # each worker stops on its own equilibrium subspace


def test_one_dpgan_iteration_is_one_gossip_exchange_per_round(suite4):
    """G and D in one optimizer: per batch, t rounds × 2 ring neighbours messages, also in D-only iterations."""
    out = suite4 / "messages"
    for r in range(N):
        record = json.loads((out / f"messages_rank{r}.json").read_text())
        assert record["per_batch"] == [3 * 2] * 6
    with open(out / "log" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"loss/d", "loss/g", "grad_norm/generator", "grad_norm/discriminator", "consensus/generator"} <= logged
    # n_critic=2: G is updated every other iteration (Lightning repeats the last value in the rows between)
    assert len({row["loss/g"] for row in rows if row["loss/g"]}) == 3
    assert len({row["loss/d"] for row in rows}) == 6
    ema = replicas(out)[0]
    assert any(k.startswith("generator_ema.") for k in ema)


@pytest.mark.parametrize("strategy", ["ddp", "decentralized"])
def test_every_rank_draws_its_own_noise(suite4, strategy):
    """seed_everything seeds every rank alike; if DPGAN kept that, DDP's all-reduced gradient would see one fake
    batch world_size times over instead of world_size different ones."""
    noise = [torch.load(suite4 / f"noise_{strategy}" / f"noise_rank{r}.pt", weights_only=True) for r in range(N)]
    for r in range(1, N):
        assert not torch.allclose(noise[0], noise[r]), r


def test_dpgan_under_ddp_is_centralized_osg(suite4):
    """strategy=ddp with the same optimizer: gradients averaged, so every replica stays identical (CPOSG)."""
    states = replicas(suite4 / "cposg")
    for r in range(1, N):
        for key, value in states[0].items():
            if value.is_floating_point():
                torch.testing.assert_close(states[r][key], value, rtol=0, atol=1e-6)


def test_grid25_smoke_run_covers_most_modes(suite2):
    """2000 DPOSG iterations on 2 workers. Evaluated on the EMA generator (decay 0.99, a 100-step window): the live
    generator still swings from one evaluation to the next; its short average does not. With a 2-D latent the
    untrained generator's samples sit near the origin, on one or two modes."""
    states = replicas(suite2 / "smoke", 2)
    consensus = {k: sum(s[k] for s in states) / 2 for k in states[0] if k.startswith("generator_ema.")}
    generator = MLPGenerator()
    generator.load_state_dict({k.removeprefix("generator_ema."): v for k, v in consensus.items()})
    torch.manual_seed(0)
    with torch.no_grad():
        samples = generator(torch.randn(2500, generator.latent_dim)).numpy()
    coverage = ModeCoverage(*mixture_modes("grid"))
    coverage.update(torch.as_tensor(samples))
    result = coverage.compute()
    assert result["modes"] >= 20, result


def test_scheduler_steps_once_per_iteration_and_is_checkpointed(tmp_path):
    """LinearLR from 1.0 to 0.1 over 10 iterations: after 4 iterations both groups run at 1 - 0.9 * 4/10 of their rate."""
    from functools import partial

    import lightning.pytorch as pl

    from lightning_dpgan import DPGAN
    from lightning_dpgan.data import GaussianMixtureDataModule
    from lightning_dpgan.models import MLPDiscriminator

    scheduler = partial(torch.optim.lr_scheduler.LinearLR, start_factor=1.0, end_factor=0.1, total_iters=10)
    gan = DPGAN(MLPGenerator(hidden=16), MLPDiscriminator(hidden=16), lr_g=1e-3, lr_d=4e-3, scheduler=scheduler)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(gan, datamodule=GaussianMixtureDataModule("grid", num_samples=2000, batch_size=64))
    factor = 1 - 0.9 * 4 / 10
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx([1e-3 * factor, 4e-3 * factor])
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    saved = torch.load(tmp_path / "s.ckpt", weights_only=False)["lr_schedulers"][0]
    assert saved["last_epoch"] == 4
