"""Recipes run as written: the wandb sweep's command line (offline, one combination), the torchrun launch of
2 nodes × 2 processes, and the elastic launch that loses a host (all agents on this machine)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import free_port, logged_step, run, worker_env

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SMALL = ["max_steps=20", "evaluation.every_n_steps=10", "evaluation.num_samples=200", "trainer.enable_progress_bar=false"]


def sweep_command(sweep: dict, choice: dict[str, object]) -> list[str]:
    """What ``wandb agent`` runs for one combination: the sweep's macros expanded as wandb documents them."""
    macros = {"${env}": "/usr/bin/env", "${interpreter}": sys.executable, "${program}": sweep["program"]}
    command: list[str] = []
    for part in sweep["command"]:
        if part == "${args_no_hyphens}":
            command += [f"{key}={value}" for key, value in choice.items()]
        else:
            command.append(macros.get(part, part))
    return command


def test_sweep_runs_one_combination_offline(tmp_path):
    sweep = yaml.safe_load((RECIPES / "sweep_topologies.yaml").read_text())
    assert set(sweep["parameters"]) == {"topology", "gossip_rounds", "devices"}
    assert sweep["metric"] == {"name": "eval/modes", "goal": "maximize"}  # not eval/high_quality: it rewards collapse
    choice = {"topology": "torus", "gossip_rounds": 3, "devices": 4}
    assert all(value in sweep["parameters"][key]["values"] for key, value in choice.items())
    env = worker_env()
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        env.pop(key, None)
    env["HOME"] = str(tmp_path)  # no ~/.netrc: no key anywhere
    run_dir = tmp_path / "run"
    proc = run([*sweep_command(sweep, choice), *SMALL, f"hydra.run.dir={run_dir}"], env=env, timeout=240)
    assert "logging offline" in proc.stdout
    assert list((run_dir / "wandb").glob("offline-run-*")), list(run_dir.iterdir())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["strategy"]["topology"] == "torus" and config["gossip_rounds"] == 3 and config["devices"] == 4
    assert "on 4 processes (torus, gossip_rounds=3" in proc.stdout


