"""One slow host among eight: synchronous training against bounded-staleness gossip.

    sudo python benchmarks/cluster_straggler.py --hosts 8 --rate 200mbit --steps 300 --every 100 --fid 300

The emulated cluster of ``cluster_train.py`` (the widened digits DCGAN, one worker per host, the real command line
on every host), with one host's CPU capped by a cgroup (v1 ``cpu.cfs_quota_us``) to ``1 / --slowdown`` of a fair
share of this machine (its cores divided by the hosts). Side by side, seed by seed: the gossip setting with no slow
host, then with the slow host DDP, synchronous gossip (``staleness=0``) and ``staleness=s`` for each ``--staleness``.
Bounded staleness needs a static graph, so every gossip setting is a ring (``t = 1``, bf16 wire).

Per setting: iterations per second (from the first evaluation to the last), training seconds to each FID
threshold and that time divided by the no-slow-host run's, and FID at the last iteration (equal iterations).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import EmulatedCluster, add_link_arguments, link_options, preflight  # noqa: E402
from cluster_train import first_reaching, fit, read_rows, seconds_per_iteration, slug  # noqa: E402

GOSSIP = ["topology=ring", "gossip_rounds=1", "wire_dtype=bf16"]
CGROUP = Path("/sys/fs/cgroup/cpu")


class SlowHost:
    """A cgroup (v1 cpu controller) whose quota is ``cores`` CPUs; ``add(pid)`` moves a process into it."""

    def __init__(self, name: str, cores: float) -> None:
        self.path = CGROUP / name
        self.cores = cores

    def __enter__(self) -> SlowHost:
        if not CGROUP.is_dir():
            raise SystemExit(f"no cgroup v1 cpu controller at {CGROUP}: this benchmark caps a host's CPU with it")
        self.path.mkdir(exist_ok=True)
        period = int((self.path / "cpu.cfs_period_us").read_text())
        (self.path / "cpu.cfs_quota_us").write_text(str(max(1000, round(period * self.cores))))
        return self

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def __exit__(self, *exc: object) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():  # leftovers go back to the root group
            try:
                (CGROUP / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # it has exited meanwhile
        self.path.rmdir()


def settings(staleness: list[int]) -> dict[str, tuple[list[str], bool]]:
    """name -> (overrides, with the slow host)."""
    table = {"ring bf16, no slow host": (GOSSIP + ["staleness=0"], False), "DDP": (["strategy=ddp"], True)}
    for s in [0, *staleness]:
        table[f"ring bf16, staleness {s}"] = (GOSSIP + [f"staleness={s}"], True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--rate", default="200mbit")
    parser.add_argument("--slow-host", type=int, default=3)
    parser.add_argument("--slowdown", type=float, default=4.0, help="the slow host's CPU: a fair share divided by this")
    parser.add_argument("--staleness", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--fid", type=float, nargs="+", default=[300.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--settings", nargs="+", default=None, help="a subset, by slug")
    parser.add_argument("--out", type=Path, default=Path("runs/cluster_straggler"))
    add_link_arguments(parser)
    args = parser.parse_args()
    preflight(parser, **link_options(args))
    if not 0 <= args.slow_host < args.hosts:
        parser.error(f"--slow-host must be a host in [0, {args.hosts - 1}], got {args.slow_host}")
    if args.slowdown < 1:
        parser.error(f"--slowdown must be at least 1, got {args.slowdown}")
    cores = (os.cpu_count() or 1) / args.hosts / args.slowdown
    table = {name: v for name, v in settings(args.staleness).items() if args.settings is None or slug(name) in args.settings}
    results: dict[str, dict[int, dict[str, object]]] = {}
    with SlowHost(f"dpgan_slow{os.getpid()}", cores) as slow:
        def started(host: int, process: subprocess.Popen) -> None:
            if host == args.slow_host and slowed:
                slow.add(process.pid)

        for seed in args.seeds:
            for name, (overrides, slowed) in table.items():
                run_dir = args.out / f"seed{seed}" / slug(name)
                with EmulatedCluster(args.hosts, args.rate, port=29602, **link_options(args)) as cluster:
                    congestion = cluster.congestion_control()
                    rows = fit(cluster, overrides, run_dir, args.steps, args.every, seed, started=started)
                results.setdefault(name, {})[seed] = {
                    "it_per_s": 1 / seconds_per_iteration(rows),
                    "to_fid": {fid: (r["train_s"] if (r := first_reaching(rows, fid)) else None) for fid in args.fid},
                    "fid": rows[-1]["fid"], "steps": rows[-1]["step"], "congestion_control": congestion,
                }
                print(f"seed {seed}, {name}: {json.dumps(results[name][seed])}", file=sys.stderr, flush=True)
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "cluster_straggler.json").write_text(json.dumps(results, indent=1))
    reference = results.get("ring bf16, no slow host", {})
    congestion = "/".join(sorted({r["congestion_control"] for per_seed in results.values() for r in per_seed.values()}))
    head = " | ".join(f"s to FID ≤ {fid:g} | ÷ no slow host" for fid in args.fid)
    lines = [
        f"**{args.hosts} hosts at {args.rate}**, host {args.slow_host} capped to {cores:.3f} CPUs (a fair share ÷ "
        f"{args.slowdown:g}), {os.cpu_count()} cores, TCP {congestion}; mean over seeds {args.seeds}",
        "",
        f"| setting | it/s | {head} | FID at the last iteration |",
        "|---|" + "---:|" * (2 + 2 * len(args.fid)),
    ]
    for name, per_seed in results.items():
        runs = list(per_seed.values())
        cells = [name, f"{sum(r['it_per_s'] for r in runs) / len(runs):.2f}"]
        for fid in args.fid:
            times = [r["to_fid"][fid] for r in runs]
            base = [reference[s]["to_fid"][fid] for s in per_seed if s in reference]
            if all(t is not None for t in times):
                mean = sum(times) / len(times)
                cells.append(f"{mean:.0f}")
                cells.append(f"{mean / (sum(base) / len(base)):.2f}×" if base and all(b is not None for b in base) else "")
            else:
                cells += [f"not reached in {sum(t is None for t in times)} of {len(times)}", ""]
        cells.append(f"{sum(r['fid'] for r in runs) / len(runs):.1f} at {runs[0]['steps']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    (args.out / "cluster_straggler.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
