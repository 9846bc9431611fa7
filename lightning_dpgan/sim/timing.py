"""Seconds per iteration of DDP and of each gossip setting, from the network, the message bytes and the compute.

An α–β model, one message per hop: a hop takes ``α + bytes / β``, with ``α`` the link's latency and ``β`` its rate,
and the bytes are what a host's link carries, its frames' headers included. What each setting sends:

* **DDP** (a ring all-reduce of the fp32 gradients, gloo's algorithm): ``2(n − 1)`` hops one after another, each
  moving ``1/n`` of the gradients over every link at once, so ``2(n − 1) α`` plus ``2(n − 1)/n`` of the gradients
  through each host's link. ``allreduce="halving_doubling"`` is DDP's best case on a link with latency: the same
  bytes in ``2 ⌈log2 n⌉`` hops. The gradients are reduced in buckets as the backward
  pass produces them (25 MB each, torch's default): all but the last bucket's all-reduce can hide behind the
  backward pass, the last one cannot.
* **Gossip**: ``t`` rounds per mix, one hop each. In a round a host sends one message to each out-neighbour and
  receives one from each in-neighbour over a full-duplex link, so the round takes ``α`` plus the larger of the two
  directions' bytes over ``β``; the busiest host of the round sets its pace (every host waits for its
  neighbours). The message is the tensors in the wire dtype, or CHOCO's compressed difference, plus the 64-byte
  header (:func:`lightning_dpgan.gossip.buffers.mix_message_bytes`, as the engines size them). A complete graph
  mixes with one all-reduce, DDP's cost. With ``gossip_every = H`` one iteration in ``H`` mixes.
* **Overlap and staleness** leave a mix on the wire while the next steps compute: communication hides behind up
  to the compute time, and an iteration takes the longer of the two (a host's link must still carry every mix).

The frames: a TCP segment carries ``mtu − 52`` bytes (IP and TCP headers with timestamps) in ``mtu + frame``
bytes on the link, ``frame`` being 38 on Ethernet (header, checksum, preamble, gap) and 14 under ``tc tbf``,
which counts the Ethernet header only.

Compute: one step's seconds on one core, measured (:func:`lightning_dpgan.sim.compute.step_seconds`) or given.
On the emulated cluster the hosts share the machine's ``cores``: a step then takes ``shared_step_s``, measured
where they share them (each gossip setting's run on an unlimited link, its mix's CPU included, which comes before
and after its transfer), or ``step_s`` stretched by ``hosts / cores``. DDP's all-reduce does its CPU work (the
reductions and copies of its chunks) while the chunks move: its ``shared_step_s`` is the hosts' step without
communication, and the all-reduce takes the longer of its transfer and ``shared_allreduce_cpu_s``.

A shaped link (``tc tbf``, the emulated cluster's) is a token bucket: while the host computes its link idles and
the bucket fills at the link's rate, up to ``burst_bytes``, and the next transfer's first bytes pass at once. A link
kept busy by overlap never fills it.

Not modelled: TCP's congestion control leaving a shaped link short of its rate with several flows (bbr;
docs/wire.md), a transfer hidden behind other hosts' compute on shared cores, the CPU of casting and combining on
hosts with a core each, stragglers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from lightning_dpgan.checks import check_choice, check_int, check_number
from lightning_dpgan.topology import Topology, build_topology

#: bytes of IPv4 and TCP headers (with the timestamp option Linux sends) in every segment
TCP_IP_HEADER_BYTES = 52
#: bytes per frame on an Ethernet link beyond the IP packet: header 14, checksum 4, preamble 8, inter-frame gap 12
ETHERNET_FRAME_BYTES = 38
#: what ``tc tbf`` counts per frame beyond the IP packet: the Ethernet header only
TBF_FRAME_BYTES = 14
#: torch DDP's default bucket (``bucket_cap_mb=25``): gradients are all-reduced in pieces of this size
DDP_BUCKET_BYTES = 25 * 2**20
#: the backward pass's share of a training step (forward and backward of both players, about 1 : 2), the part a
#: DDP bucket's all-reduce can hide behind
BACKWARD_SHARE = 2 / 3
ALLREDUCES = ("ring", "halving_doubling")


@dataclass(frozen=True)
class Network:
    """The hosts and their links.

    Args:
        hosts: ``n``, one worker per host.
        bandwidth_bps: ``β``, each link's rate in bits per second, each direction (full duplex).
        latency_s: ``α``, seconds a message takes to start arriving (one hop).
        mtu: the links' MTU in bytes.
        frame_bytes: bytes each frame takes on the link beyond its IP packet (``ETHERNET_FRAME_BYTES``, or
            ``TBF_FRAME_BYTES`` for the emulated cluster's shaped links).
        cores: cores all hosts share (the emulated cluster: the machine's); ``None``: each host has its own.
        burst_bytes: a shaped link's bucket, in bytes on the wire (frames as ``frame_bytes`` counts them), each
            direction; 0: a link that carries its rate and no more.
    """

    hosts: int
    bandwidth_bps: float
    latency_s: float = 0.0
    mtu: int = 1500
    frame_bytes: int = ETHERNET_FRAME_BYTES
    cores: int | None = None
    burst_bytes: int = 0

    def __post_init__(self) -> None:
        check_int("hosts", self.hosts, 1)
        check_number("bandwidth (bits per second)", self.bandwidth_bps, 0, low_open=True)
        check_number("latency (seconds)", self.latency_s, 0)
        check_int("mtu", self.mtu, TCP_IP_HEADER_BYTES + 1)
        check_int("frame_bytes", self.frame_bytes, 0)
        if self.cores is not None:
            check_int("cores", self.cores, 1)
        check_int("burst_bytes", self.burst_bytes, 0)

    @property
    def wire_factor(self) -> float:
        """Bytes on the link per byte of payload: each segment's headers and frame."""
        return (self.mtu + self.frame_bytes) / (self.mtu - TCP_IP_HEADER_BYTES)

    def link_seconds(self, payload_bytes: float) -> float:
        """Seconds a link takes to carry ``payload_bytes`` of TCP payload (no latency)."""
        return payload_bytes * self.wire_factor * 8 / self.bandwidth_bps

    def burst_seconds(self, payload_bytes: float, idle_s: float) -> float:
        """Seconds of :meth:`link_seconds` that a shaped link's bucket saves ``payload_bytes`` sent after ``idle_s``
        idle: the bucket refilled at the link's rate, up to ``burst_bytes``, and what it holds passes at once."""
        held = min(self.burst_bytes, max(0.0, idle_s) * self.bandwidth_bps / 8, payload_bytes * self.wire_factor)
        return held * 8 / self.bandwidth_bps


@dataclass(frozen=True)
class Workload:
    """The model and its step.

    Args:
        numel: parameters mixed (both players), of ``itemsize`` bytes each.
        step_s: one step's compute in seconds on a host with a core to itself (a core per host).
        shared_step_s: one step's compute while every host computes at once on cores they share (the emulated
            cluster); ``None``: ``step_s`` stretched by ``hosts / cores``. Measure it where the hosts really share
            cores: their processes also contend for caches and memory, which the stretch alone leaves out.
        shared_allreduce_cpu_s: on shared cores, the CPU seconds of DDP's all-reduce on each host (DDP's run on an
            unlimited link less the same hosts' run without communication, which is then ``shared_step_s``). Its
            reductions and copies run while its chunks move, so the all-reduce takes the longer of the two.
    """

    numel: int
    step_s: float
    itemsize: int = 4
    shared_step_s: float | None = None
    shared_allreduce_cpu_s: float | None = None

    def __post_init__(self) -> None:
        check_int("numel (parameters)", self.numel, 1)
        check_number("step_s (seconds of compute per step)", self.step_s, 0)
        check_choice("itemsize", self.itemsize, (2, 4, 8))
        if self.shared_step_s is not None:
            check_number("shared_step_s (seconds of compute per step on shared cores)", self.shared_step_s, 0)
        if self.shared_allreduce_cpu_s is not None:
            check_number("shared_allreduce_cpu_s (CPU seconds of an all-reduce on shared cores)", self.shared_allreduce_cpu_s, 0)

    @property
    def gradient_bytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class Setting:
    """One way of communicating: DDP (``topology=None``) or gossip with the CLI's options."""

    topology: str | None = "ring"
    rounds: int = 1
    wire_dtype: str | None = None
    compression: str | None = None
    topk_fraction: float = 0.01
    overlap: bool = False
    staleness: int = 0
    every: int = 1
    #: DDP's all-reduce: ``"ring"`` (gloo's; ``2(n − 1)`` hops) or ``"halving_doubling"`` (``2 ⌈log2 n⌉`` hops,
    #: the same bytes: the fewest hops a bandwidth-optimal all-reduce takes, DDP's best case on a slow-starting link)
    allreduce: str = "ring"

    @classmethod
    def ddp(cls, allreduce: str = "ring") -> Setting:
        check_choice("allreduce", allreduce, ALLREDUCES)
        return cls(topology=None, allreduce=allreduce)

    @property
    def is_ddp(self) -> bool:
        return self.topology is None

    def options(self) -> object:
        """The :class:`~lightning_dpgan.gossip.GossipOptions` of this setting: checked as a run would check them."""
        from lightning_dpgan.gossip.options import GossipOptions

        return GossipOptions(rounds=self.rounds, wire_dtype=self.wire_dtype, compression=self.compression,
                             topk_fraction=self.topk_fraction, overlap=self.overlap, staleness=self.staleness,
                             every=self.every)

    def label(self) -> str:
        if self.is_ddp:
            return f"DDP ({self.allreduce.replace('_', '-')} all-reduce)"
        parts = [str(self.topology), f"t={self.rounds}"]
        if self.compression:
            parts.append(f"{self.compression}" + (f" {self.topk_fraction:.0%}" if self.compression == "topk" else "") + " CHOCO")
        elif self.wire_dtype:
            parts.append(self.wire_dtype)
        parts += [p for p, on in (("overlap", self.overlap), (f"staleness {self.staleness}", self.staleness),
                                  (f"H={self.every}", self.every > 1)) if on]
        return ", ".join(parts)


@lru_cache(maxsize=32)
def _topology(name: str, hosts: int) -> Topology:
    return build_topology(name, hosts)


def round_degrees(name: str, hosts: int) -> tuple[int, ...]:
    """Per round of the topology's period, the most messages any host sends or receives (its busier direction)."""
    degrees = []
    for w in _topology(name, hosts).matrices:
        links = w > 0
        links[range(hosts), range(hosts)] = False
        degrees.append(int(max(links.sum(axis=0).max(), links.sum(axis=1).max())) if hosts > 1 else 0)
    return tuple(degrees)


def message_bytes(setting: Setting, workload: Workload) -> int:
    """One gossip message (header included), as the engines size it."""
    import torch

    from lightning_dpgan.gossip.buffers import mix_message_bytes

    dtype = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[workload.itemsize]
    return mix_message_bytes(workload.numel, dtype, setting.wire_dtype, setting.compression, setting.topk_fraction)


def allreduce_bytes(workload: Workload, hosts: int) -> float:
    """What each host sends in a ring all-reduce of the gradients: ``2(n − 1)/n`` of them."""
    return 2 * (hosts - 1) / hosts * workload.gradient_bytes


def allreduce_hops(hosts: int, algorithm: str = "ring") -> int:
    """Sequential hops of an all-reduce: a ring's ``2(n − 1)`` (reduce-scatter, then all-gather, a ``1/n`` piece
    per hop), or recursive halving then doubling's ``2 ⌈log2 n⌉`` (pieces halving, then doubling)."""
    if hosts == 1:
        return 0
    return 2 * (hosts - 1) if algorithm == "ring" else 2 * math.ceil(math.log2(hosts))


def allreduce_seconds(workload: Workload, network: Network, payload_bytes: float | None = None,
                      algorithm: str = "ring") -> float:
    """An all-reduce: its hops of ``α``, and ``2(n − 1)/n`` of the data through each host's link (both algorithms
    move the same bytes)."""
    n = network.hosts
    if n == 1:
        return 0.0
    data = workload.gradient_bytes if payload_bytes is None else payload_bytes
    return allreduce_hops(n, algorithm) * network.latency_s + network.link_seconds(2 * (n - 1) / n * data)


def bytes_per_iteration(setting: Setting, workload: Workload, hosts: int) -> float:
    """What one host sends per iteration, averaged over the mixes' rounds and the steps between mixes."""
    if hosts == 1:
        return 0.0
    if setting.is_ddp or _topology(str(setting.topology), hosts).is_complete:
        return allreduce_bytes(workload, hosts)
    sends = _mean_over_rounds(setting, hosts, [_out_degree(w) for w in _topology(str(setting.topology), hosts).matrices])
    return sends * message_bytes(setting, workload) / setting.every


def _out_degree(w: object) -> int:
    links = w > 0  # type: ignore[operator]
    n = links.shape[0]
    links[range(n), range(n)] = False
    return int(links.sum(axis=0).max())


def _mean_over_rounds(setting: Setting, hosts: int, per_phase: list[int] | tuple[int, ...]) -> float:
    """The sum over one mix's ``t`` rounds of a per-phase quantity, averaged over the phases a mix can start at
    (the rounds are counted from the first step and never reset, so every phase comes up)."""
    period = len(per_phase)
    return sum(per_phase[(start + r) % period] for start in range(period) for r in range(setting.rounds)) / period


def communication_seconds(setting: Setting, workload: Workload, network: Network) -> float:
    """Seconds one iteration spends communicating, on average, if nothing of it is hidden."""
    n = network.hosts
    if n == 1:
        return 0.0
    if setting.is_ddp or _topology(str(setting.topology), n).is_complete:
        return allreduce_seconds(workload, network, algorithm=setting.allreduce) / (1 if setting.is_ddp else setting.every)
    rounds = setting.rounds * network.latency_s + network.link_seconds(_rounds_payload(setting, workload, n))
    return rounds / setting.every


def _rounds_payload(setting: Setting, workload: Workload, hosts: int) -> float:
    """The payload one mix's ``t`` rounds put through the busiest host's link (its busier direction)."""
    return _mean_over_rounds(setting, hosts, round_degrees(str(setting.topology), hosts)) * message_bytes(setting, workload)


def compute_seconds(workload: Workload, network: Network) -> float:
    """One step's compute when every host computes at once: ``step_s`` with a core per host; on ``cores`` shared
    by more hosts, ``shared_step_s`` (each gets ``cores / hosts`` of a core, and less of the caches)."""
    if network.cores is None or network.cores >= network.hosts:
        return workload.step_s
    if workload.shared_step_s is not None:
        return workload.shared_step_s
    return workload.step_s * network.hosts / network.cores


def iteration_seconds(setting: Setting, workload: Workload, network: Network) -> float:
    """Predicted seconds of one iteration: a host computes, then communicates (DDP: the all-reduce, less the buckets
    hidden behind its backward pass; gossip: ``t`` rounds); overlap and staleness hide the communication behind up
    to the compute. On shared cores the compute is :func:`compute_seconds`: a synchronous mix ends at about the same
    moment on neighbouring hosts, so they compute at the same time, on the same cores; DDP's all-reduce takes at
    least its CPU (``shared_allreduce_cpu_s``). A shaped link's bucket,
    filled while the link idled, passes the start of the communication at once."""
    compute = compute_seconds(workload, network)
    communication = communication_seconds(setting, workload, network)
    n = network.hosts
    if n == 1:
        return compute
    if setting.is_ddp:
        hidden = ddp_hidden_seconds(workload, network, compute, communication, setting.allreduce)
        # the link idles for the compute less the hidden buckets' all-reduce
        exposed = 2 * (n - 1) / n * _last_bucket_bytes(workload)
        transfer = communication - hidden - network.burst_seconds(exposed, compute - hidden)
        return compute + max(transfer, _exposed_allreduce_cpu(workload, network))
    if setting.overlap or setting.staleness:
        return max(compute, communication)
    if _topology(str(setting.topology), n).is_complete:
        payload = allreduce_bytes(workload, n)
    else:
        payload = _rounds_payload(setting, workload, n)
    # a mix every H steps: the link idles for H steps' compute, and the saving counts once in H iterations
    return compute + communication - network.burst_seconds(payload, setting.every * compute) / setting.every


def ddp_hidden_seconds(workload: Workload, network: Network, compute: float, communication: float,
                       algorithm: str = "ring") -> float:
    """The part of DDP's all-reduce that runs during the backward pass: every bucket's but the last one's, at most
    the backward pass's time."""
    exposed = allreduce_seconds(workload, network, payload_bytes=_last_bucket_bytes(workload), algorithm=algorithm)
    return max(0.0, min(communication - exposed, BACKWARD_SHARE * compute))


def _exposed_allreduce_cpu(workload: Workload, network: Network) -> float:
    """On shared cores, the CPU of the last bucket's all-reduce (the others' hides with their transfer)."""
    if workload.shared_allreduce_cpu_s is None or network.cores is None or network.cores >= network.hosts:
        return 0.0
    return workload.shared_allreduce_cpu_s * _last_bucket_bytes(workload) / workload.gradient_bytes


def _last_bucket_bytes(workload: Workload) -> int:
    """The gradients' last DDP bucket, the one whose all-reduce starts after the backward pass."""
    gradient = workload.gradient_bytes
    return gradient - (max(0, -(-gradient // DDP_BUCKET_BYTES) - 1)) * DDP_BUCKET_BYTES
