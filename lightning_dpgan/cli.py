"""``python -m lightning_dpgan <verb> [Hydra overrides]``: ``fit``, ``validate``, ``sample`` and ``topology``.

The verb is not a Hydra override, so it is taken off the command line before Hydra parses the rest, and put
back before training starts: Lightning's popen launcher re-runs ``sys.argv`` in every worker, and each worker
must read the same verb. Everything that can reject bad input (unknown group options, bad values, a world size
the topology cannot take, a missing data path) runs first, in the launching process, before any worker starts;
it ends with one message and exit status 2.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_PACKAGE = "lightning_dpgan.conf"
LR_SCALINGS = ("none", "sqrt")  # lr_scaling: the decentralized workers' rate is model.lr_* times 1 or sqrt(n)
VERB_VARIABLE = "LIGHTNING_DPGAN_VERB"
VERBS = {
    "fit": "train (default: DPOSG on the grid of 25 Gaussians, 4 CPU workers gossiping on a ring)",
    "validate": "evaluate the consensus model of a checkpoint: ckpt_path=...",
    "sample": "write num_samples samples of a checkpoint as samples.npy and samples.png: ckpt_path=...",
    "topology": "print W, degree, spectral gap and rho(W^t) for topology, devices x num_nodes, gossip_rounds",
}
EXAMPLES = """examples:
  python -m lightning_dpgan fit topology=ring gossip_rounds=3 devices=8
  python -m lightning_dpgan fit experiment=digits strategy=ddp logger=wandb
  python -m lightning_dpgan fit -m topology=ring,torus,exponential
  python -m lightning_dpgan topology topology=exponential devices=16 gossip_rounds=2
  python -m lightning_dpgan sample ckpt_path=runs/fit/<date>/checkpoints/last.ckpt num_samples=1000
Hydra's own flags (--cfg job, --info, -m) go after the verb."""


class UsageError(Exception):
    """Bad input, reported as one line and exit status 2."""


# ---------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    verb, overrides = argv[0], argv[1:]
    try:
        if verb not in VERBS:
            raise UsageError(f"unknown verb {verb!r}; allowed: {', '.join(VERBS)}")
        hydra_flags = any(arg.startswith("-") for arg in overrides)  # -m, --cfg, --info: Hydra's to handle
        cfg = None if hydra_flags else check(verb, overrides)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if verb == "topology" and cfg is not None:
        print_topology(cfg)  # reads the configuration only: no run directory, no process
        return
    run_hydra(verb, overrides)


def usage() -> str:
    groups = config_groups()
    lines = ["usage: python -m lightning_dpgan {" + ",".join(VERBS) + "} [key=value ...]", "", "verbs:"]
    lines += [f"  {verb:<9} {text}" for verb, text in VERBS.items()]
    lines += ["", "config groups (group=option):"]
    lines += [f"  {group:<11} {', '.join(options)}" for group, options in groups.items()]
    defaults = compose_config("fit", [])
    shortcuts = [k for k, v in defaults.items() if not isinstance(v, DictConfig) and k != "verb"]
    lines += ["", "shortcuts (key=value): " + ", ".join(f"{k}={defaults[k]}" for k in shortcuts), "", EXAMPLES]
    return "\n".join(lines)


def config_groups() -> dict[str, list[str]]:
    root = resources.files(CONFIG_PACKAGE)
    return {
        entry.name: sorted(f.name.removesuffix(".yaml") for f in entry.iterdir() if f.name.endswith(".yaml"))
        for entry in sorted(root.iterdir(), key=lambda e: e.name)
        if entry.is_dir() and not entry.name.startswith("_")
    }


