"""The CPU passes one gossip round makes around the wire, per way of laying them out; one process, one thread.

    python benchmarks/combine_passes.py --mb 4.35 16 --tensors 4 40 400 2000 --neighbours 1 2 5

Nothing goes on the wire: the received rows are random. ``packed`` is what the engine does with several
in-neighbours otherwise (and did for every round before 2026-11-27): pack the tensors into the flat buffer, cast it to the
wire dtype, upcast the received rows, one ``addmv`` for ``w_ii x + sum_j w_ij x_j``, unpack. ``in place`` is what
it does for a one-round mix with one in-neighbour: cast straight from the tensors (fp32: pack, the flat buffer
being the send buffer), upcast, one ``_foreach_lerp_`` into the tensors. ``per neighbour`` is what it does for a
one-round mix with several in-neighbours, a bf16 wire and tensors of ``SCALE_ADD_MIN_MEAN_NUMEL`` elements or more
on average: cast from the tensors, a ``_foreach_mul_`` by ``w_ii``, then one ``_foreach_add_`` per neighbour
straight from its received row (bf16 rows upcast as they are read; no flat buffer, no upcast pass). Its fp32
rows are for comparison (the engine packs there). On CPU a ``_foreach`` op loops over its tensors one at a time, so
many small tensors cost calls.
Each cell is the median of ``--repeats`` rounds, in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def layouts(numel: int, tensors: int, neighbours: int, wire: str):
    import torch

    sizes = [numel // tensors] * (tensors - 1) + [numel - (tensors - 1) * (numel // tensors)]
    params = [torch.randn(s) for s in sizes]
    flat = torch.empty(numel)
    views = list(flat.split(sizes))
    wire_dtype = torch.bfloat16 if wire == "bf16" else torch.float32
    send = torch.empty(numel, dtype=wire_dtype) if wire == "bf16" else flat
    send_views = list(send.split(sizes))
    received = torch.randn(neighbours, numel).to(wire_dtype)
    upcast = torch.empty(neighbours, numel) if wire == "bf16" else received
    rows = [list(row.split(sizes)) for row in upcast]
    weight = 1.0 / (neighbours + 1)
    weights = torch.full((neighbours,), weight)

    def send_copy() -> None:
        if wire == "bf16":
            torch._foreach_copy_(send_views, params)  # straight from the tensors
        else:
            torch._foreach_copy_(views, params)  # the flat buffer is the send buffer

    def to_upcast() -> None:
        if upcast is not received:
            upcast.copy_(received)

    def packed() -> None:
        torch._foreach_copy_(views, params)
        if send is not flat:
            send.copy_(flat)
        to_upcast()
        flat.addmv_(upcast.t(), weights, beta=weight)
        torch._foreach_copy_(params, views)

    def in_place() -> None:
        send_copy()
        to_upcast()
        torch._foreach_lerp_(params, rows[0], weight)

    received_rows = [list(row.split(sizes)) for row in received]

    def per_neighbour() -> None:
        send_copy()
        torch._foreach_mul_(params, weight)
        for row in received_rows:
            torch._foreach_add_(params, row, alpha=weight)

    candidates = {"packed": packed, "per neighbour": per_neighbour}
    if neighbours == 1:
        candidates = {"packed": packed, "in place": in_place}
    return candidates


def timed(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, nargs="+", default=[4.35, 16], help="fp32 megabytes per bucket")
    parser.add_argument("--tensors", type=int, nargs="+", default=[4, 40, 400, 2000], help="tensors the bucket holds")
    parser.add_argument("--neighbours", type=int, nargs="+", default=[1, 2, 5], help="in-neighbours per round")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    for name, values in (("--mb", args.mb), ("--tensors", args.tensors), ("--neighbours", args.neighbours)):
        if min(values) <= 0:
            parser.error(f"{name} takes positive values, got {min(values)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    import torch

    torch.set_num_threads(1)
    print("| MB | tensors | in-neighbours | wire | packed ms | in place ms | per neighbour ms |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for mb in args.mb:
        numel = int(mb * 1e6 / 4)
        for tensors in args.tensors:
            for neighbours in args.neighbours:
                for wire in ("fp32", "bf16"):
                    ms = {k: 1e3 * timed(fn, args.repeats) for k, fn in layouts(numel, min(tensors, numel), neighbours, wire).items()}
                    cells = [f"{ms[k]:.2f}" if k in ms else "" for k in ("packed", "in place", "per neighbour")]
                    print(f"| {mb:g} | {tensors} | {neighbours} | {wire} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
