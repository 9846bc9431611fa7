"""How long does each membership engine take to give the survivors of a kill -9 a working new group, and to admit a
worker started later? (issue 44, item 4; the decision is in docs/membership.md)

    OMP_NUM_THREADS=1 python benchmarks/membership_reconfigure.py --repeats 3
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/torchft_pkgs python benchmarks/membership_reconfigure.py --repeats 3

Real processes on CPU and gloo: ``--workers`` (4) workers train a toy step (an all-reduce of ``id + 1`` and
``--step-s`` of "compute"). Once all of them are members, the launcher kills one with SIGKILL (not the one hosting
anything) and measures, from the kill, until every survivor has completed its first all-reduce on a new group whose
sum is its member set's (``leave``). Then it starts one more worker and measures, from the moment that worker asks to
join (after its imports) until every member, it included, has completed an all-reduce on a group that holds it
(``join``; ``join from start`` counts from the process start, imports included). Last, it stops a worker with
SIGSTOP (a host gone silent: its sockets stay open) and measures as for the kill (``silent``). Both candidates declare a silent
worker dead after ``--heartbeat-timeout`` seconds without a heartbeat, and use it as the gloo timeout too.

Candidates:

``store``  torch's c10d ``TCPStore`` (what torchrun's c10d rendezvous keeps its state in), hosted by the launcher as
           torchrun's agent hosts it. Generation ``k + 1`` is agreed on through ``compare_set``: whoever first sees
           every old member either written under ``g{k+1}/alive/`` or silent past the heartbeat timeout fixes the
           member set (the writers, plus the workers that asked to join); every survivor reads it and builds a fresh
           ``torch.distributed.ProcessGroupGloo`` on ``PrefixStore("g{k+1}/pg/", store)``.
``torchft`` torchft's ``LighthouseServer`` (hosted by the launcher), one ``Manager`` per worker (a replica group of one,
           each with its own ``TCPStore`` and manager server) and torchft's reconfigurable ``ProcessGroupGloo``;
           ``start_quorum`` / ``allreduce`` / ``should_commit`` every step, ``init_sync`` on, so a joiner is also sent
           a donor's state (a small one here) over torchft's HTTP checkpoint transport. Runs only where ``torchft``
           imports: ``pip download torchft --no-deps -d /tmp/torchft_dl`` then ``pip install --no-deps --target
           /tmp/torchft_pkgs /tmp/torchft_dl/torchft-*.whl`` and ``PYTHONPATH=/tmp/torchft_pkgs`` (torchft 0.2.0
           works with torch 2.14.1; it needs the opentelemetry packages, which the project's environment has).

Also printed: ``step overhead``, the median wall time of one steady step less ``--step-s`` (the membership check, the
all-reduce, the event line), what each engine costs on every step when nothing changes; and, once each, what the
workers do when the process hosting the store (``store-host``) or the lighthouse (``torchft-host``) is killed and no
worker is (a store worker that loses the store trains on with the member set it has; a torchft worker needs the
lighthouse for every step's quorum).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()


def emit(**event: Any) -> None:
    print(json.dumps({"t": time.time(), **event}), flush=True)


# ---------------------------------------------------------------------------------------------------------- store


class Heartbeat:
    """``hb/{id}`` set to this worker's clock (``time.time()``) every ``interval`` seconds by a daemon thread with a
    store client of its own (a TCPStore client serves one operation at a time)."""

    def __init__(self, addr: str, port: int, wid: int, interval: float = 0.1) -> None:
        import torch.distributed as dist

        self.store = dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=10))
        self.key, self.interval = f"hb/{wid}", interval
        self.store.set(self.key, repr(time.time()))
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.store.set(self.key, repr(time.time()))
            except Exception:
                return


#: how long a heartbeat must stay unchanged, seen from here, before its own clock may say it is silent
GRACE_S = 0.5


def silent(beat: str, unchanged_for: float, timeout: float) -> bool:
    """Whether a worker is silent past ``timeout``: its heartbeat has not changed for ``GRACE_S`` here (so a live
    worker whose clock is behind is never dropped) and either its last beat is older than ``timeout`` by this clock,
    or it has not changed for ``timeout`` here (a dead worker whose clock was ahead)."""
    if unchanged_for < min(GRACE_S, timeout):
        return False
    return time.time() - float(beat) > timeout or unchanged_for > timeout


class StoreMember:
    """One worker of the ``store`` candidate."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch.distributed as dist

        self.dist, self.args, self.id = dist, args, args.id
        self.hb_timeout = args.heartbeat_timeout
        self.store = dist.TCPStore(args.addr, args.port, is_master=False, timeout=timedelta(seconds=30))
        self.heartbeat = Heartbeat(args.addr, args.port, self.id)
        self.gen, self.members, self.pg = 0, [], None
        self.abandoned: list[Any] = []  # groups left behind: a gloo group's destructor waits for its pending works

    # the agreement ---------------------------------------------------------------------------------------------

    def _wants(self, pre: str) -> list[int]:
        n = self.store.add(pre + "nwant", 0)
        return [int(self.store.get(f"{pre}want{i}")) for i in range(1, n + 1)]

    def agree(self, gen: int, old: list[int], wait_all: bool = False) -> list[int]:
        """Generation ``gen``'s member set, the same on every worker that reads it (``compare_set`` fixes it once).
        ``wait_all``: wait for every one of ``old`` however long (the first generation: workers still starting)."""
        pre, store = f"g{gen}/", self.store
        store.compare_set(pre + "open", "", "1")  # tells the members that have not noticed yet
        store.set(f"{pre}alive/{self.id}", "1")
        seen: dict[int, tuple[str, float]] = {}  # member -> (heartbeat, when it last changed here)
        while not store.check([pre + "members"]):
            now, decided = time.monotonic(), True
            alive = []
            for m in old:
                if store.check([f"{pre}alive/{m}"]):
                    alive.append(m)
                    continue
                if wait_all or not store.check([f"hb/{m}"]):
                    decided = False  # not started yet
                    continue
                beat = store.get(f"hb/{m}").decode()
                if m not in seen or seen[m][0] != beat:
                    seen[m] = (beat, now)
                if not silent(beat, now - seen[m][1], self.hb_timeout):
                    decided = False  # alive, not here yet: wait for it or for its silence
            if decided:
                members = sorted(set(alive) | set(self._wants(pre)))
                store.compare_set(pre + "members", "", json.dumps(members))
                break
            time.sleep(0.02)
        members = json.loads(store.get(pre + "members"))
        store.compare_set("gen", str(gen - 1) if gen > 1 else "", str(gen))  # for joiners: the newest generation
        return members

    def build(self, gen: int, members: list[int]) -> None:
        dist = self.dist
        if self.pg is not None:
            self.abandoned.append(self.pg)
        prefix = dist.PrefixStore(f"g{gen}/pg/", self.store)
        # the loop applies the heartbeat timeout to each all-reduce; this one bounds the group's setup
        self.pg = dist.ProcessGroupGloo(prefix, members.index(self.id), len(members), timedelta(seconds=30))
        self.gen, self.members = gen, members

    def join(self) -> None:
        """Ask to be in the next generation, and wait until one holds this worker."""
        store = self.store
        while True:
            gen = int(store.get("gen")) + 1 if store.check(["gen"]) else 1
            pre = f"g{gen}/"
            n = store.add(pre + "nwant", 1)
            store.set(f"{pre}want{n}", str(self.id))
            emit(ev="ready", id=self.id)
            store.compare_set(pre + "open", "", "1")
            store.wait([pre + "members"], timedelta(seconds=60))
            members = json.loads(store.get(pre + "members"))
            if self.id in members:
                self.build(gen, members)
                return

    # the loop --------------------------------------------------------------------------------------------------

    def run(self) -> None:
        import torch

        if self.args.joiner:
            self.join()
        else:
            emit(ev="ready", id=self.id)
            self.build(1, self.agree(1, list(range(self.args.workers)), wait_all=True))
        fresh, last, frozen = True, time.monotonic(), False
        while True:
            value = torch.tensor([float(self.id + 1)], dtype=torch.float64)
            nxt = f"g{self.gen + 1}/open"
            try:
                failed = not frozen and self.store.check([nxt])
            except Exception as err:  # the store's host died: train on with the members we have
                frozen, failed = True, False
                emit(ev="frozen", id=self.id, err=str(err).splitlines()[0])
            if not failed:
                work = self.pg.allreduce([value])
                deadline = time.monotonic() + self.hb_timeout
                polls = 0
                while not work.is_completed():
                    polls += 1
                    if polls % 4 == 0 and not frozen and self.store.check([nxt]):  # someone saw a change: stop waiting
                        failed = True
                        break
                    if time.monotonic() > deadline:
                        failed = True
                        break
                    time.sleep(0.005)
                if not failed:
                    try:
                        work.wait()
                    except Exception:
                        failed = True
            if failed:
                self.build(self.gen + 1, self.agree(self.gen + 1, self.members))
                if self.id not in self.members:
                    emit(ev="fatal", id=self.id, err="left out of the member set")
                    return
                fresh = True
                continue
            if fresh:
                emit(ev="member", id=self.id, gen=self.gen, members=self.members, sum=value.item())
                fresh = False
            now = time.monotonic()
            emit(ev="step", id=self.id, s=now - last)
            last = now
            time.sleep(self.args.step_s)


