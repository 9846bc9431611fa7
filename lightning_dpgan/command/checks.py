"""Before any worker starts: the configuration checked, and the run's objects built once.

Every cheap object is built here (constructors check their arguments; none starts a process), checkpoints are read
as data before anything is built from their run, and what ``fit`` needs of the machine and its launcher is
checked. The objects built are the ones the verb then uses: a worker that Lightning's launcher starts builds its
own from the same configuration, in the same order, from the same seed.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_dpgan.checks import check_choice, check_int
from lightning_dpgan.command.errors import UsageError
from lightning_dpgan.gossip.options import JOIN
from lightning_dpgan.topology import MAX_WORLD_SIZE

LR_SCALINGS = ("none", "sqrt")  # lr_scaling: the decentralized workers' rate is model.lr_* times 1 or sqrt(n)
MAX_SEED = 2**32 - 1
#: environment variables that say a launcher started this process on each node (torchrun, SLURM, a manual launch)
EXTERNAL_LAUNCHERS = ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "NODE_RANK")
#: what a run's config.yaml may build: the classes of these kinds that this package and torch.optim define, and
#: the loss factory; nothing else (a function that writes or removes files, a loader that unpickles)
RUN_TARGET_PREFIXES = ("lightning_dpgan.", "torch.optim.")
RUN_TARGET_FUNCTIONS = ("lightning_dpgan.losses.build_loss",)


@dataclass
class Run:
    """A verb's configuration (as the workers use it) and the objects built from it."""

    cfg: DictConfig
    run_dir: str
    datamodule: Any = None
    model: Any = None
    strategy: Any = None
    evaluation: Any = None
    topology: Any = None
    plan: Any = None  # the plan verb's request (lightning_dpgan.command.plan.Request)


def prepare(verb: str, cfg: DictConfig, run_dir: str, spawn: bool = False) -> Run:
    """Check the configuration by building its objects; for ``fit`` with the scaled learning rates, for
    ``validate``/``sample`` with the run's own dataset and model. ``spawn``: the workers are started with ``spawn``
    (a multirun job: popen would start the whole sweep again in every worker)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UsageError(f"{missing[0]} must be given: add {missing[0]}=... (e.g. dataset.root=<a folder> for dataset=imagefolder)")
    for key in ("devices", "num_nodes", "max_steps", "batch_size", "num_samples"):
        _check(lambda: check_int(key, cfg[key], 1))
    _check(lambda: check_int("seed", cfg.seed, 0, MAX_SEED, why="the range numpy's and torch's generators take"))
    _check(lambda: check_int("devices x num_nodes", cfg.devices * cfg.num_nodes, 1, MAX_WORLD_SIZE,
                             why="every worker builds and checks the dense n x n mixing matrix"))
    if verb == "topology":
        return Run(cfg, run_dir, topology=build_topology_from(cfg))
    if verb == "plan":  # the model and data to measure, nothing else
        import lightning.pytorch as pl

        from lightning_dpgan.command.plan import request_from

        request = request_from(cfg)
        pl.seed_everything(cfg.seed, verbose=False)
        return Run(cfg, run_dir, datamodule=instantiate(cfg, "dataset"), model=instantiate(cfg, "model"), plan=request)
    _check_rounds(cfg.gossip_rounds)  # by its key on the command line, before the strategy names it its own way
    if verb in ("validate", "sample") and not cfg.ckpt_path:
        raise UsageError(f"{verb} needs ckpt_path=<a checkpoint file>, got {cfg.ckpt_path!r}")
    if cfg.ckpt_path == "last" and verb != "fit":
        raise UsageError(f"ckpt_path=last resumes a fit in its run directory; {verb} needs ckpt_path=<a checkpoint file>")
    if cfg.ckpt_path == JOIN:
        check_join(verb, cfg)
    checkpoint_path = _checkpoint_to_read(cfg, run_dir)
    checkpoint = read_checkpoint(checkpoint_path) if checkpoint_path else None  # as data, before anything is built
    cfg = with_run_config(cfg) if verb in ("validate", "sample") else with_scaled_learning_rates(cfg)
    run = build(cfg, run_dir, evaluate=verb != "sample", spawn=spawn)  # sampling scores nothing
    if verb == "fit" and is_decentralized(cfg):  # the graph, and the gossip options against it
        try:
            run.topology = run.strategy.gossiper.build_topology(cfg.devices * cfg.num_nodes)
        except ValueError as err:  # a TopologyError, or options that need a static graph (staleness, compression)
            raise UsageError(str(err)) from None
    if verb == "validate" and run.evaluation is None:
        raise UsageError("validate evaluates the checkpoint: leave evaluation.enabled=true")
    with _same_random_state():  # the checks draw; the run then draws as a worker does
        _check_objects(verb, run, checkpoint_path, checkpoint)
    return run


def build(cfg: DictConfig, run_dir: str, evaluate: bool = True, spawn: bool = False) -> Run:
    """The run's objects, seeded: what the launching process checks and trains with, and what each worker builds."""
    import lightning.pytorch as pl

    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg, "dataset")
    model = instantiate(cfg, "model")
    world_size = cfg.devices * cfg.num_nodes
    strategy = instantiate(cfg, "strategy", **({"start_method": "spawn"} if spawn and world_size > 1 else {}))
    evaluation = build_evaluation(cfg, output_dir=run_dir) if evaluate else None
    return Run(cfg, run_dir, datamodule, model, strategy, evaluation)


