"""The per-replica checkpoint format: one file per rank beside Lightning's checkpoint.

Lightning writes one file, from global rank 0, which here holds the *consensus* model, so that
``load_from_checkpoint`` gives a usable model. Each replica differs, so resuming every replica exactly needs
each rank's own model, optimizer state (anchors, moments), random streams and gossip phase:
``<checkpoint>.replicas/rank{r}.pt``. Both carry the same random token, so a replica file left over from an
older checkpoint at the same path is never mistaken for the current one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

CHECKPOINT_KEY = "decentralized"  # the main checkpoint's entry describing its replicas


def replica_path(checkpoint_path: _PATH, rank: int) -> str:
    """Where rank ``rank`` keeps its replica for the checkpoint at ``checkpoint_path``."""
    return os.path.join(f"{checkpoint_path}.replicas", f"rank{rank}.pt")


def replicas_meta(token: str, world_size: int, topology: str, gossip_rounds: int, gossip_state: dict[str, Any]) -> dict[str, Any]:
    """What the main checkpoint records of its replicas (``checkpoint[CHECKPOINT_KEY]``)."""
    return {
        "token": token,
        "world_size": world_size,
        "topology": topology,
        "gossip_rounds": gossip_rounds,
        "gossip": gossip_state,
    }


def replica_file(meta: dict[str, Any], rank: int, state_dict: dict[str, Any], optimizer_states: Any, rng_states: dict[str, Any]) -> dict[str, Any]:
    return {**meta, "rank": rank, "state_dict": state_dict, "optimizer_states": optimizer_states, "rng_states": rng_states}


def read_replica(checkpoint_io: CheckpointIO, checkpoint_path: _PATH, meta: dict[str, Any], rank: int, world_size: int) -> dict[str, Any] | None:
    """This rank's replica of the checkpoint, or ``None`` if it is missing, stale, or from another world size."""
    if meta["world_size"] != world_size:
        return None
    path = replica_path(checkpoint_path, rank)
    if not get_filesystem(path).exists(path):
        return None
    loaded = checkpoint_io.load_checkpoint(path, weights_only=False)
    return loaded if loaded.get("token") == meta["token"] and loaded.get("rank") == rank else None


def consensus_restart_reason(meta: dict[str, Any], world_size: int) -> str:
    """Why the replicas cannot be resumed one by one (some rank had no matching replica file)."""
    if meta["world_size"] != world_size:
        return f"it was written by {meta['world_size']} workers and this run has {world_size}"
    return "some ranks' replica files are missing or do not match it"


def remove_replica(checkpoint_path: _PATH, rank: int, is_global_zero: bool) -> None:
    """Every rank removes its own file (disks may be node-local); rank 0 also removes the folder, tolerating the
    other ranks deleting their files at the same moment."""
    path = replica_path(checkpoint_path, rank)
    fs = get_filesystem(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)
    if is_global_zero:
        folder = os.path.dirname(path)
        if isinstance(fs, LocalFileSystem):
            shutil.rmtree(folder, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(folder, recursive=True)
