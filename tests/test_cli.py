"""The main job through the real command line, and its errors before any worker starts."""

from __future__ import annotations

import sys

import pytest

from helpers import run


def test_fit_runs_the_gan_on_a_ring_and_reports(tmp_path):
    proc = run(
        [sys.executable, "-m", "lightning_dpgan", "fit", "devices=2", "max_steps=60", "consensus_every=10", f"output_dir={tmp_path}"],
        timeout=240,
    )
    assert "fit done" in proc.stdout and "on 2 processes (ring, gossip_rounds=1, optimistic_adam)" in proc.stdout
    assert "/25 modes" in proc.stdout
    assert "consensus distance: generator" in proc.stdout
    assert (tmp_path / "fit" / "version_0" / "metrics.csv").exists()
    assert (tmp_path / "fit" / "version_0" / "evaluation.csv").exists()
    assert (tmp_path / "fit" / "version_0" / "samples_step0000060.png").exists()
    assert (tmp_path / "fit" / "version_0" / "checkpoints" / "last.ckpt.replicas" / "rank1.pt").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["train"], "unknown verb 'train'; allowed: fit"),
        (["fit", "topology=hypercube", "devices=3"], "'hypercube' needs a power-of-two world size"),
        (["fit", "gossip_rounds=0"], "gossip_rounds must be an integer >= 1, got 0"),
        (["fit", "devices=0"], "devices must be >= 1, got 0"),
        (["fit", "learning_rate=1"], "unknown option 'learning_rate=1'; allowed keys: topology"),
        (["fit", "optimizer=rmsprop"], "unknown optimizer 'rmsprop'; allowed: optimistic_adam, optimistic_sgd, adam, sgd"),
        (["fit", "devices=two"], "devices='two' is not a valid int"),
    ],
)
def test_bad_input_exits_2_with_one_message(args, message):
    proc = run([sys.executable, "-m", "lightning_dpgan", *args], timeout=60, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "Initializing distributed" not in proc.stderr
