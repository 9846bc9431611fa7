"""``python -m lightning_dpgan plan hosts=256 bandwidth=1gbit latency_ms=30``: which communication to use, before
any host is rented.

For the configured model (the usual config groups: ``experiment=digits``, ``model=...``) the verb prints, per
setting, the time model's seconds per iteration (:mod:`lightning_dpgan.sim.timing`), the bytes a host sends per
iteration, and how well one iteration mixes: ``ρ(W^t)``, the factor by which the replicas' disagreement shrinks
per iteration (0 for DDP, whose replicas are identical). It starts no workers; the compute time of a step is
``compute_ms=``, or measured here on one process with one thread (:func:`lightning_dpgan.sim.compute.step_seconds`).

The recommendation weighs time per iteration against mixing. Mixing is counted in iterations: how many it takes
until any disagreement between the replicas (the consensus distance, squared) has shrunk ``SHRINK``-fold, worst
case over vectors and starting rounds (the package's ``rho`` of the product of the rounds' matrices; DDP: one).
A setting *mixes enough* if that takes at most ``MIX_WITHIN`` iterations. The recommendation is the fastest
gossip setting that mixes enough, if it is more than ``MARGIN`` times as fast as the faster DDP, else DDP: a
smaller gap is inside the model's checked error, and DDP's replicas are exact. A setting that mixes less trains on
replicas that drift further apart; it may still reach the same quality sooner (on 8 hosts top-1 % CHOCO did,
docs/cluster.md), which the time model cannot tell, so the fastest setting overall is printed beside it. For a
mix every ``H`` steps the iterations are ``H`` times the mixes; CHOCO moves each replica ``γ`` of the way a round
would, so its disagreement shrinks by ``1 − γ(1 − ρ(W))`` a round at best (its compression error left out).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_dpgan.checks import check_int, check_number
from lightning_dpgan.command.errors import UsageError

#: the most hosts the plan computes mixing for (dense products of n x n matrices for every candidate's rho)
MAX_PLAN_HOSTS = 512
#: the plan's own keys on the command line (the rest are Hydra's overrides: the model and dataset)
KEYS = ("hosts", "bandwidth", "latency_ms", "compute_ms", "mtu")
REQUIRED = ("hosts", "bandwidth")
#: a setting mixes enough if any disagreement between the replicas (consensus distance, squared) shrinks this many
#: times within MIX_WITHIN iterations
SHRINK = 100.0
MIX_WITHIN = 10
#: gossip is recommended over DDP only if faster by more than this: the model was checked to within ±15 % on the
#: emulated cluster (docs/scale.md)
MARGIN = 1.15
#: the most gossip rounds the plan looks at for one mix (a ring of 256 hosts would need about 11,500 to mix enough)
MAX_PLAN_ROUNDS = 64
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


@dataclass(frozen=True)
class Request:
    hosts: int
    bandwidth_bps: float
    latency_s: float
    compute_s: float | None
    mtu: int
    bandwidth: str


def parse_bandwidth(text: str) -> float:
    """``"1gbit"``, ``"100mbit"``, ``"2.5gbit"``, ``"500kbit"`` -> bits per second."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)bit", str(text).strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"bandwidth must be a rate such as 100mbit, 1gbit or 10gbit (bits per second, each link and "
                         f"direction), got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def hydra_overrides(overrides: Sequence[str]) -> list[str]:
    """The command line's overrides for Hydra: the plan's keys checked here, then passed on as ``+plan.<key>``."""
    split_arguments(overrides)
    return [f"+plan.{o}" if o.partition("=")[0] in KEYS and "=" in o else o for o in overrides]


def request_from(cfg: Any) -> Request:
    """The plan's keys again, from the configuration Hydra composed (``cfg.plan``)."""
    return split_arguments([f"{key}={value}" for key, value in cfg.plan.items()])[0]


def split_arguments(overrides: Sequence[str]) -> tuple[Request, list[str]]:
    """The plan's keys, checked, and the other overrides for Hydra. Runs before Hydra, torch or the model."""
    given: dict[str, str] = {}
    rest = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key in KEYS:
            given[key] = value
        else:
            rest.append(override)
    missing = [key for key in REQUIRED if key not in given]
    if missing:
        raise UsageError(f"plan needs {' and '.join(f'{k}=...' for k in missing)}; e.g. plan hosts=64 bandwidth=1gbit "
                         "latency_ms=30")
    hosts = _checked(lambda: check_int("hosts", _number(given["hosts"]), 2, MAX_PLAN_HOSTS,
                                       why="the plan multiplies each graph's dense n x n mixing matrices: about a "
                                           "minute at 512 hosts, more than five at 1024"))
    latency_ms = _checked(lambda: check_number("latency_ms", _number(given.get("latency_ms", "0")), 0))
    compute = given.get("compute_ms")
    compute_ms = None if compute is None else _checked(lambda: check_number("compute_ms", _number(compute), 0, low_open=True))
    mtu = _checked(lambda: check_int("mtu", _number(given.get("mtu", "1500")), 576, 65535))
    request = Request(hosts=hosts, bandwidth_bps=parse_bandwidth(given["bandwidth"]), latency_s=latency_ms / 1e3,
                      compute_s=None if compute_ms is None else compute_ms / 1e3, mtu=mtu, bandwidth=given["bandwidth"])
    return request, rest