# ---------------------------------------------------------------------- checks before any process starts
def compose_config(verb: str, overrides: Sequence[str]) -> DictConfig:
    """The configuration Hydra will run with (minus ``hydra.*``), or a :class:`UsageError` saying what is wrong."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ[VERB_VARIABLE] = verb
    user = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
    try:
        with initialize_config_module(CONFIG_PACKAGE, version_base="1.3"):
            return compose("config", overrides=user)
    except (HydraException, OmegaConfBaseException) as err:
        raise UsageError(_hydra_message(err)) from None


def _hydra_message(err: BaseException) -> str:
    message = str(err).strip()
    cause = err.__cause__
    return f"{message}: {cause}" if cause is not None and str(cause) not in message else message


def check(verb: str, overrides: Sequence[str]) -> DictConfig:
    """Compose the configuration and build every cheap object that validates its own arguments."""
    cfg = compose_config(verb, overrides)
    for key in ("devices", "num_nodes", "max_steps", "batch_size", "num_samples"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{key} must be an integer >= 1, got {value!r}")
    if verb == "topology" or _is_decentralized(cfg):  # DDP has no topology to check
        build_topology_from(cfg)
    if verb == "topology":
        return cfg
    if verb in ("validate", "sample") and not cfg.ckpt_path:
        raise UsageError(f"{verb} needs ckpt_path=<a checkpoint file>, got {cfg.ckpt_path!r}")
    if cfg.ckpt_path and not os.path.isfile(str(cfg.ckpt_path)):
        raise UsageError(f"ckpt_path must be a checkpoint file, got {cfg.ckpt_path!r} (not found)")
    if verb in ("validate", "sample"):
        cfg = with_run_config(cfg)
    else:
        cfg = with_scaled_learning_rates(cfg)
    for key in ("dataset", "model", "strategy", "evaluation"):
        instantiate(cfg, key)  # constructors check their arguments; none starts a process or downloads
    _check_target(cfg, "logger")  # building a logger would create its run (a wandb run, a folder)
    return cfg


def build_topology_from(cfg: DictConfig) -> Any:
    from lightning_dpgan.topology import TopologyError, check_rounds, build_topology

    try:
        check_rounds(cfg.gossip_rounds)
        options = OmegaConf.to_container(cfg.topology.options, resolve=True) or {}
        return build_topology(cfg.topology.name, cfg.devices * cfg.num_nodes, **options)
    except TopologyError as err:
        raise UsageError(str(err)) from None


def with_scaled_learning_rates(cfg: DictConfig) -> DictConfig:
    """``lr_scaling=sqrt``: under the decentralized strategy each worker steps at √(world size) × ``model.lr_*``.

    ``model.lr_*`` is then the centralized recipe's rate. Each DPOSG worker's Adam normalises the gradient of its
    own batch, which carries n× the noise variance of DDP's averaged one, so at equal rates its step is ~1/√n of
    DDP's, and DPOSG at √n × DDP's rate matches DDP (docs/quality.md). DDP keeps the rate as given.
    """
    from lightning_dpgan.gan import check_learning_rate

    scaling = cfg.get("lr_scaling")
    if scaling not in LR_SCALINGS:
        raise UsageError(f"lr_scaling must be one of {', '.join(LR_SCALINGS)}, got {scaling!r}")
    world_size = cfg.devices * cfg.num_nodes
    if scaling == "none" or world_size == 1 or not _is_decentralized(cfg):
        return cfg
    if "lr_g" not in cfg.model or "lr_d" not in cfg.model:
        raise UsageError(f"lr_scaling={scaling} scales model.lr_g and model.lr_d; model {cfg.model.get('_target_')!r} has no lr_g/lr_d")
    scaled = cfg.copy()
    for key in ("lr_g", "lr_d"):
        rate = cfg.model[key]
        try:
            check_learning_rate(key, rate)  # name the value given, not the scaled one
        except ValueError as err:
            raise UsageError(f"model: {err}") from None
        scaled.model[key] = rate * math.sqrt(world_size)
    return scaled


def _is_decentralized(cfg: DictConfig) -> bool:
    return str(cfg.strategy.get("_target_", "")).endswith("DecentralizedStrategy")


def _check_target(cfg: DictConfig, key: str) -> None:
    from hydra.utils import get_class

    try:
        get_class(cfg[key]._target_)
    except Exception as err:  # an import error names the missing package
        raise UsageError(f"{key}: {_hydra_message(err)}") from None


def instantiate(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(cfg[key])`` with plain containers, and the bad value's own message on failure."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(cfg[key], _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        raise UsageError(f"{key}: {cause}") from None
    except (ValueError, TypeError) as err:
        raise UsageError(f"{key}: {err}") from None


def with_run_config(cfg: DictConfig) -> DictConfig:
    """For a checkpoint written by ``fit``: the dataset and model it was trained with (from its ``config.yaml``)."""
    saved = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(str(cfg.ckpt_path)))), "config.yaml")
    if not os.path.isfile(saved):
        return cfg
    run = OmegaConf.load(saved)
    merged = cfg.copy()
    OmegaConf.set_struct(merged, False)
    for key in ("dataset", "model", "loss", "optim"):
        if key in run:
            merged[key] = run[key]
    return merged


# ---------------------------------------------------------------------- running under Hydra
def run_hydra(verb: str, overrides: Sequence[str]) -> None:
    import hydra

    task = TASKS[verb]
    restored = [sys.argv[0], verb, *overrides]

    def hydra_task(cfg: DictConfig) -> None:
        sys.argv[:] = restored  # what Lightning's popen launcher re-runs in each worker, verb included
        task(cfg)

    os.environ[VERB_VARIABLE] = verb  # the config's ${verb}; not an argument, so Hydra's flags parse as usual
    sys.argv[:] = [sys.argv[0], *overrides]
    hydra.main(config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config", version_base="1.3")(hydra_task)()


def run_directory() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def fit(cfg: DictConfig) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from lightning_dpgan.signals import StopOnSigterm

    run_dir = run_directory()
    cfg = with_scaled_learning_rates(cfg)  # before config.yaml is written: it holds the rates the workers use
    world_size = cfg.devices * cfg.num_nodes
    # Threads per process: left to Lightning's launcher, which divides the cores among the processes with
    # torch.set_num_threads in this one too; setting OMP_NUM_THREADS here, after torch is loaded, would keep this
    # process at one thread per core, and every rank waits for the slowest.
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg, "dataset")
    model = instantiate(cfg, "model")
    # popen re-runs the command line, which under multirun would start the whole sweep again in every worker
    strategy = instantiate(cfg, "strategy", **({"start_method": "spawn"} if is_multirun() and world_size > 1 else {}))
    logger = make_logger(cfg, run_dir)
    evaluation = instantiate(cfg, "evaluation", output_dir=run_dir)
    checkpoint = instantiate(cfg, "checkpoint", dirpath=os.path.join(run_dir, "checkpoints"))
    # With manual optimization and every_n_train_steps, ModelCheckpoint warns that no "pre-optimization state" was
    # saved; the state after the step is the one a resume needs (resuming is exact), so the warning is noise.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)
    callbacks = [checkpoint, evaluation, StopOnSigterm()]  # the last: a SIGTERM stops DDP runs too, not hangs them
    trainer = instantiate(cfg, "trainer", strategy=strategy, logger=logger, callbacks=callbacks)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger.log_hyperparams(resolved)  # rank 0; creates the logger's files first, so it finds no others there
    if rank_zero_only.rank == 0:
        OmegaConf.save(OmegaConf.create(resolved), os.path.join(run_dir, "config.yaml"))
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    finally:
        finish_wandb(cfg)
    if trainer.is_global_zero:
        print(fit_summary(cfg, run_dir, time.perf_counter() - start, world_size))


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


def fit_summary(cfg: DictConfig, run_dir: str, seconds: float, world_size: int) -> str:
    rows = read_csv(os.path.join(run_dir, "evaluation.csv"))
    last = rows[-1] if rows else {}
    if "modes" in last:
        quality = f"{float(last['modes']):.0f} modes, {100 * float(last['high_quality']):.1f}% high quality, reverse KL {float(last['reverse_kl']):.3f}"
    elif "fid" in last:
        quality = f"FID {float(last['fid']):.2f}, IS {float(last['inception_score']):.2f}"
    else:
        quality = "not evaluated"
    consensus = ", ".join(f"{k.removeprefix('consensus/')} {float(v):.3g}" for k, v in last.items() if k.startswith("consensus/") and v)
    communication = (
        f"{cfg.topology.name}, gossip_rounds={cfg.gossip_rounds}" if _is_decentralized(cfg) else cfg.strategy._target_.rsplit(".", 1)[-1]
    )
    return (
        f"\nfit done in {seconds:.1f} s on {world_size} processes ({communication}, {cfg.optim._target_.rsplit('.', 1)[-1]})\n"
        f"  {'consensus' if cfg.evaluation.model == 'consensus' else 'local'} model, {cfg.evaluation.num_samples} samples: {quality}\n"
        f"  consensus distance: {consensus or 'not measured (one process, or DDP: identical replicas)'}\n"
        f"  run directory: {run_dir}\n"
        f"    config.yaml, metrics.csv, evaluation.csv, samples_step*.png, consensus.png, checkpoints/last.ckpt"
    )


def read_csv(path: str) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def load_model(cfg: DictConfig) -> Any:
    """The checkpoint's consensus model (the file holds the average of the replicas), on the CPU, in eval mode."""
    import torch

    model = instantiate(cfg, "model")
    state = torch.load(str(cfg.ckpt_path), map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(state)
    return model.eval()


def validate(cfg: DictConfig) -> None:
    import json

    cfg = with_run_config(cfg)
    run_dir = run_directory()
    os.makedirs(run_dir, exist_ok=True)
    model = load_model(cfg)
    datamodule = instantiate(cfg, "dataset")
    datamodule.setup("validate")
    evaluation = instantiate(cfg, "evaluation", output_dir=run_dir)
    values = evaluation.evaluate_module(model, datamodule, picture=os.path.join(run_dir, "samples.png"))
    result = {"ckpt_path": os.path.abspath(str(cfg.ckpt_path)), "dataset": evaluation.dataset, **values}
    with open(os.path.join(run_dir, "validate.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"validate {result['ckpt_path']} ({evaluation.dataset}, {cfg.evaluation.num_samples} samples):")
    for key, value in values.items():
        print(f"  {key}: {value:.4g}")
    print(f"  written to {run_dir}/validate.json and samples.png")


def sample(cfg: DictConfig) -> None:
    import numpy as np
    import torch

    from lightning_dpgan.evaluation import save_samples_picture

    cfg = with_run_config(cfg)
    run_dir = run_directory()
    os.makedirs(run_dir, exist_ok=True)
    model = load_model(cfg)
    torch.manual_seed(cfg.seed)
    samples = model.sample(cfg.num_samples, ema=cfg.evaluation.use_ema)
    np.save(os.path.join(run_dir, "samples.npy"), samples.numpy())
    dataset = cfg.evaluation.dataset or instantiate(cfg, "dataset").name
    save_samples_picture(samples, dataset, os.path.join(run_dir, "samples.png"), f"{cfg.num_samples} samples")
    print(f"sample: {tuple(samples.shape)} from {cfg.ckpt_path}\n  written to {run_dir}/samples.npy and samples.png")


def print_topology(cfg: DictConfig) -> None:
    import numpy as np

    topology = build_topology_from(cfg)
    rounds = cfg.gossip_rounds
    with np.printoptions(precision=3, suppress=True, linewidth=160):
        for phase in range(topology.period):
            label = f"W (round {phase} of a period of {topology.period})" if topology.is_time_varying else "W"
            print(f"{label}:\n{topology.matrix(phase)}")
    for key, value in topology.summary(rounds).items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


TASKS: dict[str, Callable[[DictConfig], None]] = {"fit": fit, "validate": validate, "sample": sample, "topology": print_topology}