# ---------------------------------------------------------------------------------------------------------- torchft


def torchft_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed import ReduceOp

    from torchft import Manager, ProcessGroupGloo

    timeout = timedelta(seconds=args.heartbeat_timeout)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # this replica group's own
    state = {"value": torch.zeros(4)}
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=lambda sd: state.update(sd),
        state_dict=lambda: dict(state),
        min_replica_size=2,
        use_async_quorum=False,
        timeout=timedelta(seconds=30),
        quorum_timeout=timedelta(seconds=60),
        connect_timeout=timedelta(seconds=30),
        rank=0,
        world_size=1,
        store_addr="127.0.0.1",
        store_port=store.port,
        lighthouse_addr=args.lighthouse,
        replica_id=f"w{args.id}",
        hostname="127.0.0.1",
    )
    emit(ev="ready", id=args.id)
    quorum, last = None, time.monotonic()
    while True:
        manager.start_quorum()
        value = torch.tensor([float(args.id + 1)], dtype=torch.float64)
        manager.allreduce(value, reduce_op=ReduceOp.SUM).wait()
        if manager.should_commit():
            if manager._quorum_id != quorum:
                quorum = manager._quorum_id
                emit(ev="member", id=args.id, gen=quorum, size=manager.num_participants(), sum=value.item())
            now = time.monotonic()
            emit(ev="step", id=args.id, s=now - last)
            last = now
        time.sleep(args.step_s)


