"""``SweepComparison``: after a ``-m`` sweep, one picture of every job's quality and consensus distance over steps.

A Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``): when the sweep ends it reads each job folder's
``evaluation.csv``, labels each job by the overrides that differ between jobs (``topology=ring``, ...), and writes
``comparison.png`` into the sweep folder, one line per job: for mixtures the modes covered and the high-quality
fraction side by side (the fraction alone rewards mode collapse: a generator on one mode puts most samples near
it), for images FID; then the generator's consensus distance.
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
    if "fid" in first:
        panels = [("fid", "FID (lower is better)")]
    else:  # both: coverage, and how many samples are near a mode
        panels = [("modes", "modes covered (higher is better)"), ("high_quality", "high-quality samples (within 3σ of a mode)")]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5.5 * (len(panels) + 1), 4.2))
    last_values = []
    for ax, (key, label) in zip(axes, panels):
        for name, rows in jobs.items():
            values = [float(r[key]) if r.get(key) else float("nan") for r in rows]
            ax.plot([float(r["step"]) for r in rows], values, marker="o", label=labels[name])
        ax.set(xlabel="step", ylabel=label, title=f"{key} of the consensus model")
        last_values.append(f"{key}: " + ", ".join(f"{labels[n]} {float(rows[-1][key]):.4g}" for n, rows in jobs.items() if rows[-1].get(key)))
    right = axes[-1]
    for name, rows in jobs.items():
        consensus = [float(r["consensus/generator"]) if r.get("consensus/generator") else float("nan") for r in rows]
        right.plot([float(r["step"]) for r in rows], [max(v, 1e-30) for v in consensus], marker="o", label=labels[name])
    right.set(xlabel="step", ylabel="mean_i ||x_i - mean(x)||²", yscale="log", title="consensus distance (generator)")
    axes[0].legend(fontsize=8)
    fig.suptitle(os.path.basename(os.path.normpath(sweep_dir)))
    fig.tight_layout()
    path = os.path.join(sweep_dir, "comparison.png")
    # the PNG names what it compares, each job's last value per panel (PIL: Image.open(path).text["Description"])
    fig.savefig(path + ".tmp", dpi=100, format="png", metadata={"Description": "; ".join(last_values)})
    plt.close(fig)
    os.replace(path + ".tmp", path)
    return path


def _labels(names: list[str]) -> dict[str, str]:
    """Each job's overrides that not every job shares (job folders are ``<number>_<overrides>``)."""
    parts = {name: name.split("_", 1)[1].split(",") if "_" in name else [name] for name in names}
    common = set.intersection(*(set(p) for p in parts.values())) if len(parts) > 1 else set()
    return {name: ", ".join(p for p in items if p not in common) or name for name, items in parts.items()}
