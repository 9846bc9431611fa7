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
from lightning_dpgan.gossip import GossipOptions
from lightning_dpgan.metrics import ModeCoverage
from lightning_dpgan.models import MLPGenerator
from lightning_dpgan.topology import complete, ring

from conftest import BILINEAR_CONVERGENCE, BILINEAR_EQUATIONS, BILINEAR_FEWER_BYTES, BILINEAR_STALE
from helpers import WORKERS
from reference import choco_mix, delivery_schedule, dposg, every, int8, replayed_dposg, sign, stale_dposg, topk

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
    for name in ("t1", "t3", "t1_overlap", "t1_stale2", "t1_sign", "t1_every4"):
        distance, consensus = results[name]
        # measured 8.8e-5 (t=1) and 4.0e-4 (t=3) after 500 steps in numpy; the overlapped variant, bounded
        # staleness (s = 2, messages taken as they arrive), sign-compressed CHOCO and local steps (H = 4) also converge
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
    """2000 DPOSG iterations on 2 workers, batches of 128. Evaluated on the EMA generator (decay 0.99, a 100-step
    window): the live generator still swings from one evaluation to the next; its short average does not. With a 2-D
    latent the untrained generator's samples sit near the origin, on one or two modes."""
    states = replicas(suite2 / "smoke", 2)
    consensus = {k: sum(s[k] for s in states) / 2 for k in states[0] if k.startswith("generator_ema.module.")}
    generator = MLPGenerator()
    generator.load_state_dict({k.removeprefix("generator_ema.module."): v for k, v in consensus.items()})
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


@pytest.mark.parametrize("compression", [None, "sign"])
def test_a_fabric_loop_equals_the_dposg_equations_and_resumes_exactly(suite4, compression):
    """The bilinear game trained by a Fabric loop with ``DecentralizedFabricStrategy`` (4 ranks, a ring, optimistic
    Adam) against the same DPOSG recursion in numpy; and the same loop resumed from ``fabric.save`` at step 3 ends
    exactly where the uninterrupted one does, every replica bit for bit. With sign-compressed CHOCO gossip the
    resume is exact only if every replica's public copies came back with it."""
    out = suite4 / ("fabric_bilinear" if compression is None else f"fabric_bilinear_{compression}")
    z = bilinear_result(out)
    gamma = GossipOptions(compression="sign").resolved_consensus_step()  # the engine's default step for sign
    mixing = ring(N).matrix() if compression is None else choco_mix(ring(N).matrix(), sign, gamma)
    expected = dposg(bilinear_gradient, start(), mixing, 6, 0.05, ((0.5, 0.9), 1e-8))
    np.testing.assert_allclose(z, expected, atol=1e-10, rtol=0)
    assert np.abs(z - z.mean(0)).max() > 1e-6  # the replicas differ: each was trained on its own game
    resumed = [torch.load(out / f"resumed_rank{r}.pt", weights_only=True) for r in range(N)]
    for r, replica in enumerate(replicas(out)):
        assert torch.equal(replica["x"], resumed[r]["x"]) and torch.equal(replica["y"], resumed[r]["y"]), r


@pytest.mark.parametrize("index", range(len(BILINEAR_STALE)), ids=[f"{c['optimizer']}-s{c['staleness']}" for c in BILINEAR_STALE])
def test_bounded_staleness_equals_the_replayed_schedule_on_the_bilinear_game(suite4, index):
    """DPOSG with staleness s through the strategy (4 real ranks on a ring), each rank taking its neighbours' messages
    when a seeded schedule says, against the same schedule replayed in numpy; and it differs from synchronous DPOSG."""
    case = BILINEAR_STALE[index]
    z = bilinear_result(suite4 / f"bilinear_stale{index}")
    adam = (tuple(case["kwargs"]["betas"]), 1e-8) if case["optimizer"] == "optimistic_adam" else None
    schedule = delivery_schedule(N, case["staleness"], case["schedule"])
    expected = stale_dposg(bilinear_gradient, start(), ring(N).matrix(), 12, 0.05, schedule, adam)
    np.testing.assert_allclose(z, expected, atol=1e-10, rtol=0)
    assert np.abs(z - dposg(bilinear_gradient, start(), ring(N).matrix(), 12, 0.05, adam)).max() > 1e-6


