"""An emulated cluster on one machine: N hosts as network namespaces on a bridge, each link rate-limited both ways.

Needs root and iproute2 (``ip``, ``tc``). Host ``i`` is the namespace ``<name>-h<i>`` with ``eth0`` at
``10.77.0.<i+1>``; its veth peer sits on a bridge in a switch namespace ``<name>-sw``, so nothing touches the
machine's own network. ``tc tbf`` limits the host's egress (on ``eth0``) and its ingress (on the switch port):
a full-duplex link of ``rate``. This kernel has no ``netem``, so links add no delay: latency is modelled (α–β)
next to the measurements instead. TCP's congestion control is the machine's default (``bbr`` on the 2-core
development machine) unless ``congestion_control`` names another: it decides how near their floor several flows
sharing a link get (docs/log.md), so the benchmarks print which one ran. ``mtu`` sets the links' MTU
(default 1500, Ethernet's; 9000 is a jumbo-frame cluster's): ``tbf`` counts whole frames, so a TCP payload takes
``(mtu + 14) / (mtu - 52)`` of its floor (1.046 at 1500, 1.007 at 9000) before the ACKs of the traffic coming the
other way share the link. Everything is torn down on exit, on errors and on Ctrl-C/SIGTERM, and stale namespaces
of an earlier crashed run of the same name are removed first.

Workers run through the project's normal launch path: each gets a torchrun-style environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``GROUP_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` = host 0 inside the
cluster), which torch.distributed and Lightning's ``TorchElasticEnvironment`` read as they would under torchrun.

    sudo python benchmarks/cluster.py --hosts 4 --rate 200mbit -- python -m lightning_dpgan fit devices=1 num_nodes=4
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

SUBNET = "10.77.0"
MTU_RANGE = (576, 65535)  # the datagram every IPv4 host must accept (RFC 791) .. the largest a veth carries


def tbf_burst_bytes(bits_per_second: int) -> int:
    """The links' ``tc tbf`` bucket: at least one 4 ms tick of tokens, and a 64 KB GSO packet. The time model counts
    it (``Network.burst_bytes``): after an idle link it passes at once."""
    return max(64 * 1024, bits_per_second // 8 // 250)


def new_figure(**subplots: object) -> tuple[object, object]:
    """A matplotlib figure and its axes, drawn without a display (hosts and CI have none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(**subplots)


def save_figure(fig: object, path: object) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_rate(rate: str | None) -> int | None:
    """``"200mbit"``, ``"10gbit"``, ``"500kbit"`` -> bits per second; ``None``/``"unlimited"`` -> None."""
    if rate is None or rate == "unlimited":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if not match:
        raise ValueError(f"rate must look like 100mbit, 1gbit or 'unlimited', got {rate!r}")
    return int(float(match.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2)])


_IPV4 = "/proc/sys/net/ipv4"


def _sysctl_file(name: str) -> str:
    with open(f"{_IPV4}/{name}") as f:
        return f.read().strip()


def congestion_control_problem(name: str | None) -> str | None:
    """Why hosts cannot run TCP congestion control ``name`` (None: the machine's default), or None if they can."""
    if name is None:
        return None
    known = _sysctl_file("tcp_available_congestion_control").split()
    if name not in known:
        return f"congestion control {name!r} is not in this kernel; allowed: {', '.join(known)}"
    allowed = _sysctl_file("tcp_allowed_congestion_control").split()
    if name not in allowed and name != _sysctl_file("tcp_congestion_control"):
        # a namespace may only pick the allowed ones (or the default it inherits)
        return (f"congestion control {name!r} is not allowed in namespaces here (allowed: {', '.join(allowed)}); "
                f"add it with: sysctl -w net.ipv4.tcp_allowed_congestion_control='{' '.join([*allowed, name])}'")
    return None


def mtu_problem(mtu: object) -> str | None:
    """Why ``mtu`` cannot be the links' MTU, or None if it can."""
    low, high = MTU_RANGE
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not low <= mtu <= high:
        return f"mtu must be an integer in [{low}, {high}] bytes (1500 is Ethernet's, 9000 jumbo frames), got {mtu!r}"
    return None


def available() -> str | None:
    """Why an emulated cluster cannot be built here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs iproute2's {tool!r}"
    probe = subprocess.run(["ip", "netns", "add", f"dpgprobe{os.getpid()}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"dpgprobe{os.getpid()}"], capture_output=True)
    return None


def add_link_arguments(parser: argparse.ArgumentParser) -> None:
    """The hosts' link options every cluster benchmark takes; ``link_options(args)`` hands them to the cluster."""
    parser.add_argument("--congestion-control", default=None, metavar="NAME",
                        help="TCP congestion control of the hosts, e.g. cubic or bbr (default: the machine's; printed)")
    parser.add_argument("--mtu", type=int, default=1500, help="the links' MTU in bytes (default Ethernet's 1500; 9000: jumbo frames)")
    parser.add_argument("--slow-start-after-idle", type=int, choices=(0, 1), default=None,
                        help="the hosts' net.ipv4.tcp_slow_start_after_idle (default: Linux's 1, a connection idle for "
                             "longer than its retransmission timeout starts again from its initial window; 0 keeps it)")


