"""The results table: DPOSG against its centralized baseline and plain simultaneous Adam, several seeds each.

    python benchmarks/quality.py default --settings dposg_ring_optimisticadam --seeds 0 1 2
    python benchmarks/quality.py grid25 ring8 --seeds 0 1 2 --parallel 2
    python benchmarks/quality.py digits mnist5k --seeds 0 1 2 --parallel 2

Every run is the real command line, ``python -m lightning_dpgan fit experiment=<name> seed=<s> <setting>``, so a
row can be reproduced by hand (``default`` is the main job, ``python -m lightning_dpgan fit`` with no experiment);
extra ``key=value`` arguments after ``--`` go to every run (``-- max_steps=2000``).
Runs go to ``--out/<experiment>/<setting>/seed<s>/``; the table is built from their ``evaluation.csv`` (the
consensus model's last evaluation) and printed as Markdown, and also saved as ``--out/results.md``. ``--collect``
builds it from runs already there (for example, runs made on several machines). ``--settings`` also takes the
``DIAGNOSES`` below, which a plain run leaves out:

    python benchmarks/quality.py grid25 --settings dposg_complete_graph_optimisticadam --seeds 1 2 -- loss.r1=0.1
    python benchmarks/quality.py default --settings dposg_ring_optimisticadam dposg_ring_int8_choco \
        dposg_ring_sign_choco dposg_ring_top_1_choco --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: setting name -> overrides; each baseline changes one thing against DPOSG
SETTINGS = {
    "DPOSG, ring (OptimisticAdam)": [],
    "centralized, DDP (OptimisticAdam)": ["strategy=ddp"],
    "simultaneous Adam, ring": ["optim=adam"],
}
IMAGE_SETTINGS = ("DPOSG, ring (OptimisticAdam)", "centralized, DDP (OptimisticAdam)")
#: run only when named with --settings: diagnoses of a gap between DPOSG and its centralized baseline
DIAGNOSES = {
    # W = J/n: replicas exactly averaged after every local step, so any gap left to DDP is the local step's
    "DPOSG, complete graph (OptimisticAdam)": ["topology=complete"],
}
#: run only when named with --settings: compressed gossip (CHOCO) at its default consensus step, against DPOSG
COMPRESSIONS = {
    "DPOSG, ring, int8 CHOCO": ["compression=int8"],
    "DPOSG, ring, sign CHOCO": ["compression=sign"],
    "DPOSG, ring, top-1 % CHOCO": ["compression=topk"],
}
ALL_SETTINGS = {**SETTINGS, **DIAGNOSES, **COMPRESSIONS}
#: PacGAN (Lin et al., 2018), Table 1, grid of 25 Gaussians: modes, % high-quality samples
PACGAN_GRID = {"GAN": (17.3, 94.8), "ALI": (24.1, 95.7), "PacGAN4": (24.8, 93.6)}
MIXTURES = ("default", "grid25", "ring8")  # the default job trains on grid-25
DEFAULT = "default"


def experiment_overrides(experiment: str) -> list[str]:
    return [] if experiment == DEFAULT else [f"experiment={experiment}"]


def run_one(experiment: str, setting: str, seed: int, out: Path, extra: list[str]) -> None:
    run_dir = out / experiment / slug(setting) / f"seed{seed}"
    if collect(run_dir) is not None:
        print(f"{experiment} | {setting} | seed {seed}: already done in {run_dir}", flush=True)
        return
    cmd = [
        sys.executable, "-m", "lightning_dpgan", "fit", *experiment_overrides(experiment), f"seed={seed}",
        *ALL_SETTINGS[setting], f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false", *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "stdout.log").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    print(f"{experiment} | {setting} | seed {seed}: exit {proc.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)


def collect(run_dir: Path) -> dict[str, float] | None:
    """A finished run's last evaluation and its fit time, or None if it did not finish."""
    log = run_dir / "stdout.log"
    fit_time = re.search(r"fit done in ([\d.]+) s", log.read_text()) if log.is_file() else None
    if fit_time is None or not (run_dir / "evaluation.csv").is_file():
        return None
    with open(run_dir / "evaluation.csv") as f:
        last = list(csv.DictReader(f))[-1]
    return {**{k: float(v) for k, v in last.items() if v}, "fit_s": float(fit_time.group(1))}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """Mean ± sample standard deviation; infinite values (the reverse KL of a run with no high-quality sample)
    are counted apart instead of swallowing the statistics."""
    finite = [v * scale for v in values if math.isfinite(v)]
    if not finite:
        return "∞"
    text = f"{finite[0]:.{digits}f}" if len(finite) == 1 else (
        f"{statistics.mean(finite):.{digits}f} ± {statistics.stdev(finite):.{digits}f}"
    )
    infinite = len(values) - len(finite)
    return f"{text} (∞ in {infinite} of {len(values)})" if infinite else text


