"""``python -m lightning_dpgan <verb> [Hydra overrides]``: ``fit``, ``validate``, ``sample``, ``topology`` and ``plan``.

Every run goes through one ``hydra.main``: the verb becomes the ``verb`` key, Hydra composes the configuration and
makes the run directory, and the task checks the configuration by building its objects once
(:mod:`lightning_dpgan.command.checks`) before any worker starts. Bad input ends with one ``error:`` line and exit
status 2, and leaves no folder. Lightning's launcher starts the other workers by re-running the command line
through Hydra into the same directory; each builds its objects from the same configuration without the checks.
Under ``-m`` every job is checked and run like a single run, its workers started with ``spawn`` (a re-run would
start the whole sweep in each).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

from omegaconf import DictConfig

from lightning_dpgan.checks import check_choice
from lightning_dpgan.command.errors import UsageError, fail

CONFIG_PACKAGE = "lightning_dpgan.conf"
VERBS = {
    "fit": "train (default: DPOSG on the grid of 25 Gaussians, 4 CPU workers gossiping on a ring)",
    "validate": "evaluate the consensus model of a checkpoint: ckpt_path=...",
    "sample": "write num_samples samples of a checkpoint as samples.npy and samples.png: ckpt_path=...",
    "topology": "print W, degree, spectral gap and rho(W^t) for topology, devices x num_nodes, gossip_rounds",
    "plan": "predict seconds per iteration of DDP and gossip settings for the model: hosts=, bandwidth=, latency_ms=",
}
HYDRA_FLAGS = ("-m", "--multirun", "-c", "--cfg", "-p", "--package", "--info", "-i", "--resolve", "-sc", "--shell-completion", "--hydra-help")
#: Hydra's flags that take the word after them (``--info`` only when it is one of its topics)
_FLAG_ARGUMENTS: dict[str, tuple[str, ...] | None] = {"-c": None, "--cfg": None, "-p": None, "--package": None}
_FLAG_ARGUMENTS["-i"] = _FLAG_ARGUMENTS["--info"] = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
EXAMPLES = """examples:
  python -m lightning_dpgan fit topology=ring gossip_rounds=3 devices=8
  python -m lightning_dpgan fit experiment=digits strategy=ddp logger=wandb
  python -m lightning_dpgan fit -m topology=ring,torus,exponential
  python -m lightning_dpgan topology topology=exponential devices=16 gossip_rounds=2
  python -m lightning_dpgan plan hosts=256 bandwidth=1gbit latency_ms=30 experiment=digits
  python -m lightning_dpgan sample ckpt_path=runs/fit/<run>/checkpoints/last.ckpt num_samples=1000
Hydra's flags (-m, --cfg job, --info, -sc install=bash) go after the verb."""
#: the job name Lightning's launcher gives the workers it re-runs through Hydra
WORKER_JOB = "train_ddp_process_"
_started = False  # whether Hydra has called the task: an OSError before it is Hydra making the run directory


@dataclass
class Command:
    verb: str = "fit"
    args: list[str] = field(default_factory=list)
    relaunched: bool = False  # ``verb=fit ...``: the line Hydra parsed already, re-run by Lightning's launcher
    help: bool = False
    version: bool = False


def run() -> None:
    """The program (``python -m lightning_dpgan``, ``lightning-dpgan``): :func:`main`, then every object is frozen.
    They are all garbage by then, and the interpreter's exit would walk them (torch, Lightning and Hydra: seconds in
    every process); frozen, they are left to the operating system. atexit handlers still run."""
    try:
        main()
    finally:
        gc.freeze()


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
        flags, overrides = split_hydra_flags(command.args)
        if {"-sc", "--shell-completion"} & set(flags) and any(arg.startswith("query") for arg in overrides):
            if complete_verb():
                return
        hydra_args = hydra_command_line(command, flags, overrides)
    except UsageError as err:
        fail(str(err))
    run_hydra(hydra_args)


def parse_command(argv: list[str]) -> Command:
    """The verb (first word that is not a flag), ``--help``/``--version`` before or after it, the rest for Hydra."""
    command = Command()
    rest = [arg for arg in argv if arg not in ("-h", "--help", "-V", "--version")]
    command.version = any(arg in ("-V", "--version") for arg in argv)
    command.help = any(arg in ("-h", "--help") for arg in argv) or not (rest or command.version)
    if command.help or command.version:
        return command
    if _is_hydra_flag(rest[0]):  # shell completion calls ``lightning-dpgan -sc query=bash``: no verb
        rest = ["fit", *rest]
    command.relaunched = rest[0].startswith("verb=")
    command.verb = rest[0].removeprefix("verb=")
    command.args = rest[1:]
    check_choice("verb", command.verb, VERBS, error=UsageError)
    return command


def _is_hydra_flag(arg: str) -> bool:
    return arg.split("=", 1)[0] in HYDRA_FLAGS


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


