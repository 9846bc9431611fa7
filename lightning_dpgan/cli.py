"""``python -m lightning_dpgan fit [key=value ...]``: the main job.

This is the minimal entry point of the core release: an existing-style Lightning GAN (two optimizers,
alternating steps) on scikit-learn's digits, trained by 4 CPU processes gossiping on a ring. The Hydra
configuration (see the CLI issue) replaces the small ``key=value`` parser below.

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
    "max_epochs": 30,
    "batch_size": 32,
    "wire_dtype": "fp32",
    "seed": 0,
    "consensus_every": 10,
    "output_dir": "runs",
}
USAGE = f"""usage: python -m lightning_dpgan {{{','.join(VERBS)}}} [key=value ...]

verbs:
  fit    train a GAN on scikit-learn's digits with DecentralizedStrategy

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
    if options["devices"] < 1:
        raise UsageError(f"devices must be >= 1, got {options['devices']}")
    return verb, options


def fit(options: dict[str, Any]) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lightning_dpgan.data import DigitsDataModule
    from lightning_dpgan.examples.alternating_gan import AlternatingGAN
    from lightning_dpgan.strategy import DecentralizedStrategy
    from lightning_dpgan.topology import build_topology

    build_topology(options["topology"], options["devices"])  # fail here, before any worker starts
    pl.seed_everything(options["seed"], verbose=False)
    strategy = DecentralizedStrategy(
        topology=options["topology"],
        gossip_rounds=options["gossip_rounds"],
        wire_dtype=options["wire_dtype"],
        consensus_every=options["consensus_every"],
    )
    logger = CSVLogger(options["output_dir"], name="fit")
    checkpoint = ModelCheckpoint(save_last=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=options["devices"],
        strategy=strategy,
        max_epochs=options["max_epochs"],
        logger=logger,
        callbacks=[checkpoint],
        log_every_n_steps=5,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(AlternatingGAN(), datamodule=DigitsDataModule(batch_size=options["batch_size"]))
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        consensus = ", ".join(f"{k} {v:.3g}" for k, v in strategy.consensus_distance.items())
        print(
            f"\nfit done in {time.perf_counter() - start:.1f} s on {trainer.world_size} processes"
            f" ({options['topology']}, gossip_rounds={options['gossip_rounds']})\n"
            f"  g_loss {metrics.get('g_loss', float('nan')):.3f}  d_loss {metrics.get('d_loss', float('nan')):.3f}\n"
            f"  consensus distance: {consensus or 'not measured'}\n"
            f"  metrics:    {os.path.join(logger.log_dir, 'metrics.csv')}\n"
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