def table(experiment: str, results: dict[str, list[dict[str, float]]], extra: list[str]) -> str:
    if experiment in MIXTURES:
        modes = 8 if experiment == "ring8" else 25
        columns = [(f"modes (of {modes})", "modes", 1, 1), ("high-quality %", "high_quality", 100, 1), ("reverse KL", "reverse_kl", 1, 3)]
        by_seed = ("modes by seed", "modes")  # a mean hides a bimodal outcome: all modes or none
    else:
        columns = [("FID ↓", "fid", 1, 2), ("IS ↑", "inception_score", 1, 2)]
        by_seed = ("FID by seed", "fid")
    header = ["setting", "seeds", *(title for title, *_ in columns), by_seed[0], "consensus distance G", "fit s"]
    lines = [
        f"**{experiment}** (`{' '.join(['python -m lightning_dpgan fit', *experiment_overrides(experiment), 'seed=S <setting>', *extra])}`)",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for setting, runs in results.items():
        if not runs:
            lines.append(f"| {setting} | 0 | failed |" + " |" * (len(header) - 3))
            continue
        consensus = [r["consensus/generator"] for r in runs if "consensus/generator" in r]
        cells = [setting, str(len(runs)), *(mean_std([r[key] for r in runs], scale, digits) for _, key, scale, digits in columns)]
        cells.append(", ".join(f"{r[by_seed[1]]:.0f}" for r in runs))
        cells += [f"{statistics.mean(consensus):.2g}" if consensus else "0 (identical)", mean_std([r["fit_s"] for r in runs], 1, 0)]
        lines.append("| " + " | ".join(cells) + " |")
    if experiment in ("grid25", DEFAULT):
        lines += [f"| PacGAN Table 1: {name} | | {m} | {hq} | | | | |" for name, (m, hq) in PACGAN_GRID.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+", help="default (the main job), or experiment configs: grid25, ring8, digits, mnist5k")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (each starts `devices` processes)")
    parser.add_argument("--settings", nargs="+", default=None, help="a subset of the settings, or diagnoses, by slug")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--collect", action="store_true", help="only build the table from the runs already in --out")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    jobs = []
    for experiment in args.experiments:
        settings = list(SETTINGS) if experiment in MIXTURES else list(IMAGE_SETTINGS)
        if args.settings:
            unknown = set(args.settings) - {slug(s) for s in ALL_SETTINGS}
            if unknown:
                parser.error(f"unknown --settings {sorted(unknown)}; choose from {[slug(s) for s in ALL_SETTINGS]}")
            settings = [s for s in [*settings, *DIAGNOSES, *COMPRESSIONS] if slug(s) in args.settings]
        jobs += [(experiment, setting, seed) for setting in settings for seed in args.seeds]
    if not args.collect:
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda job: run_one(*job, args.out, extra), jobs))
    report = []
    for experiment in args.experiments:
        results: dict[str, list[dict[str, float]]] = {}
        for e, setting, seed in jobs:
            if e == experiment:
                outcome = collect(args.out / e / slug(setting) / f"seed{seed}")
                results.setdefault(setting, []).extend([outcome] if outcome is not None else [])
        report.append(table(experiment, results, extra))
    text = "\n\n".join(report)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
