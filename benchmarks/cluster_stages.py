"""Where a staged gossip round spends its time: every host's stage-by-stage timeline on the emulated cluster.

    sudo python benchmarks/cluster_stages.py --hosts 8 --rate 200mbit --mb 4.35 --topology exponential --run-ahead 0 2

Each host (one worker per network namespace, ``benchmarks/cluster.py``) runs ``GossipEngine(staged=True).mix``
``--repeats`` times and records, without changing the engine, when each of its stages was posted and when the
first and the last chunk from that stage's in-neighbour had arrived (``batch_isend_irecv`` and
``GossipEngine._wait`` are wrapped). Per stage it prints, as medians over repeats: the last host's post and end
(``post``, ``end``; ms from the round's start), how far apart the hosts posted (``skew``), and per host the wait
from its own post to its first chunk (``wait``: the chunk's own time on the link, ``chunk KiB`` at the rate, plus
the handshake and any lateness of the sender) and from first to last chunk (``data``; a message alone on a link
takes ``msg ms``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import EmulatedCluster, add_link_arguments, link_options, parse_rate, preflight  # noqa: E402


def _no_stages(topology_name: str, hosts: int) -> str | None:
    """Why ``topology_name`` on ``hosts`` hosts has no staged timeline to draw, or None if it has one."""
    from lightning_dpgan.topology import build_topology

    try:
        topology = build_topology(topology_name, hosts)
    except ValueError as err:
        return str(err)
    if topology.is_complete or len(topology.stages(0)) < 2:
        kind = "is one all_reduce (W = J/n)" if topology.is_complete else "has a single stage per round"
        return (f"--topology {topology_name} on {hosts} hosts {kind}: a staged timeline needs several stages per "
                "round, e.g. exponential, torus or ring on 8 hosts")
    return None


def worker(topology_name: str, mb: float, repeats: int, run_ahead: list[int], chunk_kib: int) -> None:
    import torch
    import torch.distributed as dist

    from lightning_dpgan import gossip
    from lightning_dpgan.gossip import GossipEngine
    from lightning_dpgan.topology import build_topology

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    events: list[tuple[float, str, int]] = []  # (seconds, "post" | "recv", peer)
    receives: dict[int, int] = {}  # id(work) -> peer, for the receives of the current mix
    post_batch = gossip.dist.batch_isend_irecv
    wait = GossipEngine._wait

    def recording_batch(ops):
        events.append((time.perf_counter(), "post", -1))
        works = post_batch(ops)
        receives.update({id(w): op.peer for w, op in zip(works, ops) if op.op is dist.irecv})
        return works

    def recording_wait(self, work, what, peer=None):
        wait(self, work, what, peer)
        if id(work) in receives:
            events.append((time.perf_counter(), "recv", receives[id(work)]))

    gossip.dist.batch_isend_irecv = recording_batch
    GossipEngine._wait = recording_wait
    params = [torch.randn(int(mb * 1e6 / 4))]
    timelines = {}
    for ahead in run_ahead:
        engine = GossipEngine(build_topology(topology_name, world), rank, chunk_bytes=chunk_kib * 1024, staged=True,
                              run_ahead_chunks=ahead)
        engine.mix(params)  # warm up: connections, buffers
        runs = []
        for _ in range(repeats):
            dist.barrier()
            events.clear()
            receives.clear()
            start = time.perf_counter()
            engine.mix(params)
            posts = [t - start for t, kind, _ in events if kind == "post"]
            by_peer: dict[int, list[float]] = {}
            for t, kind, peer in events:
                if kind == "recv":
                    by_peer.setdefault(peer, []).append(t - start)
            # stage k receives from the k-th in-neighbour to arrive (one in-neighbour per stage)
            arrivals = sorted((ts[0], ts[-1]) for ts in by_peer.values())
            runs.append({"posts": posts, "arrivals": arrivals})
        timelines[ahead] = runs
    everyone = [None] * world
    dist.all_gather_object(everyone, timelines)
    if rank == 0:
        print("TIMELINES " + json.dumps(everyone), flush=True)
    dist.destroy_process_group()


def summary(hosts: list[dict], ahead: int, mb: float, bits_per_second: int | None, chunk_kib: int) -> str:
    runs = [host[str(ahead)] for host in hosts]  # json keys are strings
    repeats = len(runs[0])
    stages = max(len(run[r]["arrivals"]) for run in runs for r in range(repeats))
    med = statistics.median
    ends = [max(run[r]["arrivals"][-1][1] for run in runs if run[r]["arrivals"]) for r in range(repeats)]
    msg = "" if bits_per_second is None else f"{mb * 8e6 / bits_per_second * 1e3:.0f}"
    chunk = "" if bits_per_second is None else f"{chunk_kib * 1024 * 8 / bits_per_second * 1e3:.1f}"
    lines = [f"run_ahead_chunks={ahead}: round {1e3 * med(ends):.0f} ms (slowest host, median of {repeats}); "
             f"msg ms {msg}, one {chunk_kib} KiB chunk {chunk} ms", "",
             "| stage | post ms | end ms | skew ms | wait ms | data ms |", "|---:|---:|---:|---:|---:|---:|"]
    for k in range(stages):
        def hosts_with(r):
            return [run[r] for run in runs if len(run[r]["arrivals"]) > k]
        # a stage's post is the host's k-th posting unless receives went out a posting early: then its own
        post = [[run["posts"][min(k, len(run["posts"]) - 1)] for run in hosts_with(r)] for r in range(repeats)]
        first = [[run["arrivals"][k][0] for run in hosts_with(r)] for r in range(repeats)]
        last = [[run["arrivals"][k][1] for run in hosts_with(r)] for r in range(repeats)]
        lines.append(
            f"| {k} | {1e3 * med(max(p) for p in post):.0f} | {1e3 * med(max(x) for x in last):.0f} | "
            f"{1e3 * med(max(p) - min(p) for p in post):.1f} | "
            f"{1e3 * med(med(f - p for f, p in zip(fs, ps)) for fs, ps in zip(first, post)):.1f} | "
            f"{1e3 * med(med(l - f for l, f in zip(ls, fs)) for ls, fs in zip(last, first)):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--rate", default="200mbit")
    parser.add_argument("--mb", type=float, default=4.35, help="MB per message")
    parser.add_argument("--topology", default="exponential")
    parser.add_argument("--run-ahead", type=int, nargs="+", default=[0], metavar="CHUNKS",
                        help="run_ahead_chunks values to time, one after another")
    parser.add_argument("--chunk-kib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=8)
    add_link_arguments(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.topology, args.mb, args.repeats, args.run_ahead, args.chunk_kib)
        return
    if min(args.run_ahead) < 0:
        parser.error(f"--run-ahead takes chunk counts >= 0, got {min(args.run_ahead)}")
    problem = _no_stages(args.topology, args.hosts)
    if problem:
        parser.error(problem)
    preflight(parser, **link_options(args))
    command = [sys.executable, __file__, "--worker", "--topology", args.topology, "--mb", str(args.mb),
               "--repeats", str(args.repeats), "--chunk-kib", str(args.chunk_kib),
               "--run-ahead", *map(str, args.run_ahead)]
    with EmulatedCluster(args.hosts, args.rate, port=29700, **link_options(args)) as cluster:
        print(f"{args.hosts} hosts at {args.rate} ({cluster.congestion_control()}, MTU {args.mtu}), {args.topology}, {args.mb:g} MB, staged")
        results = cluster.run(lambda host: command, timeout=3600)
    line = next(l for l in results[0].stdout.splitlines() if l.startswith("TIMELINES "))
    hosts = json.loads(line[len("TIMELINES "):])
    for ahead in args.run_ahead:
        print()
        print(summary(hosts, ahead, args.mb, parse_rate(args.rate), args.chunk_kib))


if __name__ == "__main__":
    main()
