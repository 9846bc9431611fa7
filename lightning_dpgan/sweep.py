"""``SweepComparison``: after a ``-m`` sweep, one picture of every job's quality and consensus distance over steps.

A Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``): when the sweep ends it reads each job folder's
``evaluation.csv``, labels each job by the overrides that differ between jobs (``topology=ring``, ...), and writes
``comparison.png`` into the sweep folder: quality (high-quality samples for mixtures, FID for images) on the left,
the generator's consensus distance on the right, one line per job.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepComparison(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = str(config.hydra.sweep.dir)
        path = plot_sweep(sweep_dir)
        if path is not None:
            print(f"sweep comparison: {path}")


def plot_sweep(sweep_dir: str) -> str | None:
    """Write ``comparison.png`` for the jobs under ``sweep_dir``; ``None`` when no job has evaluations."""
    jobs = {}
    for name in sorted(os.listdir(sweep_dir)) if os.path.isdir(sweep_dir) else []:
        table = os.path.join(sweep_dir, name, "evaluation.csv")
        if os.path.isfile(table):
            with open(table, newline="") as f:
                jobs[name] = list(csv.DictReader(f))
    if not jobs:
        return None
    labels = _labels(list(jobs))
    first = next(iter(jobs.values()))[0]
    quality, quality_label = ("fid", "FID (lower is better)") if "fid" in first else ("high_quality", "high-quality samples")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in jobs.items():
        steps = [float(r["step"]) for r in rows]
        left.plot(steps, [float(r[quality]) if r.get(quality) else float("nan") for r in rows], marker="o", label=labels[name])
        consensus = [float(r["consensus/generator"]) if r.get("consensus/generator") else float("nan") for r in rows]
        right.plot(steps, [max(v, 1e-30) for v in consensus], marker="o", label=labels[name])
    left.set(xlabel="step", ylabel=quality_label, title="quality of the consensus model")
    right.set(xlabel="step", ylabel="mean_i ||x_i - mean(x)||²", yscale="log", title="consensus distance (generator)")
    left.legend(fontsize=8)
    fig.suptitle(os.path.basename(os.path.normpath(sweep_dir)))
    fig.tight_layout()
    path = os.path.join(sweep_dir, "comparison.png")
    fig.savefig(path + ".tmp", dpi=100, format="png")
    plt.close(fig)
    os.replace(path + ".tmp", path)
    return path


def _labels(names: list[str]) -> dict[str, str]:
    """Each job's overrides that not every job shares (job folders are ``<number>_<overrides>``)."""
    parts = {name: name.split("_", 1)[1].split(",") if "_" in name else [name] for name in names}
    common = set.intersection(*(set(p) for p in parts.values())) if len(parts) > 1 else set()
    return {name: ", ".join(p for p in items if p not in common) or name for name, items in parts.items()}