def _check_objects(verb: str, run: Run, checkpoint_path: str | None, checkpoint: dict[str, Any] | None) -> None:
    cfg, datamodule = run.cfg, run.datamodule
    _check(lambda: datamodule.prepare_data() if getattr(datamodule, "download", False) else None)  # downloads once
    if run.evaluation is not None:
        _check(lambda: run.evaluation.check(datamodule))
    _check_target(cfg, "logger")  # building a logger would create its run (a wandb run, a folder)
    if cfg.logger._target_.endswith("TensorBoardLogger") and not any(
        importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")
    ):
        raise UsageError("logger=tensorboard needs tensorboard, which is not installed: pip install tensorboard (the 'tensorboard' extra)")
    if checkpoint is not None and checkpoint_path is not None:
        check_checkpoint(verb, cfg, run.model, checkpoint_path, checkpoint)
    if verb == "fit":
        check_launch(cfg, datamodule)
    if verb in ("fit", "validate") and hasattr(datamodule, "sample_shape"):
        check_data_fits_model(cfg, datamodule, run.model)


@contextmanager
def _same_random_state() -> Iterator[None]:
    import numpy as np
    import torch

    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def _checkpoint_to_read(cfg: DictConfig, run_dir: str) -> str | None:
    """The file a fit resumes from: ``ckpt_path``, or for ``last`` the one Lightning will take in the run's
    ``checkpoints/`` (through :class:`~lightning_dpgan.checkpointing.FinalModelCheckpoint`), if there is one."""
    from lightning_dpgan.checkpointing import newest_last
    from lightning_dpgan.loading import CheckpointError

    if cfg.ckpt_path == JOIN:
        return None  # the state comes from a member of the run
    if cfg.ckpt_path != "last":
        return str(cfg.ckpt_path) if cfg.ckpt_path else None
    try:
        return newest_last(os.path.join(run_dir, "checkpoints"))
    except CheckpointError as err:
        raise UsageError(f"ckpt_path=last: {err}") from None


def check_join(verb: str, cfg: DictConfig) -> None:
    """``ckpt_path=join``: one worker, started alone, joins a live run of the same settings through its store."""
    membership = cfg.get("membership", "fixed")
    if verb != "fit":
        raise UsageError(f"ckpt_path={JOIN} joins a live run, which only fit does; {verb} needs ckpt_path=<a checkpoint file>")
    if not is_decentralized(cfg) or membership != "live":
        raise UsageError(f"ckpt_path={JOIN} joins a live run: it needs membership=live and the run's settings, got membership={membership}")
    if cfg.devices * cfg.num_nodes != 1:
        raise UsageError(f"ckpt_path={JOIN} starts one worker that joins the run: devices=1 num_nodes=1, got devices={cfg.devices} num_nodes={cfg.num_nodes}")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise UsageError(
            f"ckpt_path={JOIN} finds the run in its c10d store at MASTER_ADDR:MASTER_PORT (the run's first host and "
            f"port); {' and '.join(missing)} not set"
        )


def check_data_fits_model(cfg: DictConfig, datamodule: Any, model: Any) -> None:
    """The generator makes samples of the data's shape (``dataset=imagefolder``'s 64 px against ``model=dcgan``'s 32
    would train on scrambled images)."""
    _check(lambda: datamodule.setup("fit"))
    real = tuple(datamodule.sample_shape())
    fake = tuple(model.sample(2, ema=False).shape[1:]) if hasattr(model, "sample") else real
    if real != fake:
        size = f"; e.g. model.generator.image_size={real[-1]}" if len(real) == 3 else ""
        raise UsageError(
            f"dataset={cfg.dataset.get('name', cfg.dataset._target_)} gives samples of shape {real} and the model "
            f"generates {fake}: they must match{size}"
        )