def _number(text: str) -> Any:
    """An int or float if ``text`` spells one (``inf`` and ``nan`` included, for the checks to refuse), else it."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _checked(check: Any) -> Any:
    try:
        return check()
    except ValueError as err:
        raise UsageError(str(err)) from None


@dataclass(frozen=True)
class Row:
    setting: Any  # lightning_dpgan.sim.timing.Setting
    seconds: float
    bytes_per_host: float
    rho: float  # rho(W^t) of one mix, 0 for DDP
    iterations_to_mix: int | None  # iterations until any disagreement has shrunk SHRINK-fold; None: past the cap

    @property
    def mixes_enough(self) -> bool:
        return self.iterations_to_mix is not None and self.iterations_to_mix <= MIX_WITHIN


def candidates(hosts: int) -> list[Any]:
    """DDP (gloo's ring all-reduce, and halving-doubling: its best case where latency counts) and the gossip
    settings worth comparing: each shipped sparse graph the hosts allow, with a bf16 wire at
    one round and at the fewest rounds that mix enough in one iteration; one-peer in fp32, overlapped and with
    local steps; top-1 % CHOCO on the static graphs."""
    from lightning_dpgan.sim.timing import Setting
    from lightning_dpgan.topology import TopologyError, build_topology

    settings = [Setting.ddp(), Setting.ddp("halving_doubling")]
    for name in ("ring", "torus", "exponential", "one_peer_exponential"):
        try:
            topology = build_topology(name, hosts)
        except TopologyError:  # a torus of a prime number of hosts
            continue
        settings.append(Setting(name, 1, "bf16"))
        rounds = _rounds_to_mix(topology)
        if rounds is not None and rounds > 1:
            settings.append(Setting(name, rounds, "bf16"))
        if name == "one_peer_exponential":
            settings += [Setting(name, 1), Setting(name, 1, "bf16", overlap=True), Setting(name, 1, "bf16", every=4)]
        elif name in ("ring", "exponential"):
            settings.append(Setting(name, 1, compression="topk", topk_fraction=0.01))
    return settings


def _rounds_to_mix(topology: Any) -> int | None:
    """The fewest gossip rounds after which any disagreement has shrunk ``SHRINK``-fold (worst case over vectors
    and starting rounds: the package's ``rho`` of their product), or None past ``MAX_PLAN_ROUNDS``."""
    from lightning_dpgan.topology import TopologyError

    try:
        rounds = topology.rounds_to_shrink(SHRINK, max_rounds=MAX_PLAN_ROUNDS)
    except TopologyError:
        return None
    return rounds if rounds <= MAX_PLAN_ROUNDS else None


def iterations_to_mix(setting: Any, topology: Any) -> int | None:
    """Iterations until any disagreement has shrunk ``SHRINK``-fold: the rounds it takes, ``t`` per mix and a mix
    every ``H`` iterations. CHOCO moves each replica only ``γ`` of the way a round would, so its consensus
    shrinks by ``1 − γ(1 − ρ(W))`` a round at best (its compression error left out)."""
    if setting.compression is not None:
        gamma = setting.options().resolved_consensus_step()
        per_round = 1 - gamma * (1 - topology.rho(1))
        rounds = math.ceil(math.log(SHRINK) / (-2 * math.log(per_round)) - 1e-12) if per_round > 0 else 1
        return rounds * setting.every if rounds <= MAX_PLAN_ROUNDS * MIX_WITHIN else None
    rounds = _rounds_to_mix(topology)
    return None if rounds is None else math.ceil(rounds / setting.rounds) * setting.every


def rows(request: Request, numel: int, step_s: float) -> list[Row]:
    """Every candidate's predicted seconds, bytes and mixing on hosts with a core each."""
    from lightning_dpgan.sim.timing import Network, Workload, bytes_per_iteration, iteration_seconds
    from lightning_dpgan.topology import build_topology

    network = Network(hosts=request.hosts, bandwidth_bps=request.bandwidth_bps, latency_s=request.latency_s, mtu=request.mtu)
    workload = Workload(numel=numel, step_s=step_s)
    out = []
    for setting in candidates(request.hosts):
        if setting.is_ddp:
            rho, iterations = 0.0, 1
        else:
            topology = build_topology(setting.topology, request.hosts)
            rho, iterations = topology.rho(setting.rounds), iterations_to_mix(setting, topology)
        out.append(Row(setting, iteration_seconds(setting, workload, network),
                       bytes_per_iteration(setting, workload, request.hosts), rho, iterations))
    return out


def recommend(table: list[Row]) -> tuple[Row, Row]:
    """The recommended setting: the fastest gossip setting that mixes enough if it is more than ``MARGIN`` times
    the faster DDP's pace, else that DDP (exact, and the model cannot tell a smaller gap from its own error); and
    the fastest setting of all."""
    ddp = min((row for row in table if row.setting.is_ddp), key=lambda row: row.seconds)
    gossip = [row for row in table if row.mixes_enough and not row.setting.is_ddp]
    best = min(gossip, key=lambda row: row.seconds) if gossip else ddp
    enough = best if ddp.seconds > MARGIN * best.seconds else ddp
    return enough, min(table, key=lambda row: row.seconds)


def report(request: Request, numel: int, itemsize: int, step_s: float, measured: bool, table: list[Row]) -> str:
    compute = (f"{1e3 * step_s:.1f} ms a step, measured here (one process, one thread)" if measured
               else f"{1e3 * step_s:.1f} ms a step (compute_ms)")
    lines = [
        f"plan: {request.hosts} hosts, {request.bandwidth} links ({request.bandwidth_bps / 1e9:g} Gbit/s each way), "
        f"latency {1e3 * request.latency_s:g} ms, MTU {request.mtu}; a core per host",
        f"model: {numel:,} parameters ({numel * itemsize / 1e6:.2f} MB); compute {compute}",
        "",
        f"{'setting':<42} {'s/iteration':>12} {'MB/host/it':>11} {'rho(W^t)':>9} {'its to mix':>11} {'s to mix':>10}",
    ]
    ddp = min((row for row in table if row.setting.is_ddp), key=lambda row: row.seconds)
    for row in table:
        its = "> cap" if row.iterations_to_mix is None else str(row.iterations_to_mix)
        to_mix = "" if row.iterations_to_mix is None else f"{row.iterations_to_mix * row.seconds:.4f}"
        lines.append(f"{row.setting.label():<42} {row.seconds:>12.4f} {row.bytes_per_host / 1e6:>11.3f} "
                     f"{row.rho:>9.4f} {its:>11} {to_mix:>10}")
    enough, fastest = recommend(table)
    if enough.setting.is_ddp:
        advice = (f"recommendation: {enough.setting.label()}, {enough.seconds:.4f} s an iteration: no gossip setting "
                  f"that mixes enough is more than {MARGIN:g}x faster (the time model's checked accuracy)")
    else:
        advice = (f"recommendation: {enough.setting.label()}, {enough.seconds:.4f} s an iteration, "
                  f"{ddp.seconds / enough.seconds:.2f}x the pace of the faster DDP: the fastest setting that mixes enough")
    lines += ["", advice]
    if fastest is not enough:
        lines.append(f"fastest: {fastest.setting.label()}, {fastest.seconds:.4f} s an iteration "
                     f"({enough.seconds / fastest.seconds:.2f}x sooner), but it mixes less: it may need more "
                     "iterations to the same quality, which the time model cannot tell")
    lines.append(f"its to mix: iterations until any disagreement between the replicas (squared) has shrunk "
                 f"{SHRINK:g}-fold (DDP: 1; CHOCO: at best); mixes enough: within {MIX_WITHIN}. Bytes: what one "
                 "host sends per iteration, headers included.")
    return "\n".join(lines)


def plan(run: Any) -> None:
    """The verb: the model from the configuration, the compute measured or given, the table and the advice."""
    request: Request = run.plan
    model = run.model
    params = [*model.generator.parameters(), *model.discriminator.parameters()] if hasattr(model, "generator") \
        else list(model.parameters())
    numel = sum(p.numel() for p in params)
    itemsize = params[0].element_size() if params else 4
    measured = request.compute_s is None
    step_s = request.compute_s if request.compute_s is not None else _measure(run)
    print(report(request, numel, itemsize, step_s, measured, rows(request, numel, step_s)))


def _measure(run: Any) -> float:
    import logging

    from lightning_dpgan.sim.compute import step_seconds

    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return step_seconds(run.model, run.datamodule)
    finally:
        quiet.setLevel(level)
