"""Launch real worker processes the way users do: torchrun, or a script that Lightning's popen launcher re-runs."""

from __future__ import annotations

import json
import os
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
    with socket.socket() as s:
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
        f"--master-addr=127.0.0.1", f"--master-port={free_port()}", str(WORKERS / script), *args,
    ]
    return run(cmd, timeout=timeout)


def lightning_script(script: str, *args: str, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    """Run a script that builds a Trainer; Lightning's popen launcher starts the other ranks by re-running it."""
    return run([sys.executable, str(WORKERS / script), *args], timeout=timeout, check=check)


def as_json(obj: Any) -> str:
    return json.dumps(obj)
