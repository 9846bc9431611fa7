"""The verbs: ``fit`` trains, ``validate`` scores a checkpoint, ``sample`` writes its samples, ``topology`` prints W,
``plan`` predicts each communication setting's time per iteration (:mod:`lightning_dpgan.command.plan`).

Each takes the :class:`~lightning_dpgan.command.checks.Run` that the checks built, and builds only what the checks
could not (the logger creates its run, the trainer its processes).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_dpgan.command.checks import Run, instantiate, is_decentralized
from lightning_dpgan.command.errors import fail
from lightning_dpgan.command.folders import resume_line
from lightning_dpgan.command.plan import plan


def fit(run: Run, worker: bool = False) -> None:
    """Train. ``worker``: a process that Lightning's launcher started; the launching process reports."""
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from lightning_dpgan.gossip import GossipPeerError
    from lightning_dpgan.guard import NonFiniteError, NonFiniteGuard
    from lightning_dpgan.processes import release_default_group
    from lightning_dpgan.progress import StepProgressBar
    from lightning_dpgan.replicas import CheckpointError
    from lightning_dpgan.signals import StopOnSigterm

    cfg, run_dir = run.cfg, run.run_dir
    quiet = worker or int(os.environ.get("RANK", "0")) != 0  # rank 0 reports; under torchrun every rank runs this
    # Threads per process: left to Lightning's launcher, which divides the cores among the processes with
    # torch.set_num_threads in this one too; setting OMP_NUM_THREADS here, after torch is loaded, would keep this
    # process at one thread per core, and every rank waits for the slowest.
    logger = make_logger(cfg, run_dir)
    if not quiet:
        _ = logger.experiment  # the logger's files first, so that it finds its folder as it left it
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        OmegaConf.save(resolved, os.path.join(run_dir, "config.yaml"))
    checkpoint = instantiate(cfg, "checkpoint", dirpath=os.path.join(run_dir, "checkpoints"))
    # With manual optimization and every_n_train_steps, ModelCheckpoint warns that no "pre-optimization state" was
    # saved; the state after the step is the one a resume needs (resuming is exact), so the warning is noise.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)
    callbacks: list[pl.Callback] = [checkpoint] + ([run.evaluation] if run.evaluation is not None else [])
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())  # toward max_steps, not per epoch of a small shard
    if not is_decentralized(cfg):  # the strategy does both itself, through its gossip
        callbacks += [NonFiniteGuard(), StopOnSigterm()]
    trainer = instantiate(cfg, "trainer", strategy=run.strategy, logger=logger, callbacks=callbacks)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    start = time.perf_counter()
    try:
        trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=cfg.ckpt_path)  # Lightning resolves "last"
    except SIGTERMException:
        last = os.path.join(run_dir, "checkpoints", "last.ckpt")
        if not quiet and os.path.isfile(last):
            print(f"resume: {resume_line(last)}", flush=True)
        raise  # Lightning's SIGTERM exit
    except (NonFiniteError, GossipPeerError, CheckpointError) as err:
        if quiet:
            sys.exit(1)  # rank 0 says it once
        fail(f"{type(err).__name__}: {err}" if isinstance(err, GossipPeerError) else str(err), 2 if isinstance(err, CheckpointError) else 1)
    finally:
        finish_wandb(cfg)
    if trainer.is_global_zero and rank_zero_only.rank == 0:
        changes = getattr(getattr(run.strategy, "engine", None), "changes", ())  # a live run's changes of members
        print(fit_summary(cfg, run_dir, time.perf_counter() - start, cfg.devices * cfg.num_nodes, changes), flush=True)
    release_default_group()  # this process trains no more (a multirun's jobs run in spawned workers)


def make_logger(cfg: DictConfig, run_dir: str) -> Any:
    kwargs: dict[str, Any] = {"save_dir": run_dir}
    if cfg.logger._target_.endswith("WandbLogger") and not cfg.logger.offline and not wandb_key_available():
        print("wandb: no API key (WANDB_API_KEY or `wandb login`), logging offline; `wandb sync` uploads later")
        kwargs["offline"] = True
    return instantiate(cfg, "logger", **kwargs)


def wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read()


def finish_wandb(cfg: DictConfig) -> None:
    """Close the wandb run, so that the next multirun job starts its own."""
    if cfg.logger._target_.endswith("WandbLogger"):
        import wandb

        wandb.finish()


