"""The wire on an emulated cluster: one gossip mix per topology and wire dtype against one all_reduce, next to the
bandwidth floor and the α–β model.

    sudo python benchmarks/cluster_wire.py --hosts 4 8 --rate 200mbit unlimited --sizes 0.1 4 16 64

Every host is a network namespace with a ``tc tbf`` limited link (``benchmarks/cluster.py``), one worker per
host. Each cell is the median over ``--repeats`` of the slowest host's time for one mix (``t = 1``). The floor is
the bytes a host must push through its link divided by the rate: ``2(n-1)/n · S`` for ring all_reduce,
``out-degree · S_wire`` for a gossip round (a topology whose ``W`` is ``J/n``, such as the exponential graph on
4 hosts, runs as one all_reduce and gets its floor). The α–β model adds a per-message latency ``α`` for each
sequential hop, ``2(n-1)`` hops for ring all_reduce and one for a gossip round. This kernel has no netem, so the
links add no delay; the table prints the model's prediction for an ``--alpha-ms`` link (default 1 ms) instead.
``cpu ms`` is the most CPU time (user + system of the worker process) one host spent in the mix: on real hosts it
is the part that competes with training.

``--raw-tcp`` adds, for each gossip setting, the same exchange (the bytes of ``S_wire`` to every out-neighbour of
the round, received from every in-neighbour) over plain TCP sockets, one connection per pair and a thread per
message, without gloo or the engine: what the emulated link carries for that traffic pattern. ``÷ raw TCP``
is then the engine's own overhead, ``raw TCP / floor`` the link's (framing, ACKs, TCP sharing a shaped link).

    sudo python benchmarks/cluster_wire.py --hosts 8 --rate 200mbit --sizes 4.35 16 --raw-tcp

``--topologies`` times a subset of the gossip topologies. ``--timeline`` adds, for each gossip row, where the
time of a mix goes (medians over the repeats, one clock for all hosts: the namespaces share it): how far apart
the hosts started, the most time a host took from its start to its last send posted, and the most it took after
its last receive to finish (packing, casting and combining outside the transfer).
``--congestion-control`` picks the hosts' TCP congestion control and ``--mtu`` the links' MTU (the tables name
both).

``--chunk-kib`` sweeps the gloo chunk size (``GossipOptions(chunk_bytes=)``) for the gossip settings:

    sudo python benchmarks/cluster_wire.py --hosts 8 --rate 200mbit unlimited --sizes 4.35 16 --chunk-kib 64 128 256 512
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import (  # noqa: E402
    EmulatedCluster, add_link_arguments, link_options, new_figure, parse_rate, preflight, save_figure,
)

TOPOLOGIES = ("ring", "torus", "exponential", "one_peer_exponential")
WIRES = ("fp32", "bf16")


def slowest(*seconds: float) -> list[float]:
    import torch
    import torch.distributed as dist

    elapsed = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.tolist()


def timed(fn, repeats: int, clock: Clock | None = None) -> dict[str, float]:
    """Medians over ``repeats`` of the slowest host's wall time and of the most CPU time a host spent (and, with a
    ``clock``, of where the time of the slowest went)."""
    import torch.distributed as dist

    fn()  # warm up: connections, buffers
    wall, cpu, phases = [], [], []
    for _ in range(repeats):
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        if clock is not None:
            clock.reset()
        fn()
        end = time.perf_counter()
        w, c = slowest(end - start, time.process_time() - start_cpu)
        wall.append(w)
        cpu.append(c)
        if clock is not None:
            phases.append(clock.phases(start, end))
    out = {"seconds": statistics.median(wall), "cpu_seconds": statistics.median(cpu)}
    if phases:
        out.update({key: statistics.median(p[key] for p in phases) for key in phases[0]})
    return out


class Clock:
    """Timestamps of one mix on this host, from its transport's calls: the first exchange posted, the last posted
    (the last send out), the last wait returned (the last message in)."""

    def __init__(self, transport) -> None:
        self.stamps: dict[str, float] = {}
        exchange, wait = transport.exchange, transport.wait

        def timed_exchange(*args, **kwargs):
            posted = exchange(*args, **kwargs)
            self.stamps["posted"] = time.perf_counter()
            return posted

        def timed_wait(*args, **kwargs):
            wait(*args, **kwargs)
            self.stamps["received"] = time.perf_counter()

        transport.exchange, transport.wait = timed_exchange, timed_wait

    def reset(self) -> None:
        self.stamps.clear()

    def phases(self, start: float, end: float) -> dict[str, float]:
        """Across hosts: how far apart they started, the most any took to its last send, and after its last wait."""
        import torch
        import torch.distributed as dist

        mine = torch.tensor([start, self.stamps["posted"], self.stamps["received"], end], dtype=torch.float64)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        hosts = torch.stack(every)
        return {
            "start_skew_s": float(hosts[:, 0].max() - hosts[:, 0].min()),
            "to_last_send_s": float((hosts[:, 1] - hosts[:, 0]).max()),
            "after_last_receive_s": float((hosts[:, 3] - hosts[:, 2]).max()),
        }


class RawExchange:
    """One gossip round's traffic over plain TCP: a connection to each out-neighbour, one from each in-neighbour.

    Connections are made once (``port + rank`` listens). ``steps`` lists ``(send_to, receive_from)`` groups run
    one after another (one group: every message at once); in a group each message has its own thread
    (``sendall`` and ``recv_into`` release the GIL) and the group ends when all are done.
    """

    def __init__(self, rank: int, addresses: list[str], steps: list[tuple[tuple[int, ...], tuple[int, ...]]], port: int) -> None:
        import torch.distributed as dist

        send_to = sorted({p for sends, _ in steps for p in sends})
        receive_from = sorted({p for _, receives in steps for p in receives})
        listener = socket.create_server((addresses[rank], port + rank), backlog=len(receive_from) + 1)
        dist.barrier()  # every listener is up before anyone connects
        self.outgoing = {}
        for peer in send_to:
            conn = socket.create_connection((addresses[peer], port + peer))
            conn.sendall(rank.to_bytes(4, "little"))
            self.outgoing[peer] = conn
        self.incoming = {}
        while len(self.incoming) < len(receive_from):
            conn, _ = listener.accept()
            self.incoming[int.from_bytes(_receive(conn, 4), "little")] = conn
        listener.close()
        self.steps = steps
        dist.barrier()

    def exchange(self, payload: bytearray, sinks: dict[int, bytearray]) -> None:
        for sends, receives in self.steps:
            threads = [threading.Thread(target=self.outgoing[p].sendall, args=(payload,)) for p in sends]
            threads += [threading.Thread(target=_receive, args=(self.incoming[p], len(payload), sinks[p])) for p in receives]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

    def close(self) -> None:
        for conn in [*self.outgoing.values(), *self.incoming.values()]:
            conn.close()


def _receive(conn: socket.socket, nbytes: int, into: bytearray | None = None) -> bytearray:
    buffer = into if into is not None else bytearray(nbytes)
    view, got = memoryview(buffer), 0
    while got < nbytes:
        n = conn.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed the connection mid-exchange")
        got += n
    return buffer


def worker(sizes: list[float], repeats: int, chunk_kib: list[int], addresses: list[str] | None, topologies: list[str],
           timeline: bool = False) -> None:
    import torch
    import torch.distributed as dist

    from lightning_dpgan.gossip import GossipOptions, build_engine
    from lightning_dpgan.topology import build_topology

    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    rows = []
    for mb in sizes:
        numel = int(mb * 1e6 / 4)
        flat = torch.randn(numel)
        rows.append({"n": n, "mb": mb, "setting": "all_reduce", "wire": "fp32", "out_degree": None, "chunk_kib": None,
                     **timed(lambda: dist.all_reduce(flat), repeats)})
        params = [torch.randn(numel // 4) for _ in range(3)] + [torch.randn(numel - 3 * (numel // 4))]
        for name in topologies:
            topology = build_topology(name, n)
            out_degree = max(len(topology.neighbours(r, p).send_to) for r in range(n) for p in range(topology.period))
            for wire in WIRES:
                for kib in chunk_kib:
                    engine = build_engine(topology, rank, GossipOptions(wire_dtype=wire, chunk_bytes=kib * 1024))
                    clock = Clock(engine.transport) if timeline and not topology.is_complete else None
                    rows.append({"n": n, "mb": mb, "setting": name, "wire": wire, "out_degree": out_degree,
                                 "chunk_kib": kib, "complete": topology.is_complete,
                                 **timed(lambda: engine.mix(params, 1), repeats, clock)})
                if addresses and not topology.is_complete:
                    nb = topology.neighbours(rank, 0)
                    payload = bytearray(int(mb * 1e6 * (0.5 if wire == "bf16" else 1.0)))
                    sinks = {p: bytearray(len(payload)) for p in nb.receive_from}
                    raw = RawExchange(rank, addresses, [(nb.send_to, nb.receive_from)], port=31000)
                    rows.append({"n": n, "mb": mb, "setting": name, "wire": wire, "out_degree": out_degree, "chunk_kib": None,
                                 "raw_tcp": "raw TCP", **timed(lambda: raw.exchange(payload, sinks), repeats)})
                    raw.close()
    if rank == 0:
        print("ROWS " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


def floor_seconds(row: dict, bits_per_second: int | None) -> float | None:
    if bits_per_second is None:
        return None
    size = row["mb"] * 1e6 * (0.5 if row["wire"] == "bf16" else 1.0)
    if row["setting"] == "all_reduce" or row.get("complete"):  # W = J/n (exponential at n = 4) is one all_reduce
        pushed = 2 * (row["n"] - 1) / row["n"] * size
    else:
        pushed = row["out_degree"] * size
    return pushed * 8 / bits_per_second


def alpha_beta(row: dict, bits_per_second: int | None, alpha: float) -> float | None:
    """α·hops + bytes/β: the time on a link with per-message latency α (the floor is the β part)."""
    floor = floor_seconds(row, bits_per_second)
    if floor is None:
        return None
    hops = 2 * (row["n"] - 1) if row["setting"] == "all_reduce" or row.get("complete") else 1
    return alpha * hops + floor


def raw_tcp_row(rows: list[dict], row: dict) -> dict | None:
    """The raw-TCP baseline for an engine row: the same hosts, size, topology and wire, if measured."""
    keys = ("n", "mb", "setting", "wire")
    return next((r for r in rows if r.get("raw_tcp") and all(r[k] == row[k] for k in keys)), None)


def table(rows: list[dict], rate: str, alpha: float) -> str:
    bps = parse_rate(rate)
    with_raw = any(r.get("raw_tcp") for r in rows)
    with_timeline = any("start_skew_s" in r for r in rows)
    congestion = sorted({r["congestion_control"] for r in rows if r.get("congestion_control")})
    mtus = sorted({r.get("mtu", 1500) for r in rows})  # rows saved before --mtu ran at the default
    lines = [
        f"**{rate}**, α–β model with α = {alpha * 1e3:g} ms per hop"
        + (f", TCP congestion control {'/'.join(congestion)}" if congestion else "")
        + f", MTU {'/'.join(map(str, mtus))}",
        "",
        "| hosts | MB | setting | wire | chunk KiB | ms | floor ms | ms / floor | ÷ all_reduce | α–β ms | cpu ms |"
        + (" ÷ raw TCP |" if with_raw else "")
        + (" start skew ms | to last send ms | after last receive ms |" if with_timeline else ""),
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if with_raw else "")
        + ("---:|---:|---:|" if with_timeline else ""),
    ]
    for row in rows:
        base = next(r for r in rows if r["n"] == row["n"] and r["mb"] == row["mb"] and r["setting"] == "all_reduce")
        floor = floor_seconds(row, bps)
        model = alpha_beta(row, bps, alpha)
        floor_ms = "" if floor is None else f"{1e3 * floor:.1f}"
        ratio = "" if floor is None else f"{row['seconds'] / floor:.2f}"
        model_ms = "" if model is None else f"{1e3 * model:.1f}"
        cpu_ms = f"{1e3 * row['cpu_seconds']:.1f}" if "cpu_seconds" in row else ""
        raw = None if row.get("raw_tcp") else raw_tcp_row(rows, row)
        suffix = " (= all_reduce)" if row.get("complete") else f", {row['raw_tcp']}" if row.get("raw_tcp") else ""
        lines.append(
            f"| {row['n']} | {row['mb']:g} | {row['setting']}{suffix} | {row['wire']} | "
            f"{row.get('chunk_kib') or ''} | {1e3 * row['seconds']:.1f} | {floor_ms} | {ratio} | {row['seconds'] / base['seconds']:.2f} | "
            f"{model_ms} | {cpu_ms} |" + ((f" {row['seconds'] / raw['seconds']:.2f} |" if raw else " |") if with_raw else "")
            + (timeline_cells(row) if with_timeline else "")
        )
    return "\n".join(lines)


def timeline_cells(row: dict) -> str:
    keys = ("start_skew_s", "to_last_send_s", "after_last_receive_s")
    return "".join(f" {1e3 * row[k]:.1f} |" if k in row else " |" for k in keys)


def plot(rows_by_rate: dict[str, list[dict]], path: Path) -> None:
    """Time per mix against message size, one panel per host count at the limited rate, floors dashed."""
    import matplotlib

    rate, rows = next((r, rs) for r, rs in rows_by_rate.items() if parse_rate(r) is not None)
    first_chunk = next((r.get("chunk_kib") for r in rows if r.get("chunk_kib")), None)
    # one line per setting: the first chunk size, no raw-TCP baselines
    rows = [r for r in rows if r.get("chunk_kib") in (None, first_chunk) and not r.get("raw_tcp")]
    hosts = sorted({r["n"] for r in rows})
    fig, axes = new_figure(nrows=1, ncols=len(hosts), figsize=(6 * len(hosts), 4.5), squeeze=False)
    for ax, n in zip(axes[0], hosts):
        for (setting, wire), color in zip(
            dict.fromkeys((r["setting"], r["wire"]) for r in rows if r["n"] == n), matplotlib.colormaps["tab10"].colors
        ):
            mine = [r for r in rows if r["n"] == n and r["setting"] == setting and r["wire"] == wire]
            sizes = [r["mb"] for r in mine]
            label = f"{setting} {wire}" if setting != "all_reduce" else "all_reduce"
            ax.plot(sizes, [1e3 * r["seconds"] for r in mine], "o-", color=color, label=label)
            ax.plot(sizes, [1e3 * floor_seconds(r, parse_rate(rate)) for r in mine], "--", color=color, alpha=0.5)
        ax.set(xscale="log", yscale="log", xlabel="message MB", ylabel="ms per mix (slowest host)",
               title=f"{n} hosts at {rate} (dashed: bandwidth floor)")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--rate", nargs="+", default=["200mbit", "unlimited"])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 4, 16, 64], help="MB per message")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-kib", type=int, nargs="+", default=[256], help="gloo chunk sizes to time for gossip")
    parser.add_argument("--raw-tcp", action="store_true", help="also time each gossip exchange over plain TCP sockets")
    parser.add_argument("--topologies", nargs="+", choices=TOPOLOGIES, default=list(TOPOLOGIES),
                        help="the gossip topologies to time (default: all)")
    parser.add_argument("--timeline", action="store_true", help="also time where a gossip mix spends its time")
    parser.add_argument("--addresses", nargs="+", default=None, help=argparse.SUPPRESS)
    add_link_arguments(parser)
    parser.add_argument("--alpha-ms", type=float, default=1.0, help="per-hop latency for the α–β prediction")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables and rows here")
    parser.add_argument("--tables-from", type=Path, default=None, help="rebuild tables and plot from a saved cluster_wire.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.sizes, args.repeats, args.chunk_kib, args.addresses, args.topologies, args.timeline)
        return
    if args.tables_from:
        all_rows = json.loads(args.tables_from.read_text())
        print("\n\n".join(table(rows, rate, args.alpha_ms / 1e3) for rate, rows in all_rows.items()))
        plot(all_rows, args.tables_from.with_suffix(".png"))
        return
    preflight(parser, **link_options(args))
    tables, all_rows = [], {}
    for rate in args.rate:
        rows = []
        for n in args.hosts:
            with EmulatedCluster(n, rate, port=29500 + n, **link_options(args)) as cluster:
                congestion = cluster.congestion_control()
                command = [sys.executable, __file__, "--worker", f"--repeats={args.repeats}", "--sizes", *map(str, args.sizes),
                           "--chunk-kib", *map(str, args.chunk_kib), "--topologies", *args.topologies]
                if args.timeline:
                    command.append("--timeline")
                if args.raw_tcp:
                    command += ["--addresses", *(cluster.address(h) for h in range(n))]
                results = cluster.run(lambda host: command, timeout=4 * 3600)
            line = next(l for l in results[0].stdout.splitlines() if l.startswith("ROWS "))
            rows += [{**row, "congestion_control": congestion, "mtu": args.mtu} for row in json.loads(line[5:])]
            print(f"done: {n} hosts at {rate}", file=sys.stderr, flush=True)
        all_rows[rate] = rows
        tables.append(table(rows, rate, args.alpha_ms / 1e3))
    text = "\n\n".join(tables)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cluster_wire.md").write_text(text + "\n")
        (args.out / "cluster_wire.json").write_text(json.dumps(all_rows, indent=1))
        plot(all_rows, args.out / "cluster_wire.png")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
