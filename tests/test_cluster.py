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
from time_to_quality import time_to  # noqa: E402


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
        results = cluster.run(lambda host: [sys.executable, str(WORKERS / "gossip_worker.py"), str(tmp_path), json.dumps([case])], timeout=120)
    assert all(r.returncode == 0 for r in results)
    assert all("tbf" in q and "100Mbit" in q for q in qdiscs), qdiscs  # both directions of host 0's link
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in left  # torn down
    got = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for k, expected in enumerate(reference(case, 0, 2)):
        stacked = np.stack([got[r][f"0/{k}"].astype(np.float64).ravel() for r in range(2)])
        np.testing.assert_allclose(stacked, expected, rtol=0, atol=1e-6)


def test_rates_parse_and_bad_ones_are_named():
    assert parse_rate("200mbit") == 200_000_000 and parse_rate("10gbit") == 10**10 and parse_rate("unlimited") is None
    with pytest.raises(ValueError, match="rate must look like 100mbit, 1gbit or 'unlimited', got '200mb'"):
        parse_rate("200mb")


def test_time_to_quality_takes_the_clock_of_one_run_at_the_first_step_the_other_reaches():
    clock = [{"step": 100, "train_s": 50.0, "fid": 400.0}, {"step": 200, "train_s": 110.0, "fid": 150.0}, {"step": 300, "train_s": 160.0, "fid": 90.0}]
    scores = [{"step": 100, "train_s": 999.0, "fid": 310.0}, {"step": 200, "train_s": 999.0, "fid": 290.0}, {"step": 300, "train_s": 999.0, "fid": 190.0}]
    assert time_to(clock, scores, 300) == (110.0, 200)  # the scores' first FID <= 300 is at 200; the clock there
    assert time_to(clock, scores, 200) == (160.0, 300)
    assert time_to(clock, scores, 100) is None
    with pytest.raises(SystemExit, match=r"clock run evaluated at \[100, 200, 300\], the scores run at \[100\]"):
        time_to(clock, scores[:1], 300)


def test_time_to_quality_can_take_both_clocks_from_runs_other_than_the_scored_ones(tmp_path):
    """``--against-scores``: the other setting's time is its clock run's seconds at its scores run's crossing."""
    def run(name: str, rows: list[tuple[int, float, float]]) -> str:
        (tmp_path / name).mkdir()
        lines = ["step,train_s,fid", *(f"{step},{seconds},{fid}" for step, seconds, fid in rows)]
        (tmp_path / name / "evaluation.csv").write_text("\n".join(lines) + "\n")
        return str(tmp_path / name)

    base_clock = run("base_clock", [(100, 40.0, 999.0), (200, 80.0, 999.0)])
    base_scores = run("base_scores", [(100, 1.0, 350.0), (200, 2.0, 250.0)])  # FID <= 300 at 200: 80 s
    other_clock = run("other_clock", [(100, 10.0, 999.0), (200, 20.0, 999.0)])
    other_scores = run("other_scores", [(100, 1.0, 280.0), (200, 2.0, 150.0)])  # FID <= 300 at 100: 10 s
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_quality.py"
    common = [sys.executable, str(script), "--fid", "300", "--clock", base_clock, "--scores", base_scores, "--against", other_clock]
    both = subprocess.run([*common, "--against-scores", other_scores], capture_output=True, text=True, check=True).stdout
    assert "| 80 (200) | 10 (100) | 8.00× |" in both
    alone = subprocess.run(common, capture_output=True, text=True, check=True).stdout  # the clock run's own FID: never <= 300
    assert "| 80 (200) | not reached |" in alone


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


@pytest.mark.parametrize(
    ("tool", "args", "message"),
    [
        ("cluster_engine_ab", ["--settings", "ring:fp8"], "a setting is TOPOLOGY:WIRE with TOPOLOGY in ring, torus, exponential, one_peer_exponential and WIRE in fp32, bf16, got 'ring:fp8'"),
        ("cluster_engine_ab", ["--against", "no-such-revision"], "--against 'no-such-revision': no lightning_dpgan/gossip.py at that revision"),
        ("cluster_engine_ab", ["--rate", "200mb"], "rate must look like 100mbit, 1gbit or 'unlimited', got '200mb'"),
        ("cluster_stages", ["--hosts", "4", "--topology", "exponential"], "--topology exponential on 4 hosts is one all_reduce (W = J/n)"),
        ("cluster_stages", ["--hosts", "8", "--topology", "one_peer_exponential"], "--topology one_peer_exponential on 8 hosts has a single stage per round"),
        ("cluster_stages", ["--mtu", "100"], "mtu must be an integer in [576, 65535] bytes (1500 is Ethernet's, 9000 jumbo frames), got 100"),
    ],
)
def test_cluster_tools_name_bad_input_before_building_a_cluster(tool, args, message):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{tool}.py"
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
