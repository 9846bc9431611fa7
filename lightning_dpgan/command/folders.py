"""A run folder: the overrides a resume composes again, the printed resume line, and whether a folder may be used.

Hydra makes the folder (``hydra.run.dir``); a run that ends with a resume line names a checkpoint in it, and
``fit ckpt_path=<that file>`` composes the run's own command line again (its ``overrides.yaml``), so a resume is
the run it names, whatever the defaults are now.
"""

from __future__ import annotations

import os
import re
import shlex
import uuid
from collections.abc import Sequence

from omegaconf import OmegaConf

from lightning_dpgan.command.errors import UsageError
from lightning_dpgan.gossip.options import JOIN

#: keys whose values are paths: quoted for Hydra, whose grammar reads ``=`` and ``,`` (a multirun job's folder name)
PATH_KEYS = ("ckpt_path", "output_dir", "hydra.run.dir", "hydra.sweep.dir", "dataset.root", "evaluation.inception_weights")
#: a run's overrides that name where it is, not what it is: never carried into its resume
PLACE_KEYS = ("ckpt_path", "output_dir", "hydra.run.dir", "hydra.sweep.dir", "verb")
RUN_OVERRIDES = "overrides.yaml"  # beside config.yaml: the command line a resume composes again
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_/.\-+@%*?]*")  # what Hydra's grammar reads unquoted as one value
_RUN_ID = uuid.uuid4().hex[:6]  # one per launching process: two runs started in the same second get two folders
#: what a run's overrides.yaml may not hold: it comes from the run folder, which may come from anyone
_BUILDING = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")


def register_resolvers() -> None:
    """``${run_id:}`` in ``hydra.run.dir`` and ``hydra.sweep.dir`` (conf/config.yaml)."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", lambda: _RUN_ID)


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


def override_value(overrides: Sequence[str], key: str) -> str | None:
    values = [o.partition("=")[2] for o in overrides if override_key(o) == key]
    return _unquote(values[-1]) if values else None


def with_run_overrides(verb: str, overrides: list[str]) -> list[str]:
    """Resuming a fit (``ckpt_path=<run>/checkpoints/<file>``, or ``ckpt_path=last hydra.run.dir=<run>``) composes
    the run's own command line again, with the keys given now replacing the same keys of the run's, and goes on in
    the run's directory."""
    ckpt = override_value(overrides, "ckpt_path")
    if verb != "fit" or not ckpt or ckpt == JOIN:  # a joiner's state comes from the run, its settings from this line
        return overrides
    if ckpt == "last":
        run_dir = override_value(overrides, "hydra.run.dir")
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
    place = [] if "hydra.run.dir" in given else quote_paths([f"hydra.run.dir={run_dir}"])
    return [o for o in stored if override_key(o) not in given | set(PLACE_KEYS)] + overrides + place


def save_run_overrides(run_dir: str, overrides: Sequence[str]) -> None:
    """What :func:`with_run_overrides` reads back (rank 0 alone; the others find it written)."""
    if int(os.environ.get("RANK", "0")) == 0:
        kept = [o for o in overrides if override_key(o) not in PLACE_KEYS and not override_key(o).startswith("hydra.")]
        OmegaConf.save(OmegaConf.create(kept), os.path.join(run_dir, RUN_OVERRIDES))


def resume_line(checkpoint: str) -> str:
    return f"python -m lightning_dpgan fit ckpt_path={shlex.quote(checkpoint)}"


def check_run_directory(run_dir: str, ckpt_path: str | None, resuming_here: bool) -> None:
    """A folder that already holds a run is refused unless resuming from a checkpoint in it (``resuming_here``:
    ``ckpt_path=last``, which goes on in the run directory whether it has a checkpoint yet or not), and the folder
    must be writable. Under torchrun only global rank 0 checks (the others never write into it)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if os.listdir(run_dir) and not resuming_here:
        ckpt = os.path.abspath(ckpt_path) if ckpt_path else None
        if ckpt is None or not ckpt.startswith(run_dir + os.sep):
            raise UsageError(
                f"run directory {run_dir!r} already holds a run; choose another (hydra.run.dir=...), leave the default "
                f"(a new folder per run), or resume from a checkpoint in it (ckpt_path={run_dir}/checkpoints/last.ckpt)"
            )
    probe = os.path.join(run_dir, f".write-test-{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise UsageError(f"run directory {run_dir!r} cannot be written ({err.strerror}); set output_dir=<a writable folder>") from None


def remove_if_unused(run_dir: str, output_dir: str) -> None:
    """A refused run leaves no folder: the one Hydra made for it, if still empty, and the empty ones above it up to
    ``output_dir``."""
    top, folder = os.path.abspath(output_dir), os.path.abspath(run_dir)
    while True:
        try:
            os.rmdir(folder)  # only an empty folder
        except OSError:
            return
        folder = os.path.dirname(folder)
        if not (folder.startswith(top + os.sep) or folder == top):
            return
