"""The gossip engine of another git revision against the working tree's, side by side on an emulated cluster.

    sudo python benchmarks/cluster_engine_ab.py --against HEAD --hosts 8 --rate 200mbit --sizes 4.35 16 \
        --settings one_peer_exponential:fp32 one_peer_exponential:bf16 ring:bf16 --congestion-control cubic

An engine change is judged against the one before it in the same run: on a shared machine two runs minutes apart
differ by more than most changes do. ``--against`` names a revision; its ``lightning_dpgan/gossip.py`` is loaded
next to the working tree's (both use the working tree's topology module), and each repeat times one mix with
each engine, in alternating order, after a barrier. Printed per setting: the median of the slowest host's time
for each engine against the bandwidth floor (out-degree x wire bytes ÷ link rate), how many repeats the working
tree won, and the most main-thread CPU a host spent in a mix (the engine's own passes over the data; gloo's
threads not included). ``--overlap`` times ``start_mix`` then ``finish_mix`` instead of ``mix``; ``--staged`` builds
both engines with ``staged=True``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import EmulatedCluster, add_link_arguments, link_options, parse_rate, preflight  # noqa: E402
from cluster_wire import TOPOLOGIES, WIRES, floor_seconds, slowest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def parse_setting(text: str) -> tuple[str, str]:
    name, _, wire = text.partition(":")
    if name not in TOPOLOGIES or wire not in WIRES:
        raise argparse.ArgumentTypeError(
            f"a setting is TOPOLOGY:WIRE with TOPOLOGY in {', '.join(TOPOLOGIES)} and WIRE in {', '.join(WIRES)}, got {text!r}"
        )
    return name, wire


def load_engine_module(path: str):
    spec = importlib.util.spec_from_file_location("gossip_against", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def worker(against_path: str, sizes: list[float], settings: list[tuple[str, str]], repeats: int, rounds: int,
           overlap: bool, staged: bool) -> None:
    import torch
    import torch.distributed as dist

    from lightning_dpgan import gossip
    from lightning_dpgan.topology import build_topology

    against = load_engine_module(against_path)
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    rows = []
    for mb in sizes:
        numel = int(mb * 1e6 / 4)
        params = [torch.randn(numel // 4) for _ in range(3)] + [torch.randn(numel - 3 * (numel // 4))]
        for name, wire in settings:
            topology = build_topology(name, n)
            engines = {"against": against.GossipEngine(topology, rank, wire_dtype=wire, staged=staged),
                       "tree": gossip.GossipEngine(topology, rank, wire_dtype=wire, staged=staged)}

            def one_mix(engine) -> None:
                if overlap:
                    engine.finish_mix(engine.start_mix(params, rounds))
                else:
                    engine.mix(params, rounds)

            for engine in engines.values():
                one_mix(engine)  # warm up: connections, buffers
            wall: dict[str, list[float]] = {k: [] for k in engines}
            cpu: dict[str, list[float]] = {k: [] for k in engines}
            for r in range(repeats):
                for key in (("against", "tree") if r % 2 == 0 else ("tree", "against")):
                    dist.barrier()
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    one_mix(engines[key])
                    seconds, cpu_seconds = slowest(time.perf_counter() - start, time.thread_time() - start_cpu)
                    wall[key].append(seconds)
                    cpu[key].append(cpu_seconds)
            out_degree = max(len(topology.neighbours(q, p).send_to) for q in range(n) for p in range(topology.period))
            rows.append({"n": n, "mb": mb, "setting": name, "wire": wire, "out_degree": out_degree,
                         "complete": topology.is_complete, "repeats": repeats,
                         "tree_wins": sum(t < a for t, a in zip(wall["tree"], wall["against"])),
                         **{f"{k}_seconds": statistics.median(v) for k, v in wall.items()},
                         **{f"{k}_main_cpu_seconds": statistics.median(v) for k, v in cpu.items()}})
    if rank == 0:
        print("ROWS " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


def table(rows: list[dict], rate: str, against: str, congestion: str, overlap: bool, staged: bool = False, mtu: int = 1500) -> str:
    bps = parse_rate(rate)
    lines = [
        f"**{rate}**, TCP congestion control {congestion}, MTU {mtu}, {'start_mix + finish_mix' if overlap else 'mix'}"
        f"{', staged' if staged else ''}; "
        f"`{against}` against the working tree",
        "",
        f"| hosts | MB | setting | wire | floor ms | {against} ms | tree ms | {against} ÷ floor | tree ÷ floor | "
        f"tree ÷ {against} | tree faster in | {against} main CPU ms | tree main CPU ms |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        floor = floor_seconds(row, bps)
        old, new = row["against_seconds"], row["tree_seconds"]
        ratios = ("", "") if floor is None else (f"{old / floor:.3f}", f"{new / floor:.3f}")
        lines.append(
            f"| {row['n']} | {row['mb']:g} | {row['setting']}{' (= all_reduce)' if row['complete'] else ''} | {row['wire']} | "
            f"{'' if floor is None else f'{1e3 * floor:.1f}'} | {1e3 * old:.1f} | {1e3 * new:.1f} | {ratios[0]} | {ratios[1]} | "
            f"{new / old:.3f} | {row['tree_wins']} of {row['repeats']} | {1e3 * row['against_main_cpu_seconds']:.1f} | "
            f"{1e3 * row['tree_main_cpu_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="HEAD", help="git revision whose engine the working tree's is timed against")
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--rate", default="200mbit", help="per link and direction, e.g. 200mbit, 1gbit, or unlimited")
    parser.add_argument("--sizes", type=float, nargs="+", default=[4.35, 16], help="MB per message")
    parser.add_argument("--settings", type=parse_setting, nargs="+", metavar="TOPOLOGY:WIRE",
                        default=[("one_peer_exponential", "fp32"), ("one_peer_exponential", "bf16")])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="gossip rounds t per mix")
    parser.add_argument("--overlap", action="store_true", help="time start_mix + finish_mix instead of mix")
    parser.add_argument("--staged", action="store_true", help="build both engines with staged=True")
    add_link_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="also write the table and rows here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.sizes, args.settings, args.repeats, args.rounds, args.overlap, args.staged)
        return
    if args.repeats < 1 or args.rounds < 1:
        parser.error(f"--repeats and --rounds must be >= 1, got {args.repeats} and {args.rounds}")
    try:
        parse_rate(args.rate)
    except ValueError as err:
        parser.error(str(err))
    shown = subprocess.run(["git", "-C", str(REPO), "show", f"{args.against}:lightning_dpgan/gossip.py"],
                           capture_output=True, text=True)
    if shown.returncode != 0:
        parser.error(f"--against {args.against!r}: no lightning_dpgan/gossip.py at that revision ({shown.stderr.strip()})")
    preflight(parser, **link_options(args))
    with tempfile.TemporaryDirectory(prefix="engine_ab_") as tmp:
        against_path = Path(tmp) / "gossip_against.py"
        against_path.write_text(shown.stdout)
        with EmulatedCluster(args.hosts, args.rate, **link_options(args)) as cluster:
            congestion = cluster.congestion_control()
            command = [sys.executable, __file__, "--worker", str(against_path), "--sizes", *map(str, args.sizes),
                       "--settings", *(f"{n}:{w}" for n, w in args.settings), f"--repeats={args.repeats}",
                       f"--rounds={args.rounds}"] + (["--overlap"] if args.overlap else []) + (["--staged"] if args.staged else [])
            results = cluster.run(lambda host: command, timeout=4 * 3600)
    line = next(l for l in results[0].stdout.splitlines() if l.startswith("ROWS "))
    rows = json.loads(line[5:])
    text = table(rows, args.rate, args.against, congestion, args.overlap, args.staged, args.mtu)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cluster_engine_ab.md").write_text(text + "\n")
        (args.out / "cluster_engine_ab.json").write_text(json.dumps({"against": args.against, "rate": args.rate,
                                                                       "congestion_control": congestion, "mtu": args.mtu, "staged": args.staged,
                                                                       "rows": rows}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
