"""Recipes run as written: the wandb sweep's command line (offline, one combination) and the torchrun launch
of 2 nodes × 2 processes (both agents on this machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from helpers import free_port, run, worker_env

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
