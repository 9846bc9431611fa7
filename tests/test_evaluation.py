"""GANEvaluation in real 4-process runs: consensus vs local numbers recomputed independently, pictures, no side effects."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_dpgan.evaluation import GANEvaluation
from lightning_dpgan.models import MLPGenerator

from conftest import EVALUATE

N, SAMPLES, SEED = 4, EVALUATE["samples"], 1234


def ends(out: Path, n: int = N) -> list[dict[str, torch.Tensor]]:
    return [torch.load(out / f"end_rank{r}.pt", weights_only=True) for r in range(n)]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def generator_from(state: dict[str, torch.Tensor]) -> MLPGenerator:
    g = MLPGenerator(hidden=64)
    g.load_state_dict({k.removeprefix("generator."): v for k, v in state.items() if k.startswith("generator.")})
    return g.eval()


def samples(g: MLPGenerator, n: int) -> np.ndarray:
    """The evaluation's samples: ``n`` normal vectors from the evaluation's seed, whatever the step or rank."""
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        return g(noise).numpy()


def modes_and_quality(points: np.ndarray) -> tuple[int, float]:
    """PacGAN's numbers written out in numpy, independent of ModeCoverage."""
    grid = np.array([(a, b) for a in range(-4, 5, 2) for b in range(-4, 5, 2)], dtype=float)
    distance = np.sqrt(((points[:, None, :] - grid[None]) ** 2).sum(-1))
    near = distance.min(1) < 0.15
    return len(set(distance.argmin(1)[near].tolist())), float(near.mean())


def test_consensus_evaluation_scores_the_average_model_and_leaves_training_alone(suite4):
    tmp_path = suite4
    evaluated = ends(suite4 / "eval_consensus")
    plain = ends(suite4 / "eval_plain")
    for r in range(N):  # parameters restored, training noise untouched: bit-identical replicas
        for key, value in plain[r].items():
            assert torch.equal(value, evaluated[r][key]), (r, key)
    average = {k: sum(s[k] for s in evaluated) / N for k in evaluated[0] if k.startswith("generator.")}
    g = generator_from(average)
    points = samples(g, SAMPLES)  # the ranks' shares together
    table = rows(tmp_path / "eval_consensus" / "eval" / "evaluation.csv")
    assert [int(row["step"]) for row in table] == [10, 20, 30]
    modes, quality = modes_and_quality(points)
    assert int(float(table[-1]["modes"])) == modes and float(table[-1]["high_quality"]) == pytest.approx(quality)
    assert float(table[-1]["consensus/generator"]) > 0
    for picture in ("samples_step0000010.png", "samples_step0000030.png", "consensus.png"):
        assert (tmp_path / "eval_consensus" / "eval" / picture).stat().st_size > 1000
    logged = rows(tmp_path / "eval_consensus" / "log" / "version_0" / "metrics.csv")
    assert any(row.get("eval/modes") for row in logged)


def test_local_evaluation_reports_mean_and_worst_replica(suite4):
    replicas = ends(suite4 / "eval_local")
    per_replica = [modes_and_quality(samples(generator_from(replicas[r]), SAMPLES)) for r in range(N)]
    last = rows(suite4 / "eval_local" / "eval" / "evaluation.csv")[-1]
    quality = [q for _, q in per_replica]
    assert float(last["high_quality_mean"]) == pytest.approx(np.mean(quality))
    assert float(last["high_quality_worst"]) == pytest.approx(min(quality))
    assert float(last["modes_worst"]) == min(m for m, _ in per_replica)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID written out: ``||mu_a - mu_b||² + Tr(S_a + S_b - 2 (S_a S_b)^½)``."""
    from scipy.linalg import sqrtm

    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * sqrtm(sa @ sb).real))


def digit_features(images: torch.Tensor) -> np.ndarray:
    from lightning_dpgan.metrics import load_classifier

    with torch.no_grad():
        return load_classifier("digits").features(images).double().numpy()


def test_image_evaluation_reports_the_fid_of_the_average_model(suite2):
    """2 ranks, DCGAN on digits: the logged FID at the end is the consensus EMA generator's, recomputed here from
    the replicas' weights, the evaluation's noise and the shipped extractor's features."""
    from lightning_dpgan.data import DigitsDataModule
    from lightning_dpgan.models import DCGANGenerator

    out = suite2 / "eval_digits"
    table = rows(out / "eval" / "evaluation.csv")
    assert [int(r["step"]) for r in table] == [10, 20]
    replicas = ends(out, 2)
    g = DCGANGenerator(8, channels=1, latent_dim=16, width=16)
    state = {k.removeprefix("generator_ema.module."): v for k, v in replicas[0].items() if k.startswith("generator_ema.module.")}
    for k, v in state.items():
        if v.is_floating_point():
            state[k] = sum(r[f"generator_ema.module.{k}"] for r in replicas) / 2
    g.load_state_dict(state)
    g.eval()
    with torch.no_grad():
        fake = g(torch.randn(200, 16, generator=torch.Generator().manual_seed(SEED)))  # both ranks' 100
    data = DigitsDataModule(batch_size=32, val_size=360)
    data.setup()
    real = torch.stack([data.val_set[i][0] for i in range(len(data.val_set))])
    expected = frechet_distance(digit_features(real), digit_features(fake))
    assert float(table[-1]["fid"]) == pytest.approx(expected, rel=1e-3)
    assert float(table[-1]["inception_score"]) >= 1.0  # exp of a KL divergence
    assert (out / "eval" / "samples_step0000020.png").stat().st_size > 500