def check_launch(cfg: DictConfig, datamodule: Any) -> None:
    """What ``fit`` needs of this machine and its launcher: the accelerator is here, a run of several nodes has a
    launcher on each, a live run under torchrun one worker per agent, ``MASTER_PORT`` is a free port, and every rank's shard of
    the data holds a batch."""
    import torch

    from lightning_dpgan.processes import check_master_port_free, master_port_from_env

    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if cfg.get("membership", "fixed") == "live" and (accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())):
        raise UsageError(
            f"membership=live runs on CPU workers only (each new member set gets a gloo group), got "
            f"trainer.accelerator={accelerator}{' on a machine with a GPU' if accelerator == 'auto' else ''}; use trainer=cpu"
        )
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UsageError(f"trainer.accelerator={accelerator} needs a CUDA GPU, and torch sees none on this machine; use trainer=cpu")
    external = next((name for name in EXTERNAL_LAUNCHERS if name in os.environ), None)
    if cfg.num_nodes > 1 and external is None:
        raise UsageError(
            f"num_nodes={cfg.num_nodes} needs a launcher on every node (torchrun: recipes/multinode_torchrun.sh; SLURM: "
            "recipes/slurm_multinode.sbatch; or MASTER_ADDR and NODE_RANK set on each node); none was found, so "
            "this node would wait for the others forever"
        )
    _check(master_port_from_env)
    if cfg.get("membership", "fixed") == "live" and cfg.devices > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        raise UsageError(
            f"membership=live under torchrun needs one worker per agent, got devices={cfg.devices} (--nproc-per-node): "
            "torchrun's agent stops every worker it started when one fails. Start one agent per host with "
            "--nproc-per-node=1 (recipes/live_torchrun.sh; docs/guide.md: live membership)"
        )
    if cfg.devices > 1 and cfg.num_nodes == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        try:
            check_master_port_free()  # Lightning's launcher is about to start workers on this machine
        except RuntimeError as err:
            raise UsageError(str(err)) from None
    if hasattr(datamodule, "check_shards"):
        _check(lambda: datamodule.check_shards(cfg.devices * cfg.num_nodes))


def _check(check: Callable[[], Any]) -> None:
    try:
        check()
    except ValueError as err:  # DatasetNotFoundError, InceptionWeightsError, a bad value: each says what to do
        raise UsageError(str(err)) from None


def _check_rounds(rounds: Any) -> None:
    from lightning_dpgan.topology import TopologyError, check_rounds

    try:
        check_rounds(rounds)
    except TopologyError as err:
        raise UsageError(str(err)) from None


def build_topology_from(cfg: DictConfig) -> Any:
    from lightning_dpgan.topology import TopologyError, build_topology

    _check_rounds(cfg.gossip_rounds)
    try:
        options = OmegaConf.to_container(cfg.topology.options, resolve=True) or {}
        return build_topology(cfg.topology.name, cfg.devices * cfg.num_nodes, **options)
    except TopologyError as err:
        raise UsageError(str(err)) from None


def read_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at ``path``, read as data (never unpickled), or one :class:`UsageError` naming it and why."""
    from lightning_dpgan.replicas import CheckpointError, read_main

    try:
        return read_main(path, mmap=True)
    except CheckpointError as err:
        raise UsageError(f"ckpt_path: {err}") from None


def check_checkpoint(verb: str, cfg: DictConfig, model: Any, path: str, checkpoint: dict[str, Any]) -> None:
    """The checkpoint holds this model, with finite values (a NaN model samples NaN), and for ``fit`` its replica
    files are all there, belong to it and hold the same model; else one :class:`UsageError` naming the file and why."""
    from lightning_dpgan.replicas import CheckpointError, check_set, state_dict_difference

    try:
        problem = state_dict_difference(model.state_dict(), checkpoint["state_dict"])
        if problem:
            raise CheckpointError(f"checkpoint {path!r} holds {problem}" if problem.startswith("non-finite")
                                  else f"checkpoint {path!r} is not of this model ({problem})")
        if verb == "fit" and is_decentralized(cfg):
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
            _check(lambda: check_learning_rate(key, cfg.model[key]))  # name the value given, not the scaled one
    world_size = cfg.devices * cfg.num_nodes
    if scaling == "none" or world_size == 1 or not is_decentralized(cfg):
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
    if not node.pop("enabled", True):
        return None
    return instantiate(OmegaConf.create({"evaluation": node}), "evaluation", **kwargs)


def is_decentralized(cfg: DictConfig) -> bool:
    return str(cfg.strategy.get("_target_", "")).endswith("DecentralizedStrategy")


def hydra_message(err: BaseException) -> str:
    message = str(err).strip()
    cause = err.__cause__
    return f"{message}: {cause}" if cause is not None and str(cause) not in message else message


def _check_target(cfg: DictConfig, key: str) -> None:
    from hydra.utils import get_class

    try:
        get_class(cfg[key]._target_)
    except Exception as err:  # an import error names the missing package
        raise UsageError(f"{key}: {hydra_message(err)}") from None


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
    for value in node.values():
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
