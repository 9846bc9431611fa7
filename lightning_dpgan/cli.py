"""``python -m lightning_dpgan fit [key=value ...]``: the main job.

This is the minimal entry point before the Hydra configuration (see the CLI issue) replaces the small
``key=value`` parser below: DPOSG (``DPGAN`` with ``OptimisticAdam``, MLPs) on PacGAN's grid of 25 Gaussians,
trained by 4 CPU processes gossiping on a ring, evaluated (mode coverage of the consensus model, pictures)
every 500 steps and at the end.

Lightning's popen launcher re-runs ``sys.argv`` in every worker, so the verb is read from ``sys.argv`` on
every process alike; all validation happens before the Trainer starts any worker.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

VERBS = ("fit",)
DEFAULTS: dict[str, Any] = {
    "topology": "ring",
    "gossip_rounds": 1,
    "devices": 4,
    "max_steps": 2500,
    "batch_size": 256,
    "optimizer": "optimistic_adam",
    "lr": 1e-3,
    "wire_dtype": "fp32",
    "seed": 0,
    "consensus_every": 50,
    "output_dir": "runs",
}
USAGE = f"""usage: python -m lightning_dpgan {{{','.join(VERBS)}}} [key=value ...]

verbs:
  fit    train DPGAN on the grid of 25 Gaussians with DecentralizedStrategy

keys (default):
""" + "\n".join(f"  {k}={v}" for k, v in DEFAULTS.items())


class UsageError(Exception):
    pass


def parse(argv: Sequence[str]) -> tuple[str, dict[str, Any]]:
    if not argv or argv[0] in ("-h", "--help"):
        raise UsageError("")
    verb, *pairs = argv
    if verb not in VERBS:
        raise UsageError(f"unknown verb {verb!r}; allowed: {', '.join(VERBS)}")
    options = dict(DEFAULTS)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in DEFAULTS:
            raise UsageError(f"unknown option {pair!r}; allowed keys: {', '.join(DEFAULTS)}")
        default = DEFAULTS[key]
        try:
            options[key] = type(default)(value)
        except ValueError:
            raise UsageError(f"{key}={value!r} is not a valid {type(default).__name__}") from None
    for key in ("devices", "max_steps", "batch_size"):
        if options[key] < 1:
            raise UsageError(f"{key} must be >= 1, got {options[key]}")
    return verb, options


def fit(options: dict[str, Any]) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lightning_dpgan.data import GaussianMixtureDataModule
    from lightning_dpgan.evaluation import GANEvaluation
    from lightning_dpgan.gan import DPGAN
    from lightning_dpgan.models import MLPDiscriminator, MLPGenerator
    from lightning_dpgan.optim import OPTIMIZERS
    from lightning_dpgan.strategy import DecentralizedStrategy
    from lightning_dpgan.topology import build_topology

    build_topology(options["topology"], options["devices"])  # fail here, before any worker starts
    if options["optimizer"] not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {options['optimizer']!r}; allowed: {', '.join(OPTIMIZERS)}")
    pl.seed_everything(options["seed"], verbose=False)
    strategy = DecentralizedStrategy(
        topology=options["topology"],
        gossip_rounds=options["gossip_rounds"],
        wire_dtype=options["wire_dtype"],
        consensus_every=options["consensus_every"],
    )
    logger = CSVLogger(options["output_dir"], name="fit")
    checkpoint = ModelCheckpoint(save_last=True)
    evaluation = GANEvaluation("grid", every_n_steps=500, output_dir=logger.log_dir)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=options["devices"],
        strategy=strategy,
        max_steps=options["max_steps"],
        logger=logger,
        callbacks=[checkpoint, evaluation],
        log_every_n_steps=50,
        enable_model_summary=False,
    )

    gan = DPGAN(
        MLPGenerator(), MLPDiscriminator(), optimizer=options["optimizer"], lr_g=options["lr"], lr_d=options["lr"],
        optimizer_kwargs={"betas": (0.5, 0.9)} if "adam" in options["optimizer"] else {},
    )
    start = time.perf_counter()
    trainer.fit(gan, datamodule=GaussianMixtureDataModule("grid", batch_size=options["batch_size"]))
    if trainer.is_global_zero:
        final = evaluation.history[-1]
        consensus = ", ".join(f"{k} {v:.3g}" for k, v in strategy.consensus_distance.items())
        print(
            f"\nfit done in {time.perf_counter() - start:.1f} s on {trainer.world_size} processes"
            f" ({options['topology']}, gossip_rounds={options['gossip_rounds']}, {options['optimizer']})\n"
            f"  consensus model, 2500 samples: {final['modes']:.0f}/25 modes, {100 * final['high_quality']:.1f}% high quality\n"
            f"  consensus distance: {consensus or 'not measured'}\n"
            f"  metrics:    {os.path.join(logger.log_dir, 'metrics.csv')}\n"
            f"  evaluation: {os.path.join(logger.log_dir, 'evaluation.csv')} and samples_step*.png, consensus.png\n"
            f"  checkpoint: {checkpoint.last_model_path}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        verb, options = parse(argv)
        if verb == "fit":
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            fit(options)
    except UsageError as err:
        print(f"error: {err}\n\n{USAGE}" if str(err) else USAGE, file=sys.stderr)
        sys.exit(2 if str(err) else 0)
    except ValueError as err:  # TopologyError and other bad values, raised before workers start
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