def test_two_nodes_by_torchrun_through_the_recipe(tmp_path):
    port = free_port()
    run_dir = tmp_path / "run"
    env = worker_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # torchrun of this Python
    agents = []
    for node in (0, 1):
        node_env = dict(env, NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RUN_DIR=str(run_dir))
        agents.append(subprocess.Popen(
            [str(RECIPES / "multinode_torchrun.sh"), "topology=one_peer_exponential", *SMALL],
            env=node_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outputs = [agent.communicate(timeout=300) for agent in agents]
    for agent, (out, err) in zip(agents, outputs):
        assert agent.returncode == 0, err[-3000:]
    assert "fit done" in outputs[0][0] and "on 4 processes (one_peer_exponential" in outputs[0][0]
    (replica_set,) = (run_dir / "checkpoints" / "last.ckpt.replicas").iterdir()
    assert sorted(p.name for p in replica_set.iterdir()) == [f"rank{r}.pt" for r in range(4)]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["trainer"]["num_nodes"] == 2 and config["trainer"]["devices"] == 2


def _rank_of(pid: int) -> int | None:
    """The ``RANK`` torchrun gave the process ``pid`` (``None`` for the agent itself)."""
    with contextlib.suppress(OSError):
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        return int(env["RANK"]) if "RANK" in env else None
    return None


def _start_agents(recipe: str, args: list[str], env: dict[str, str], port: int, folder: Path) -> tuple[list, list[Path]]:
    """Four single-worker agents of ``recipe``, each logging to ``folder/agent<node>.log``; the first one holds
    torchrun's rendezvous store (RDZV_HOST), so the others start once its port is open."""
    agents, logs = [], [folder / f"agent{node}.log" for node in range(4)]
    for node in range(4):
        with open(logs[node], "w") as log:  # a file, not a pipe nobody reads while waiting: it would fill and block
            agents.append(subprocess.Popen([str(RECIPES / recipe), *args], env=env, start_new_session=True,
                                           stdout=log, stderr=subprocess.STDOUT, text=True))
        if node == 0:
            _wait_for_port(port)
    return agents, logs


def test_live_run_by_torchrun_goes_on_without_a_lost_host_and_restarts_nobody(tmp_path):
    """Four agents of recipes/live_torchrun.sh (one worker each, --nnodes=3:4, --max-restarts=0). One host is lost
    (its worker, then its agent, killed) at about step 20 of 60: the other agents keep their workers (no new process
    under any of them, torchrun starts no second round), the three workers agree on the members and end at max_steps,
    and rank 0 prints the summary with the change. The agents then wait at torchrun's exit barrier for the lost one
    (300 s, docs/guide.md: live membership): the test ends them there."""
    import re
    import signal
    import time

    port, run_dir = free_port(), tmp_path / "run"
    env = worker_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # torchrun of this Python
    env.update(RDZV_HOST="127.0.0.1", RDZV_PORT=str(port), RUN_DIR=str(run_dir), MIN_NODES="3", MAX_NODES="4", LAST_CALL_S="2")
    args = ["max_steps=60", "batch_size=64", "evaluation.every_n_steps=0", "evaluation.num_samples=100",
            "trainer.enable_progress_bar=false", "strategy.gossip.peer_timeout=5", "trainer.log_every_n_steps=1",
            "+logger.flush_logs_every_n_steps=1"]
    agents, logs = _start_agents("live_torchrun.sh", args, env, port, tmp_path)  # the last one is lost
    try:
        deadline = time.monotonic() + 120
        while logged_step(run_dir) < 20:
            assert time.monotonic() < deadline and all(a.poll() is None for a in agents), [a.poll() for a in agents]
            time.sleep(0.05)
        workers = [set(_children(agent.pid)) for agent in agents]
        (lost,) = [_rank_of(pid) for pid in workers[3] if _rank_of(pid) is not None]
        for worker in workers[3]:  # a host is lost: its worker, then its agent
            os.kill(worker, signal.SIGKILL)
        os.killpg(agents[3].pid, signal.SIGKILL)
        while "fit done" not in "".join(log.read_text() for log in logs[:3]):
            assert time.monotonic() < deadline, [log.read_text()[-2000:] for log in logs[:3]]
            for agent, started in zip(agents[:3], workers):
                assert set(_children(agent.pid)) <= started, "an agent started a new worker"
            time.sleep(0.05)
        time.sleep(1)  # the summary's last lines
        assert all(agent.poll() is None for agent in agents[:3])  # in torchrun's exit barrier, not ended by a failure
    finally:
        for agent in agents:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)
    everything = "".join(log.read_text() for log in logs[:3])
    assert everything.count("torchrun started 4 workers") == 1 and "torchrun started 3" not in everything, everything[-3000:]
    survivors = ", ".join(str(r) for r in range(4) if r != lost)
    left = re.search(rf"^  members: step (\d+): worker\(s\) {lost} left; 3 go on \({survivors}\) on ring$", everything, re.MULTILINE)
    assert left is not None and 20 < int(left.group(1)) < 60, everything[-3000:]
    assert "on 4 processes, 3 at the end" in everything and re.search(r"\d+ modes?, [\d.]+% high quality", everything)
    assert "Traceback" not in everything, everything[-3000:]
    rows = (run_dir / "evaluation.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[0] == "60", rows  # one evaluation, at max_steps


def _wait_for_port(port: int, timeout: float = 60) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (the recipe's shell execs torchrun, whose worker is its child)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                        found.append(int(entry.name))
                        todo.append(int(entry.name))
    return found


@pytest.mark.timeout(600)
def test_elastic_restart_after_losing_a_host_ends_with_three_workers(tmp_path):
    """Four single-worker torchrun agents (--nnodes=3:4, torchrun's own c10d rendezvous). One agent, worker and all,
    is killed once a checkpoint exists; torchrun restarts the other three, `fit` resumes by itself from the run's
    newest checkpoint (the consensus model: 4 replicas became 3) and ends at max_steps with a usable model."""
    import signal
    import time

    from lightning_dpgan import DPGAN
    from lightning_dpgan.models import MLPDiscriminator, MLPGenerator
    from lightning_dpgan.replicas import read_main, replica_set_of

    port, run_dir = free_port(), tmp_path / "run"
    env = worker_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # torchrun of this Python
    env.update(RDZV_HOST="127.0.0.1", RDZV_PORT=str(port), RUN_DIR=str(run_dir), CHECKPOINT_EVERY="20", LAST_CALL_S="2")
    args = ["max_steps=100", "batch_size=64", "evaluation.every_n_steps=0", "evaluation.num_samples=200",
            "trainer.enable_progress_bar=false", "strategy.gossip.peer_timeout=20"]
    agents, logs = _start_agents("elastic_torchrun.sh", args, env, port, tmp_path)  # one is lost
    try:
        last = run_dir / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 240
        while not (last.exists() and read_main(last)["global_step"] >= 20):
            assert time.monotonic() < deadline and all(a.poll() is None for a in agents), [a.poll() for a in agents]
            time.sleep(0.2)
        for worker in _children(agents[3].pid):  # a host is lost: its worker, then its agent
            os.kill(worker, signal.SIGKILL)
        os.killpg(agents[3].pid, signal.SIGKILL)
        for agent in agents[:3]:
            agent.wait(timeout=420)
    finally:
        for agent in agents:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)
    outputs = [log.read_text() for log in logs[:3]]
    for agent, out in zip(agents[:3], outputs):
        assert agent.returncode == 0, out[-4000:]
    everything = "".join(outputs)
    assert "written by 4 workers and this run has 3; every replica restarts from the consensus model" in everything
    main = read_main(last)
    assert main["global_step"] == 100 and replica_set_of(main).world_size == 3
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["trainer"]["num_nodes"] == 3 and config["trainer"]["devices"] == 1
    gan = DPGAN.load_from_checkpoint(last, generator=MLPGenerator(latent_dim=16, hidden=128, depth=3, output_scale=4.0),
                                     discriminator=MLPDiscriminator(hidden=128, depth=3))
    assert torch.isfinite(gan.sample(100)).all()  # a usable model
