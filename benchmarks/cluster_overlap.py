"""Does a mix in flight progress while the host computes? ``start_mix`` of the gossip engine against compute.

    sudo python benchmarks/cluster_overlap.py --hosts 2 8 --rate 200mbit --mb 4.35

Per host count, every host (one worker per network namespace, ``benchmarks/cluster.py``) times, as the slowest
host's median over ``--repeats``: one ring mix alone (``mix``); a fixed amount of compute alone (``compute``:
matrix products sized to take about as long as the mix); and ``start_mix``, the same compute, ``finish_mix``
(``both``). If the wire progresses in the background, ``both`` ≈ max(mix, compute); if it does not, ``both`` ≈
mix + compute. ``hidden`` is the share of the shorter of the two that overlapping saved:
``(mix + compute - both) / min(mix, compute)``. With 2 hosts each worker has a core of this 2-core machine to
itself; with 8 hosts the cores are shared, as in ``cluster_train.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import EmulatedCluster, preflight  # noqa: E402


def worker(mb: float, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    from lightning_dpgan.gossip import build_engine
    from lightning_dpgan.topology import build_topology

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = build_engine(build_topology("ring", world), rank)
    tensors = [torch.randn(int(mb * 1e6 / 4))]
    a = torch.randn(256, 256)

    def compute(n: int) -> None:
        for _ in range(n):
            a.matmul(a)

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0])

    def timed(fn) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            fn()
            samples.append(slowest(time.perf_counter() - start))
        return statistics.median(samples)

    mix = timed(lambda: engine.mix(tensors))
    start = time.perf_counter()
    compute(20)
    per_product = slowest((time.perf_counter() - start) / 20)
    products = max(1, round(mix / per_product))
    alone = timed(lambda: compute(products))

    def both() -> None:
        pending = engine.start_mix(tensors)
        compute(products)
        engine.finish_mix(pending)

    overlapped = timed(both)
    if rank == 0:
        print(json.dumps({"mix": mix, "compute": alone, "both": overlapped}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rate", default="200mbit")
    parser.add_argument("--mb", type=float, default=4.35, help="message size (4.35: the DCGAN of cluster_train.py)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.mb, args.repeats)
        return
    preflight(parser)
    lines = [
        f"**ring mix of {args.mb:g} MB at {args.rate}, overlapped with compute** (slowest host, median of {args.repeats})",
        "",
        "| hosts | mix ms | compute ms | start_mix + compute + finish_mix ms | max(mix, compute) | mix + compute | hidden |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for hosts in args.hosts:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--mb", str(args.mb), "--repeats", str(args.repeats)]
        with EmulatedCluster(hosts, args.rate, port=29640) as cluster:
            r = json.loads(cluster.run(lambda host: command, timeout=1800)[0].stdout.strip().splitlines()[-1])
        hidden = (r["mix"] + r["compute"] - r["both"]) / min(r["mix"], r["compute"])
        lines.append(
            f"| {hosts} | {1e3 * r['mix']:.0f} | {1e3 * r['compute']:.0f} | {1e3 * r['both']:.0f} | "
            f"{1e3 * max(r['mix'], r['compute']):.0f} | {1e3 * (r['mix'] + r['compute']):.0f} | {100 * hidden:.0f} % |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
