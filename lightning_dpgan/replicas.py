"""Checkpoint sets: Lightning's main file (the consensus model) plus one replica file per rank, committed as one unit.

Lightning writes one file, from global rank 0, which here holds the *consensus* model, so that
``load_from_checkpoint`` gives a usable model. Each replica differs, so resuming every replica exactly needs each
rank's own model, optimizer state (anchors, moments), random streams and gossip state. A set is written so that a
crash at any moment leaves either the previous set or the new one, never a mix:

1. every rank writes its replica into a folder of its own for this set,
   ``<checkpoint>.replicas/step<N>-<token>/rank<r>.pt`` (temporary file, ``fsync``, ``os.replace``);
2. after a barrier, rank 0 writes the main file the same way: replacing it is the commit;
3. only then are the folders of earlier sets of the same path removed.

The main file records the set's run id, step, token and world size; each replica records the same, so resuming
refuses a replica from another set instead of silently taking the consensus model. Everything is read with
``torch.load(weights_only=True)``: a checkpoint is data, and loading one never runs code.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from lightning_dpgan.loading import CheckpointError, is_local, safe_load

CHECKPOINT_KEY = "decentralized"  # the main checkpoint's entry describing its replica set
#: a replica file's own entry: its set, its rank and what the strategy alone keeps (the gossip engine's state, a
#: Fabric replica's random streams), apart from what the user saved, so that neither overwrites the other
REPLICA_KEY = "lightning_dpgan"


@dataclass(frozen=True)
class ReplicaSet:
    """What the main file records of its replicas, and what every replica file must repeat."""

    run_id: str
    step: int
    token: str
    world_size: int
    topology: str
    #: the ids of the workers whose replicas these are (a live run's members after a change; else every rank)
    members: tuple[int, ...] = ()

    @property
    def folder_name(self) -> str:
        return f"step{self.step:09d}-{self.token}"

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ReplicaSet:
        """The set a main file records; :class:`CheckpointError` naming the first entry missing or of the wrong type
        (a ``world_size`` of ``"2"`` is not 2)."""
        kinds = {"run_id": str, "step": int, "token": str, "world_size": int, "topology": str}
        for key, kind in kinds.items():
            value = meta.get(key)
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < (1 if key == "world_size" else 0)):
                raise CheckpointError(
                    f"its replica set's {key} is {'missing' if key not in meta else repr(value)}, not "
                    f"{'a positive integer' if key == 'world_size' else 'an integer >= 0' if kind is int else 'a string'}"
                )
        members = meta.get("members") or range(meta["world_size"])
        return cls(**{k: meta[k] for k in kinds}, members=tuple(int(m) for m in members))


def set_folder(checkpoint_path: _PATH, replica_set: ReplicaSet) -> str:
    return os.path.join(f"{checkpoint_path}.replicas", replica_set.folder_name)


def replica_path(checkpoint_path: _PATH, replica_set: ReplicaSet, rank: int) -> str:
    """Where rank ``rank`` keeps its replica of the set that the checkpoint at ``checkpoint_path`` commits."""
    return os.path.join(set_folder(checkpoint_path, replica_set), f"rank{rank}.pt")


def main_meta(replica_set: ReplicaSet, gossip_state: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint[CHECKPOINT_KEY]`` of the main file."""
    return {**asdict(replica_set), "gossip": gossip_state}