@pytest.mark.parametrize("loop", ["bilinear_catch_up", "fabric_catch_up"], ids=["trainer", "fabric"])
def test_a_slow_rank_catches_up_by_skipping_computations_and_equals_the_replayed_trace(suite4, loop):
    """Staleness 2 with catch_up (4 real ranks on a ring, optimistic Adam, through the Trainer and through a Fabric
    loop asking ``strategy.catch_up``), rank 2 computing 30 ms slower: its neighbours run ahead and wait on it, so it
    skips computations and only mixes. Each rank's trace (which steps it skipped, which neighbour step each mix used)
    replayed in numpy, with a skipped step computing nothing, gives the same replicas; no mix used a message more
    than s steps old; and the slow rank mixed messages of steps it had not reached, which gloo shows only if the
    engine can tell an arrived message from one on its way."""
    out = suite4 / loop
    traces = [json.loads((out / f"trace_rank{r}.json").read_text()) for r in range(N)]
    assert [len(t) for t in traces] == [40] * N
    skipped = [sum(entry[1] for entry in t) for t in traces]
    assert skipped[2] >= 5, skipped  # the slow rank caught up (about 3 steps in 4 here; 1 would already show)
    for t in traces:
        for step, _, (tags,) in t:
            assert all(tag >= step - 2 for tag in tags.values()), (step, tags)
    assert any(tag > step for step, _, (tags,) in traces[2] for tag in tags.values())
    z = bilinear_result(out)
    adam = ((0.5, 0.9), 1e-8)
    expected = replayed_dposg(bilinear_gradient, start(), ring(N).matrix(), 0.05, traces, adam)
    np.testing.assert_allclose(z, expected, atol=1e-10, rtol=0)
    no_skips = [[[step, False, tags] for step, _, tags in t] for t in traces]
    assert np.abs(z - replayed_dposg(bilinear_gradient, start(), ring(N).matrix(), 0.05, no_skips, adam)).max() > 1e-6


@pytest.mark.parametrize("index", range(len(BILINEAR_FEWER_BYTES)), ids=[
    f"{c['optimizer']}-{c.get('compression') or 'every' + str(c.get('gossip_every'))}" for c in BILINEAR_FEWER_BYTES
])
def test_compressed_gossip_and_local_steps_equal_numpy_on_the_bilinear_game(suite4, index):
    """Twelve DPOSG steps through the strategy (4 real ranks on a ring) with CHOCO compressed gossip (int8, sign,
    top-25 %) or local steps (a mix every 3rd step), against DPOSG in numpy with CHOCO's consensus step or the mix on
    every 3rd step written out there (tests/reference.py); and each differs from plain DPOSG."""
    case = BILINEAR_FEWER_BYTES[index]
    z = bilinear_result(suite4 / f"bilinear_fewer_bytes{index}")
    adam = (tuple(case["kwargs"]["betas"]), 1e-8) if case["optimizer"] == "optimistic_adam" else None
    w = ring(N).matrix()
    if "compression" in case:
        options = GossipOptions(compression=case["compression"], topk_fraction=case.get("topk_fraction", 0.01))
        compress = {"int8": int8, "sign": sign, "topk": topk(options.topk_fraction)}[case["compression"]]
        mixing = choco_mix(w, compress, options.resolved_consensus_step())
    else:
        mixing = every(lambda x: w @ x, case["gossip_every"])
    expected = dposg(bilinear_gradient, start(), mixing, 12, 0.05, adam)
    np.testing.assert_allclose(z, expected, atol=1e-10, rtol=0)
    assert np.abs(z - dposg(bilinear_gradient, start(), w, 12, 0.05, adam)).max() > 1e-6
