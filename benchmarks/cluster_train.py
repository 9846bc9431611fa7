"""End to end: DPGAN trained on the emulated cluster, the centralized baseline against gossip settings.

    sudo python benchmarks/cluster_train.py --hosts 8 --rate 200mbit --steps 1000 --fid 300 200

Every run is the real command line on every host, ``python -m lightning_dpgan fit experiment=digits ... devices=1
num_nodes=8``, one worker per host (Lightning reads the torchrun-style environment the cluster sets). The DCGAN
is widened to 128 channels (1.09 M parameters, 4.35 MB in fp32) so that communication matters. Per setting:

* iterations per second on the limited link, and on an unlimited one (a short run of ``--probe-steps``): the
  difference in seconds per iteration is the communication the link costs;
* training seconds (evaluations excluded) until the consensus model first reaches FID <= each ``--fid``;
* FID and IS at the last iteration (equal iterations for every setting), and ``cluster_train.png``: FID against
  training seconds;
* the α–β prediction of communication per iteration: bytes a host pushes ÷ rate, plus ``α`` per sequential hop
  (``2(n-1)`` for DDP's ring all_reduce of the gradients, ``t`` for gossip). DDP overlaps its all_reduce with the
  backward pass; gossip runs after the step, or (the ``overlap`` settings, ``strategy.gossip.overlap=true``) stays on
  the wire during the next forward and backward: the prediction is the communication, not the added time.

``--congestion-control`` picks the hosts' TCP congestion control (it decides how near their floor several flows
sharing a link get, docs/log.md) and ``--mtu`` the links' MTU; the table names both.
``no_communication_ceiling`` trains with no messages at all: its iterations per second are what the hosts'
cores allow, so DDP's seconds per iteration divided by its own bound every setting's per-iteration speed-up.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import (  # noqa: E402
    EmulatedCluster, add_link_arguments, link_options, new_figure, parse_rate, preflight, save_figure,
)

SETTINGS = {
    "DDP, all_reduce (CPOSG)": ["strategy=ddp"],
    "ring, t = 1": ["topology=ring", "gossip_rounds=1"],
    "ring, t = 3": ["topology=ring", "gossip_rounds=3"],
    "one-peer exponential, fp32": ["topology=one_peer_exponential"],
    "one-peer exponential, bf16": ["topology=one_peer_exponential", "wire_dtype=bf16"],
    "ring, t = 1, overlap": ["topology=ring", "gossip_rounds=1", "strategy.gossip.overlap=true"],
    "one-peer exponential, bf16, overlap": ["topology=one_peer_exponential", "wire_dtype=bf16", "strategy.gossip.overlap=true"],
    # no messages at all (its replicas drift apart, so its FID means nothing): the compute-bound ceiling of every
    # setting's iterations per second on these hosts
    "no communication (ceiling)": ["strategy.gossip.mixing=false", "strategy.consensus_every=0"],
}
CEILING = "no communication (ceiling)"
MODEL = ["experiment=digits", "model.generator.width=128", "model.discriminator.width=128", "trainer.enable_progress_bar=false"]
PARAMETER_BYTES = 1_087_874 * 4  # DCGANGenerator(8, 1, 32, 128) + DCGANDiscriminator(8, 1, 128), fp32


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def read_rows(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "evaluation.csv") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def fit(cluster: EmulatedCluster, overrides: list[str], run_dir: Path, steps: int, every: int, seed: int,
        started: Callable[[int, subprocess.Popen], None] | None = None) -> list[dict[str, float]]:
    command = [
        sys.executable, "-m", "lightning_dpgan", "fit", *MODEL, *overrides, "devices=1", f"num_nodes={cluster.hosts}",
        f"max_steps={steps}", f"evaluation.every_n_steps={every}", f"seed={seed}", f"hydra.run.dir={run_dir}",
    ]
    results = cluster.run(lambda host: command, timeout=6 * 3600, started=started)
    (run_dir / "stdout.log").write_text(results[0].stdout + "\n--- stderr\n" + results[0].stderr)
    return read_rows(run_dir)


def _recorded(run_dir: Path, what: str, before_it_was_recorded: str) -> str:
    """The hosts' ``what`` (congestion_control, mtu) in a limited-link run, as the run wrote it down."""
    path = run_dir / f"{what}.txt"
    return path.read_text().strip() if path.is_file() else before_it_was_recorded


def first_reaching(rows: list[dict[str, float]], fid: float) -> dict[str, float] | None:
    """The first evaluation with FID <= ``fid``, or None."""
    return next((r for r in rows if r["fid"] <= fid), None)


def seconds_per_iteration(rows: list[dict[str, float]]) -> float:
    """From the first evaluation to the last: leaves out start-up and the first iterations."""
    first, last = rows[0], rows[-1]
    return (last["train_s"] - first["train_s"]) / (last["step"] - first["step"])


def predicted_comm(setting: str, hosts: int, bits_per_second: int, alpha: float) -> float:
    overrides = SETTINGS[setting]
    if setting == CEILING:
        return 0.0
    if "strategy=ddp" in overrides:
        return 2 * (hosts - 1) / hosts * PARAMETER_BYTES * 8 / bits_per_second + alpha * 2 * (hosts - 1)
    rounds = int(next((o.split("=")[1] for o in overrides if o.startswith("gossip_rounds=")), 1))
    out_degree = 1 if "one_peer_exponential" in " ".join(overrides) else 2
    wire = 0.5 if "wire_dtype=bf16" in overrides else 1.0
    return rounds * (out_degree * PARAMETER_BYTES * wire * 8 / bits_per_second + alpha)


