"""GANEvaluation in real 4-process runs: consensus vs local numbers recomputed independently, pictures, no side effects."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_dpgan.evaluation import GANEvaluation
from lightning_dpgan.models import MLPGenerator

from helpers import lightning_script

N, STEPS, SAMPLES, SEED = 4, 30, 400, 1234


def run(out: Path, *opts: str) -> list[dict[str, torch.Tensor]]:
    lightning_script("lightning_worker.py", "evaluate", str(out), f"steps={STEPS}", f"samples={SAMPLES}", *opts)
    return [torch.load(out / f"end_rank{r}.pt", weights_only=False) for r in range(N)]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def generator_from(state: dict[str, torch.Tensor]) -> MLPGenerator:
    g = MLPGenerator(hidden=64)
    g.load_state_dict({k.removeprefix("generator."): v for k, v in state.items() if k.startswith("generator.")})
    return g.eval()


def samples(g: MLPGenerator, n: int, rank: int, step: int) -> np.ndarray:
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(SEED + 1_000_003 * rank + 7919 * step))
    with torch.no_grad():
        return g(noise).numpy()


def modes_and_quality(points: np.ndarray) -> tuple[int, float]:
    """PacGAN's numbers written out in numpy, independent of ModeCoverage."""
    grid = np.array([(a, b) for a in range(-4, 5, 2) for b in range(-4, 5, 2)], dtype=float)
    distance = np.sqrt(((points[:, None, :] - grid[None]) ** 2).sum(-1))
    near = distance.min(1) < 0.15
    return len(set(distance.argmin(1)[near].tolist())), float(near.mean())


def test_consensus_evaluation_scores_the_average_model_and_leaves_training_alone(tmp_path):
    evaluated = run(tmp_path / "eval")
    plain = run(tmp_path / "plain", "eval=0")
    for r in range(N):  # parameters restored, training noise untouched: bit-identical replicas
        for key, value in plain[r].items():
            assert torch.equal(value, evaluated[r][key]), (r, key)
    average = {k: sum(s[k] for s in evaluated) / N for k in evaluated[0] if k.startswith("generator.")}
    g = generator_from(average)
    points = np.concatenate([samples(g, SAMPLES // N, r, STEPS) for r in range(N)])
    table = rows(tmp_path / "eval" / "eval" / "evaluation.csv")
    assert [int(row["step"]) for row in table] == [10, 20, 30]
    modes, quality = modes_and_quality(points)
    assert int(float(table[-1]["modes"])) == modes and float(table[-1]["high_quality"]) == pytest.approx(quality)
    assert float(table[-1]["consensus/generator"]) > 0
    for picture in ("samples_step0000010.png", "samples_step0000030.png", "consensus.png"):
        assert (tmp_path / "eval" / "eval" / picture).stat().st_size > 1000
    logged = rows(tmp_path / "eval" / "log" / "version_0" / "metrics.csv")
    assert any(row.get("eval/modes") for row in logged)


def test_local_evaluation_reports_mean_and_worst_replica(tmp_path):
    replicas = run(tmp_path, "model=local", "mixing=0")
    per_replica = [modes_and_quality(samples(generator_from(replicas[r]), SAMPLES, r, STEPS)) for r in range(N)]
    last = rows(tmp_path / "eval" / "evaluation.csv")[-1]
    quality = [q for _, q in per_replica]
    assert float(last["high_quality_mean"]) == pytest.approx(np.mean(quality))
    assert float(last["high_quality_worst"]) == pytest.approx(min(quality))
    assert float(last["modes_worst"]) == min(m for m, _ in per_replica)


def test_image_evaluation_gives_fid_is_and_a_grid(tmp_path):
    lightning_script("lightning_worker.py", "evaluate", str(tmp_path), "dataset=digits", "devices=2", "steps=20", "samples=200")
    table = rows(tmp_path / "eval" / "evaluation.csv")
    assert [int(r["step"]) for r in table] == [10, 20]
    for row in table:
        assert 0 < float(row["fid"]) < 5000 and 1 <= float(row["inception_score"]) <= 10
    assert (tmp_path / "eval" / "samples_step0000020.png").stat().st_size > 500


@pytest.mark.parametrize(
    "kwargs,message",
    [({"model": "mean"}, "model must be one of consensus, local, got 'mean'"), ({"num_samples": 0}, "num_samples must be an integer >= 1")],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GANEvaluation("grid", **kwargs)


def test_a_run_stopped_early_keeps_its_evaluations(tmp_path):
    """evaluation.csv is rewritten (atomically) after every evaluation, not only when training ends."""
    import lightning.pytorch as pl

    from lightning_dpgan import DPGAN
    from lightning_dpgan.data import GaussianMixtureDataModule
    from lightning_dpgan.models import MLPDiscriminator

    class StopAt5(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 5:
                raise RuntimeError("stopped at 5")

    evaluation = GANEvaluation("grid", every_n_steps=2, num_samples=200, output_dir=str(tmp_path))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=20, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[evaluation, StopAt5()])
    gan = DPGAN(MLPGenerator(hidden=16), MLPDiscriminator(hidden=16))
    with pytest.raises(RuntimeError, match="stopped at 5"):
        trainer.fit(gan, datamodule=GaussianMixtureDataModule("grid", num_samples=2000, batch_size=64))
    assert [int(row["step"]) for row in rows(tmp_path / "evaluation.csv")] == [2, 4]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == []
