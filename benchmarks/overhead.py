"""At one process, a fit with DecentralizedStrategy against a plain Trainer fit of the same model and data.

    python benchmarks/overhead.py [--repeats 5] [--epochs 5]

Runs alternate (plain, strategy, plain, strategy, ...) in one process so that machine load hits both alike;
prints the median wall time of each and their ratio. Target: strategy / plain <= 1.05.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings


def fit_once(strategy: str, epochs: int) -> float:
    import lightning.pytorch as pl

    from lightning_dpgan import DecentralizedStrategy
    from lightning_dpgan.data import DigitsDataModule
    from lightning_dpgan.examples.alternating_gan import AlternatingGAN

    pl.seed_everything(0, verbose=False)
    chosen = DecentralizedStrategy("ring", consensus_every=10) if strategy == "decentralized" else "auto"
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=chosen, max_epochs=epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    model, data = AlternatingGAN(), DigitsDataModule(batch_size=32)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    times: dict[str, list[float]] = {"plain": [], "decentralized": []}
    fit_once("plain", 1)  # warm up imports and caches
    for _ in range(args.repeats):
        for name in times:
            times[name].append(fit_once(name, args.epochs))
    plain, dec = statistics.median(times["plain"]), statistics.median(times["decentralized"])
    print(f"{'setting':>22} {'median s':>9}  runs")
    print(f"{'plain Trainer':>22} {plain:>9.3f}  " + " ".join(f"{t:.2f}" for t in times["plain"]))
    print(f"{'DecentralizedStrategy':>22} {dec:>9.3f}  " + " ".join(f"{t:.2f}" for t in times["decentralized"]))
    print(f"ratio strategy / plain: {dec / plain:.3f}")


if __name__ == "__main__":
    main()
