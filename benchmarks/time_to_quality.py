"""Time to FID thresholds with the clock of one run and the scores of another run of the same setting.

    python benchmarks/time_to_quality.py --fid 300 200 \\
        --clock runs/e2e/ddp_all_reduce_cposg/200mbit --scores runs/ddp_fixed/seed0 \\
        --against runs/e2e/one_peer_exponential_bf16_overlap/200mbit

Why: a setting's time per iteration depends on the shapes of what it computes and sends, not on the values. When
a fix changes only the values (DDP's per-rank noise, 2026-11-26), its scores can be re-measured on an unlimited
link, on a busy machine, while the clock of the run measured side by side with the other settings on the limited
link stands. The time to a threshold is then the clock run's ``train_s`` at the first iteration where the scores
run reaches it. ``--clock``, ``--scores`` and ``--against`` take one run folder per seed, in the same order; every
folder needs an ``evaluation.csv``, and the clock and scores runs must have evaluated at the same iterations.
``--against-scores`` does the same for the other setting: its clock is then ``--against`` (for example, both
clocks measured on hosts with their own cores, both score curves from runs elsewhere).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_train import first_reaching, read_rows  # noqa: E402


def time_to(clock: list[dict[str, float]], scores: list[dict[str, float]], fid: float) -> tuple[float, int] | None:
    """Seconds on ``clock``'s run until ``scores``' run first has FID <= ``fid``, and that iteration."""
    clock_steps, score_steps = [int(r["step"]) for r in clock], [int(r["step"]) for r in scores]
    if clock_steps != score_steps:
        raise SystemExit(f"error: the clock run evaluated at {clock_steps}, the scores run at {score_steps}; they must match")
    reached = first_reaching(scores, fid)
    if reached is None:
        return None
    step = reached["step"]
    return next(r["train_s"] for r in clock if r["step"] == step), int(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fid", type=float, nargs="+", default=[300.0, 200.0])
    parser.add_argument("--clock", type=Path, nargs="+", required=True, help="the baseline's limited-link runs")
    parser.add_argument("--scores", type=Path, nargs="+", required=True, help="the baseline's re-scored runs")
    parser.add_argument("--against", type=Path, nargs="+", required=True, help="the other setting's limited-link runs")
    parser.add_argument("--against-scores", type=Path, nargs="+", default=None, help="the other setting's scores, if not --against's own")
    args = parser.parse_args()
    against_scores = args.against_scores or args.against
    counts = [len(args.clock), len(args.scores), len(args.against), len(against_scores)]
    if len(set(counts)) != 1:
        parser.error(f"--clock, --scores, --against (and --against-scores) need one folder per seed each, got {counts}")
    header = ["run"]
    for fid in args.fid:
        header += [f"baseline s to FID ≤ {fid:g} (it)", "other", "baseline ÷ other"]
    header += ["FID at the end: baseline, other"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    ratios: dict[float, list[float]] = {fid: [] for fid in args.fid}
    for clock_dir, scores_dir, against_dir, against_scores_dir in zip(args.clock, args.scores, args.against, against_scores):
        clock, scores = read_rows(clock_dir), read_rows(scores_dir)
        against, against_scored = read_rows(against_dir), read_rows(against_scores_dir)
        cells = [str(scores_dir)]
        for fid in args.fid:
            base, other = time_to(clock, scores, fid), time_to(against, against_scored, fid)
            cells.append(f"{base[0]:.0f} ({base[1]})" if base else "not reached")
            cells.append(f"{other[0]:.0f} ({other[1]})" if other else "not reached")
            if base and other:
                ratios[fid].append(base[0] / other[0])
                cells.append(f"{ratios[fid][-1]:.2f}×")
            else:
                cells.append("")
        cells.append(f"{scores[-1]['fid']:.1f}, {against_scored[-1]['fid']:.1f} at {scores[-1]['step']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    mean = ["mean"]
    for fid in args.fid:
        mean += ["", "", f"{statistics.mean(ratios[fid]):.2f}×" if ratios[fid] else ""]
    lines.append("| " + " | ".join(mean + [""]) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
