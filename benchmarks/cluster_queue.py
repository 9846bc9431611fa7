"""How long a small message waits behind a bulk TCP flow on an emulated link: gloo's "ready" notices are such
messages, and a send in a staged gossip round waits for one.

    sudo python benchmarks/cluster_queue.py --rate 200mbit --congestion-control cubic bbr reno

Two hosts (``benchmarks/cluster.py``). Host 0 streams ``--mb`` MB to host 1 over one connection while it
measures, every 50 ms, the round trip of a 16-byte message over a second connection (``TCP_NODELAY``) that host
1 echoes: out through host 0's link queue, the switch port's queue toward host 1 (both shared with the bulk
flow), and back over the idle direction. Printed per congestion control: the round trip idle and under load
(median and worst), and the bulk flow's rate (until its last byte arrived) against the link's. A congestion
control the machine does not allow in namespaces is reported, with the sysctl that allows it, and skipped.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import EmulatedCluster, congestion_control_problem, parse_rate, preflight  # noqa: E402

PORT = 7100

ECHO_SERVER = f"""
import socket, sys, threading
def drain(conn, nbytes):
    buffer, got = bytearray(1 << 20), 0
    while got < nbytes:
        got += conn.recv_into(buffer)
    conn.sendall(b"k")  # everything arrived
bulk = socket.create_server((sys.argv[1], {PORT}))
echo = socket.create_server((sys.argv[1], {PORT + 1}))
print("listening", flush=True)
conn, _ = bulk.accept()
threading.Thread(target=drain, args=(conn, int(sys.argv[2])), daemon=True).start()
conn, _ = echo.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := conn.recv(64):
    conn.sendall(data)
"""

PROBING_CLIENT = f"""
import socket, sys, threading, time
address, nbytes = sys.argv[1], int(sys.argv[2])
bulk = socket.create_connection((address, {PORT}))
echo = socket.create_connection((address, {PORT + 1}))
echo.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def round_trip():
    start = time.perf_counter()
    echo.sendall(b"x" * 16)
    got = 0
    while got < 16:
        got += len(echo.recv(64))
    return time.perf_counter() - start
idle = [round_trip() for _ in range(10)]
def send_all():
    bulk.sendall(bytearray(nbytes))
    bulk.recv(1)  # the receiver has it all
sender = threading.Thread(target=send_all)
start = time.perf_counter()
sender.start()
time.sleep(0.3)  # past slow start
loaded = []
while sender.is_alive():
    loaded.append(round_trip())
    time.sleep(0.05)
sender.join()
seconds = time.perf_counter() - start
print(" ".join(map(str, [seconds, *idle])), "|", " ".join(map(str, loaded)), flush=True)
"""


def measure(rate: str, congestion_control: str, mb: float) -> dict[str, float]:
    with EmulatedCluster(2, rate, name="dpgqueue", port=29800, congestion_control=congestion_control) as cluster:
        server = cluster.start(1, [sys.executable, "-c", ECHO_SERVER, cluster.address(1), str(int(mb * 1e6))], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        server.stdout.readline()  # listening
        client = cluster.start(0, [sys.executable, "-c", PROBING_CLIENT, cluster.address(1), str(int(mb * 1e6))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = client.communicate(timeout=600)
        if client.returncode != 0:
            raise RuntimeError(f"the probing client failed:\n{err[-2000:]}")
        server.kill()
    head, tail = out.split("|")
    seconds, *idle = map(float, head.split())
    loaded = list(map(float, tail.split()))
    if not loaded:
        raise SystemExit(f"error: the {mb:g} MB bulk flow ended before the first probe under load; give a larger --mb")
    return {"seconds": seconds, "idle": statistics.median(idle), "loaded": statistics.median(loaded),
            "worst": max(loaded), "samples": len(loaded)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", default="200mbit")
    parser.add_argument("--congestion-control", nargs="+", default=["cubic", "bbr", "reno"])
    parser.add_argument("--mb", type=float, default=40.0, help="MB of the bulk flow")
    args = parser.parse_args()
    bits_per_second = parse_rate(args.rate)
    if bits_per_second is None:
        parser.error("--rate must be a limited rate: an unlimited link has no queue to wait in")
    if args.mb * 8e6 / bits_per_second < 1.0:
        parser.error(f"--mb {args.mb:g} lasts under a second at {args.rate}; give at least {bits_per_second / 8e6:g}")
    preflight(parser)
    print(f"2 hosts at {args.rate}, a {args.mb:g} MB bulk flow from host 0 to host 1, a 16-byte echo every 50 ms\n")
    print("| congestion control | idle round trip ms | under load: median ms | worst ms | samples | bulk rate ÷ link |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.congestion_control:
        problem = congestion_control_problem(name)
        if problem:
            print(f"| {name} | not run: {problem} | | | | |")
            continue
        m = measure(args.rate, name, args.mb)
        rate = args.mb * 8e6 / m["seconds"] / bits_per_second
        print(f"| {name} | {1e3 * m['idle']:.2f} | {1e3 * m['loaded']:.1f} | {1e3 * m['worst']:.1f} | {m['samples']} | {rate:.2f} |")


if __name__ == "__main__":
    main()