def plot(curves: dict[str, list[dict[str, float]]], thresholds: list[float], title: str, path: Path) -> None:
    """The consensus model's FID against training seconds, one line per setting, the thresholds dotted."""
    fig, ax = new_figure(figsize=(6.5, 4.5))
    for setting, rows in curves.items():
        ax.plot([r["train_s"] for r in rows], [r["fid"] for r in rows], "o-", label=setting)
    for fid in thresholds:
        ax.axhline(fid, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="training seconds (evaluations excluded)", ylabel="FID of the consensus model", title=title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--rate", default="200mbit")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100, help="evaluate (FID) every this many iterations")
    parser.add_argument("--probe-steps", type=int, default=200, help="iterations of the unlimited-link run")
    parser.add_argument("--fid", type=float, nargs="+", default=[200.0], help="quality thresholds: FID at most this")
    parser.add_argument("--alpha-ms", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="the CLI's seed=, the same for every setting")
    parser.add_argument("--settings", nargs="+", default=None, help="a subset, by slug")
    parser.add_argument("--out", type=Path, default=Path("runs/cluster_train"))
    parser.add_argument("--collect", action="store_true", help="only rebuild the table from the runs in --out")
    add_link_arguments(parser)
    args = parser.parse_args()
    if not args.collect:
        preflight(parser, **link_options(args))
    bps = parse_rate(args.rate)
    assert bps is not None, "--rate must be a limit, the unlimited link is the probe"
    settings = [s for s in SETTINGS if args.settings is None or slug(s) in args.settings]
    results, curves = {}, {}
    for setting in settings:
        out = args.out / slug(setting)
        if args.collect:
            if not (out / args.rate / "evaluation.csv").is_file():
                continue
            probe, rows = read_rows(out / "unlimited"), read_rows(out / args.rate)
            if rows[-1]["step"] < args.steps:  # evaluation.csv is written as a run goes: this one was stopped
                print(f"{setting}: stopped at step {rows[-1]['step']:.0f} of {args.steps}, left out", file=sys.stderr)
                continue
        else:
            with EmulatedCluster(args.hosts, None, port=29600, **link_options(args)) as cluster:
                probe = fit(cluster, SETTINGS[setting], out / "unlimited", args.probe_steps, args.probe_steps // 2, args.seed)
            with EmulatedCluster(args.hosts, args.rate, port=29601, **link_options(args)) as cluster:
                congestion = cluster.congestion_control()
                rows = fit(cluster, SETTINGS[setting], out / args.rate, args.steps, args.every, args.seed)
            (out / args.rate / "congestion_control.txt").write_text(congestion + "\n")
            (out / args.rate / "mtu.txt").write_text(f"{args.mtu}\n")
        if setting != CEILING:  # its FID means nothing
            curves[setting] = rows
        reached = {fid: first_reaching(rows, fid) for fid in args.fid}
        results[setting] = {
            "s_per_it": seconds_per_iteration(rows),
            "s_per_it_unlimited": seconds_per_iteration(probe),
            "to_threshold": {fid: (r["train_s"], r["step"]) if r else None for fid, r in reached.items()},
            "steps": rows[-1]["step"],
            "fid": rows[-1]["fid"],
            "inception_score": rows[-1]["inception_score"],
            "predicted_comm_s": predicted_comm(setting, args.hosts, bps, args.alpha_ms / 1e3),
            "congestion_control": _recorded(out / args.rate, "congestion_control", "not recorded"),
            "mtu": _recorded(out / args.rate, "mtu", "1500"),  # every run before --mtu had Linux's default
        }
        print(f"{setting}: {json.dumps(results[setting])}", file=sys.stderr, flush=True)
        args.out.mkdir(parents=True, exist_ok=True)  # after every setting: a run cut short keeps what it measured
        (args.out / "cluster_train.json").write_text(json.dumps(results, indent=1))
    thresholds = " | ".join(f"s to FID ≤ {fid:g} | ÷ DDP" for fid in args.fid)
    congestion = "/".join(sorted({r["congestion_control"] for r in results.values()}))
    mtus = "/".join(sorted({r["mtu"] for r in results.values()}))
    lines = [
        f"**{args.hosts} hosts at {args.rate}**, TCP congestion control {congestion}, MTU {mtus}, α = {args.alpha_ms:g} ms; "
        "time to quality in training seconds (iteration)",
        "",
        f"| setting | it/s | it/s unlimited | comm ms/it (measured) | comm ms/it (α–β) | {thresholds} | FID | IS |",
        "|---|" + "---:|" * (6 + 2 * len(args.fid)),
    ]
    ddp = results.get("DDP, all_reduce (CPOSG)")
    for setting, r in results.items():
        cells = [setting, f"{1 / r['s_per_it']:.2f}", f"{1 / r['s_per_it_unlimited']:.2f}",
                 f"{1e3 * (r['s_per_it'] - r['s_per_it_unlimited']):.0f}", f"{1e3 * r['predicted_comm_s']:.0f}"]
        for fid in args.fid:
            reach, base = r["to_threshold"][fid], ddp["to_threshold"][fid] if ddp else None
            cells.append(f"{reach[0]:.0f} ({reach[1]:.0f})" if reach else "not reached")
            cells.append(f"{base[0] / reach[0]:.2f}×" if reach and base else "")
        cells += [f"{r['fid']:.1f} at {r['steps']:.0f}", f"{r['inception_score']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cluster_train.md").write_text(text + "\n")
    if curves:
        plot(curves, args.fid, f"{args.hosts} hosts at {args.rate}, seed {args.seed}, TCP {congestion}", args.out / "cluster_train.png")


if __name__ == "__main__":
    main()
