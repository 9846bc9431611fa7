"""benchmarks/quality.py: which settings a run covers, and its one error for a setting it does not know."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


def collect(tmp_path: Path, *settings: str) -> subprocess.CompletedProcess:
    chosen = ["--settings", *settings] if settings else []
    return subprocess.run([sys.executable, str(SCRIPT), "grid25", "--collect", "--out", str(tmp_path), *chosen],
                          capture_output=True, text=True)


def test_diagnoses_run_only_when_named(tmp_path):
    plain = collect(tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert "DPOSG, ring (OptimisticAdam) | 0 | failed" in plain.stdout  # nothing collected yet: every row is named
    assert "simultaneous Adam, ring | 0 |" in plain.stdout and "complete graph" not in plain.stdout
    named = collect(tmp_path, "dposg_complete_graph_optimisticadam", "centralized_ddp_optimisticadam")
    assert named.returncode == 0, named.stderr
    rows = [line.split(" | ")[0] for line in named.stdout.splitlines() if " | 0 | failed" in line]
    assert rows == ["| centralized, DDP (OptimisticAdam)", "| DPOSG, complete graph (OptimisticAdam)"]


def test_an_unknown_setting_is_named_with_the_choices(tmp_path):
    bad = collect(tmp_path, "dposg_ring", "dposg_ring_optimisticadam")
    assert bad.returncode == 2
    assert "unknown --settings ['dposg_ring']; choose from ['dposg_ring_optimisticadam'," in bad.stderr


def test_the_default_job_is_run_without_an_experiment(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "default", "--collect", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "**default** (`python -m lightning_dpgan fit seed=S <setting>`)" in done.stdout
    assert "modes (of 25)" in done.stdout and "PacGAN Table 1: PacGAN4" in done.stdout
