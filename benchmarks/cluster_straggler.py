"""One slow host among eight: synchronous training against bounded-staleness gossip, with and without catching up.

    sudo python benchmarks/cluster_straggler.py --hosts 8 --rate 200mbit --steps 800 --every 100 --fid 300 200 \
        --staleness 4 --catch-up 2 4 --probe-steps 60 --seeds 0 1 2

The emulated cluster of ``cluster_train.py`` (the widened digits DCGAN, one worker per host, the real command line
on every host), with one host's CPU capped by a cgroup (v1 ``cpu.cfs_quota_us``) to ``1 / --slowdown`` of a fair
share of this machine (its cores divided by the hosts). Side by side, seed by seed: the gossip setting with no slow
host, then with the slow host DDP, synchronous gossip (``staleness=0``), ``staleness=s`` for each ``--staleness``
and ``staleness=s catch_up=true`` for each ``--catch-up``. Bounded staleness needs a static graph, so every gossip
setting is a ring (``t = 1``, bf16 wire).

With ``--probe-steps N`` the settings with the slow host and without catch_up run N iterations only, for their
speed: synchronous gossip computes the same numbers with or without a slow host, so its time to an FID is the
no-slow-host run's iterations to it times its own seconds per iteration. The FID of DDP and of bounded staleness
without catch_up is then not measured.

Per setting: iterations per second (from the first evaluation to the last), training seconds to each FID
threshold and that time divided by the no-slow-host run's, FID at the last iteration (equal iterations), and with
catch_up the steps each host only mixed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import CpuQuota, EmulatedCluster, add_link_arguments, link_options, preflight  # noqa: E402
from cluster_train import first_reaching, fit, read_rows, seconds_per_iteration, slug  # noqa: E402

GOSSIP = ["topology=ring", "gossip_rounds=1", "wire_dtype=bf16"]
NO_SLOW_HOST = "ring bf16, no slow host"


def settings(staleness: list[int], catch_up: list[int]) -> dict[str, tuple[list[str], bool]]:
    """name -> (overrides, with the slow host)."""
    table = {NO_SLOW_HOST: (GOSSIP + ["staleness=0"], False), "DDP": (["strategy=ddp"], True)}
    for s in [0, *staleness]:
        table[f"ring bf16, staleness {s}"] = (GOSSIP + [f"staleness={s}"], True)
    for s in catch_up:
        table[f"ring bf16, staleness {s}, catch_up"] = (GOSSIP + [f"staleness={s}", "catch_up=true"], True)
    return table


def only_mixed(run_dir: Path) -> list[int] | None:
    """The steps each host only mixed, from the line the strategy prints at the end of a catch_up run."""
    log = run_dir / "stdout.log"
    match = re.search(r"catch_up: steps each rank only mixed, of \d+: ([\d, ]+)", log.read_text()) if log.is_file() else None
    return [int(n) for n in match.group(1).split(",")] if match else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--rate", default="200mbit")
    parser.add_argument("--slow-host", type=int, default=3)
    parser.add_argument("--slowdown", type=float, default=4.0, help="the slow host's CPU: a fair share divided by this")
    parser.add_argument("--staleness", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--catch-up", type=int, nargs="*", default=[2, 4], help="staleness values to run with catch_up")
    parser.add_argument("--probe-steps", type=int, default=None, help="the settings with the slow host and without catch_up: this many iterations, for their speed")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--fid", type=float, nargs="+", default=[300.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--settings", nargs="+", default=None, help="a subset, by slug")
    parser.add_argument("--out", type=Path, default=Path("runs/cluster_straggler"))
    parser.add_argument("--tables-from", type=Path, default=None, help="rebuild the table from a saved cluster_straggler.json (give the run's --fid, --hosts, --rate)")
    add_link_arguments(parser)
    args = parser.parse_args()
    cores = (os.cpu_count() or 1) / args.hosts / args.slowdown
    if args.tables_from is not None:
        saved = json.loads(args.tables_from.read_text())
        results = {name: {int(seed): run for seed, run in per_seed.items()} for name, per_seed in saved.items()}
        print(table(results, args, cores))
        return
    preflight(parser, **link_options(args))
    if not 0 <= args.slow_host < args.hosts:
        parser.error(f"--slow-host must be a host in [0, {args.hosts - 1}], got {args.slow_host}")
    if args.slowdown < 1:
        parser.error(f"--slowdown must be at least 1, got {args.slowdown}")
    chosen = {name: v for name, v in settings(args.staleness, args.catch_up).items() if args.settings is None or slug(name) in args.settings}
    results: dict[str, dict[int, dict[str, object]]] = {}
    with CpuQuota(f"dpgan_slow{os.getpid()}", cores) as slow:
        def started(host: int, process: subprocess.Popen) -> None:
            if host == args.slow_host and slowed:
                slow.add(process.pid)

        for seed in args.seeds:
            for name, (overrides, slowed) in chosen.items():
                run_dir = args.out / f"seed{seed}" / slug(name)
                probe = args.probe_steps is not None and slowed and "catch_up" not in name
                steps, every = (args.probe_steps, args.probe_steps // 2) if probe else (args.steps, args.every)
                with EmulatedCluster(args.hosts, args.rate, port=29602, **link_options(args)) as cluster:
                    congestion = cluster.congestion_control()
                    rows = fit(cluster, overrides, run_dir, steps, every, seed, started=started)
                results.setdefault(name, {})[seed] = {
                    "it_per_s": 1 / seconds_per_iteration(rows),
                    "to_fid": {str(fid): (r["train_s"] if (r := first_reaching(rows, fid)) else None) for fid in args.fid},
                    "steps_to_fid": {str(fid): (r["step"] if (r := first_reaching(rows, fid)) else None) for fid in args.fid},
                    "fid": rows[-1]["fid"], "steps": rows[-1]["step"], "congestion_control": congestion,
                    "only_mixed": only_mixed(run_dir), "probe": probe,
                }
                print(f"seed {seed}, {name}: {json.dumps(results[name][seed])}", file=sys.stderr, flush=True)
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "cluster_straggler.json").write_text(json.dumps(results, indent=1))
    text = table(results, args, cores)
    print(text)
    (args.out / "cluster_straggler.md").write_text(text + "\n")


def as_measured(name: str, run: dict, reference: dict | None, fids: list[float]) -> dict:
    """A run's time to each FID and its last FID. A speed probe of synchronous gossip (``staleness 0``) computes what
    the no-slow-host run computes, only slower: its iterations to an FID are that run's. Other probes have none."""
    if not run["probe"]:
        return run
    if name == "ring bf16, staleness 0" and reference is not None:
        to_fid = {str(f): (n / run["it_per_s"] if (n := reference["steps_to_fid"][str(f)]) else None) for f in fids}
        return {**run, "to_fid": to_fid, "fid": reference["fid"], "steps": reference["steps"], "derived": True}
    return {**run, "to_fid": {str(f): None for f in fids}, "fid": None}