class RealDigits(torch.nn.Module):
    """A stand-in for a perfectly trained generator: each call returns the next real training digits."""

    latent_dim = 16

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images, self.offset = images, 0

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        out = self.images[self.offset : self.offset + len(noise)]
        self.offset += len(noise)
        return out


def test_image_scores_separate_a_trained_generator_from_an_untrained_one():
    """Real training digits score as a trained generator should and an untrained DCGAN as it should not, with the
    bounds the extractor was measured against (tests/test_metrics.py: FID 7 for real digits, 458 for noise)."""
    from types import SimpleNamespace

    from lightning_dpgan.data import DigitsDataModule
    from lightning_dpgan.models import DCGANGenerator

    data = DigitsDataModule(batch_size=32, val_size=360)
    data.setup()
    train = torch.stack([data.train_set[i][0] for i in range(1000)])
    torch.manual_seed(0)
    scores = {}
    for name, generator in (("real", RealDigits(train)), ("untrained", DCGANGenerator(8, channels=1, latent_dim=16, width=16))):
        module = SimpleNamespace(generator=generator, latent_dim=16, device=torch.device("cpu"))
        scores[name] = GANEvaluation("digits", num_samples=1000).evaluate_module(module, data)
    assert scores["real"]["fid"] < 20 and scores["untrained"]["fid"] > 200, scores
    assert scores["real"]["inception_score"] > 7 and scores["untrained"]["inception_score"] < 4, scores


@pytest.mark.parametrize(
    "kwargs,message",
    [({"model": "mean"}, "unknown evaluation model 'mean'; allowed: consensus, local"), ({"num_samples": 0}, "num_samples must be an integer >= 1")],
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


# ---------------------------------------------------------------------- the command line, as a user runs it
@pytest.fixture(scope="module")
def fit_then_validate(tmp_path_factory):
    """``fit`` with the command line's defaults where a worker's epoch is 48 batches (the defaults' 4 workers x 512
    samples; here 2 x 1024), consensus every 25 steps, evaluated once, at the end; then ``validate`` on its
    ``last.ckpt``."""
    import sys

    from helpers import run

    cli = [sys.executable, "-m", "lightning_dpgan"]
    root = tmp_path_factory.mktemp("fit_then_validate")
    fit = run([*cli, "fit", "devices=2", "batch_size=1024", "max_steps=150", "strategy.consensus_every=25",
               f"hydra.run.dir={root / 'run'}"], timeout=400)
    validate = run([*cli, "validate", f"ckpt_path={root / 'run' / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={root / 'validate'}"],
                   timeout=200)
    return root, fit, validate


def test_validate_on_last_ckpt_reports_what_fits_last_evaluation_did(fit_then_validate):
    """The same checkpoint, the same 2,500 noise vectors (``evaluation_noise``: fit's 2 ranks score a share each,
    validate all in one process): the same modes and high-quality fraction. They drew different noise, and
    reported 13 modes against 11."""
    import json

    root, _, _ = fit_then_validate
    last = rows(root / "run" / "evaluation.csv")[-1]
    validated = json.loads((root / "validate" / "validate.json").read_text())
    assert int(last["step"]) == 150
    assert float(last["high_quality"]) > 0.05  # enough samples near modes for the numbers to say something
    assert validated["modes"] == float(last["modes"])
    assert validated["high_quality"] == pytest.approx(float(last["high_quality"]), abs=1.5 / 2500)  # a sample at most
    assert validated["reverse_kl"] == pytest.approx(float(last["reverse_kl"]), abs=1e-3)


def test_the_defaults_give_no_lightning_warnings_about_validation_or_logging(fit_then_validate):
    """No validation loader the model has no step for, and a log interval no longer than a worker's epoch."""
    _, fit, _ = fit_then_validate
    output = fit.stdout + fit.stderr
    assert "val_dataloader" not in output and "validation_step" not in output, output[-3000:]
    assert "log_every_n_steps" not in output, output[-3000:]


def test_the_pictures_say_what_they_show(fit_then_validate):
    """``consensus.png`` plots the strategy's consensus rows of metrics.csv (every 25 steps here), not
    evaluation.csv's one row; ``samples_step*.png`` shows and names all 2,500 scored samples, from both ranks."""
    from PIL import Image

    root, _, _ = fit_then_validate
    logged = rows(root / "run" / "metrics.csv")
    steps = [row["step"] for row in logged if row.get("consensus/generator") and not row.get("eval/modes")]
    assert len(steps) == 6 and len(rows(root / "run" / "evaluation.csv")) == 1
    described = Image.open(root / "run" / "consensus.png").text["Description"]
    assert f"consensus/generator: steps {' '.join(steps)}" in described, described
    picture = Image.open(root / "run" / "samples_step0000150.png").text
    assert "all 2500 scored samples" in picture["Title"] and picture["Description"] == "2500 points", picture
    validated = Image.open(root / "validate" / "samples.png").text
    assert "all 2500 scored samples" in validated["Title"] and validated["Description"] == "2500 points", validated
