"""The processes of a decentralized run, shared by the Trainer and the Fabric strategy: the gossip's own process
group, workers that die with their launcher, a launcher's observer that lets rank 0 name a failed worker first, and
a ``MASTER_PORT`` checked and held before any worker starts. Framework-neutral: nothing here knows Lightning's
Trainer or Fabric."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from typing_extensions import override

_PR_SET_PDEATHSIG = 1
_log = logging.getLogger(__name__)


def gossip_group(backend: str, timeout: timedelta | None) -> tuple[torch.distributed.ProcessGroup | None, int]:
    """The gossip's own process group (and the world size), over connections of its own, so that the framework's
    collectives never queue behind a mix still on the wire to the same peer. ``None`` for one process."""
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world_size == 1:
        return None, 1
    return torch.distributed.new_group(backend=backend, timeout=timeout), world_size


def close_gossip_group(group: torch.distributed.ProcessGroup | None) -> None:
    if group is not None and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):  # local for gloo; after an error the peers may be gone
            torch.distributed.destroy_process_group(group)


def release_default_group() -> None:
    """Destroy torch.distributed's default group where a process's training ends for good. A process that exits
    with gloo's threads still holding its groups can abort in the interpreter's finalization (``terminate called
    without an active exception``, pytorch/pytorch#190489), which a launcher then counts as a failed worker (torchrun
    restarts every worker). Only after a fit that ended well: every work is complete, so the join is immediate."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


#: how long rank 0 has to say which worker failed, after one of the workers it launched has failed, before
#: everything still running is killed
REPORT_GRACE_S = 15.0


class PatientObserver(_ChildProcessObserver):
    """Lightning's observer of the workers rank 0 launched kills every process, rank 0 included, within 5 s of one
    worker failing: often before rank 0 has said which one (the others fail a moment later, on losing it). This one
    gives rank 0 ``REPORT_GRACE_S`` to report and exit first (its workers die with it, :func:`die_with_parent`),
    and only then kills what is still running, as Lightning's does.

    ``live`` (``membership="live"``): the others go on without a worker that failed, so it is only logged, and the
    observer stops watching once every worker has ended. Rank 0 is this process: if it dies, its workers die with it.
    """

    def __init__(self, child_processes: list[Any], live: bool = False) -> None:
        super().__init__(main_pid=os.getpid(), child_processes=child_processes, sleep_period=1)
        self._failed_at: float | None = None
        self._live = live
        self._let_go: set[int] = set()

    @override
    def _run(self) -> bool:
        codes = [proc.poll() for proc in self._child_processes]
        if self._live:
            return self._let_failed_go(codes)
        if all(code == 0 for code in codes):
            return True
        if not any(codes):
            return False
        if self._failed_at is None:
            self._failed_at = time.monotonic()
        if time.monotonic() - self._failed_at < REPORT_GRACE_S:
            return False
        return super()._run()

    def _let_failed_go(self, codes: list[int | None]) -> bool:
        for rank, (proc, code) in enumerate(zip(self._child_processes, codes), start=1):
            if code and rank not in self._let_go:
                self._let_go.add(rank)
                _log.warning(
                    f"worker of rank {rank} (pid {proc.pid}) ended with exit code {code}; membership=live: the others go on without it"
                )
        return all(code is not None for code in codes)


def launch_watched(launcher: Any, function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What Lightning's and Fabric's popen launchers do in ``launch``, with a :class:`PatientObserver` instead of
    theirs (both strategies' launchers call this); ``launcher.live``: the run's members may change."""
    launcher.cluster_environment.validate_settings(num_devices=launcher.num_processes, num_nodes=launcher.num_nodes)
    if not launcher.cluster_environment.creates_processes_externally:
        launcher._call_children_scripts()
        PatientObserver(launcher.procs, live=getattr(launcher, "live", False)).start()
    _set_num_threads_if_needed(num_processes=launcher.num_processes)
    return function(*args, **kwargs)


def die_with_parent() -> None:
    """A worker started by a launcher (Lightning's popen, torchrun, SLURM) dies with it, never living on as an
    orphan: Linux delivers SIGKILL when the parent exits, also to a worker stopped with SIGSTOP."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent was already gone before the request took effect
            os.kill(os.getpid(), signal.SIGKILL)


#: ports this process holds a lock on (the file descriptors): a run keeps its MASTER_PORT to itself until it exits
_PORT_LOCKS: dict[int, int] = {}


def master_port_from_env() -> int | None:
    """``MASTER_PORT`` as a port number (``None`` when unset); ``ValueError`` naming it when it is not one. Port 0
    would let rank 0 listen anywhere while the other ranks wait at a port nobody holds."""
    value = os.environ.get("MASTER_PORT")
    if value is None or value == "":
        return None
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ValueError(f"MASTER_PORT must be a port number in [1, 65535], got {value!r}; or unset it to let Lightning pick a free one")
    return port


def check_master_port_free() -> None:
    """Before Lightning starts workers on one machine: a ``MASTER_PORT`` that another program holds would make rank 0
    fail after a long rendezvous wait while the others wait on. Say so now instead (``RuntimeError``).

    A run that has not yet opened its port (still starting) holds a lock on it instead, which this process then
    takes until it exits: two runs started together on one explicit port cannot both pass."""
    try:
        port = master_port_from_env()
    except ValueError as err:
        raise RuntimeError(str(err)) from None
    if port is None or port in _PORT_LOCKS:
        return  # unset: Lightning picks a free one
    advice = "choose a free port, or unset MASTER_PORT to let Lightning pick one"
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as err:
            raise RuntimeError(f"MASTER_PORT={port} is already in use on this machine ({err.strerror}); {advice}") from None
    try:  # one lock file per user: another user's file may not be writable; flock needs only a descriptor
        fd = os.open(os.path.join(tempfile.gettempdir(), f"lightning_dpgan-{os.getuid()}-port-{port}.lock"), os.O_CREAT | os.O_RDONLY, 0o600)
    except OSError:
        return  # no lock to be had here: the bind check above is all there is
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RuntimeError(f"MASTER_PORT={port} is already in use on this machine (another run is starting on it); {advice}") from None
    _PORT_LOCKS[port] = fd