def hydra_command_line(command: Command, flags: list[str], overrides: list[str]) -> list[str]:
    """What ``hydra.main`` parses: ``verb=<verb>``, the overrides (a resume's with its run's own), Hydra's flags."""
    from lightning_dpgan.command.folders import override_value, quote_paths, with_run_overrides

    if not command.relaunched:
        overrides = with_run_overrides(command.verb, quote_paths(overrides))
    if command.verb == "plan":
        from lightning_dpgan.command.plan import hydra_overrides

        overrides = hydra_overrides(overrides)  # its own keys checked before anything is composed or built
    if command.verb in ("topology", "plan") and override_value(overrides, "hydra.run.dir") is None:
        overrides = [*overrides, "hydra.run.dir=."]  # these read the configuration only: no run directory
    hydra_only = {"--hydra-help", "-sc", "--shell-completion"} & set(flags)  # Hydra's help and completion know no verb
    return [*([] if hydra_only else [f"verb={command.verb}"]), *overrides, *flags]


def run_hydra(hydra_args: list[str]) -> None:
    """``hydra.main`` on ``hydra_args``; its composition errors (an unknown option, a bad override) as one line."""
    import hydra
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from lightning_dpgan.command.checks import hydra_message
    from lightning_dpgan.command.folders import register_resolvers

    global _started
    _started = False
    register_resolvers()
    sys.argv[:] = [sys.argv[0], *hydra_args]  # what hydra.main parses, and what Lightning's launcher re-runs
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its own several lines and exiting 1
    try:
        hydra.main(config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config", version_base="1.3")(run_task)()
    except MissingConfigException as err:  # an unknown option of a group: one line instead of Hydra's search path
        group, _, name = str(err.missing_cfg_file).rpartition("/")
        fail(f"unknown {group} {name!r}; allowed: {', '.join(err.options)}" if group and err.options
             else hydra_message(err).splitlines()[0])
    except (HydraException, OmegaConfBaseException) as err:
        fail(hydra_message(err))
    except OSError as err:
        if _started:  # from the run itself: its own traceback
            raise
        fail(f"run directory {err.filename!r} cannot be written ({err.strerror}); set output_dir=<a writable folder>")
    finally:
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.hydra_config import HydraConfig

        GlobalHydra.instance().clear()  # the next main() in this process (a test) composes afresh, and a Trainer
        HydraConfig.instance().cfg = None  # built later in it is not taken for a worker of this run
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error


def run_task(cfg: DictConfig) -> None:
    """One run (or one job of a multirun) in the directory Hydra made for it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lightning_dpgan.command import checks, folders, verbs

    global _started
    _started = True  # Hydra has made the run directory
    hydra_cfg = HydraConfig.get()
    verb, run_dir = str(cfg.verb), os.path.abspath(hydra_cfg.runtime.output_dir)
    if hydra_cfg.job.name.startswith(WORKER_JOB):  # checked by the process that started this one
        run = checks.build(checks.with_scaled_learning_rates(cfg), run_dir)
        verbs.fit(run, worker=True)
        return
    try:
        cfg = checks.follow_the_launcher(cfg)
        if verb not in ("topology", "plan"):
            folders.check_run_directory(run_dir, cfg.ckpt_path, resuming_here=cfg.ckpt_path == "last")
        run = checks.prepare(verb, cfg, run_dir, spawn=hydra_cfg.mode == RunMode.MULTIRUN)
    except UsageError as err:
        folders.remove_if_unused(run_dir, str(cfg.output_dir))
        fail(str(err))
    if verb == "fit":
        folders.save_run_overrides(run_dir, list(hydra_cfg.overrides.task))
    verbs.VERBS[verb](run)


def usage() -> str:
    defaults = compose_defaults()
    lines = ["usage: python -m lightning_dpgan {" + ",".join(VERBS) + "} [key=value ...]", "", "verbs:"]
    lines += [f"  {verb:<9} {text}" for verb, text in VERBS.items()]
    lines += ["", "config groups (group=option):"]
    lines += [f"  {group:<11} {', '.join(options)}" for group, options in config_groups().items()]
    shortcuts = [k for k, v in defaults.items() if not isinstance(v, DictConfig) and k != "verb"]
    lines += ["", "shortcuts (key=value): " + ", ".join(f"{k}={defaults[k]}" for k in shortcuts), "", EXAMPLES]
    lines += ["", "-h/--help: this text; -V/--version: the version"]
    return "\n".join(lines)


def compose_defaults() -> DictConfig:
    """The default configuration, for the usage text's shortcuts."""
    from hydra import compose, initialize_config_module

    from lightning_dpgan.command.folders import register_resolvers

    register_resolvers()
    with initialize_config_module(CONFIG_PACKAGE, version_base="1.3"):
        return compose("config", overrides=["verb=fit"])


def config_groups() -> dict[str, list[str]]:
    root = resources.files(CONFIG_PACKAGE)
    return {
        entry.name: sorted(f.name.removesuffix(".yaml") for f in entry.iterdir() if f.name.endswith(".yaml"))
        for entry in sorted(root.iterdir(), key=lambda e: e.name)
        if entry.is_dir() and not entry.name.startswith("_")
    }


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
