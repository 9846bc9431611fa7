"""Reading a file that someone else may have written: as data only (``torch.load(weights_only=True)``), with one
:class:`CheckpointError` for every way it can be unusable. Checkpoints, replica files and Inception weights are all
read here, so that loading a file never runs code."""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH


class CheckpointError(ValueError):
    """A checkpoint or replica file that cannot be used; the message names the file and why."""


def safe_load(path: _PATH, what: str = "checkpoint", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one :class:`CheckpointError` for every way a file can
    be unusable: missing, unreadable, truncated, not a torch file, or holding objects other than data."""
    path = os.fspath(path)
    fs = get_filesystem(path)
    try:
        if is_local(path) and mmap:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        with fs.open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path!r} not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{what} {path!r} is a directory, not a checkpoint file") from None
    except PermissionError:
        raise CheckpointError(f"{what} {path!r} cannot be read (permission denied)") from None
    except Exception as err:  # UnpicklingError (code, or not data), RuntimeError (truncated, not a zip), EOFError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Weights only load failed" in first or "weights_only" in first:
            raise CheckpointError(
                f"{what} {path!r} holds objects other than tensors and plain data, which are never loaded (they could "
                f"run code); only checkpoints written by Lightning and this package can be used"
            ) from None
        raise CheckpointError(f"{what} {path!r} is not a readable checkpoint ({type(err).__name__}: {first})") from None


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def safe_loads(data: bytes, what: str) -> Any:
    """:func:`safe_load` of bytes received from another worker (a donor's replica): data only, never code."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - as safe_load: one error naming what could not be read
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{what} could not be read as data ({type(err).__name__}: {first})") from None