def link_options(args: argparse.Namespace) -> dict[str, object]:
    """``preflight(parser, **link_options(args))``, ``EmulatedCluster(..., **link_options(args))``."""
    return {"congestion_control": args.congestion_control, "mtu": args.mtu, "slow_start_after_idle": args.slow_start_after_idle}


def preflight(parser: argparse.ArgumentParser, congestion_control: str | None = None, mtu: int = 1500,
              slow_start_after_idle: int | None = None) -> None:
    """A benchmark's checks before it builds anything: a congestion control the hosts cannot run or a bad MTU is a
    usage error, a machine without namespaces (no root, no iproute2) ends the run with the reason."""
    problem = congestion_control_problem(congestion_control) or mtu_problem(mtu)
    if problem:
        parser.error(problem)
    reason = available()
    if reason:
        sys.exit(f"error: the emulated cluster {reason}")


def remove_orphans() -> list[str]:
    """Delete the namespaces of default-named clusters (``dpg<pid>-...``) whose process is gone from this PID
    namespace: a run killed with SIGKILL had no chance to tear its cluster down."""
    removed = []
    for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
        owner = re.fullmatch(r"dpg(\d+)-(?:sw|h\d+)", ns)
        if owner and not os.path.exists(f"/proc/{owner.group(1)}"):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            removed.append(ns)
    return removed


CGROUP = Path("/sys/fs/cgroup/cpu")