def fit_summary(cfg: DictConfig, run_dir: str, seconds: float, world_size: int, changes: Sequence[Any] = ()) -> str:
    """The end of a fit, for the terminal. ``changes``: a live run's changes of members
    (:class:`~lightning_dpgan.gossip.live.Change`), each named with its step."""
    rows = read_csv(os.path.join(run_dir, "evaluation.csv"))
    last = rows[-1] if rows else {}
    if "modes" in last:
        modes = int(float(last["modes"]))
        quality = f"{modes} mode{'' if modes == 1 else 's'}, {100 * float(last['high_quality']):.1f}% high quality, reverse KL {float(last['reverse_kl']):.3f}"
    elif "fid" in last:
        quality = f"FID {float(last['fid']):.2f}, IS {float(last['inception_score']):.2f}"
    else:
        quality = "not evaluated"
    measured = {k: v for k, v in last.items() if k.startswith("consensus/") and v}
    if not measured:  # no evaluation: the strategy's own measurement, every consensus_every steps, in metrics.csv
        for row in read_csv(os.path.join(run_dir, "metrics.csv")):
            measured.update({k: v for k, v in row.items() if k.startswith("consensus/") and v})
    consensus = ", ".join(f"{k.removeprefix('consensus/')} {float(v):.3g}" for k, v in measured.items())
    unmeasured = ("not measured (strategy.consensus_every=0 and no evaluation)" if is_decentralized(cfg) and world_size > 1
                  else "0 (one process, or DDP: identical replicas)")
    communication = (
        f"{cfg.topology.name}, gossip_rounds={cfg.gossip_rounds}" if is_decentralized(cfg) else cfg.strategy._target_.rsplit(".", 1)[-1]
    )
    gossip = compression_options(cfg) if is_decentralized(cfg) else None
    if gossip is not None:
        communication += f", compression={gossip.compression} with consensus step {gossip.resolved_consensus_step():g}"
    if is_decentralized(cfg) and cfg.get("membership", "fixed") != "fixed":
        communication += f", membership={cfg.membership}"
    files = sorted(name for name in os.listdir(run_dir) if not name.startswith(".") and not name.endswith(".tmp"))
    samples = [name for name in files if name.startswith("samples_step")]
    shown = [name for name in files if not name.startswith("samples_step")] + ([f"samples_step*.png ({len(samples)})"] if samples else [])
    last_ckpt = os.path.join(run_dir, "checkpoints", "last.ckpt")
    resume = f"\n  resume: {resume_line(last_ckpt)}" if os.path.isfile(last_ckpt) else ""
    processes = f"{world_size} process{'' if world_size == 1 else 'es'}"
    if changes:
        count = len(changes[-1].members)
        processes += f", {count} at the end"
        if resume:  # a set of the members at the end: each replica goes on where as many workers resume it
            resume += f" devices={count}" if cfg.num_nodes == 1 else f" (on {count} workers)"
    members = "".join(f"\n  members: {change.describe()}" for change in changes)
    return (
        f"\nfit done in {seconds:.1f} s on {processes} ({communication}, {cfg.optim._target_.rsplit('.', 1)[-1]}){members}\n"
        f"  {'consensus' if cfg.evaluation.model == 'consensus' else 'local'} model, {cfg.evaluation.num_samples} samples: {quality}\n"
        f"  consensus distance: {consensus or unmeasured}\n"
        f"  run directory: {run_dir}\n"
        f"    {', '.join(shown)}{resume}"
    )


def read_csv(path: str) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _consensus_model(run: Run) -> Any:
    """The checkpoint's consensus model (the file holds the average of the replicas), on the CPU, in eval mode."""
    from lightning_dpgan.replicas import read_main

    run.model.load_state_dict(read_main(str(run.cfg.ckpt_path))["state_dict"])  # checked by the checks already
    return run.model.eval()


def validate(run: Run) -> None:
    cfg, run_dir = run.cfg, run.run_dir
    model = _consensus_model(run)
    run.datamodule.setup("validate")
    values = run.evaluation.evaluate_module(model, run.datamodule, picture=os.path.join(run_dir, "samples.png"))
    result = {"ckpt_path": os.path.abspath(str(cfg.ckpt_path)), "dataset": run.evaluation.dataset, **values}
    with open(os.path.join(run_dir, "validate.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"validate {result['ckpt_path']} ({run.evaluation.dataset}, {cfg.evaluation.num_samples} samples):")
    for key, value in values.items():
        print(f"  {key}: {value:.4g}")
    print(f"  written to {run_dir}/validate.json and samples.png")


def sample(run: Run) -> None:
    import numpy as np
    import torch

    from lightning_dpgan.evaluation import save_samples_picture

    cfg, run_dir = run.cfg, run.run_dir
    model = _consensus_model(run)
    torch.manual_seed(cfg.seed)
    samples = model.sample(cfg.num_samples, ema=cfg.evaluation.use_ema)
    np.save(os.path.join(run_dir, "samples.npy"), samples.numpy())
    dataset = cfg.evaluation.dataset or run.datamodule.name
    save_samples_picture(samples, dataset, os.path.join(run_dir, "samples.png"), f"{cfg.num_samples} samples")
    print(f"sample: {tuple(samples.shape)} from {cfg.ckpt_path}\n  written to {run_dir}/samples.npy and samples.png")


def print_topology(run: Run) -> None:
    import numpy as np

    cfg, topology = run.cfg, run.topology
    with np.printoptions(precision=3, suppress=True, linewidth=160):
        for phase in range(topology.period):
            label = f"W (round {phase} of a period of {topology.period})" if topology.is_time_varying else "W"
            print(f"{label}:\n{topology.matrix(phase)}")
    for key, value in topology.summary(cfg.gossip_rounds).items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    gossip = compression_options(cfg)
    if gossip is not None:  # CHOCO's gamma, and what Theorem 2 guarantees on this graph
        print(f"consensus_step (CHOCO's gamma): {gossip.describe_consensus_step(topology)}")


def compression_options(cfg: DictConfig) -> Any:
    """The gossip options of a compressed run (for its consensus step), or ``None``."""
    from lightning_dpgan.gossip.options import GossipOptions

    if cfg.get("compression") in (None, "none"):
        return None
    return GossipOptions(
        compression=cfg.compression,
        topk_fraction=OmegaConf.select(cfg, "strategy.gossip.topk_fraction", default=0.01),
        consensus_step=OmegaConf.select(cfg, "strategy.gossip.consensus_step", default=None),
    )


VERBS = {"fit": fit, "validate": validate, "sample": sample, "topology": print_topology, "plan": plan}
