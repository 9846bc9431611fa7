"""``python -m lightning_dpgan <verb> [Hydra overrides]``: ``fit``, ``validate``, ``sample`` and ``topology``.

The launching process composes the configuration once, checks it (every cheap object is built, checkpoints are
read as data, the run directory is made), writes the resolved ``config.yaml`` into the run directory, and only
then starts workers. Lightning's popen launcher starts each worker by re-running the command line; the command
line a worker gets is ``<verb> --run-config <run directory>/config.yaml``, so it builds its objects from the same
resolved configuration without composing or checking again. Bad input ends with one ``error:`` line and exit
status 2, before any worker starts.

Hydra's own flags (``-m``, ``--cfg``, ``--info``, ``-sc``) go through ``hydra.main``: each multirun job is checked
and run like a single run, its workers started with ``spawn`` (popen would start the whole sweep in each).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import re
import shlex
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_dpgan.checks import check_choice, check_int
from lightning_dpgan.topology import MAX_WORLD_SIZE

CONFIG_PACKAGE = "lightning_dpgan.conf"
RUN_CONFIG_FLAG = "--run-config"  # how a launched worker is handed the resolved configuration
LR_SCALINGS = ("none", "sqrt")  # lr_scaling: the decentralized workers' rate is model.lr_* times 1 or sqrt(n)
VERBS = {
    "fit": "train (default: DPOSG on the grid of 25 Gaussians, 4 CPU workers gossiping on a ring)",
    "validate": "evaluate the consensus model of a checkpoint: ckpt_path=...",
    "sample": "write num_samples samples of a checkpoint as samples.npy and samples.png: ckpt_path=...",
    "topology": "print W, degree, spectral gap and rho(W^t) for topology, devices x num_nodes, gossip_rounds",
}
HYDRA_FLAGS = ("-m", "--multirun", "-c", "--cfg", "-p", "--package", "--info", "-i", "--resolve", "-sc", "--shell-completion", "--hydra-help")
EXAMPLES = """examples:
  python -m lightning_dpgan fit topology=ring gossip_rounds=3 devices=8
  python -m lightning_dpgan fit experiment=digits strategy=ddp logger=wandb
  python -m lightning_dpgan fit -m topology=ring,torus,exponential
  python -m lightning_dpgan topology topology=exponential devices=16 gossip_rounds=2
  python -m lightning_dpgan sample ckpt_path=runs/fit/<run>/checkpoints/last.ckpt num_samples=1000
Hydra's flags (-m, --cfg job, --info, -sc install=bash) go after the verb."""
MAX_SEED = 2**32 - 1
#: environment variables that say a launcher started this process on each node (torchrun, SLURM, a manual launch)
EXTERNAL_LAUNCHERS = ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "NODE_RANK")
_RUN_ID = uuid.uuid4().hex[:6]  # one per launching process: two runs started in the same second get two folders


class UsageError(Exception):
    """Bad input, reported as one line and exit status 2."""


@dataclass
class Command:
    verb: str = "fit"
    overrides: list[str] = field(default_factory=list)
    hydra_flags: bool = False
    run_config: str | None = None
    help: bool = False
    version: bool = False


# ---------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command = parse_command(argv)
        if command.help:
            print(usage())
            return
        if command.version:
            from lightning_dpgan._version import __version__

            print(f"lightning-dpgan {__version__}")
            return
        if command.run_config is not None:
            run_worker(command)
            return
        if command.hydra_flags:
            run_hydra(command)
            return
        overrides = with_run_overrides(command.verb, quote_paths(command.overrides))
        cfg, run_dir = compose_run(command.verb, overrides)
        cfg = follow_the_launcher(cfg)
        cfg, resuming_here = resolve_last(command.verb, cfg, run_dir)
        cfg = prepare(command.verb, cfg)
        if command.verb == "topology":
            print_topology(cfg)  # reads the configuration only: no run directory, no process
            return
        run_dir = make_run_directory(cfg, run_dir, resuming_here)
        if command.verb == "fit":
            save_run_overrides(run_dir, overrides)
    except UsageError as err:
        fail(str(err), 2)
    TASKS[command.verb](cfg, run_dir)