# ---------------------------------------------------------------------------------------------------------- launcher


STORE = """
import sys, time
from torch.distributed import TCPStore
store = TCPStore("127.0.0.1", int(sys.argv[1]), is_master=True, wait_for_workers=False)
while True:
    time.sleep(60)
"""

LIGHTHOUSE = """
import sys, time
from torchft._torchft import LighthouseServer
ms = int(sys.argv[2])
server = LighthouseServer(bind=f"[::]:{sys.argv[1]}", min_replicas=2, join_timeout_ms=ms, heartbeat_timeout_ms=ms)
while True:
    time.sleep(60)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    def __init__(self, wid: int, argv: list[str], events: queue.Queue) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RUST_LOG": "error"}
        self.id, self.started = wid, time.time()
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--worker", "--id", str(wid), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.stderr: list[str] = []
        threading.Thread(target=self._read, args=(events,), daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self, events: queue.Queue) -> None:
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                events.put(json.loads(line))

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class Run:
    """One repeat of one candidate: start, leave, join."""

    def __init__(self, candidate: str, args: argparse.Namespace) -> None:
        self.candidate, self.args = candidate, args
        self.events: queue.Queue = queue.Queue()
        self.workers: dict[int, Worker] = {}
        self.steps: list[float] = []
        self.server: Any = None
        common = ["--heartbeat-timeout", str(args.heartbeat_timeout), "--step-s", str(args.step_s)]
        if candidate in ("store", "store-host"):
            import torch.distributed as dist

            port = free_port()
            if candidate == "store":  # the launcher hosts it, as torchrun's agent does
                self.server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
            else:  # store-host: a process of its own, to be killed
                self.host = subprocess.Popen([sys.executable, "-c", STORE, str(port)])
            self.argv = ["--candidate", "store", "--addr", "127.0.0.1", "--port", str(port), *common]
            self.argv += ["--workers", str(args.workers)]
        else:
            ms = int(args.heartbeat_timeout * 1000)
            if candidate == "torchft":  # the launcher hosts it
                from torchft._torchft import LighthouseServer

                self.server = LighthouseServer(
                    bind="[::]:0", min_replicas=2, join_timeout_ms=ms, heartbeat_timeout_ms=ms
                )
                address = self.server.address()
            else:  # torchft-host: a process of its own, to be killed
                port = free_port()
                self.host = subprocess.Popen(
                    [sys.executable, "-c", LIGHTHOUSE, str(port), str(ms)], env={**os.environ, "RUST_LOG": "error"}
                )
                address = f"http://127.0.0.1:{port}"
            self.argv = ["--candidate", "torchft", "--lighthouse", address, *common]

    def start(self, wid: int, extra: list[str] = ()) -> Worker:
        self.workers[wid] = Worker(wid, [*self.argv, *extra], self.events)
        return self.workers[wid]

    def wait_members(self, ids: set[int], size: int, since: float, timeout: float = 90.0) -> dict[int, dict]:
        """The first ``member`` event after ``since`` of each of ``ids`` with ``size`` members."""
        got: dict[int, dict] = {}
        deadline = time.time() + timeout
        while set(got) != ids:
            try:
                ev = self.events.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                dead = {w: self.workers[w].proc.poll() for w in ids if self.workers[w].proc.poll() is not None}
                tail = {w: "".join(self.workers[w].stderr[-3:])[-400:] for w in ids}
                missing = sorted(set(ids) - set(got))
                raise TimeoutError(f"{self.candidate}: {missing} not in a group of {size} (exited: {dead}; {tail})")
            if ev["ev"] == "step" and ev["id"] in ids:
                self.steps.append(ev["s"])
            if ev["ev"] == "fatal":
                raise RuntimeError(f"{self.candidate}: worker {ev['id']}: {ev['err']}")
            if ev["ev"] == "member" and ev["id"] in ids and ev["t"] >= since:
                n = len(ev["members"]) if "members" in ev else ev["size"]
                if n == size:
                    got[ev["id"]] = ev
        return got

    def wait_ready(self, wid: int, timeout: float = 90.0) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                ev = self.events.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                break
            if ev["ev"] == "ready" and ev["id"] == wid:
                return ev["t"]
        raise TimeoutError(f"{self.candidate}: worker {wid} never asked to join")

    def check(self, got: dict[int, dict], ids: set[int]) -> None:
        expected = float(sum(i + 1 for i in ids))
        sums = {ev["sum"] for ev in got.values()}
        sets = {tuple(ev["members"]) for ev in got.values() if "members" in ev}
        if sums != {expected} or len(sets) > 1 or (sets and set(next(iter(sets))) != ids):
            raise AssertionError(f"{self.candidate}: sums {sums} (expected {expected}), member sets {sets}")

    def go(self) -> dict[str, Any]:
        n = self.args.workers
        t0 = time.time()
        for w in range(n):
            self.start(w)
        self.wait_members(set(range(n)), n, t0)
        time.sleep(5 * self.args.step_s + 0.5)
        self.steps.clear()
        out: dict[str, Any] = {}
        if self.candidate == "torchft-host":
            return {"lighthouse dies": self.after_host_death()}
        if self.candidate == "store-host":
            return {"store dies": self.after_host_death()}
        victim = n // 2
        survivors = set(range(n)) - {victim}
        killed = time.time()
        self.workers[victim].kill()
        try:
            got = self.wait_members(survivors, n - 1, killed, timeout=self.args.heartbeat_timeout + 30)
        except (TimeoutError, RuntimeError) as err:
            out["leave"] = f"failed: {err}"
            return out
        self.check(got, survivors)
        out["leave"] = max(ev["t"] for ev in got.values()) - killed
        out["step overhead"] = statistics.median(self.steps) - self.args.step_s if self.steps else float("nan")
        joiner = n
        worker = self.start(joiner, ["--joiner"] if self.candidate.startswith("store") else [])
        asked = self.wait_ready(joiner)
        got = self.wait_members(survivors | {joiner}, n, asked)
        self.check(got, survivors | {joiner})
        done = max(ev["t"] for ev in got.values())
        out["join"], out["join from start"] = done - asked, done - worker.started
        # a silent worker: SIGSTOP (its sockets stay open, its heartbeat stops); close() kills it
        members = survivors | {joiner}
        silent = min(members)
        stopped = time.time()
        self.workers[silent].proc.send_signal(signal.SIGSTOP)
        try:
            got = self.wait_members(members - {silent}, n - 1, stopped, timeout=3 * self.args.heartbeat_timeout + 30)
        except (TimeoutError, RuntimeError) as err:
            out["silent"] = f"failed: {err}"
            return out
        self.check(got, members - {silent})
        out["silent"] = max(ev["t"] for ev in got.values()) - stopped
        return out

    def after_host_death(self, watch: float = 20.0) -> str:
        """Kill the process that hosts the store or the lighthouse (no worker); say what the workers do in the next
        ``watch`` seconds."""
        killed = time.time()
        self.host.send_signal(signal.SIGKILL)
        self.host.wait()
        last_step, fatal, frozen = killed, None, set()
        while time.time() < killed + watch and fatal is None:
            with contextlib.suppress(queue.Empty):
                ev = self.events.get(timeout=0.2)
                if ev["ev"] == "step":
                    last_step = max(last_step, ev["t"])
                elif ev["ev"] == "fatal":
                    fatal = ev
                elif ev["ev"] == "frozen":
                    frozen.add(ev["id"])
        exited = sorted(w.id for w in self.workers.values() if w.proc.poll() is not None)
        if last_step > killed + watch - 1:
            what = f"training went on ({len(frozen)} workers froze their member set)"
            return f"{what}; exited: {exited}" if exited else what
        what = f"steps stopped {last_step - killed:.2f} s after the kill"
        if fatal is not None:
            what += f"; worker {fatal['id']} raised after {fatal['t'] - killed:.1f} s: {fatal['err'][:160]}"
        else:
            what += f"; no error within {watch:.0f} s (blocked in the quorum)"
        return f"failed: {what}; exited: {exited}"

    def close(self) -> None:
        if getattr(self, "host", None) is not None:
            self.host.kill()
            self.host.wait()
        for worker in self.workers.values():
            worker.kill()
        if self.server is not None and hasattr(self.server, "shutdown"):
            self.server.shutdown()
        self.server = None


def host() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu if ln.startswith("Model name")), platform.processor())
    try:
        cc = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        cc = "?"
    import torch

    cores = f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))})"
    return f"{cores}, {cpu}, tcp_congestion_control={cc}, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ["store", "torchft", "store-host", "torchft-host"]
    p.add_argument("--candidates", nargs="+", default=names, choices=names)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--heartbeat-timeout", type=float, default=2.0, help="seconds of silence that make a worker dead")
    p.add_argument("--step-s", type=float, default=0.05, help="seconds of 'compute' per step")
    # a worker's own arguments
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--candidate", help=argparse.SUPPRESS)
    p.add_argument("--id", type=int, help=argparse.SUPPRESS)
    p.add_argument("--addr", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--lighthouse", help=argparse.SUPPRESS)
    p.add_argument("--joiner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        try:
            (StoreMember(args).run if args.candidate == "store" else lambda: torchft_worker(args))()
        except Exception as err:
            emit(ev="fatal", id=args.id, err=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            raise
        return

    candidates = list(args.candidates)
    if any(c.startswith("torchft") for c in candidates):
        os.environ.setdefault("RUST_LOG", "error")  # the lighthouse logs every quorum request otherwise
        try:
            import torchft

            print(f"torchft {importlib.metadata.version('torchft')} from {Path(torchft.__file__).parent}")
        except ImportError as err:
            print(f"torchft skipped: {err} (see this file's docstring for how to install it)", file=sys.stderr)
            candidates = [c for c in candidates if not c.startswith("torchft")]
    print(f"host: {host()}")
    print(f"workers {args.workers} (OMP_NUM_THREADS=1 each), heartbeat timeout {args.heartbeat_timeout} s", end="")
    print(f", step {args.step_s} s")
    results: dict[tuple[str, str], list[Any]] = {}
    for repeat in range(args.repeats):
        for candidate in candidates:
            if candidate.endswith("-host") and repeat > 0:
                continue  # it fails the same way every time
            run = Run(candidate, args)
            try:
                out = run.go()
            except Exception as err:
                out = {"leave": f"failed: {err}"}
            finally:
                run.close()
            print(f"# repeat {repeat} {candidate}: {out}", file=sys.stderr, flush=True)
            for event, value in out.items():
                results.setdefault((candidate, event), []).append(value)
    print("\n| candidate | event | median s | max s | repeats |\n|---|---|---|---|---|")
    for (candidate, event), values in results.items():
        numbers = [v for v in values if isinstance(v, float)]
        failures = [v for v in values if isinstance(v, str)]  # the "-host" rows: what dies with the host
        if numbers:
            digits = 4 if event == "step overhead" else 2
            median, top = statistics.median(numbers), max(numbers)
            print(f"| {candidate} | {event} | {median:.{digits}f} | {top:.{digits}f} | {len(numbers)} |")
        for f in failures[:1]:
            print(f"| {candidate} | {event} | {f[:300]} | | {len(failures)} |")


if __name__ == "__main__":
    main()
