"""Smoke test of the emulated cluster (benchmarks/cluster.py): two network-namespace hosts on a rate-limited link,
three gossip steps across it, checked against the dense reference. Skipped, with the reason, without root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import WORKERS
from test_gossip import reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cluster import EmulatedCluster, available, parse_rate, remove_orphans  # noqa: E402


def test_three_gossip_steps_across_a_two_host_cluster(tmp_path):
    reason = available()
    if reason is not None:
        pytest.skip(f"no emulated cluster here: it {reason}")
    # W = [[3/4, 1/4], [1/4, 3/4]]: a point-to-point exchange (a 2-ring would be one all_reduce)
    case = {"topology": "custom", "options": {"matrix": [[0.75, 0.25], [0.25, 0.75]]}, "rounds": 1, "mixes": 3, "chunk_bytes": 16}
    name = "dpgsmoke"
    with EmulatedCluster(2, "100mbit", name=name, port=29777) as cluster:
        qdiscs = [
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev], capture_output=True, text=True).stdout
            for ns, dev in ((cluster.namespace(0), "eth0"), (cluster.switch, "p0"))
        ]
        results = cluster.run(lambda host: [sys.executable, str(WORKERS / "gossip_worker.py"), str(tmp_path), json.dumps({2: [case]})], timeout=120)
    assert all(r.returncode == 0 for r in results)
    assert all("tbf" in q and "100Mbit" in q for q in qdiscs), qdiscs  # both directions of host 0's link
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in left  # torn down
    got = [np.load(tmp_path / f"n2_rank{r}.npz") for r in range(2)]
    for k, expected in enumerate(reference(case, 0, 2)):
        stacked = np.stack([got[r][f"0/{k}"].astype(np.float64).ravel() for r in range(2)])
        np.testing.assert_allclose(stacked, expected, rtol=0, atol=1e-6)


def test_rates_parse_and_bad_ones_are_named():
    assert parse_rate("200mbit") == 200_000_000 and parse_rate("10gbit") == 10**10 and parse_rate("unlimited") is None
    with pytest.raises(ValueError, match="rate must look like 100mbit, 1gbit or 'unlimited', got '200mb'"):
        parse_rate("200mb")


def test_clusters_of_killed_runs_are_removed():
    """SIGKILL skips every teardown: the next cluster removes namespaces whose owner process is gone."""
    reason = available()
    if reason is not None:
        pytest.skip(f"no emulated cluster here: it {reason}")
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan, alive = f"dpg{dead.pid}-h0", f"dpg{os.getpid()}-h9"
    for ns in (orphan, alive):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        removed = remove_orphans()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        assert orphan in removed and orphan not in left
        assert alive in left  # its owner (this test) still runs
    finally:
        for ns in (orphan, alive):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_hosts_run_the_congestion_control_asked_for_and_unknown_ones_are_named():
    with pytest.raises(ValueError, match=r"congestion control .nosuchcc. is not in this kernel; allowed: .*reno"):
        EmulatedCluster(1, congestion_control="nosuchcc")
    default, allowed = _ipv4_sysctl("tcp_congestion_control")[0], _ipv4_sysctl("tcp_allowed_congestion_control")
    barred = [cc for cc in _ipv4_sysctl("tcp_available_congestion_control") if cc not in allowed and cc != default]
    for cc in barred:  # in the kernel, but a namespace may not pick it: the error says how to allow it
        with pytest.raises(ValueError, match=rf"congestion control '{cc}' is not allowed in namespaces here .*"
                                             rf"sysctl -w net.ipv4.tcp_allowed_congestion_control='.*{cc}'"):
            EmulatedCluster(1, congestion_control=cc)
    reason = available()
    if reason is not None:
        pytest.skip(f"no emulated cluster here: it {reason}")
    other = next((cc for cc in allowed if cc != default), None)
    if other is None:
        pytest.skip(f"the machine allows namespaces no congestion control but its default {default!r}")
    with EmulatedCluster(1, "100mbit", name="dpgcc", congestion_control=other) as cluster:
        assert cluster.congestion_control() == other
    with EmulatedCluster(1, "100mbit", name="dpgcc") as cluster:
        assert cluster.congestion_control() == default  # the machine's own unless asked


_MSS_PROBE = """
import socket, sys, time
peer, port = sys.argv[1], 29790
if sys.argv[2] == "listen":
    server = socket.create_server(("", port))
    server.accept()[0].recv(1)
else:
    for _ in range(200):
        try:
            conn = socket.create_connection((peer, port))
            break
        except OSError:
            time.sleep(0.05)
    print(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), open("/proc/sys/net/ipv4/tcp_timestamps").read().strip())
    conn.sendall(b"x")
"""


@pytest.mark.parametrize("mtu", [1500, 9000])
def test_tcp_between_hosts_segments_at_the_mtu_asked_for(mtu):
    reason = available()
    if reason is not None:
        pytest.skip(f"no emulated cluster here: it {reason}")
    with EmulatedCluster(2, "100mbit", name="dpgmtu", port=29788, mtu=mtu) as cluster:
        peer = cluster.address(1)
        results = cluster.run(lambda host: [sys.executable, "-c", _MSS_PROBE, peer, "connect" if host == 0 else "listen"], timeout=60)
    mss, timestamps = map(int, results[0].stdout.split())
    # IPv4 and TCP headers take 40 bytes of each frame's MTU, the timestamp option (on unless disabled) 12 more
    assert mss == mtu - 40 - (12 if timestamps else 0)


@pytest.mark.parametrize("mtu", [100, 70000, 9000.0, True])
def test_bad_mtus_are_named_before_anything_is_built(mtu):
    with pytest.raises(ValueError, match=rf"mtu must be an integer in \[576, 65535\] bytes .*, got {mtu!r}"):
        EmulatedCluster(2, mtu=mtu)


def _ipv4_sysctl(name: str) -> list[str]:
    return Path(f"/proc/sys/net/ipv4/{name}").read_text().split()


@pytest.mark.parametrize("tool", ["cluster_wire", "cluster_train"])
def test_cluster_tools_name_bad_input_before_building_a_cluster(tool):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{tool}.py"
    done = subprocess.run([sys.executable, str(script), "--mtu", "100"], capture_output=True, text=True, timeout=120)
    message = "mtu must be an integer in [576, 65535] bytes (1500 is Ethernet's, 9000 jumbo frames), got 100"
    assert done.returncode == 2 and message in done.stderr, done.stderr