# ---------------------------------------------------------------------- writing
def atomic_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` to a temporary file beside ``path``, ``fsync``, then ``os.replace``: readers see the old file
    or the whole new one, also after a power cut. Remote (fsspec) paths go through a filesystem transaction. A local
    write that fails (a full disk) leaves the old file and raises :class:`CheckpointError` (:func:`write_error`)."""
    path = os.fspath(path)
    fs = get_filesystem(path)
    if not is_local(path):
        with fs.transaction, fs.open(path, "wb") as f:
            torch.save(obj, f)
        return
    folder = os.path.dirname(os.path.abspath(path))
    for stale in glob.glob(f"{glob.escape(path)}.tmp*"):  # left by a writer killed mid-write
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        with open(temporary, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError, without errno
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise write_error(path, obj, err) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
    _fsync_folder(folder)


def write_error(path: str, obj: Any, err: BaseException) -> CheckpointError:
    """One line for a checkpoint file that could not be written: the path, why, and the space it needs against the
    space its filesystem has (measured after the partial file is gone)."""
    needed = tensor_bytes(obj)
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:
        free = None
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    elif free is not None and free < needed:
        reason = "No space left on device"
    else:
        lines = str(err).strip().splitlines()
        reason = f"{type(err).__name__}: {lines[0] if lines else ''}"
    space = f"; it needs about {_size(needed)} and its filesystem has {_size(free)} free" if free is not None else ""
    return CheckpointError(f"checkpoint file {path!r} could not be written ({reason}){space}; the checkpoints written before it are kept")


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensor storages in ``obj`` (dicts, lists and tuples of them), each storage counted once:
    about what ``torch.save`` writes."""
    seen: dict[int, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(obj)
    return sum(seen.values())


def _size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("bytes", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def write_replica(
    checkpoint_path: _PATH, replica_set: ReplicaSet, rank: int, contents: dict[str, Any], own: dict[str, Any] | None = None
) -> None:
    """Rank ``rank``'s file of the set: ``contents`` as given, and under :data:`REPLICA_KEY` the set, the rank and
    ``own`` (the strategy's entries)."""
    check_free_key(contents, REPLICA_KEY)
    meta = {**asdict(replica_set), "rank": rank, **(own or {})}
    atomic_save({**contents, REPLICA_KEY: meta}, replica_path(checkpoint_path, replica_set, rank))


def check_free_key(state: dict[str, Any], key: str) -> None:
    """A checkpoint entry this package writes must not also be the user's (``ValueError`` naming it)."""
    if key in state:
        raise ValueError(f"the checkpoint entry {key!r} is written by lightning_dpgan; name your entry otherwise")


def replica_own(replica: dict[str, Any]) -> dict[str, Any]:
    """What the strategy keeps in a replica file (an older file keeps it among the user's entries)."""
    own = replica.get(REPLICA_KEY)
    return own if isinstance(own, dict) else replica


def replica_contents(replica: dict[str, Any]) -> dict[str, Any]:
    """A replica file's entries as they were saved, without the strategy's."""
    return {k: v for k, v in replica.items() if k != REPLICA_KEY}


def remove_set(checkpoint_path: _PATH, replica_set: ReplicaSet, rank: int, is_global_zero: bool) -> None:
    """Remove a set that was not committed (a write failed): each rank its own file, rank 0 the folder, and the
    ``.replicas`` folder too if nothing else is left in it."""
    folder = set_folder(checkpoint_path, replica_set)
    if not is_local(folder):
        return
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        os.remove(os.path.join(folder, f"rank{rank}.pt"))
    if is_global_zero:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty: it holds the sets written before
            os.rmdir(f"{checkpoint_path}.replicas")


def remove_other_sets(checkpoint_path: _PATH, keep: ReplicaSet | None, rank: int, is_global_zero: bool) -> None:
    """Remove the replica folders of ``checkpoint_path`` other than ``keep``'s (all of them for ``None``).

    Every rank removes its own files (disks may be node-local); rank 0 also removes the folders, tolerating the
    other ranks deleting their files at the same moment.
    """
    root = f"{checkpoint_path}.replicas"
    if not is_local(root):
        fs = get_filesystem(root)
        if is_global_zero and keep is None:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(root, recursive=True)
        return
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):  # none, or rank 0 removed it a moment ago
        return
    for name in names:
        if keep is not None and name == keep.folder_name:
            continue
        folder = os.path.join(root, name)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.remove(os.path.join(folder, f"rank{rank}.pt"))
        if is_global_zero:
            shutil.rmtree(folder, ignore_errors=True)
    if is_global_zero and keep is None:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------- reading
def read_replica(checkpoint_path: _PATH, replica_set: ReplicaSet, rank: int, mmap: bool = False) -> dict[str, Any]:
    """Rank ``rank``'s replica of the set, checked against it; :class:`CheckpointError` if missing or from another set."""
    path = replica_path(checkpoint_path, replica_set, rank)
    replica = safe_load(path, f"replica file of rank {rank}", mmap=mmap)
    expected = {**asdict(replica_set), "rank": rank}
    if not isinstance(replica, dict):
        raise CheckpointError(f"replica file {path!r} is not a replica (a {type(replica).__name__}, not a dict)")
    own = replica_own(replica)
    if not own.get("members"):  # written before sets named their members, or by every rank: as its main file says
        expected.pop("members")
    wrong = {k: own.get(k) for k, v in expected.items() if own.get(k) != v}
    if wrong:
        raise CheckpointError(
            f"replica file {path!r} belongs to another checkpoint ({', '.join(f'{k}={v!r}' for k, v in wrong.items())};"
            f" the main file expects {', '.join(f'{k}={expected[k]!r}' for k in wrong)})"
        )
    return replica


def read_main(checkpoint_path: _PATH, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint file, checked to be one (a dict with ``state_dict`` and ``global_step``)."""
    checkpoint = safe_load(checkpoint_path, "checkpoint", mmap=mmap)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict) or "global_step" not in checkpoint:
        raise CheckpointError(f"checkpoint {os.fspath(checkpoint_path)!r} is not a Lightning checkpoint (no state_dict/global_step)")
    return checkpoint


def replica_set_of(checkpoint: dict[str, Any], path: _PATH | None = None) -> ReplicaSet | None:
    """The replica set a main file commits, ``None`` for a checkpoint without one (written by one process, or by
    another strategy); :class:`CheckpointError` for one whose record is damaged."""
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None or (isinstance(meta, dict) and ("run_id" not in meta or "token" not in meta)):
        return None  # no set (one process, another strategy), or 0.1.0's record, which named none: a consensus model
    where = f"checkpoint {os.fspath(path)!r}" if path is not None else "the checkpoint"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: its replica set record is a {type(meta).__name__}, not a dict")
    try:
        return ReplicaSet.from_meta(meta)
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from None


def check_set(checkpoint_path: _PATH, world_size: int) -> str | None:
    """In the launching process, before any worker starts: the main file and, at the same world size, every replica
    file load safely, belong to it and hold what a resume reads (the same model, every optimizer, finite values).
    Returns why the replicas will not be resumed one by one (another world size), or ``None``; raises
    :class:`CheckpointError` otherwise."""
    checkpoint = read_main(checkpoint_path, mmap=True)
    replica_set = replica_set_of(checkpoint, checkpoint_path)
    if replica_set is None:
        return None
    if replica_set.world_size != world_size:
        return consensus_restart_reason(replica_set, world_size)
    for rank in range(world_size):
        replica = read_replica(checkpoint_path, replica_set, rank, mmap=True)
        check_like_main(replica, checkpoint, replica_path(checkpoint_path, replica_set, rank))
    return None


def check_like_main(replica: dict[str, Any], checkpoint: dict[str, Any], path: str) -> None:
    """A Lightning replica holds the main file's model (same entries, same shapes, finite) and as many optimizer
    states; :class:`CheckpointError` naming the first difference."""
    state = replica.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"replica file {path!r} has no state_dict (the replica's model)")
    problem = state_dict_difference(checkpoint["state_dict"], state)
    if problem:
        raise CheckpointError(f"replica file {path!r} does not hold the main file's model ({problem})")
    expected = checkpoint.get("optimizer_states")
    if isinstance(expected, list) and not (isinstance(replica.get("optimizer_states"), list) and len(replica["optimizer_states"]) == len(expected)):
        raise CheckpointError(f"replica file {path!r} does not hold the {len(expected)} optimizer state(s) of the main file")


def state_dict_difference(expected: dict[str, Any], found: dict[str, Any]) -> str:
    """What keeps ``found`` from standing in for ``expected`` (missing, unexpected or resized entries, or non-finite
    values), in a few words; ``""`` when nothing does."""
    shapes = lambda state: {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}  # noqa: E731
    want, have = shapes(expected), shapes(found)
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    resized = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    details = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
               for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes", resized)) if keys]
    if details:
        return "; ".join(details)
    nonfinite = next((k for k, v in found.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                      and not bool(torch.isfinite(v).all())), None)
    return f"non-finite values in {nonfinite}" if nonfinite is not None else ""


def consensus_restart_reason(replica_set: ReplicaSet, world_size: int) -> str:
    members = replica_set.members
    live = f" (the members {', '.join(map(str, members))} of a live run)" if members and members != tuple(range(len(members))) else ""
    return f"it was written by {replica_set.world_size} workers{live} and this run has {world_size}"


def _fsync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
