"""The membership engine chosen in docs/membership.md (the c10d TCPStore, fresh gloo groups per member set), with
real processes: 4 workers, one killed with SIGKILL, the survivors agree on one member set and all-reduce on a new
group; then a fifth process asks to join and is in the next group; then one is stopped (SIGSTOP), and the others
go on without it. The mechanism is the benchmark's (benchmarks/membership_reconfigure.py), run once here so that it
cannot rot."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "membership_reconfigure.py"

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL and gloo over loopback: Linux only")


def load():
    spec = importlib.util.spec_from_file_location("membership_reconfigure", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_survivors_of_a_kill_agree_and_a_joiner_is_admitted():
    bench = load()
    args = argparse.Namespace(workers=4, heartbeat_timeout=1.0, step_s=0.05)
    run = bench.Run("store", args)
    try:
        # go() checks every survivor's first all-reduce on the new group: the same member set on all of them, and
        # the sum of the members' values (a dead worker counted, or a survivor missing, fails it)
        out = run.go()
    finally:
        run.close()
    assert all(w.proc.poll() is not None for w in run.workers.values())  # close() left no child behind
    for event in ("leave", "join", "silent"):
        assert isinstance(out[event], float), out[event]
    # a worker is dropped only once its heartbeat has stood still for GRACE_S as seen by a survivor
    assert bench.GRACE_S <= out["leave"] < args.heartbeat_timeout + 10
    assert bench.GRACE_S <= out["silent"] < 2 * args.heartbeat_timeout + 10
    assert out["join"] < 10


def test_the_check_sees_a_wrong_sum_or_a_split_member_set():
    bench = load()
    run = bench.Run.__new__(bench.Run)
    run.candidate = "store"
    good = {i: {"sum": 7.0, "members": [0, 1, 3]} for i in (0, 1, 3)}
    run.check(good, {0, 1, 3})
    with pytest.raises(AssertionError):
        run.check({**good, 3: {"sum": 10.0, "members": [0, 1, 2, 3]}}, {0, 1, 3})
    with pytest.raises(AssertionError):
        run.check({i: {"sum": 7.0, "members": [0, 1, 3]} for i in (0, 1, 3)}, {0, 1, 2})
