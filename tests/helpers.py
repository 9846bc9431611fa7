"""Launch real worker processes the way users do: torchrun, or a script that Lightning's popen launcher re-runs."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

WORKERS = Path(__file__).parent / "workers"


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("LOCAL_RANK", None)
    env.pop("PL_GLOBAL_SEED", None)
    return env


def free_port() -> int:
    """A free port for a run's store, below the kernel's range of ephemeral ports: one the kernel hands out
    (``bind(0)``) is free only until it hands it out again, to any outgoing connection (gloo opens many, three tests
    run at a time) in the seconds before the store binds it; seen as ``EADDRINUSE``."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) if sys.platform == "linux" else 0
    for port in random.Random().sample(range(20000, low), min(200, max(0, low - 20000))):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    with socket.socket() as s:  # no such range here: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: float = 240, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or worker_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def torchrun(script: str, nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(WORKERS / script), *args,
    ]
    return run(cmd, timeout=timeout)


def lightning_script(script: str, *args: str, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    """Run a script that builds a Trainer; Lightning's popen launcher starts the other ranks by re-running it."""
    return run([sys.executable, str(WORKERS / script), *args], timeout=timeout, check=check)


def as_json(obj: Any) -> str:
    return json.dumps(obj)


def call_cli(*args: str) -> tuple[int, str, str]:
    """``python -m lightning_dpgan *args`` in this process: (exit status, stdout, stderr). For input that is
    refused before any worker starts: nothing else needs a process of its own."""
    import contextlib
    import io

    from lightning_dpgan import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(list(args))
            status = 0
        except SystemExit as exit_:
            status = int(exit_.code or 0)
    return status, out.getvalue(), err.getvalue()


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` is still there."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def logged_step(run_dir: Path) -> int:
    """The newest step in the run's metrics.csv (0 before it has one)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        header, *rows = (run_dir / "metrics.csv").read_text().strip().splitlines()
        column = header.split(",").index("step")
        return max((int(float(row.split(",")[column])) for row in rows if row.count(",") == header.count(",")), default=0)
    return 0