class CpuQuota:
    """A cgroup (v1 cpu controller) whose quota is ``cores`` CPUs; ``add(pid)`` moves a process into it (the children
    it forks later stay in it): a slow host, or a host held to its fair share of the machine's cores."""

    def __init__(self, name: str, cores: float, period_us: int | None = None) -> None:
        self.path = CGROUP / name
        self.cores = cores
        self.period_us = period_us  # None: the kernel's (100 ms); a short one spreads the quota finely over time

    def __enter__(self) -> CpuQuota:
        if not CGROUP.is_dir():
            raise SystemExit(f"no cgroup v1 cpu controller at {CGROUP}: the benchmark caps a host's CPU with it")
        self.path.mkdir(exist_ok=True)
        if self.period_us is not None:
            (self.path / "cpu.cfs_period_us").write_text(str(self.period_us))
        period = int((self.path / "cpu.cfs_period_us").read_text())
        (self.path / "cpu.cfs_quota_us").write_text(str(max(1000, round(period * self.cores))))
        return self

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def __exit__(self, *exc: object) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():  # leftovers go back to the root group
            try:
                (CGROUP / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # it has exited meanwhile
        self.path.rmdir()


class EmulatedCluster:
    """``with EmulatedCluster(8, "200mbit") as cluster: cluster.run(lambda rank: [...])``."""

    def __init__(self, hosts: int, rate: str | None = "200mbit", name: str | None = None, port: int = 29500,
                 congestion_control: str | None = None, mtu: int = 1500, slow_start_after_idle: int | None = None) -> None:
        if isinstance(hosts, bool) or not isinstance(hosts, int) or not 1 <= hosts <= 200:
            raise ValueError(f"hosts must be an integer in [1, 200], got {hosts!r}")
        problem = mtu_problem(mtu)
        if problem:
            raise ValueError(problem)
        self.mtu = mtu
        problem = congestion_control_problem(congestion_control)
        if problem:
            raise ValueError(problem)
        self.congestion_control_name = congestion_control
        if slow_start_after_idle not in (None, 0, 1):
            raise ValueError(f"slow_start_after_idle must be 0, 1 or None (the machine's), got {slow_start_after_idle!r}")
        self.slow_start_after_idle = slow_start_after_idle
        self.hosts = hosts
        self.rate = rate
        self.bits_per_second = parse_rate(rate)
        self.name = name or f"dpg{os.getpid()}"
        self.port = port
        self._built = False
        self._previous_handlers: dict[int, object] = {}
        self._processes: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ names
    @property
    def switch(self) -> str:
        return f"{self.name}-sw"

    def namespace(self, host: int) -> str:
        return f"{self.name}-h{host}"

    def address(self, host: int) -> str:
        return f"{SUBNET}.{host + 1}"

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> EmulatedCluster:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[sig] = signal.signal(sig, self._interrupted)
        try:
            self.teardown()  # leftovers of a crashed run with this name
            remove_orphans()  # and of runs killed with SIGKILL, which no handler sees
            self._build()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for proc in self._processes:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            self.teardown()
        finally:
            for sig, handler in self._previous_handlers.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
            self._previous_handlers.clear()

    def _interrupted(self, signum: int, frame: FrameType | None) -> None:
        for sig in self._previous_handlers:  # a second signal (a group kill reaches ``timeout`` and this process) must
            signal.signal(sig, signal.SIG_IGN)  # not cut the teardown short: __exit__ puts the handlers back
        raise KeyboardInterrupt(f"signal {signum}")

    def _build(self) -> None:
        self._ip("netns", "add", self.switch)
        self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.switch, "link", "set", "br0", "up")
        for host in range(self.hosts):
            ns = self.namespace(host)
            self._ip("netns", "add", ns)
            self._ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{host}", "netns", self.switch)
            self._ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "mtu", str(self.mtu))
            self._ip("-n", self.switch, "link", "set", f"p{host}", "mtu", str(self.mtu))  # the bridge takes its ports' MTU
            for link in ("lo", "eth0"):
                self._ip("-n", ns, "link", "set", link, "up")
            self._ip("-n", self.switch, "link", "set", f"p{host}", "master", "br0")
            self._ip("-n", self.switch, "link", "set", f"p{host}", "up")
            if self.congestion_control_name is not None:
                self._set_tcp(ns, "tcp_congestion_control", self.congestion_control_name)
            if self.slow_start_after_idle is not None:
                self._set_tcp(ns, "tcp_slow_start_after_idle", str(self.slow_start_after_idle))
            if self.bits_per_second is not None:
                self._limit(ns, "eth0")  # host -> switch
                self._limit(self.switch, f"p{host}")  # switch -> host
        self._built = True

    def _limit(self, namespace: str, device: str) -> None:
        rate = self.bits_per_second
        assert rate is not None
        subprocess.run(
            ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf",
             "rate", f"{rate}bit", "burst", str(tbf_burst_bytes(rate)), "latency", "100ms"],
            check=True, capture_output=True, text=True,
        )

    def _set_tcp(self, namespace: str, name: str, value: str) -> None:
        # /proc/sys/net shows the reading process's namespace; plain sh, as the lent machines have no sysctl
        proc = subprocess.run(["ip", "netns", "exec", namespace, "sh", "-c", f"echo {value} > {_IPV4}/{name}"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"cannot set {name} to {value!r} in {namespace}: {proc.stderr.strip()}")

    def _tcp(self, name: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.namespace(0), "cat", f"{_IPV4}/{name}"],
                              capture_output=True, text=True, check=True).stdout.strip()

    def congestion_control(self) -> str:
        """The TCP congestion control the hosts run (read inside host 0)."""
        return self._tcp("tcp_congestion_control")

    def slow_start_after_idle_setting(self) -> int:
        """The hosts' ``tcp_slow_start_after_idle`` (read inside host 0)."""
        return int(self._tcp("tcp_slow_start_after_idle"))

    def teardown(self) -> None:
        """Delete this cluster's namespaces (their veths and qdiscs go with them); safe to call twice."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        for ns in listed:
            if ns == self.switch or re.fullmatch(re.escape(self.name) + r"-h\d+", ns):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._built = False

    @staticmethod
    def _ip(*args: str) -> None:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")

    # ------------------------------------------------------------------ workers
    def env(self, host: int) -> dict[str, str]:
        """torchrun's environment for the one worker on ``host``."""
        env = dict(os.environ)
        env.update(
            RANK=str(host), WORLD_SIZE=str(self.hosts), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK=str(host),
            NODE_RANK=str(host), MASTER_ADDR=self.address(0), MASTER_PORT=str(self.port),
            GLOO_SOCKET_IFNAME="eth0", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
            TORCHELASTIC_RUN_ID=self.name,
        )
        return env

    def start(self, host: int, command: Sequence[str], **popen: object) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespace(host), *command], env=self.env(host), **popen)  # type: ignore[call-overload]
        self._processes.append(proc)
        return proc

    def run(self, command: Callable[[int], Sequence[str]], timeout: float = 600,
            started: Callable[[int, subprocess.Popen], None] | None = None) -> list[subprocess.CompletedProcess]:
        """Run ``command(host)`` on every host at once; if one fails, stop the others and raise with its output.
        ``started(host, process)`` is called as each starts (to put it in a cgroup, say)."""
        procs = []
        for h in range(self.hosts):
            procs.append(self.start(h, command(h), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            if started is not None:
                started(h, procs[-1])
        results = []
        try:
            for host, proc in enumerate(procs):
                out, err = proc.communicate(timeout=timeout)
                results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
                if proc.returncode != 0:
                    raise RuntimeError(f"host {host} exited {proc.returncode}:\n{err[-4000:]}")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--rate", default="200mbit", help="per link and direction, e.g. 100mbit, 10gbit, or unlimited")
    add_link_arguments(parser)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every host runs")
    args = parser.parse_args()
    command = [c for c in args.command if c != "--"] if args.command and args.command[0] == "--" else args.command
    if not command:
        parser.error("give the command to run on every host after --")
    preflight(parser, **link_options(args))
    with EmulatedCluster(args.hosts, args.rate, **link_options(args)) as cluster:
        for result in cluster.run(lambda host: command, timeout=24 * 3600):
            sys.stdout.write(result.stdout)


if __name__ == "__main__":
    main()
