"""The time model (``lightning_dpgan.sim.timing``) against the emulated cluster: predicted and measured iterations
per second, side by side.

    sudo python benchmarks/time_model.py --own-cores --hosts 8 --rates unlimited 200mbit 50mbit 10mbit --probe-steps 20

The workload is ``cluster_bytes.py``'s: the widened digits DCGAN (4.35 MB of fp32 parameters), one worker per
host, the real command line on every host. The runs:

* the compute probe: one step of the configured model timed on one process with one thread and no strategy
  (:func:`lightning_dpgan.sim.compute.step_seconds`), in this process, once (``--compute-again`` repeats it); the
  model's compute for hosts with a core each (the last column);
* per setting on an unlimited link: the compute input on these hosts, which share the machine's cores (every host
  computing and mixing at once, the mix's CPU included); with ``--own-cores`` each host is held to its share by a
  cgroup quota, so that a host waiting on its link leaves its share unused instead of lending it to the others;
  and once without any communication (``--settings no_communication``), DDP's compute: its all-reduce's CPU (its
  unlimited run less that one) runs while its chunks move, so a slower link hides it;
* per rate and setting: ``cluster_bytes.py``'s speed probe (``--probe-steps`` iterations, seconds per iteration
  between its two evaluations, evaluations excluded);
* the prediction: :func:`lightning_dpgan.sim.timing.iteration_seconds` for the same setting, rate and hosts: the
  unlimited run's seconds plus the α–β communication on the cluster's links (tbf framing and bucket, its MTU, no
  latency, which this kernel cannot emulate); for DDP the run without communication plus the longer of the
  all-reduce's transfer and its CPU.

Every run is saved in ``--out/time_model.json`` as it is taken, so the settings can be run in chunks (``--rates``,
``--settings``; ``--congestion-control`` rows are kept apart) and repeated; a cell is its fastest run (the machine
is shared, and others' work only slows a run); the table gives every run's ratio too, in the order they were taken.
``--collect`` prints the table from what is there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import (CpuQuota, EmulatedCluster, add_link_arguments, link_options, parse_rate, preflight,  # noqa: E402
                     tbf_burst_bytes)
from cluster_bytes import SETTINGS as BYTES_SETTINGS  # noqa: E402
from cluster_bytes import setting_of  # noqa: E402
from cluster_train import MODEL, fit, seconds_per_iteration, slug  # noqa: E402

#: the CFS period of ``--own-cores``' quotas: short, so that a host blocked on its link loses its share as it
#: waits (over the kernel's 100 ms a host that spent its quota early would wait for the network for free)
OWN_CORES_PERIOD_US = 4000
CHECKED = ("DDP, all_reduce", "one-peer exponential, bf16", "ring, bf16", "ring, top-1 % CHOCO")
SETTINGS = {name: BYTES_SETTINGS[name] for name in CHECKED}
#: the hosts' step without any communication (on an unlimited link only): what DDP's all-reduce adds to it on an
#: unlimited link is its own CPU, which a slower link spreads over the transfer
NO_COMMUNICATION = "no communication"
MEASURED = {**SETTINGS, NO_COMMUNICATION: ["topology=ring", "strategy.gossip.mixing=false"]}
#: the probes' evaluations are left out of their time; fewer samples make them end sooner
PROBE = ["evaluation.num_samples=256"]


def compose(overrides: list[str]) -> object:
    """The CLI's configuration of the benchmark's model with ``overrides``, as ``fit`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from lightning_dpgan.command.folders import register_resolvers

    register_resolvers()
    with initialize_config_module("lightning_dpgan.conf", version_base="1.3"):
        return hydra_compose("config", overrides=["verb=fit", *MODEL, *overrides])


def compute_probe(steps: int) -> dict[str, float]:
    """One step of the benchmark's model on one process and thread, and its parameter count."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from lightning_dpgan.sim.compute import step_seconds

    cfg = compose([])
    pl.seed_everything(0, verbose=False)
    datamodule, model = instantiate(cfg.dataset, _convert_="all"), instantiate(cfg.model, _convert_="all")
    numel = sum(p.numel() for p in [*model.generator.parameters(), *model.discriminator.parameters()])
    return {"step_s": step_seconds(model, datamodule, steps=steps), "numel": numel}


def fastest(saved: dict, key: str) -> dict | None:
    """The least disturbed of a row's runs: the machine is shared, and others' work only ever slows a run down."""
    runs = saved["measured"].get(key)
    if not runs:
        return None
    return {**min(runs, key=lambda r: r["s_per_it"]), "runs": len(runs)}


def link_variant(congestion: str | None, slow_start_after_idle: int | None) -> str:
    """The key suffix of the link options chosen for a run ('' for the machine's own)."""
    return (f"@{congestion}" if congestion else "") + (f"@ssai{slow_start_after_idle}" if slow_start_after_idle is not None else "")


def variant_words(variant: str) -> str:
    words = {"ssai0": "slow start after idle off", "ssai1": "slow start after idle on"}
    return "".join(f", {words.get(part, f'TCP {part}')}" for part in variant.split("@") if part)


def row_key(rate: str, name: str, variant: str) -> str:
    """A measured row's key: the rate and setting, and the link options where some were chosen (a run on an
    unlimited link is the compute input of every variant's rows)."""
    return f"{rate}/{slug(name)}{variant if rate != 'unlimited' else ''}"


def predict(name: str, rate: str, hosts: int, saved: dict, mtu: int, cores: int) -> float:
    """Predicted seconds per iteration on the emulated cluster: its tbf links (which count the Ethernet header of a
    frame only, and pass their bucket at once after idling) without latency, its hosts sharing ``cores``. A gossip
    setting's compute is its own run on an unlimited link, every host computing and mixing at once on the shared
    cores (its step's work, the mix's CPU included). DDP's is the run without communication, and its all-reduce
    takes at least its own CPU (its run on an unlimited link less that one). Without those runs: the compute probe
    stretched by ``hosts / cores``."""
    from lightning_dpgan.sim.timing import TBF_FRAME_BYTES, Network, iteration_seconds

    bps = parse_rate(rate)
    assert bps is not None
    network = Network(hosts=hosts, bandwidth_bps=bps, latency_s=0.0, mtu=mtu, frame_bytes=TBF_FRAME_BYTES, cores=cores,
                      burst_bytes=tbf_burst_bytes(bps))
    return iteration_seconds(setting_of(SETTINGS[name]), workload(name, saved), network)


def workload(name: str, saved: dict) -> object:
    """The time model's ``Workload`` of a setting on these hosts (see :func:`predict`)."""
    from lightning_dpgan.sim.timing import Workload

    probe, unlimited = saved["compute"], fastest(saved, f"unlimited/{slug(name)}")
    alone = fastest(saved, f"unlimited/{slug(NO_COMMUNICATION)}")
    if setting_of(SETTINGS[name]).is_ddp and unlimited and alone:
        cpu = max(0.0, unlimited["s_per_it"] - alone["s_per_it"])
        return Workload(numel=int(probe["numel"]), step_s=probe["step_s"], shared_step_s=alone["s_per_it"],
                        shared_allreduce_cpu_s=cpu)
    return Workload(numel=int(probe["numel"]), step_s=probe["step_s"], shared_step_s=unlimited["s_per_it"] if unlimited else None)


def compute_input(name: str, saved: dict) -> str:
    """The table's compute column: the runs on an unlimited link that :func:`workload` takes."""
    step = workload(name, saved)
    if step.shared_step_s is None:
        return "(probe × hosts / cores)"
    if step.shared_allreduce_cpu_s is not None:
        return f"{1 / step.shared_step_s:.2f} without communication, all-reduce CPU {1e3 * step.shared_allreduce_cpu_s:.0f} ms"
    return f"{1 / step.shared_step_s:.2f}"


def host_line() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    memory = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
    avx512 = "avx512f" in open("/proc/cpuinfo").read()
    congestion = open("/proc/sys/net/ipv4/tcp_congestion_control").read().strip()
    return (f"{os.cpu_count()}-core {cpu} ({'with' if avx512 else 'without'} AVX-512), {memory:.0f} GiB, "
            f"Linux {platform.release()}, TCP {congestion} (the machine's default)")


def table(saved: dict, hosts: int, cores: int) -> str:
    probe = saved["compute"]
    sharing = (f"{hosts} hosts, each held to {cores}/{hosts} of a core (--own-cores)" if saved.get("own_cores")
               else f"{hosts} hosts sharing {cores} cores")
    lines = [
        f"{sharing}; {saved.get('host', '')}; compute probe {1e3 * probe['step_s']:.1f} ms a "
        f"step (one process, one thread), {probe['numel']:,} parameters",
        "",
        "| rate | setting | compute input: it/s on an unlimited link | predicted it/s | measured it/s (runs) "
        "| predicted ÷ measured | each run | what the emulation cannot show |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    variants = sorted({k[k.index("@"):] for k in saved["measured"] if "@" in k})
    for rate in sorted(saved["rates"], key=parse_rate, reverse=True):
        for name, variant in [(n, "") for n in SETTINGS] + [(n, v) for v in variants for n in SETTINGS]:
            row = fastest(saved, row_key(rate, name, variant))
            if row is None:
                continue
            predicted = predict(name, rate, hosts, saved, row["mtu"], cores)
            ratio = row["s_per_it"] / predicted  # predicted it/s ÷ measured it/s
            each = ", ".join(f"{run['s_per_it'] / predicted:.2f}" for run in saved["measured"][row_key(rate, name, variant)])
            compute = compute_input(name, saved)
            named = name + variant_words(variant)
            lines.append(f"| {rate} | {named} | {compute} | {1 / predicted:.2f} | {1 / row['s_per_it']:.2f} ({row['runs']}) "
                         f"| {ratio:.2f} | {each} | {cannot_show(name, rate, hosts, saved)} |")
    return "\n".join(lines)


def cannot_show(name: str, rate: str, hosts: int, saved: dict) -> str:
    """What the emulation leaves out, in the model's numbers: each host with a core of its own (the compute probe's
    step, no shared cores, Ethernet framing), and the hops that each millisecond of latency would add."""
    from lightning_dpgan.sim.timing import Network, Workload, allreduce_hops, iteration_seconds

    setting = setting_of(SETTINGS[name])
    probe = saved["compute"]
    bps = parse_rate(rate)
    assert bps is not None
    own = iteration_seconds(setting, Workload(numel=int(probe["numel"]), step_s=probe["step_s"]), Network(hosts, bps))
    hops = allreduce_hops(hosts) if setting.is_ddp else setting.rounds
    return f"a core per host: {1 / own:.2f} it/s; latency: +{hops} ms an iteration per ms of α"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--rates", nargs="+", default=["unlimited", "200mbit", "50mbit", "10mbit"],
                        help="unlimited: the settings' compute input (every host computing and mixing on the shared cores)")
    parser.add_argument("--settings", nargs="+", default=None, help="a subset, by slug: " + ", ".join(map(slug, MEASURED)))
    parser.add_argument("--probe-steps", type=int, default=20, help="iterations of each speed probe")
    parser.add_argument("--compute-steps", type=int, default=30, help="steps the compute probe times")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/time_model"))
    parser.add_argument("--compute-again", action="store_true", help="repeat the compute probe (else the saved one is kept)")
    parser.add_argument("--collect", action="store_true", help="only print the table from --out")
    parser.add_argument("--own-cores", action="store_true",
                        help="hold each host to its share of the cores (a cgroup quota renewed every 4 ms): a host "
                             "waiting on its link cannot lend its share to the others, as a real cluster's hosts cannot")
    add_link_arguments(parser)
    args = parser.parse_args()
    path = args.out / "time_model.json"
    saved = json.loads(path.read_text()) if path.is_file() else {"measured": {}, "rates": []}
    saved["measured"] = {k: v if isinstance(v, list) else [v] for k, v in saved["measured"].items()}
    if not args.collect and saved["measured"] and saved.get("own_cores", False) != args.own_cores:
        parser.error(f"{path} holds runs {'with' if saved.get('own_cores') else 'without'} --own-cores: give another --out")
    saved["own_cores"] = saved.get("own_cores", args.own_cores)
    cores = os.cpu_count() or 1
    if not args.collect:
        preflight(parser, **link_options(args))
        for rate in args.rates:
            if rate != "unlimited" and parse_rate(rate) is None:
                parser.error(f"--rates must be limits such as 10mbit, or unlimited, got {rate!r}")
        unknown = sorted(set(args.settings or ()) - {slug(s) for s in MEASURED})
        if unknown:
            parser.error(f"unknown --settings {', '.join(unknown)}; allowed: {', '.join(map(slug, MEASURED))}")
        if "compute" not in saved or args.compute_again:
            saved["compute"] = compute_probe(args.compute_steps)
            saved["host"] = host_line()
        print(f"compute probe: {json.dumps(saved['compute'])}", file=sys.stderr, flush=True)
        chosen = args.settings or [slug(s) for s in MEASURED]
        names = [s for s in MEASURED if slug(s) in chosen]
        runs = [(rate, name, MEASURED[name]) for rate in args.rates for name in names
                if rate == "unlimited" or name != NO_COMMUNICATION]
        for rate, name, overrides in runs:
            run_dir = args.out / slug(name) / rate / time.strftime("%H%M%S")
            with contextlib.ExitStack() as stack:
                share = cores / args.hosts
                quotas = [stack.enter_context(CpuQuota(f"dpgan_time{os.getpid()}_h{h}", share, OWN_CORES_PERIOD_US))
                          for h in range(args.hosts)] if args.own_cores else []
                cluster = stack.enter_context(
                    EmulatedCluster(args.hosts, None if rate == "unlimited" else rate, port=29611, **link_options(args)))
                congestion, slow_start = cluster.congestion_control(), cluster.slow_start_after_idle_setting()
                load = [os.getloadavg()[0]]  # the machine's 1-minute load before and after: others' work shows here
                rows = fit(cluster, overrides + PROBE, run_dir, args.probe_steps, args.probe_steps // 2, args.seed,
                           started=(lambda host, proc: quotas[host].add(proc.pid)) if quotas else None)
            load.append(os.getloadavg()[0])
            measured = {"s_per_it": seconds_per_iteration(rows), "congestion_control": congestion, "mtu": args.mtu,
                        "slow_start_after_idle": slow_start,
                        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": load}
            variant = link_variant(args.congestion_control, args.slow_start_after_idle)
            saved["measured"].setdefault(row_key(rate, name, variant), []).append(measured)
            if rate != "unlimited":
                saved["rates"] = list(dict.fromkeys([*saved["rates"], rate]))
            print(f"{rate} {name}: {1 / measured['s_per_it']:.3f} it/s, load {load}", file=sys.stderr, flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(saved, indent=1))
    if "compute" not in saved:
        sys.exit(f"error: no measurements in {path}: run without --collect first")
    text = table(saved, args.hosts, cores)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "time_model.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