def table(results: dict[str, dict[int, dict]], args: argparse.Namespace, cores: float) -> str:
    """The markdown table: each setting's mean over seeds, time ratios against the no-slow-host run's mean."""
    reference = results.get(NO_SLOW_HOST, {})
    measured = {name: {seed: as_measured(name, run, reference.get(seed), args.fid) for seed, run in per_seed.items()}
                for name, per_seed in results.items()}
    seeds = sorted({seed for per_seed in results.values() for seed in per_seed})
    congestion = "/".join(sorted({r["congestion_control"] for per_seed in results.values() for r in per_seed.values()}))
    head = " | ".join(f"s to FID ≤ {fid:g} | ÷ no slow host" for fid in args.fid)
    lines = [
        f"**{args.hosts} hosts at {args.rate}**, host {args.slow_host} capped to {cores:.3f} CPUs (a fair share ÷ "
        f"{args.slowdown:g}), {os.cpu_count()} cores, TCP {congestion}; mean over seeds {seeds}",
        "",
        f"| setting | it/s | {head} | FID at the last iteration | steps the slow host only mixed |",
        "|---|" + "---:|" * (3 + 2 * len(args.fid)),
    ]
    for name, per_seed in measured.items():
        runs = list(per_seed.values())
        cells = [name, f"{sum(r['it_per_s'] for r in runs) / len(runs):.2f}"]
        for fid in args.fid:
            times = [r["to_fid"][str(fid)] for r in runs]
            base = [reference[s]["to_fid"][str(fid)] for s in per_seed if s in reference]
            if all(t is not None for t in times):
                mean = sum(times) / len(times)
                derived = " (iterations of the no-slow-host run)" if runs[0].get("derived") else ""
                cells.append(f"{mean:.0f}{derived}")
                cells.append(f"{mean / (sum(base) / len(base)):.2f}×" if base and all(b is not None for b in base) else "")
            elif all(r["probe"] for r in runs):
                cells += ["not measured (a speed probe)", ""]
            else:
                cells += [f"not reached in {sum(t is None for t in times)} of {len(times)}", ""]
        fids = [r["fid"] for r in runs if r["fid"] is not None]
        cells.append(f"{sum(fids) / len(fids):.1f} at {runs[0]['steps']:.0f}" if fids else "")
        mixed = [r["only_mixed"][args.slow_host] for r in runs if r["only_mixed"]]
        cells.append(f"{sum(mixed) / len(mixed):.0f} of {runs[0]['steps']:.0f}" if mixed else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
