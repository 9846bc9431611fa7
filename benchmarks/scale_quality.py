"""Grid-25 quality at scale (issue 45, item 3): iterations to 25/25 modes and high-quality % for n replicas on each
topology, run with the package's many-replica simulator, then combined with the time model into time to quality.

    OMP_NUM_THREADS=2 python benchmarks/scale_quality.py run --replicas 8 32 128 512 --hidden 64 --batch 64 \
        --r1 0.5 --hq-step 2000 --out runs/scale_quality_r1.json
    python benchmarks/scale_quality.py report --target 25 --out runs/scale_quality_r1.json --plot docs/scale_quality.png

``run`` trains every (n, topology) with :class:`lightning_dpgan.sim.Simulator` (the package's step, optimizer and
topologies) and evaluates every ``--every`` steps; each result is saved in ``--out`` as soon as it ends, and one
already there is skipped, so the sweep can be run in several short jobs. ``report`` prints the tables from that file
and combines the first iteration at ``--target`` modes with :mod:`lightning_dpgan.sim.timing` (DDP's all-reduce for
``complete``, one fp32 gossip round for the others; the message is the simulated model's parameters) at each
latency and bandwidth; one step's compute is measured once (``sim.compute.step_seconds``) or given (``--step-ms``).

The evaluation is the CLI's default (``evaluation.model=consensus``, ``use_ema``): the replicas' average EMA
generator, scored on ``evaluation_noise(1234, 2500)`` with :func:`lightning_dpgan.metrics.mode_coverage.mode_coverage`.
It is the one model a decentralized run hands back, and the model DDP trains, so the topologies are compared on
the same kind of model.

The model is the CLI's grid MLP (depth 3, latent 16, output scale 4) at a reduced width (for speed at n = 512),
OptimisticAdam with betas (0.5, 0.9), a constant learning rate, non-saturating loss, R1 of weight ``--r1`` (none by
default); docs/scale.md has the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

TOPOLOGIES = ("ring", "exponential", "one_peer_exponential", "complete")
LATENCIES_MS = (0.1, 10.0, 50.0)
BANDWIDTHS = {"10 Gbit/s": 10e9, "1 Gbit/s": 1e9, "100 Mbit/s": 100e6}
EVAL_SEED, EVAL_SAMPLES = 1234, 2500


def build(hidden: int, lr: float, batch: int, r1: float = 0.0) -> tuple[object, object]:
    from lightning_dpgan.data import GaussianMixtureDataModule
    from lightning_dpgan.gan import DPGAN
    from lightning_dpgan.models import MLPDiscriminator, MLPGenerator

    gan = DPGAN(MLPGenerator(latent_dim=16, hidden=hidden, output_scale=4.0), MLPDiscriminator(hidden=hidden),
                lr_g=lr, lr_d=lr, optimizer_kwargs={"betas": (0.5, 0.9)}, r1=r1)
    return gan, GaussianMixtureDataModule("grid", batch_size=batch)


class ConsensusEMA:
    """The EMA of the replicas' average generator, updated after every step as ``DPGAN`` updates ``generator_ema``
    (torch's ``AveragedModel``: the first update copies, then ``ema <- ema + (1 - decay)(z - ema)``). An EMA is
    linear, so this equals the average over replicas of each replica's own EMA: what the CLI's consensus evaluation
    with ``use_ema`` scores. It is evaluation only; training never reads it (the simulator runs no EMA)."""

    def __init__(self, decay: float) -> None:
        self.decay, self.params = decay, None

    def update(self, sim: object) -> None:
        import torch

        with torch.no_grad():
            average = {k.removeprefix("generator."): p.mean(dim=0) for k, p in sim.params.items() if k.startswith("generator.")}
            if self.params is None:
                self.params = average
            else:
                for k, v in average.items():
                    self.params[k].lerp_(v, 1 - self.decay)


def consensus_scores(generator_params: dict, gan: object) -> dict[str, float]:
    """Mode coverage of a generator's parameters, as ``GANEvaluation(model="consensus")`` scores the average model."""
    import torch
    from torch.func import functional_call

    from lightning_dpgan.data.gaussians import mixture_modes
    from lightning_dpgan.evaluation import evaluation_noise
    from lightning_dpgan.metrics.mode_coverage import mode_coverage

    average = generator_params
    noise = evaluation_noise(EVAL_SEED, EVAL_SAMPLES, gan.latent_dim)
    with torch.no_grad():
        samples = functional_call(gan.generator, average, (noise,)).float()
    if not torch.isfinite(samples).all():
        return {"modes": 0, "high_quality": float("nan")}
    scores = mode_coverage(samples, *mixture_modes("grid"))
    return {"modes": int(scores["modes"]), "high_quality": float(scores["high_quality"])}


def run_one(n: int, topology: str, args: argparse.Namespace) -> dict:
    import lightning.pytorch as pl

    from lightning_dpgan.sim import Simulator

    pl.seed_everything(args.seed, verbose=False)
    gan, datamodule = build(args.hidden, args.lr, args.batch, args.r1)
    # a complete graph is one dense W = 11^T/n; a sparse product of it would hold n² entries
    mixing = "dense" if topology == "complete" or n <= 64 else "sparse"
    sim = Simulator(gan, datamodule, n, topology, rounds=1, seed=args.seed, mixing=mixing, streams=args.streams)
    curve, first, started = [], None, time.perf_counter()
    ema = ConsensusEMA(args.ema)
    while sim.steps < args.steps:
        for _ in range(args.every):
            sim.step()
            ema.update(sim)
        scores = consensus_scores(ema.params, gan)
        curve.append({"step": sim.steps, **scores})
        if first is None and scores["modes"] == 25:
            first = sim.steps
        if first is not None and not args.full and sim.steps >= args.hq_step:  # both numbers known: stop
            break
    at_hq = next((c for c in curve if c["step"] == args.hq_step), None)
    return {"n": n, "topology": topology, "first_25": first, "budget": args.steps, "every": args.every,
            "hq_step": args.hq_step, "hq_at_step": at_hq["high_quality"] if at_hq else None,
            "modes_at_step": at_hq["modes"] if at_hq else None, "seconds": time.perf_counter() - started,
            "steps_run": sim.steps, "params": sum(p[0].numel() for p in sim.params.values()), "mixing": mixing,
            "curve": curve}


def config_of(args: argparse.Namespace) -> dict:
    return {"hidden": args.hidden, "lr": args.lr, "batch": args.batch, "seed": args.seed, "streams": args.streams,
            "every": args.every, "hq_step": args.hq_step, "ema": args.ema, **({"r1": args.r1} if args.r1 else {})}


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def run(args: argparse.Namespace) -> None:
    import torch

    path = Path(args.out)
    saved = load(path)
    saved.setdefault("config", config_of(args))
    if saved["config"] != config_of(args):
        raise SystemExit(f"{path} holds runs of another configuration {saved['config']}; use another --out")
    saved["host"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    for n in args.replicas:
        for topology in args.topologies:
            key = f"{n}/{topology}"
            if key in saved["runs"]:
                continue
            r = run_one(n, topology, args)
            saved["runs"][key] = r
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(saved, indent=1))
            print(f"n={n} {topology}: 25/25 at {r['first_25']} (budget {r['steps_run']}), HQ at {args.hq_step}: "
                  f"{r['hq_at_step']}, {r['seconds']:.0f} s", flush=True)


def compute_probe(args: argparse.Namespace, saved: dict) -> dict:
    """One step of the simulated model on one process and thread (``sim.compute.step_seconds``), saved once."""
    if "compute" not in saved:
        import lightning.pytorch as pl

        from lightning_dpgan.sim.compute import step_seconds

        pl.seed_everything(0, verbose=False)
        gan, datamodule = build(saved["config"]["hidden"], saved["config"]["lr"], saved["config"]["batch"], saved["config"].get("r1", 0.0))
        numel = sum(p.numel() for p in gan.parameters())
        saved["compute"] = {"step_s": step_seconds(gan, datamodule, steps=args.probe_steps), "numel": numel}
        Path(args.out).write_text(json.dumps(saved, indent=1))
    return saved["compute"]


def seconds_per_iteration(topology: str, n: int, numel: int, step_s: float, latency_s: float, bps: float) -> float:
    """The time model's seconds of one iteration: ``complete`` is DDP (gloo's ring all-reduce; ``complete-hd``
    halving-doubling, DDP's best case where latency counts), any other topology one fp32 gossip round."""
    from lightning_dpgan.sim.timing import Network, Setting, Workload, iteration_seconds

    if topology.startswith("complete"):
        setting = Setting.ddp("halving_doubling" if topology == "complete-hd" else "ring")
    else:
        setting = Setting(topology=topology, rounds=1)
    return iteration_seconds(setting, Workload(numel=numel, step_s=step_s), Network(hosts=n, bandwidth_bps=bps, latency_s=latency_s))


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s" if seconds >= 1 else f"{1e3 * seconds:.0f} ms"


def report(args: argparse.Namespace) -> None:
    saved = load(Path(args.out))
    runs, cfg = saved["runs"], saved["config"]
    ns = sorted({r["n"] for r in runs.values()})
    tops = [t for t in TOPOLOGIES if any(r["topology"] == t for r in runs.values())]
    get = lambda n, t: runs.get(f"{n}/{t}")  # noqa: E731

    def cell_iters(r: dict | None) -> str:
        if r is None:
            return "not run"
        return str(r["first_25"]) if r["first_25"] is not None else f"not reached within {r['steps_run']}"

    print(f"# width {cfg['hidden']}, batch {cfg['batch']}/worker, lr {cfg['lr']}, seed {cfg['seed']}, "
          f"evaluated every {cfg['every']} steps; {saved.get('host', '')}\n")
    print("Iterations to 25/25 modes (consensus generator)\n")
    print("| n | " + " | ".join(tops) + " |\n|---|" + "---:|" * len(tops))
    for n in ns:
        print(f"| {n} | " + " | ".join(cell_iters(get(n, t)) for t in tops) + " |")
    print(f"\nMost modes at any evaluation within the budget (first iteration at ≥ {args.partial}/25)\n")
    print("| n | " + " | ".join(tops) + " |\n|---|" + "---:|" * len(tops))
    for n in ns:
        cells = []
        for t in tops:
            r = get(n, t)
            if r is None:
                cells.append("not run")
                continue
            most = max(c["modes"] for c in r["curve"])
            first = next((c["step"] for c in r["curve"] if c["modes"] >= args.partial), None)
            cells.append(f"{most} ({first if first is not None else '> ' + str(r['steps_run'])})")
        print(f"| {n} | " + " | ".join(cells) + " |")
    last = max(r["budget"] for r in runs.values())
    print(f"\nHigh-quality samples at iteration {cfg['hq_step']} / at {last} (modes covered); a run stopped at 25/25 shows '–' at {last}\n")
    print("| n | " + " | ".join(tops) + " |\n|---|" + "---:|" * len(tops))

    def at(r: dict, step: int) -> str:
        c = next((c for c in r["curve"] if c["step"] == step), None)
        return "–" if c is None else f"{100 * c['high_quality']:.1f} % ({c['modes']})"

    for n in ns:
        cells = []
        for t in tops:
            r = get(n, t)
            cells.append("not run" if r is None else f"{at(r, cfg['hq_step'])} / {at(r, last)}")
        print(f"| {n} | " + " | ".join(cells) + " |")

    probe = compute_probe(args, saved) if args.step_ms is None else {"step_s": args.step_ms / 1e3, "numel": next(iter(runs.values()))["params"]}
    step_s, numel = probe["step_s"], probe["numel"]
    print(f"\nTime to {args.target}/25 modes: iterations × the time model's seconds per iteration; compute {1e3 * step_s:.2f} ms a step "
          f"({'given' if args.step_ms is not None else 'measured, one process, one thread'}), {numel:,} parameters ({4 * numel / 1e3:.1f} kB fp32); DDP = ring all-reduce "
          f"for complete, one fp32 gossip round for the others; best gossip ÷ DDP\n")
    columns = [*tops, "complete-hd"] if "complete" in tops else tops
    names = {"complete": "DDP, ring all-reduce", "complete-hd": "DDP, halving-doubling"}
    print("| α | bandwidth | n | " + " | ".join(names.get(t, t) for t in columns)
          + " | DDP (ring) ÷ best gossip | DDP (h-d) ÷ best gossip |\n|---|---|---|" + "---:|" * (len(columns) + 2))
    rows = []
    for latency_ms in LATENCIES_MS:
        for bw_name, bps in BANDWIDTHS.items():
            for n in ns:
                times = {}
                for t in columns:
                    r = get(n, "complete" if t == "complete-hd" else t)
                    first = None if r is None else next((c["step"] for c in r["curve"] if c["modes"] >= args.target), None)
                    if first is not None:
                        times[t] = first * seconds_per_iteration(t, n, numel, step_s, latency_ms / 1e3, bps)
                gossip = {t: s for t, s in times.items() if not t.startswith("complete")}
                best = min(gossip, key=gossip.get) if gossip else None
                ratios = [times[d] / gossip[best] if best and d in times else None for d in ("complete", "complete-hd")]
                rows.append({"latency_ms": latency_ms, "bandwidth": bw_name, "n": n, "times": times, "best": best,
                             "ratio": ratios[0], "ratio_hd": ratios[1]})
                print(f"| {latency_ms:g} ms | {bw_name} | {n} | " + " | ".join(fmt_s(times.get(t)) for t in columns)
                      + "".join(f" | {f'{x:.2f}× ({best})' if x else '–'}" for x in ratios) + " |")
    saved[f"time_to_{args.target}_modes"] = rows
    Path(args.out).write_text(json.dumps(saved, indent=1))
    if args.plot:
        plot(rows, columns, ns, args.plot, args.target)


def plot(rows: list[dict], tops: list[str], ns: list[int], path: str, target: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(LATENCIES_MS), len(BANDWIDTHS), figsize=(12, 10), sharex=True, sharey=True)
    for i, latency_ms in enumerate(LATENCIES_MS):
        for j, bw in enumerate(BANDWIDTHS):
            ax = axes[i][j]
            for t in tops:
                points = [(r["n"], r["times"][t]) for r in rows
                          if r["latency_ms"] == latency_ms and r["bandwidth"] == bw and t in r["times"]]
                if points:
                    ax.plot(*zip(*points), marker="o", label={"complete": "DDP (complete), ring all-reduce",
                                                              "complete-hd": "DDP (complete), halving-doubling"}.get(t, t),
                            linestyle="--" if t.startswith("complete") else "-")
            ax.set(xscale="log", yscale="log", title=f"α = {latency_ms:g} ms, {bw}")
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.grid(True, which="major", alpha=0.3)
            if i == len(LATENCIES_MS) - 1:
                ax.set_xlabel("replicas n")
            if j == 0:
                ax.set_ylabel(f"seconds to {target}/25 modes")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"grid-25: predicted time to {target}/25 modes (simulated iterations × time model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("verb", choices=["run", "report"])
    parser.add_argument("--replicas", type=int, nargs="+", default=[8, 32, 128, 512])
    parser.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES), choices=TOPOLOGIES)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="per worker (per replica)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--r1", type=float, default=0.0, help="the R1 penalty's weight γ on D (the CLI's grid job: 0.5)")
    parser.add_argument("--ema", type=float, default=0.99, help="the evaluated generator's EMA decay (the CLI's model.ema_decay)")
    parser.add_argument("--streams", default="exact", choices=["exact", "fast"])
    parser.add_argument("--steps", type=int, default=3000, help="the budget: at most this many iterations a run")
    parser.add_argument("--every", type=int, default=100, help="evaluate every this many iterations")
    parser.add_argument("--hq-step", type=int, default=1000, help="the fixed iteration count of the HQ % table")
    parser.add_argument("--full", action="store_true", help="run the whole budget, not stop once 25/25 and --hq-step are reached")
    parser.add_argument("--out", default="runs/scale_quality.json")
    parser.add_argument("--probe-steps", type=int, default=50)
    parser.add_argument("--step-ms", type=float, default=None, help="report: one step's compute, given (default: measured once and saved)")
    parser.add_argument("--partial", type=int, default=20, help="report: also the first iteration at this many modes")
    parser.add_argument("--target", type=int, default=25, help="report: the modes the time-to-quality table counts to")
    parser.add_argument("--plot", default=None, help="write the time-to-quality plot here (report)")
    args = parser.parse_args()
    if args.hq_step % args.every:
        parser.error("--hq-step must be a multiple of --every")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    (run if args.verb == "run" else report)(args)


if __name__ == "__main__":
    main()
