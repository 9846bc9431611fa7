"""ModeCoverage on constructed samples with known answers; FID/IS with the shipped extractors on real data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_dpgan.data import DigitsDataModule, MNIST5kDataModule
from lightning_dpgan.metrics import (
    FrozenExtractor,
    ModeCoverage,
    extractor_report,
    mode_coverage,
    fid_metric,
    inception_score_metric,
    load_classifier,
)

GRID = np.array([(a, b) for a in (-4.0, -2.0, 0.0, 2.0, 4.0) for b in (-4.0, -2.0, 0.0, 2.0, 4.0)])  # PacGAN's


def coverage(samples: np.ndarray, chunks: int = 1) -> dict[str, float]:
    """The metric, fed in chunks (states accumulate over updates); its functional twin must agree."""
    metric = ModeCoverage(GRID, sigma=0.05)
    for part in np.array_split(samples, chunks):
        metric.update(torch.as_tensor(part))
    result = {k: float(v) for k, v in metric.compute().items()}
    functional = {k: float(v) for k, v in mode_coverage(torch.as_tensor(samples), GRID, 0.05).items()}
    assert functional == pytest.approx(result)
    return result


def test_all_modes():
    rng = np.random.default_rng(0)
    samples = GRID[np.arange(2500) % 25] + 0.05 * rng.standard_normal((2500, 2))
    result = coverage(samples, chunks=5)
    assert result["modes"] == 25
    assert result["high_quality"] == pytest.approx(1 - math.exp(-4.5), abs=0.006)  # P(|N(0, σ²I₂)| < 3σ)
    assert result["reverse_kl"] < 0.01


def test_half_the_modes_evenly():
    samples = GRID[np.arange(2400) % 12]
    result = coverage(samples)
    assert result == {"modes": 12, "high_quality": 1.0, "reverse_kl": pytest.approx(math.log(25 / 12))}


def test_uneven_histogram_kl():
    samples = GRID[[0] * 300 + [1] * 100]  # p = (3/4, 1/4) on two modes
    expected = 0.75 * math.log(0.75 * 25) + 0.25 * math.log(0.25 * 25)
    assert coverage(samples)["reverse_kl"] == pytest.approx(expected)


def test_off_mode_noise():
    samples = GRID[np.arange(2500) % 25] + 1.0  # halfway between modes
    assert coverage(samples) == {"modes": 0, "high_quality": 0.0, "reverse_kl": math.inf}


def test_bad_shape_is_named():
    with pytest.raises(ValueError, match=r"expects \(N, 2\) samples, got shape \(4, 3\)"):
        ModeCoverage(GRID, 0.05).update(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"modes must be a \(K, 2\) array of mode centres, got shape \(25,\)"):
        ModeCoverage(GRID[:, 0], 0.05)
    with pytest.raises(ValueError, match=r"sigma must be a finite number > 0, got 0"):
        mode_coverage(torch.zeros(4, 2), GRID, 0)


def real_splits(module) -> tuple[torch.Tensor, torch.Tensor]:
    module.setup()
    return tuple(torch.stack([s[i][0] for i in range(len(s))]) for s in (module.train_set, module.val_set))


@pytest.mark.parametrize(
    "dataset,make,held_out_below,noise_above",
    # measured once (2026-11-25): digits FID 7.0 held-out / 458 noise; mnist5k 11.8 / 2297
    [("digits", lambda: DigitsDataModule(val_size=360), 20.0, 200.0), ("mnist5k", lambda: MNIST5kDataModule(val_size=1000), 30.0, 1000.0)],
)
def test_fid_and_is_with_the_embedded_extractor(dataset, make, held_out_below, noise_above):
    train, held_out = real_splits(make())
    torch.manual_seed(0)
    noise = torch.rand_like(held_out) * 2 - 1
    scores = {}
    for name, fake in (("held_out", held_out), ("noise", noise)):
        fid = fid_metric(dataset)
        fid.update(train, real=True)
        fid.update(fake, real=False)
        inception = inception_score_metric(dataset)
        inception.update(fake)
        scores[name] = (float(fid.compute()), float(inception.compute()[0]))
    assert scores["held_out"][0] < held_out_below and scores["noise"][0] > noise_above, scores
    assert scores["held_out"][1] > 7 and scores["noise"][1] < 4, scores  # IS: near 10 classes vs few


def test_fid_keeps_real_statistics_across_resets():
    train, held_out = real_splits(DigitsDataModule(val_size=360))
    fid = fid_metric("digits")
    fid.update(train, real=True)
    fid.update(held_out, real=False)
    first = float(fid.compute())
    fid.reset()
    fid.update(held_out, real=False)  # real features were not recomputed
    assert float(fid.compute()) == pytest.approx(first, rel=1e-6)


def test_shipped_extractors_are_accurate_and_frozen():
    for dataset in ("digits", "mnist5k"):
        assert extractor_report(dataset)["held_out_accuracy"] > 0.95
    extractor = FrozenExtractor(load_classifier("digits"), "features")
    extractor.train()
    assert not extractor.training and extractor.num_features == 64
    assert not any(p.requires_grad for p in extractor.parameters())
