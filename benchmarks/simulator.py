"""How fast the many-replica simulator steps: grid-25, n replicas in one process (issue 45, item 1).

    OMP_NUM_THREADS=2 python benchmarks/simulator.py --replicas 512 --hidden 32 128 --batch 16 64

Prints one row per (hidden, batch, streams): steps per second over ``--steps`` steps after ``--warmup``, and the
milliseconds of a step spent in the gradients (vmap), the optimizer with its mix, and drawing the batches. The model
is the CLI's grid model (MLPs, depth 3, latent 16, output scale 4) at the given width; OptimisticAdam; ring, t = 1;
sparse ``W^t``. ``batch`` is the per-worker (per-replica) batch.
"""

from __future__ import annotations

import argparse
import platform
import time

import lightning.pytorch as pl
import torch

from lightning_dpgan.data import GaussianMixtureDataModule
from lightning_dpgan.gan import DPGAN
from lightning_dpgan.models import MLPDiscriminator, MLPGenerator
from lightning_dpgan.sim import Simulator


def measure(n: int, hidden: int, batch: int, streams: str, topology: str, rounds: int, mixing: str, steps: int, warmup: int) -> dict:
    pl.seed_everything(0, verbose=False)
    gan = DPGAN(MLPGenerator(latent_dim=16, hidden=hidden, output_scale=4.0), MLPDiscriminator(hidden=hidden),
                lr_g=1.5e-3, lr_d=1.5e-3, optimizer_kwargs={"betas": (0.5, 0.9)})
    sim = Simulator(gan, GaussianMixtureDataModule("grid", batch_size=batch), n, topology, rounds=rounds, mixing=mixing, streams=streams)
    sim.run(warmup)
    parts = {"batches": 0.0, "grads": 0.0, "optimizer+mix": 0.0}
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        real, noise = sim._next_batches()
        t1 = time.perf_counter()
        grads = sim._grad(sim.params, real, noise)
        t2 = time.perf_counter()
        for name in sim._names:
            sim.params[name].grad = grads[name]
        sim.optimizer.step()
        sim.steps += 1
        t3 = time.perf_counter()
        parts["batches"] += t1 - t0
        parts["grads"] += t2 - t1
        parts["optimizer+mix"] += t3 - t2
    elapsed = time.perf_counter() - start
    params = sum(p[0].numel() for p in sim.params.values())
    return {"n": n, "hidden": hidden, "params": params, "batch": batch, "streams": streams, "mixing": sim.mixing,
            "steps/s": steps / elapsed, **{k: 1000 * v / steps for k, v in parts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=512)
    parser.add_argument("--hidden", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--streams", nargs="+", default=["fast", "exact"])
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--mixing", default="sparse")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.topology} t={args.rounds}")
    print("| n | hidden | params/replica | batch/worker | streams | mixing | steps/s | ms batches | ms grads (vmap) | ms optimizer+mix |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for hidden in args.hidden:
        for batch in args.batch:
            for streams in args.streams:
                r = measure(args.replicas, hidden, batch, streams, args.topology, args.rounds, args.mixing, args.steps, args.warmup)
                print(f"| {r['n']} | {r['hidden']} | {r['params']:,} | {r['batch']} | {r['streams']} | {r['mixing']} | {r['steps/s']:.2f} "
                      f"| {r['batches']:.1f} | {r['grads']:.1f} | {r['optimizer+mix']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