def fail(message: str, status: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def parse_command(argv: list[str]) -> Command:
    """The verb (first word that is not a flag), ``--help``/``--version`` before or after it, Hydra's flags."""
    command = Command()
    rest: list[str] = []
    for arg in argv:
        if arg in ("-h", "--help"):
            command.help = True
        elif arg in ("-V", "--version"):
            command.version = True
        else:
            rest.append(arg)
    if command.help or command.version:
        return command
    if not rest:
        command.help = True
        return command
    if _is_hydra_flag(rest[0]):  # shell completion calls ``lightning-dpgan -sc query=bash``: no verb
        rest = ["fit", *rest]
    command.verb, args = rest[0], rest[1:]
    check_choice("verb", command.verb, VERBS, error=UsageError)
    if args[:1] == [RUN_CONFIG_FLAG] and len(args) == 2:
        command.run_config = args[1]
        return command
    command.hydra_flags = any(_is_hydra_flag(arg) for arg in args)
    command.overrides = args
    return command


def _is_hydra_flag(arg: str) -> bool:
    return arg.split("=", 1)[0] in HYDRA_FLAGS


def usage() -> str:
    groups = config_groups()
    lines = ["usage: python -m lightning_dpgan {" + ",".join(VERBS) + "} [key=value ...]", "", "verbs:"]
    lines += [f"  {verb:<9} {text}" for verb, text in VERBS.items()]
    lines += ["", "config groups (group=option):"]
    lines += [f"  {group:<11} {', '.join(options)}" for group, options in groups.items()]
    defaults = compose_config("fit", [])
    shortcuts = [k for k, v in defaults.items() if not isinstance(v, DictConfig) and k != "verb"]
    lines += ["", "shortcuts (key=value): " + ", ".join(f"{k}={defaults[k]}" for k in shortcuts), "", EXAMPLES]
    lines += ["", "-h/--help: this text; -V/--version: the version"]
    return "\n".join(lines)


def config_groups() -> dict[str, list[str]]:
    root = resources.files(CONFIG_PACKAGE)
    return {
        entry.name: sorted(f.name.removesuffix(".yaml") for f in entry.iterdir() if f.name.endswith(".yaml"))
        for entry in sorted(root.iterdir(), key=lambda e: e.name)
        if entry.is_dir() and not entry.name.startswith("_")
    }


# ---------------------------------------------------------------------- compose and check, in the launching process
def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", lambda: _RUN_ID)


def compose_config(verb: str, overrides: Sequence[str], with_hydra: bool = False) -> DictConfig:
    """The configuration for ``verb`` (with the ``hydra`` node only if asked), or a :class:`UsageError`."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    _register_resolvers()
    user = [o for o in overrides if with_hydra or not o.lstrip("+~").startswith("hydra.")]
    try:
        with initialize_config_module(CONFIG_PACKAGE, version_base="1.3"):
            return compose("config", overrides=[*user, f"verb={verb}"], return_hydra_config=with_hydra)
    except MissingConfigException as err:  # an unknown option of a group: one line instead of Hydra's search path
        group, _, name = str(err.missing_cfg_file).rpartition("/")
        if group and err.options:
            raise UsageError(f"unknown {group} {name!r}; allowed: {', '.join(err.options)}") from None
        raise UsageError(_hydra_message(err).splitlines()[0]) from None
    except (HydraException, OmegaConfBaseException) as err:
        raise UsageError(_hydra_message(err)) from None


def compose_run(verb: str, overrides: Sequence[str]) -> tuple[DictConfig, str]:
    """The configuration (composed once) and its ``hydra.run.dir`` (by default ``runs/<verb>/<date>_<time>_<id>``)."""
    from omegaconf.errors import OmegaConfBaseException

    cfg = compose_config(verb, overrides, with_hydra=True)
    try:
        run_dir = str(cfg.hydra.run.dir)
    except OmegaConfBaseException as err:
        raise UsageError(f"hydra.run.dir: {err}") from None
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra")
    OmegaConf.set_struct(cfg, True)
    return cfg, run_dir


#: keys whose values are paths: quoted for Hydra, whose grammar reads ``=`` and ``,`` (a multirun job's folder name)
PATH_KEYS = ("ckpt_path", "output_dir", "hydra.run.dir", "hydra.sweep.dir", "dataset.root", "evaluation.inception_weights")
#: a run's overrides that name where it is, not what it is: never carried into its resume
PLACE_KEYS = ("ckpt_path", "output_dir", "hydra.run.dir", "hydra.sweep.dir")
RUN_OVERRIDES = "overrides.yaml"  # beside config.yaml: the command line a resume composes again
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_/.\-+@%*?]*")  # what Hydra's grammar reads unquoted as one value
#: what a run's overrides.yaml may not hold: it comes from the run folder, which may come from anyone
_BUILDING = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")


def quote_paths(overrides: Sequence[str]) -> list[str]:
    """``ckpt_path=/runs/multirun/x/0_topology=ring/...`` as ``ckpt_path='...'``, so that a path is one value.

    In Hydra's quoted strings a backslash escapes only a quote or the backslashes before one (or before the closing
    quote), so only those are escaped: :func:`_unquote` reads the value back the same way."""
    quoted = []
    for override in overrides:
        key, eq, value = override.partition("=")
        if eq and key.lstrip("+~") in PATH_KEYS and value[:1] not in ("'", '"') and not _PLAIN_PATH.fullmatch(value):
            escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
            override = f"{key}='{escaped}'"
        quoted.append(override)
    return quoted


def _unquote(value: str) -> str:
    if len(value) < 2 or value[0] != value[-1] or value[0] not in ("'", '"'):
        return value
    quote = value[0]
    return re.sub(r"(\\+)(" + quote + r"|$)", lambda m: m.group(1)[: len(m.group(1)) // 2] + m.group(2), value[1:-1])


def override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _override_value(overrides: Sequence[str], key: str) -> str | None:
    values = [o.partition("=")[2] for o in overrides if override_key(o) == key]
    return _unquote(values[-1]) if values else None


def with_run_overrides(verb: str, overrides: list[str]) -> list[str]:
    """Resuming a fit (``ckpt_path=<run>/checkpoints/<file>``, or ``ckpt_path=last hydra.run.dir=<run>``) composes
    the run's own command line again, with the keys given now replacing the same keys of the run's, and goes on in
    the run's directory: the printed ``resume:`` line then resumes the run it names (its max_steps, topology,
    experiment), whatever the defaults are."""
    ckpt = _override_value(overrides, "ckpt_path")
    if verb != "fit" or not ckpt:
        return overrides
    if ckpt == "last":
        run_dir = _override_value(overrides, "hydra.run.dir")
    else:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    saved = os.path.join(run_dir, RUN_OVERRIDES) if run_dir else None
    if saved is None or not os.path.isfile(saved):
        return overrides  # a checkpoint outside a run directory (or from an older version): the command line alone
    try:
        stored = OmegaConf.to_container(OmegaConf.load(saved))
    except Exception as err:  # a YAML error
        raise UsageError(f"{saved}: not a readable list of overrides ({type(err).__name__})") from None
    if not isinstance(stored, list) or not all(isinstance(o, str) for o in stored):
        raise UsageError(f"{saved}: not a list of overrides")
    for override in stored:  # a run folder may come from anyone: what it composes may only choose and set values
        if any(word in override for word in _BUILDING) or override_key(override).startswith("hydra."):
            raise UsageError(
                f"{saved}: the override {override!r} would build or configure objects of its own (it could run code); "
                "a run's overrides may only choose config options and set values"
            )
    given = {override_key(o) for o in overrides}
    place = [] if "hydra.run.dir" in given else [quote_paths([f"hydra.run.dir={run_dir}"])[0]]
    return [o for o in stored if override_key(o) not in given | set(PLACE_KEYS)] + overrides + place


def save_run_overrides(run_dir: str, overrides: Sequence[str]) -> None:
    """What :func:`with_run_overrides` reads back (rank 0 alone; the others find it written)."""
    if int(os.environ.get("RANK", "0")) == 0:
        kept = [o for o in overrides if override_key(o) not in PLACE_KEYS and not _is_hydra_flag(o)]
        OmegaConf.save(OmegaConf.create(kept), os.path.join(run_dir, RUN_OVERRIDES))


def resume_line(checkpoint: str) -> str:
    return f"python -m lightning_dpgan fit ckpt_path={shlex.quote(checkpoint)}"


def _hydra_message(err: BaseException) -> str:
    message = str(err).strip()
    cause = err.__cause__
    return f"{message}: {cause}" if cause is not None and str(cause) not in message else message


def prepare(verb: str, cfg: DictConfig) -> DictConfig:
    """Check the configuration by building every cheap object; returns it as the workers will use it (for ``fit``,
    with the scaled learning rates; for ``validate``/``sample``, with the run's own dataset and model)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UsageError(f"{missing[0]} must be given: add {missing[0]}=... (e.g. dataset.root=<a folder> for dataset=imagefolder)")
    for key in ("devices", "num_nodes", "max_steps", "batch_size", "num_samples"):
        _check(key, lambda: _check_int(key, cfg[key]))
    _check("seed", lambda: check_int("seed", cfg.seed, 0, MAX_SEED, why="the range numpy's and torch's generators take"))
    _check("devices", lambda: check_int("devices x num_nodes", cfg.devices * cfg.num_nodes, 1, MAX_WORLD_SIZE,
                                        why="every worker builds and checks the dense n x n mixing matrix"))
    if verb == "topology" or _is_decentralized(cfg):  # DDP has no topology to check
        build_topology_from(cfg)
    if verb == "topology":
        return cfg
    if verb in ("validate", "sample") and not cfg.ckpt_path:
        raise UsageError(f"{verb} needs ckpt_path=<a checkpoint file>, got {cfg.ckpt_path!r}")
    checkpoint = read_checkpoint(cfg) if cfg.ckpt_path else None  # as data, before anything is built from its run
    cfg = with_run_config(cfg) if verb in ("validate", "sample") else with_scaled_learning_rates(cfg)
    # constructors check their arguments; none starts a process
    datamodule = instantiate(cfg, "dataset")
    strategy = instantiate(cfg, "strategy")
    if _is_decentralized(cfg):  # the gossip options against the graph (staleness, compression need a static one)
        _check("strategy", lambda: strategy.gossiper.build_topology(cfg.devices * cfg.num_nodes))
    evaluation = build_evaluation(cfg) if verb != "sample" else None  # sampling scores nothing
    if verb == "validate" and evaluation is None:
        raise UsageError("validate evaluates the checkpoint: leave evaluation.enabled=true")
    model = instantiate(cfg, "model")
    _check(
        "dataset.download",
        lambda: datamodule.prepare_data() if getattr(datamodule, "download", False) else None,  # downloads here, once
    )
    if evaluation is not None:
        _check("evaluation", lambda: evaluation.check(datamodule))
    _check_target(cfg, "logger")  # building a logger would create its run (a wandb run, a folder)
    if cfg.logger._target_.endswith("TensorBoardLogger") and not any(
        importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")
    ):
        raise UsageError("logger=tensorboard needs tensorboard, which is not installed: pip install tensorboard (the 'tensorboard' extra)")
    if checkpoint is not None:
        check_checkpoint(verb, cfg, model, checkpoint)
    if verb == "fit":
        check_launch(cfg, datamodule)
    if verb in ("fit", "validate") and hasattr(datamodule, "sample_shape"):
        check_data_fits_model(cfg, datamodule, model)
    return cfg


def check_data_fits_model(cfg: DictConfig, datamodule: Any, model: Any) -> None:
    """The generator makes samples of the data's shape (``dataset=imagefolder``'s 64 px against ``model=dcgan``'s 32
    would train on scrambled images)."""
    _check("dataset", lambda: datamodule.setup("fit"))
    real = tuple(datamodule.sample_shape())
    fake = tuple(model.sample(2, ema=False).shape[1:]) if hasattr(model, "sample") else real
    if real != fake:
        size = f"; e.g. model.generator.image_size={real[-1]}" if len(real) == 3 else ""
        raise UsageError(
            f"dataset={cfg.dataset.get('name', cfg.dataset._target_)} gives samples of shape {real} and the model "
            f"generates {fake}: they must match{size}"
        )


def check_launch(cfg: DictConfig, datamodule: Any) -> None:
    """What ``fit`` needs of this machine and its launcher, checked before any worker starts: the accelerator is
    here, a run of several nodes has a launcher on each, ``MASTER_PORT`` is a free port, and every rank's shard of
    the data holds a batch."""
    import torch

    from lightning_dpgan.processes import check_master_port_free, master_port_from_env

    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UsageError(f"trainer.accelerator={accelerator} needs a CUDA GPU, and torch sees none on this machine; use trainer=cpu")
    external = next((name for name in EXTERNAL_LAUNCHERS if name in os.environ), None)
    if cfg.num_nodes > 1 and external is None:
        raise UsageError(
            f"num_nodes={cfg.num_nodes} needs a launcher on every node (torchrun: recipes/multinode_torchrun.sh; SLURM: "
            "recipes/slurm_multinode.sbatch; or MASTER_ADDR and NODE_RANK set on each node); none was found, so "
            "this node would wait for the others forever"
        )
    _check("MASTER_PORT", master_port_from_env)
    if cfg.devices > 1 and cfg.num_nodes == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        try:
            check_master_port_free()  # Lightning's launcher is about to start workers on this machine
        except RuntimeError as err:
            raise UsageError(str(err)) from None
    if hasattr(datamodule, "check_shards"):
        _check("batch_size", lambda: datamodule.check_shards(cfg.devices * cfg.num_nodes))


def _check(key: str, check: Callable[[], Any]) -> None:
    try:
        check()
    except ValueError as err:  # DatasetNotFoundError, InceptionWeightsError, a bad value: each says what to do
        raise UsageError(str(err)) from None


def _check_int(key: str, value: Any) -> None:
    check_int(key, value, 1)


def build_topology_from(cfg: DictConfig) -> Any:
    from lightning_dpgan.topology import TopologyError, build_topology, check_rounds

    try:
        check_rounds(cfg.gossip_rounds)
        options = OmegaConf.to_container(cfg.topology.options, resolve=True) or {}
        return build_topology(cfg.topology.name, cfg.devices * cfg.num_nodes, **options)
    except TopologyError as err:
        raise UsageError(str(err)) from None


def read_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """The checkpoint at ``ckpt_path``, read as data (never unpickled): a Lightning checkpoint, or one
    :class:`UsageError` naming the file and why."""
    from lightning_dpgan.replicas import CheckpointError, read_main

    try:
        return read_main(str(cfg.ckpt_path), mmap=True)
    except CheckpointError as err:
        raise UsageError(f"ckpt_path: {err}") from None


def check_checkpoint(verb: str, cfg: DictConfig, model: Any, checkpoint: dict[str, Any]) -> None:
    """The checkpoint holds this model, with finite values (a NaN model samples NaN), and for ``fit`` its replica
    files are all there, belong to it and hold the same model; else one :class:`UsageError` naming the file and why."""
    from lightning_dpgan.replicas import CheckpointError, check_set, state_dict_difference

    path = str(cfg.ckpt_path)
    try:
        problem = state_dict_difference(model.state_dict(), checkpoint["state_dict"])
        if problem:
            raise CheckpointError(f"checkpoint {path!r} holds {problem}" if problem.startswith("non-finite")
                                  else f"checkpoint {path!r} is not of this model ({problem})")
        if verb == "fit" and _is_decentralized(cfg):
            check_set(path, cfg.devices * cfg.num_nodes)
    except CheckpointError as err:
        raise UsageError(f"ckpt_path: {err}") from None


def with_scaled_learning_rates(cfg: DictConfig) -> DictConfig:
    """``lr_scaling=sqrt``: under the decentralized strategy each worker steps at √(world size) × ``model.lr_*``.

    ``model.lr_*`` is then the centralized recipe's rate. Each DPOSG worker's Adam normalises the gradient of its
    own batch, which carries n× the noise variance of DDP's averaged one, so at equal rates its step is ~1/√n of
    DDP's, and DPOSG at √n × DDP's rate matches DDP (docs/quality.md). DDP keeps the rate as given.
    """
    from lightning_dpgan.gan import check_learning_rate

    scaling = cfg.get("lr_scaling")
    check_choice("lr_scaling", scaling, LR_SCALINGS, error=UsageError)
    for key in ("lr_g", "lr_d"):
        if key in cfg.model:
            _check(key, lambda: check_learning_rate(key, cfg.model[key]))  # name the value given, not the scaled one
    world_size = cfg.devices * cfg.num_nodes
    if scaling == "none" or world_size == 1 or not _is_decentralized(cfg):
        return cfg
    if "lr_g" not in cfg.model or "lr_d" not in cfg.model:
        raise UsageError(f"lr_scaling={scaling} scales model.lr_g and model.lr_d; model {cfg.model.get('_target_')!r} has no lr_g/lr_d")
    scaled = cfg.copy()
    for key in ("lr_g", "lr_d"):
        scaled.model[key] = cfg.model[key] * math.sqrt(world_size)
    return scaled


def build_evaluation(cfg: DictConfig, **kwargs: Any) -> Any:
    """The evaluation callback, or ``None`` with ``evaluation.enabled=false``."""
    node = cfg.evaluation.copy()
    OmegaConf.set_struct(node, False)
    enabled = node.pop("enabled", True)
    if not enabled:
        return None
    return instantiate(OmegaConf.create({"evaluation": node}), "evaluation", **kwargs)


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
    """For a checkpoint written by ``fit``: the dataset and model it was trained with (from its ``config.yaml``).

    A run folder may come from anyone, so its config may only build what this package's config groups build
    (:func:`check_run_targets`): instantiating any other ``_target_`` could run its author's code."""
    saved = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(str(cfg.ckpt_path)))), "config.yaml")
    if not os.path.isfile(saved):
        return cfg
    merged = cfg.copy()
    OmegaConf.set_struct(merged, False)
    try:
        run = OmegaConf.load(saved)
        nodes = {key: OmegaConf.to_container(run[key], resolve=True) for key in ("dataset", "model", "loss", "optim") if key in run}
    except Exception as err:  # a YAML or OmegaConf error
        raise UsageError(f"{saved}: not a readable run configuration ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    for key, node in nodes.items():
        check_run_targets(node, f"{saved}: {key}")  # resolved first: an interpolation cannot name another target later
        merged[key] = node
    return merged


#: what a run's config.yaml may build: the classes of these kinds that this package and torch.optim define, and
#: the loss factory; nothing else (a function that writes or removes files, a loader that unpickles)
RUN_TARGET_PREFIXES = ("lightning_dpgan.", "torch.optim.")
RUN_TARGET_FUNCTIONS = ("lightning_dpgan.losses.build_loss",)


def check_run_targets(node: Any, where: str) -> None:
    """Every ``_target_`` in ``node`` (a plain container) is a datamodule, module, optimizer or scheduler class of
    this package or ``torch.optim``, or the loss factory; else one :class:`UsageError` naming it. Nothing outside
    those modules is imported to find out."""
    import lightning.pytorch as pl
    import torch
    from hydra.utils import get_object

    if isinstance(node, list):
        for item in node:
            check_run_targets(item, where)
        return
    if not isinstance(node, dict):
        return
    target = node.get("_target_")
    if target is not None:
        allowed = False
        if isinstance(target, str) and target.startswith(RUN_TARGET_PREFIXES):
            try:
                found = get_object(target)
            except Exception:
                found = None
            kinds = (pl.LightningDataModule, torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)
            allowed = target in RUN_TARGET_FUNCTIONS or (isinstance(found, type) and issubclass(found, kinds))
        if not allowed:
            raise UsageError(
                f"{where}: _target_ {target!r} is not built from a run's config (it could run code); allowed: the "
                "datamodule, model, optimizer and scheduler classes of lightning_dpgan and torch.optim"
            )
    for key, value in node.items():
        check_run_targets(value, where)


def follow_the_launcher(cfg: DictConfig) -> DictConfig:
    """Under torchrun (elastic: ``--nnodes=MIN:MAX``) the world is what the rendezvous made it: ``devices`` and
    ``num_nodes`` follow the launcher's ``LOCAL_WORLD_SIZE`` and ``WORLD_SIZE``, so a restart with fewer hosts runs."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        return cfg
    local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    if (cfg.devices, cfg.num_nodes) == (local, world // local):
        return cfg
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"torchrun started {world} workers ({world // local} nodes x {local}): devices={local} num_nodes={world // local}")
    followed = cfg.copy()
    followed.devices, followed.num_nodes = local, world // local
    return followed


def resolve_last(verb: str, cfg: DictConfig, run_dir: str) -> tuple[DictConfig, bool]:
    """``ckpt_path=last``: the run directory's newest checkpoint, if it has one (else a fresh start), and the run may
    go on in its own directory. An elastic restart (torchrun, a SLURM requeue) re-runs the same command: it resumes."""
    if cfg.ckpt_path != "last":
        return cfg, False
    if verb != "fit":
        raise UsageError(f"ckpt_path=last resumes a fit in its run directory; {verb} needs ckpt_path=<a checkpoint file>")
    resolved = cfg.copy()
    resolved.ckpt_path = newest_last(os.path.join(os.path.abspath(run_dir), "checkpoints"))
    return resolved, True


def newest_last(folder: str) -> str | None:
    """The ``last*.ckpt`` in ``folder`` at the highest step (a folder written before it moved may hold
    ``last.ckpt`` and a newer ``last-v1.ckpt``), or ``None``."""
    from lightning_dpgan.replicas import CheckpointError, read_main

    steps = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.startswith("last") and name.endswith(".ckpt"):
            path = os.path.join(folder, name)
            try:
                steps[path] = int(read_main(path, mmap=True)["global_step"])
            except (CheckpointError, TypeError, ValueError) as err:
                raise UsageError(f"ckpt_path=last: {err}") from None
    return max(steps, key=lambda path: (steps[path], os.path.getmtime(path))) if steps else None


def make_run_directory(cfg: DictConfig, run_dir: str, resuming_here: bool = False) -> str:
    """Create the run directory, refusing one that already holds a run unless resuming from a checkpoint in it
    (``resuming_here``: ``ckpt_path=last``, which goes on in the run directory whether it has a checkpoint yet or not).

    Under torchrun every process runs the command: only global rank 0 creates and checks it (the others find it
    made, or never write into it: checkpoints go where rank 0's ModelCheckpoint says).
    """
    run_dir = os.path.abspath(run_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        return run_dir
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not resuming_here:
        ckpt = os.path.abspath(str(cfg.ckpt_path)) if cfg.ckpt_path else None
        if ckpt is None or not ckpt.startswith(run_dir + os.sep):
            raise UsageError(
                f"run directory {run_dir!r} already holds a run; choose another (hydra.run.dir=...), leave the default "
                f"(a new folder per run), or resume from a checkpoint in it (ckpt_path={run_dir}/checkpoints/last.ckpt)"
            )
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-test-{_RUN_ID}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise UsageError(f"run directory {run_dir!r} cannot be written ({err.strerror}); set output_dir=<a writable folder>") from None
    return run_dir


# ---------------------------------------------------------------------- running
def run_worker(command: Command) -> None:
    """A worker started by Lightning's popen launcher: the launching process's resolved configuration, no checks."""
    path = str(command.run_config)
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig) and command.verb == "fit"
    fit(cfg, os.path.dirname(os.path.abspath(path)), worker=True)


def run_hydra(command: Command) -> None:
    """Hydra's flags (multirun, --cfg, --info, shell completion) through ``hydra.main``."""
    import hydra

    _register_resolvers()

    def hydra_task(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        try:
            cfg = prepare(command.verb, cfg)
        except UsageError as err:
            fail(str(err), 2)
        run_dir = HydraConfig.get().runtime.output_dir
        if command.verb == "topology":
            print_topology(cfg)
            return
        if command.verb == "fit":
            save_run_overrides(run_dir, list(HydraConfig.get().overrides.task))
        TASKS[command.verb](cfg, run_dir)

    flags = {arg.split("=", 1)[0] for arg in command.overrides if _is_hydra_flag(arg)}
    if flags & {"-sc", "--shell-completion"} and any(arg.startswith("query") for arg in command.overrides):
        if complete_verb():
            return
    # Hydra's own help and completion know no verb key
    verb = [] if flags & {"--hydra-help", "-sc", "--shell-completion"} else [f"verb={command.verb}"]
    hydra_args, overrides = split_hydra_flags(command.overrides)
    sys.argv[:] = [sys.argv[0], *verb, *quote_paths(overrides), *hydra_args]  # hydra.main parses sys.argv
    hydra.main(config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config", version_base="1.3")(hydra_task)()


#: Hydra's flags that take the word after them (``--info`` only when it is one of its topics)
_FLAG_ARGUMENTS = {"-c": None, "--cfg": None, "-p": None, "--package": None,
                   "-i": ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")}
_FLAG_ARGUMENTS["--info"] = _FLAG_ARGUMENTS["-i"]


def split_hydra_flags(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags with their arguments, and the overrides: argparse takes the overrides as one run of words, and
    ``--info`` the word after it, so the flags go last."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if _is_hydra_flag(arg):
            flags.append(arg)
            takes = _FLAG_ARGUMENTS.get(arg, ())
            if i + 1 < len(args) and (takes is None or (takes and args[i + 1] in takes)):
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


def complete_verb() -> bool:
    """Shell completion (Hydra's hook runs ``lightning-dpgan -sc query=bash`` with the line typed so far in
    ``COMP_LINE``): print the verbs while the verb is typed (``True``), else drop the verb from the line so that
    Hydra completes the overrides after it."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    after = words[1:]
    if not after or (len(after) == 1 and not line.endswith(" ")):
        print(" ".join(verb for verb in VERBS if verb.startswith(after[0] if after else "")))
        return True
    if after[0] in VERBS:
        os.environ["COMP_LINE"] = " ".join([words[0], *after[1:]]) + (" " if line.endswith(" ") else "")
    return False


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def fit(cfg: DictConfig, run_dir: str, worker: bool = False) -> None:
    """Train. ``worker``: started by the popen launcher of the process that wrote ``config.yaml``."""
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from lightning_dpgan.gossip import GossipPeerError
    from lightning_dpgan.guard import NonFiniteError, NonFiniteGuard
    from lightning_dpgan.progress import StepProgressBar
    from lightning_dpgan.replicas import CheckpointError
    from lightning_dpgan.signals import StopOnSigterm

    quiet = worker or int(os.environ.get("RANK", "0")) != 0  # rank 0 reports; under torchrun every rank runs this
    world_size = cfg.devices * cfg.num_nodes
    config_path = os.path.join(run_dir, "config.yaml")

    # Threads per process: left to Lightning's launcher, which divides the cores among the processes with
    # torch.set_num_threads in this one too; setting OMP_NUM_THREADS here, after torch is loaded, would keep this
    # process at one thread per core, and every rank waits for the slowest.
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg, "dataset")
    model = instantiate(cfg, "model")
    # popen re-runs the command line, which under multirun would start the whole sweep again in every worker
    strategy = instantiate(cfg, "strategy", **({"start_method": "spawn"} if is_multirun() and world_size > 1 else {}))
    logger = make_logger(cfg, run_dir)
    if not quiet:
        _ = logger.experiment  # the logger's files first, so that it finds its folder as it left it
        OmegaConf.save(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), config_path)
    evaluation = build_evaluation(cfg, output_dir=run_dir)
    checkpoint = instantiate(cfg, "checkpoint", dirpath=os.path.join(run_dir, "checkpoints"))
    # With manual optimization and every_n_train_steps, ModelCheckpoint warns that no "pre-optimization state" was
    # saved; the state after the step is the one a resume needs (resuming is exact), so the warning is noise.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)
    callbacks: list[pl.Callback] = [checkpoint] + ([evaluation] if evaluation is not None else [])
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())  # toward max_steps, not per epoch of a small shard
    if not _is_decentralized(cfg):  # the strategy does both itself, through its gossip
        callbacks += [NonFiniteGuard(), StopOnSigterm()]
    trainer = instantiate(cfg, "trainer", strategy=strategy, logger=logger, callbacks=callbacks)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    sys.argv[1:] = ["fit", RUN_CONFIG_FLAG, config_path]  # what the popen launcher re-runs in each worker
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
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
    unmeasured = ("not measured (strategy.consensus_every=0 and no evaluation)" if _is_decentralized(cfg) and world_size > 1
                  else "0 (one process, or DDP: identical replicas)")
    communication = (
        f"{cfg.topology.name}, gossip_rounds={cfg.gossip_rounds}" if _is_decentralized(cfg) else cfg.strategy._target_.rsplit(".", 1)[-1]
    )
    gossip = compression_options(cfg) if _is_decentralized(cfg) else None
    if gossip is not None:
        communication += f", compression={gossip.compression} with consensus step {gossip.resolved_consensus_step():g}"
    files = sorted(
        name for name in os.listdir(run_dir) if not name.startswith(".") and not name.endswith(".tmp")
    )
    samples = [name for name in files if name.startswith("samples_step")]
    shown = [name for name in files if not name.startswith("samples_step")] + ([f"samples_step*.png ({len(samples)})"] if samples else [])
    last_ckpt = os.path.join(run_dir, "checkpoints", "last.ckpt")
    resume = f"\n  resume: {resume_line(last_ckpt)}" if os.path.isfile(last_ckpt) else ""
    return (
        f"\nfit done in {seconds:.1f} s on {world_size} processes ({communication}, {cfg.optim._target_.rsplit('.', 1)[-1]})\n"
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


def load_model(cfg: DictConfig) -> Any:
    """The checkpoint's consensus model (the file holds the average of the replicas), on the CPU, in eval mode."""
    from lightning_dpgan.replicas import read_main

    model = instantiate(cfg, "model")
    model.load_state_dict(read_main(str(cfg.ckpt_path))["state_dict"])  # checked by check_checkpoint already
    return model.eval()


def validate(cfg: DictConfig, run_dir: str) -> None:
    import json

    model = load_model(cfg)
    datamodule = instantiate(cfg, "dataset")
    datamodule.setup("validate")
    evaluation = build_evaluation(cfg, output_dir=run_dir)
    values = evaluation.evaluate_module(model, datamodule, picture=os.path.join(run_dir, "samples.png"))
    result = {"ckpt_path": os.path.abspath(str(cfg.ckpt_path)), "dataset": evaluation.dataset, **values}
    with open(os.path.join(run_dir, "validate.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"validate {result['ckpt_path']} ({evaluation.dataset}, {cfg.evaluation.num_samples} samples):")
    for key, value in values.items():
        print(f"  {key}: {value:.4g}")
    print(f"  written to {run_dir}/validate.json and samples.png")


def sample(cfg: DictConfig, run_dir: str) -> None:
    import numpy as np
    import torch

    from lightning_dpgan.evaluation import save_samples_picture

    model = load_model(cfg)
    torch.manual_seed(cfg.seed)
    samples = model.sample(cfg.num_samples, ema=cfg.evaluation.use_ema)
    np.save(os.path.join(run_dir, "samples.npy"), samples.numpy())
    dataset = cfg.evaluation.dataset or instantiate(cfg, "dataset").name
    save_samples_picture(samples, dataset, os.path.join(run_dir, "samples.png"), f"{cfg.num_samples} samples")
    print(f"sample: {tuple(samples.shape)} from {cfg.ckpt_path}\n  written to {run_dir}/samples.npy and samples.png")


def print_topology(cfg: DictConfig, run_dir: str | None = None) -> None:
    import numpy as np

    topology = build_topology_from(cfg)
    rounds = cfg.gossip_rounds
    with np.printoptions(precision=3, suppress=True, linewidth=160):
        for phase in range(topology.period):
            label = f"W (round {phase} of a period of {topology.period})" if topology.is_time_varying else "W"
            print(f"{label}:\n{topology.matrix(phase)}")
    for key, value in topology.summary(rounds).items():
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


TASKS: dict[str, Callable[[DictConfig, str], None]] = {"fit": fit, "validate": validate, "sample": sample, "topology": print_topology}
