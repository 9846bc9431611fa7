"""Time one gossip mix against one all_reduce and against the raw batch_isend_irecv of the same bytes.

Run it for 4 and 8 processes on loopback:

    python benchmarks/wire.py            # launches torchrun for n = 4 and 8 and prints one table

Each cell is the median over repeats of the slowest rank's time; 'ring / raw' is the strategy's overhead over
the bare exchange (packing, weights, the addmv pass, and the gloo chunking). 'whole' is the same mix with one
message per peer instead of ``chunk_bytes`` chunks: on loopback, chunking buys nothing and costs a gloo operation
per chunk; on a rate-limited link it is what keeps both directions busy (``benchmarks/cluster_wire.py``).
Ratios matter, not absolute times, on a shared box.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

SIZES_MB = (0.1, 4.0, 16.0)


def _timed(fn, repeats: int) -> float:
    import torch.distributed as dist
    import torch

    samples = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        elapsed = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        samples.append(float(elapsed))
    return statistics.median(samples)


def worker(repeats: int) -> None:
    import torch
    import torch.distributed as dist

    from lightning_dpgan.gossip import GossipOptions, build_engine
    from lightning_dpgan.topology import ring

    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    engine = build_engine(ring(n), rank)
    whole = build_engine(ring(n), rank, GossipOptions(chunk_bytes=None))  # one message per peer
    rows = []
    for mb in SIZES_MB:
        numel = int(mb * 2**20 / 4)
        # a model-like list of tensors for the engine; one flat buffer for the raw baselines
        params = [torch.randn(numel // 4) for _ in range(3)] + [torch.randn(numel - 3 * (numel // 4))]
        flat = torch.randn(numel)
        recv = torch.empty(2, numel)
        peers = ((rank + 1) % n, (rank - 1) % n)

        def raw() -> None:
            ops = [dist.P2POp(dist.isend, flat, p) for p in peers]
            ops += [dist.P2POp(dist.irecv, recv[k], p) for k, p in enumerate(peers)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()

        contenders = {
            "raw": raw,
            "ring": lambda: engine.mix(params, 1),
            "whole": lambda: whole.mix(params, 1),
            "all_reduce": lambda: dist.all_reduce(flat),
        }
        for fn in contenders.values():  # warm up
            fn()
        t = {name: _timed(fn, repeats) for name, fn in contenders.items()}
        rows.append({"n": n, "mb": mb, **t})
    if rank == 0:
        print(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.repeats)
        return
    rows = []
    for n in args.procs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--master-addr=127.0.0.1",
            f"--master-port={port}", __file__, "--worker", f"--repeats={args.repeats}",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows += json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'procs':>5} {'MB':>6} {'raw p2p ms':>11} {'ring mix ms':>12} {'whole ms':>9} {'all_reduce ms':>14} "
          f"{'ring/raw':>9} {'whole/raw':>10} {'ring/all_reduce':>16}")
    for r in rows:
        print(
            f"{r['n']:>5} {r['mb']:>6.1f} {1e3 * r['raw']:>11.2f} {1e3 * r['ring']:>12.2f} {1e3 * r['whole']:>9.2f}"
            f" {1e3 * r['all_reduce']:>14.2f} {r['ring'] / r['raw']:>9.2f} {r['whole'] / r['raw']:>10.2f}"
            f" {r['ring'] / r['all_reduce']:>16.2f}"
        )


if __name__ == "__main__":
    main()
