"""Nothing lost, nothing run: every fault of docs/reliability.md, tried for real.

Checkpoints that would run code, corrupt or foreign ones, kill -9 during checkpoint writes, NaN, two runs at once,
a taken port, a dead launcher, a stalled worker, SIGTERM to the whole process group. Bad input is checked in this
process (it ends before any worker would start); everything that involves workers runs real processes.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_dpgan.processes import PatientObserver
from lightning_dpgan.replicas import REPLICA_KEY, CheckpointError, ReplicaSet, check_set, read_main, read_replica, replica_set_of

from conftest import FITTED
from helpers import WORKERS, call_cli, free_port, group_alive, logged_step, run, worker_env

CLI = [sys.executable, "-m", "lightning_dpgan"]


def one_error(status: int, err: str, message: str) -> None:
    assert status == 2, err[-2000:]
    assert message in err, err[-2000:]
    assert err.count("error:") == 1 and "Traceback" not in err, err[-2000:]


def copy_run(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy, copy / "checkpoints" / "last.ckpt"


def set_folder(ckpt: Path) -> Path:
    (folder,) = Path(f"{ckpt}.replicas").iterdir()
    return folder


class RunsCode:
    """A pickle that runs a shell command when it is unpickled: what ``weights_only=True`` refuses to load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------- checkpoints are data
@pytest.mark.parametrize("target", ["main file (fit)", "replica file (fit)", "validate", "sample"])
def test_a_checkpoint_that_would_run_code_is_refused_with_one_line(fitted, tmp_path, target):
    run_dir, _ = fitted
    copy, ckpt = copy_run(run_dir, tmp_path)
    marker = tmp_path / "ran"
    victim = set_folder(ckpt) / "rank1.pt" if target.startswith("replica") else ckpt
    contents = torch.load(victim, weights_only=True)
    contents["payload"] = RunsCode(marker)
    torch.save(contents, victim)  # torch.save pickles anything: a tampered file looks like this
    verb = target if target in ("validate", "sample") else "fit"
    status, _, err = call_cli(verb, f"ckpt_path={ckpt}", "devices=2", f"hydra.run.dir={tmp_path / 'out'}")
    one_error(status, err, "holds objects other than tensors and plain data, which are never loaded")
    assert not marker.exists()  # and nothing ran
    with pytest.raises(CheckpointError, match="never loaded"):  # the strategy reads through the same function
        read_main(victim) if victim == ckpt else read_replica(ckpt, replica_set_of(read_main(ckpt)), 1)


@pytest.mark.parametrize(
    "damage,message",
    [
        ("truncate", "is not a readable checkpoint"),
        ("random", "is not a readable checkpoint"),
        ("other_model", "is not of this model (other shapes: "),
        ("mixed_set", "belongs to another checkpoint (step=20, token='0000abcd'; the main file expects step=40, token="),
        ("missing_replica", "replica file of rank 1 '"),
    ],
)
def test_a_damaged_or_foreign_checkpoint_is_refused_before_any_worker(fitted, tmp_path, damage, message):
    run_dir, _ = fitted
    copy, ckpt = copy_run(run_dir, tmp_path)
    extra: list[str] = []
    if damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "random":
        ckpt.write_bytes(random.Random(0).randbytes(4096))
    elif damage == "other_model":
        extra = ["model.generator.hidden=64"]
    elif damage == "mixed_set":  # rank 1's replica from another set (step 20), as a crash mid-write once left it
        replica = torch.load(set_folder(ckpt) / "rank1.pt", weights_only=True)
        replica[REPLICA_KEY] = {**replica[REPLICA_KEY], "step": 20, "token": "0000abcd"}
        torch.save(replica, set_folder(ckpt) / "rank1.pt")
    else:
        (set_folder(ckpt) / "rank1.pt").unlink()
    status, _, err = call_cli("fit", f"ckpt_path={ckpt}", "devices=2", f"hydra.run.dir={tmp_path / 'out'}", *extra)
    one_error(status, err, message)
    assert not (tmp_path / "out").exists()  # no run directory either: nothing started


@pytest.mark.parametrize(
    "damage,message",
    [
        ("replica_shapes", "rank1.pt' does not hold the main file's model (other shapes: "),
        ("replica_no_state_dict", "rank1.pt' has no state_dict"),
        ("replica_nan", "rank0.pt' does not hold the main file's model (non-finite values in "),
        ("replica_no_optimizer", "rank1.pt' does not hold the 1 optimizer state(s) of the main file"),
        ("step_text", "its replica set's step is 'abc', not an integer >= 0"),
        ("no_topology", "its replica set's topology is missing, not a string"),
        ("world_size_text", "its replica set's world_size is '2', not a positive integer"),
        ("main_nan", "holds non-finite values in "),
    ],
)
def test_damaged_checkpoint_contents_are_refused_before_any_worker(fitted, tmp_path, damage, message):
    """Files that load as data but hold the wrong things: each is named by the launching process, one line, no
    worker started (they used to end in [rank1] tracebacks, or a consensus restart for world_size="2")."""
    run_dir, _ = fitted
    copy, ckpt = copy_run(run_dir, tmp_path)
    main = torch.load(ckpt, weights_only=True)
    rank = 0 if damage == "replica_nan" else 1
    replica_file = set_folder(ckpt) / f"rank{rank}.pt"
    replica = torch.load(replica_file, weights_only=True)
    first = next(k for k, v in replica["state_dict"].items() if v.is_floating_point())
    if damage == "replica_shapes":
        replica["state_dict"][first] = torch.zeros(3, 3)
    elif damage == "replica_no_state_dict":
        del replica["state_dict"]
    elif damage == "replica_nan":
        replica["state_dict"][first] = torch.full_like(replica["state_dict"][first], float("nan"))
    elif damage == "replica_no_optimizer":
        replica["optimizer_states"] = []
    elif damage == "step_text":
        main["decentralized"]["step"] = "abc"
    elif damage == "no_topology":
        del main["decentralized"]["topology"]
    elif damage == "world_size_text":
        main["decentralized"]["world_size"] = "2"
    else:
        main["state_dict"][first] = torch.full_like(main["state_dict"][first], float("nan"))
    torch.save(replica, replica_file)
    torch.save(main, ckpt)
    status, out, err = call_cli("fit", f"ckpt_path={ckpt}", "devices=2", f"hydra.run.dir={tmp_path / 'out'}")
    one_error(status, err, message)
    assert "Initializing distributed" not in out + err and not (tmp_path / "out").exists()


def test_sampling_a_checkpoint_holding_nan_is_refused(fitted, tmp_path):
    run_dir, _ = fitted
    copy, ckpt = copy_run(run_dir, tmp_path)
    main = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in main["state_dict"].items() if k.startswith("generator_ema.") and v.is_floating_point())
    main["state_dict"][key] = torch.full_like(main["state_dict"][key], float("nan"))
    torch.save(main, ckpt)
    status, _, err = call_cli("sample", f"ckpt_path={ckpt}", "num_samples=10", f"hydra.run.dir={tmp_path / 'out'}")
    one_error(status, err, f"holds non-finite values in {key}")
    assert not (tmp_path / "out" / "samples.npy").exists()


@pytest.mark.parametrize(
    "node,target",
    [
        ("dataset", "torch.load"),  # weights_only: false through kwargs would unpickle
        ("dataset", "numpy.load"),
        ("model", "lightning_dpgan.replicas.remove_other_sets"),  # of this package, but removes folders
        ("model.generator", "pandas.read_pickle"),
        ("optim", "torch.optim.lr_scheduler.torch.load"),
    ],
)
@pytest.mark.parametrize("verb", ["validate", "sample"])
def test_a_run_config_may_only_build_what_the_config_groups_build(fitted, tmp_path, node, target, verb):
    """A run folder from someone else: its config.yaml names a target that would run code; validate and sample
    refuse it before building anything (the file it would load is planted, and never read)."""
    import yaml

    run_dir, _ = fitted
    copy, ckpt = copy_run(run_dir, tmp_path)
    marker = tmp_path / "ran"
    bait = tmp_path / "bait.pt"
    torch.save(RunsCode(marker), bait)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    where = config
    for key in node.split("."):
        where = where[key]
    where.clear()
    where.update({"_target_": target, "f": str(bait), "weights_only": False})
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    status, _, err = call_cli(verb, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'out'}")
    one_error(status, err, f"_target_ {target!r} is not built from a run's config (it could run code)")
    assert not marker.exists()


def test_a_run_folders_overrides_may_only_choose_and_set_values(fitted, tmp_path):
    """The resume line composes the run's overrides.yaml again; one from someone else must not build an object of
    its own (Hydra instantiates a nested _target_), nor reconfigure Hydra."""
    run_dir, _ = fitted
    copy, ckpt = copy_run(run_dir, tmp_path)
    marker = tmp_path / "ran"
    for override in (f"+model.extra={{_target_:os.system,_args_:['touch {marker}']}}", "hydra.job.chdir=true"):
        (copy / "overrides.yaml").write_text(f"- devices=2\n- {json.dumps(override)}\n")
        status, out, err = call_cli("fit", f"ckpt_path={ckpt}", "max_steps=41")  # refused before any worker: in this process
        one_error(status, err, "would build or configure objects of its own (it could run code)")
        assert not marker.exists() and "Initializing distributed" not in out + err


def test_a_checkpoint_of_the_first_release_still_loads_as_a_consensus_model(fitted, tmp_path):
    """0.1.0 recorded its replica set without run_id and step: such a file is a consensus model to start from."""
    run_dir, _ = fitted
    copy, ckpt = copy_run(run_dir, tmp_path)
    main = torch.load(ckpt, weights_only=True)
    old = main["decentralized"]
    main["decentralized"] = {"token": old["token"], "world_size": 2, "topology": "ring", "gossip_rounds": 1, "gossip": {}}
    torch.save(main, ckpt)
    assert replica_set_of(main) is None and check_set(ckpt, 2) is None


def test_a_main_file_whose_state_dict_is_no_dict_is_refused(fitted, tmp_path):
    run_dir, _ = fitted
    copy, ckpt = copy_run(run_dir, tmp_path)
    torch.save({"state_dict": [1], "global_step": 0}, ckpt)
    status, _, err = call_cli("sample", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'out'}")
    one_error(status, err, "is not a Lightning checkpoint (no state_dict/global_step)")


def _serve(folder: Path):
    """An http server on 127.0.0.1 for ``folder``, in a thread; returns (server, base URL)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize("source", ["http", "local with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def test_load_from_checkpoint_reads_data_only_from_every_source(fitted, tmp_path, monkeypatch, source):
    """DPGAN.load_from_checkpoint: Lightning loads URLs with weights_only=False, and a local file as the environment
    says; a tampered checkpoint must not run its code either way. The untampered one still loads, from both."""
    import yaml
    from hydra.utils import instantiate

    from lightning_dpgan import DPGAN

    run_dir, _ = fitted
    copy, ckpt = copy_run(run_dir, tmp_path)
    marker = tmp_path / "ran"
    tampered = copy / "tampered.ckpt"
    contents = torch.load(ckpt, weights_only=True)
    torch.save({**contents, "payload": RunsCode(marker)}, tampered)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # where torch.hub keeps what it downloads
    model = yaml.safe_load((copy / "config.yaml").read_text())["model"]
    build = {player: instantiate(model[player]) for player in ("generator", "discriminator")}
    server = None
    try:
        if source == "http":
            server, base = _serve(copy)
            bad, good = f"{base}/tampered.ckpt", f"{base}/checkpoints/last.ckpt"
        else:
            monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
            bad, good = str(tampered), str(ckpt)
        with pytest.raises(Exception, match="Weights only load failed"):
            DPGAN.load_from_checkpoint(bad, **build)
        assert not marker.exists()
        with pytest.raises(ValueError, match="weights_only must be True or None, got False"):
            DPGAN.load_from_checkpoint(good, weights_only=False, **build)
        gan = DPGAN.load_from_checkpoint(good, **build)
    finally:
        if server is not None:
            server.shutdown()
    key = next(iter(contents["state_dict"]))
    torch.testing.assert_close(gan.state_dict()[key], contents["state_dict"][key], rtol=0, atol=0)


def test_replica_checks_name_what_does_not_match(tmp_path):
    from lightning_dpgan.replicas import write_replica

    first = ReplicaSet("run-a", 10, "aaaa", 2, "ring")
    write_replica(tmp_path / "c.ckpt", first, 0, {"state_dict": {}})
    assert read_replica(tmp_path / "c.ckpt", first, 0)[REPLICA_KEY]["rank"] == 0
    # the same step and token, written by another run: the run id tells them apart
    with pytest.raises(CheckpointError, match=r"belongs to another checkpoint \(run_id='run-a'; the main file expects run_id='run-b'\)"):
        read_replica(tmp_path / "c.ckpt", ReplicaSet("run-b", 10, "aaaa", 2, "ring"), 0)


# ---------------------------------------------------------------------- a checkpoint set is one unit
def _fit(run_dir: Path, *extra: str) -> subprocess.Popen:
    args = ["devices=2", "max_steps=60", "batch_size=64", "checkpoint.every_n_train_steps=1", "checkpoint.save_top_k=1",
            "evaluation.every_n_steps=0", "evaluation.num_samples=100", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]
    return subprocess.Popen([*CLI, "fit", *args, *extra], env=worker_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_during_checkpoint_writes_leaves_a_whole_set_and_every_resume_is_exact(tmp_path):
    """A checkpoint every step, and the whole process group killed with SIGKILL at random moments, twice: each time
    ``last.ckpt`` and its replica files load and belong together, and resuming from them (into the same run
    directory) ends, after the last interruption, with replicas identical to those of a run never interrupted."""
    reference = _fit(tmp_path / "reference")  # runs beside the interrupted chain
    chain, last = tmp_path / "chain", tmp_path / "chain" / "checkpoints" / "last.ckpt"
    rng = random.Random(1)
    steps = []
    for attempt in range(3):
        proc = _fit(chain, *([f"ckpt_path={last}"] if attempt else []))
        if attempt == 2:
            assert proc.wait(timeout=240) == 0, proc.communicate()[1][-3000:]
            break
        deadline = time.monotonic() + 120
        while not last.exists() or read_main(last)["global_step"] <= (steps[-1] if steps else 0):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        check_set(last, 2)  # loads, and every replica file belongs to it
        main = read_main(last)
        steps.append(main["global_step"])
        assert replica_set_of(main).step == main["global_step"]
    assert len(set(steps)) == 2, steps  # two interruptions, the second after more training
    assert reference.wait(timeout=240) == 0, reference.communicate()[1][-3000:]
    expected, got = (read_main(run / "checkpoints" / "last.ckpt") for run in (tmp_path / "reference", chain))
    assert got["global_step"] == expected["global_step"] == 60
    for rank in range(2):
        a = read_replica(tmp_path / "reference" / "checkpoints" / "last.ckpt", replica_set_of(expected), rank)
        b = read_replica(last, replica_set_of(got), rank)
        for key, value in a["state_dict"].items():
            assert torch.equal(value, b["state_dict"][key]), (rank, key)


# ---------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("path", ["checkpoint", "gossip"])
def test_a_nonfinite_value_stops_every_rank_at_one_step_and_no_checkpoint_keeps_it(suite4, path):
    """Rank 2's generator gets a NaN after step 7. With a checkpoint every 2 steps, the checkpoint of step 8 is where
    every rank learns of it (it refuses to be written); with one every 20, the stop announced through the gossip is
    taken by every rank after the same later step. Either way the newest checkpoint is step 6's, and finite."""
    out = suite4 / f"nonfinite_{path}"
    stopped = [json.loads((out / f"stopped_rank{r}.json").read_text()) for r in range(4)]
    assert {s["exception"] for s in stopped} == {"NonFiniteError"}
    assert len({s["step"] for s in stopped}) == 1 and len({s["message"] for s in stopped}) == 1, stopped
    assert "non-finite values in the generator on rank 2 at optimizer step 8" in stopped[0]["message"]
    assert stopped[0]["step"] == 8 if path == "checkpoint" else 8 < stopped[0]["step"] < 20, stopped
    saved = sorted(int(p.stem.rsplit("=", 1)[1]) for p in (out / "ckpt").glob("epoch=*.ckpt"))
    assert saved == ([2, 4, 6] if path == "checkpoint" else []), saved
    if path == "checkpoint":
        last = read_main(out / "ckpt" / "last.ckpt")
        assert last["global_step"] == 6
        assert all(bool(torch.isfinite(v).all()) for v in last["state_dict"].values() if v.is_floating_point())


def test_an_overflowing_learning_rate_ends_the_cli_with_one_line(tmp_path):
    proc = run([*CLI, "fit", "devices=2", "max_steps=50", "model.lr_g=1e6", "model.lr_d=1e6", "evaluation.every_n_steps=0",
                "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}"], timeout=240, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: non-finite values in the " in proc.stderr and "every rank stopped after step" in proc.stderr
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # it diverged before any checkpoint


# ---------------------------------------------------------------------- one run, one directory
def test_two_runs_started_together_get_a_directory_each(tmp_path):
    args = ["devices=1", "max_steps=3", "evaluation.every_n_steps=0", "evaluation.num_samples=100",
            "trainer.enable_progress_bar=false", f"output_dir={tmp_path}"]
    procs = [subprocess.Popen([*CLI, "fit", *args], env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=240) == 0, proc.communicate()[1][-2000:]
    runs = sorted((tmp_path / "fit").iterdir())
    assert len(runs) == 2, runs
    for run_dir in runs:
        assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
        assert not list((run_dir / "checkpoints").glob("last-v*.ckpt"))


def test_a_run_directory_that_holds_a_run_is_refused_unless_resuming_from_it(fitted, tmp_path):
    run_dir, _ = fitted
    status, _, err = call_cli("fit", "devices=2", f"hydra.run.dir={run_dir}")
    one_error(status, err, f"run directory '{run_dir}' already holds a run")
    elsewhere = tmp_path / "elsewhere.ckpt"
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", elsewhere)
    shutil.copytree(run_dir / "checkpoints" / "last.ckpt.replicas", f"{elsewhere}.replicas")
    status, _, err = call_cli("fit", "devices=2", f"hydra.run.dir={run_dir}", f"ckpt_path={elsewhere}")
    one_error(status, err, "already holds a run")  # resuming from a checkpoint elsewhere does not make it ours
    # resuming from its own checkpoint is allowed (the kill -9 test resumes three times into one directory)


def test_resuming_last_in_a_moved_run_folder_goes_on_from_its_newest_checkpoint(fitted, tmp_path):
    """A run folder moved between resumes: Lightning forgot its checkpoints there and wrote last-v1.ckpt (step 60)
    beside last.ckpt (step 40), and the next ckpt_path=last took last.ckpt, silently redoing 20 steps. The folder
    is a copy of ``fitted`` (40 steps, a checkpoint every 15, all kept) in another place, holding both files as such
    a resume left them (last-v1.ckpt the newest, last.ckpt older), resumed with the settings it ran with: the newest
    step is taken, whatever the name, and Lightning overwrites last.ckpt instead of adding last-v2.ckpt."""
    run_dir, _ = fitted
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    checkpoints = moved / "checkpoints"
    for suffix in ("", ".replicas"):
        (checkpoints / f"last.ckpt{suffix}").rename(checkpoints / f"last-v1.ckpt{suffix}")
    older = sorted(checkpoints.glob("epoch=*-step=30.ckpt"))
    assert older, sorted(p.name for p in checkpoints.iterdir())
    shutil.copy(older[0], checkpoints / "last.ckpt")
    shutil.copytree(f"{older[0]}.replicas", checkpoints / "last.ckpt.replicas")
    from lightning_dpgan.checkpointing import newest_last

    assert newest_last(str(checkpoints)) == str(checkpoints / "last-v1.ckpt")
    proc = run([*CLI, "fit", *FITTED, "max_steps=41", "ckpt_path=last", f"hydra.run.dir={moved}"], timeout=240)
    assert f"Restoring states from the checkpoint path at {checkpoints / 'last-v1.ckpt'}" in proc.stdout + proc.stderr
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 41
    assert sorted(p.name for p in checkpoints.glob("last*.ckpt")) == ["last-v1.ckpt", "last.ckpt"]


def test_two_runs_on_one_explicit_master_port_started_together(tmp_path):
    """The second of two runs started at once on the same MASTER_PORT ends with one line naming the port, before
    its workers could meet the first run's; the first trains on, and its summary says what was measured (the
    consensus distance from metrics.csv, every 50 steps)."""
    env = {**worker_env(), "MASTER_PORT": str(free_port())}
    args = ["devices=2", "max_steps=60", "evaluation.enabled=false", "trainer.enable_progress_bar=false", "compression=topk"]
    procs = [subprocess.Popen([*CLI, "fit", *args, f"output_dir={tmp_path / str(i)}"], env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [(proc.wait(timeout=240), *proc.communicate()) for proc in procs]
    assert sorted(status for status, _, _ in results) == [0, 2], [err[-1500:] for _, _, err in results]
    (status, out, err), = [r for r in results if r[0] == 2]
    one_error(status, err, f"MASTER_PORT={env['MASTER_PORT']} is already in use on this machine")
    assert "Initializing distributed" not in out + err
    (_, trained, _), = [r for r in results if r[0] == 0]
    assert "(ring, gossip_rounds=1, compression=topk with consensus step 0.02, OptimisticAdam)" in trained
    (line,) = [line for line in trained.splitlines() if "consensus distance:" in line]
    assert "not measured" not in line and "generator" in line, line
    assert " 1 modes" not in trained


# ---------------------------------------------------------------------- no orphans
def test_a_taken_master_port_is_named_before_any_worker(monkeypatch, tmp_path):
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        status, _, err = call_cli("fit", "devices=2", f"output_dir={tmp_path}")
        one_error(status, err, f"MASTER_PORT={port} is already in use on this machine")
        import lightning.pytorch as pl

        from lightning_dpgan import DecentralizedStrategy

        with pytest.raises(RuntimeError, match=f"MASTER_PORT={port} is already in use"):  # the library, too
            pl.Trainer(accelerator="cpu", devices=2, strategy=DecentralizedStrategy(), logger=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(FileNotFoundError):  # a zombie has exited; only its parent has not reaped it yet
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


def _launch(scenario: str, out: Path, *opts: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKERS / "lightning_worker.py"), scenario, str(out), *opts],
                            env=worker_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_rank_zero_dying_in_setup_takes_its_workers_with_it(tmp_path):
    """Rank 0 (the launching process) exits while rank 1 waits for it in the initial broadcast: without the
    parent-death signal it would wait out the start-up timeout (30 minutes), orphaned."""
    proc = _launch("die_in_setup", tmp_path, "devices=2")
    assert proc.wait(timeout=120) == 3
    pids = [int((tmp_path / f"pid_rank{r}.txt").read_text()) for r in range(1, 2)]
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids), "workers outlived the launching process"


def test_a_stalled_worker_is_named_and_does_not_outlive_the_run(tmp_path):
    """Rank 2 stops itself (SIGSTOP) at step 6: its neighbours name it after the peer timeout, the run ends, and the
    stopped process is killed with its launcher instead of staying behind."""
    proc = _launch("kill", tmp_path, "rank=2", "sig=STOP", "timeout=5")
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    ended = time.time()
    assert proc.returncode != 0
    assert "GossipPeerError" in stderr and "with rank 2 failed" in stderr, stderr[-3000:]
    # timed from the stall (rank 2 writes its pid just before it stops), not from the launch: four processes start
    # in 11 s on an idle 2-core host and in over a minute beside two other tests. Without the peer timeout its
    # neighbours would wait out the process group's timeout (30 minutes by default).
    stall = (tmp_path / "pid_rank2.txt").stat().st_mtime
    assert ended - stall < 60, f"the run ended {ended - stall:.0f} s after rank 2 stalled (peer timeout 5 s)"
    stalled = int((tmp_path / "pid_rank2.txt").read_text())
    deadline = time.monotonic() + 30
    while _alive(stalled) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(stalled), "the stopped worker outlived the run"


def test_sigterm_to_the_process_group_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    """What a scheduler does: SIGTERM to every process at once. Every rank finishes the same step, the checkpoint of
    that step is written (its replicas say so), the run says where it stopped, and nobody prints a traceback."""
    proc = subprocess.Popen(
        [*CLI, "fit", "devices=4", "max_steps=100000", "evaluation.every_n_steps=0", "checkpoint.every_n_train_steps=100000",
         "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", f"hydra.run.dir={tmp_path}"],
        env=worker_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "metrics.csv").exists():  # the logger has written: training runs
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "Connection closed" not in stderr, stderr[-3000:]
    last = read_main(tmp_path / "checkpoints" / "last.ckpt")
    step = last["global_step"]
    assert f"stopped at step {step} on SIGTERM: every rank finished it" in stdout + stderr
    assert f"resume: python -m lightning_dpgan fit ckpt_path={tmp_path}/checkpoints/last.ckpt" in stdout
    check_set(tmp_path / "checkpoints" / "last.ckpt", 4)
    assert replica_set_of(last).step == step > 0
    deadline = time.monotonic() + 30
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(proc.pid)


# ---------------------------------------------------------------------- the worker that failed is named, soon
def _fit_cli(run_dir: Path, *extra: str, devices: int = 4, env: dict[str, str] | None = None, output: Any = None,
             errors: Any = None) -> subprocess.Popen:
    """``fit`` on the command line; its stdout to ``output`` and its stderr to ``errors`` (else also ``output``), or pipes."""
    args = [f"devices={devices}", "evaluation.num_samples=100", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
            "+logger.flush_logs_every_n_steps=1", f"hydra.run.dir={run_dir}"]
    if not any(e.startswith("evaluation.every_n_steps=") for e in extra):
        args.append("evaluation.every_n_steps=0")
    return subprocess.Popen([*CLI, "fit", *args, *extra], env=env or worker_env(), start_new_session=True,
                            stdout=output or subprocess.PIPE, stderr=errors or output or subprocess.PIPE, text=True)


def _worker_pid(launcher: int, rank: int) -> int:
    """The pid of the worker of global rank ``rank`` that Lightning's popen launcher (rank 0, ``launcher``) started."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == launcher:
                env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
                if env.get("LOCAL_RANK") == str(rank):
                    return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under {launcher}")


def _ended(proc: subprocess.Popen, stalled: int) -> tuple[str, float]:
    """Wait for the run to end (stderr and when), then check that nothing of it is left running."""
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    ended = time.monotonic()
    deadline = time.monotonic() + 30
    while (_alive(stalled) or group_alive(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(stalled) and not group_alive(proc.pid), "a worker outlived the run"
    return stderr, ended


def test_the_worker_that_died_is_named_not_the_neighbour_that_left(tmp_path):
    """Rank 2 of a ring of 4 is killed after the warm-up (3 steps here). Rank 0, the one that prints, is not its
    neighbour: it sees rank 1 or 3 leave after they lost rank 2, and the reports they left in the store say which
    worker it was. The stop is named within the peer timeout (5 s), plus the 3 s the reports are given. (A stopped
    worker, the silent case, is named the same way: the checkpoint-write test below.)"""
    proc = _fit_cli(tmp_path, "max_steps=100000", "checkpoint.every_n_train_steps=100000", "strategy.gossip.peer_timeout=5")
    deadline = time.monotonic() + 120
    while logged_step(tmp_path) < 4:  # past the warm-up, in the first steps
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    victim = _worker_pid(proc.pid, 2)
    os.kill(victim, signal.SIGKILL)
    _named_within_the_peer_timeout(proc, victim, "error: GossipPeerError: rank 2 died or stalled; rank 0: ")


def _named_within_the_peer_timeout(proc: subprocess.Popen, victim: int, message: str) -> None:
    """The run ends with one error line starting with ``message`` within the peer timeout (5 s), the reports' wait
    (3 s) and 10 s to spare, counted from now, when the victim was signalled."""
    signalled = time.monotonic()
    stderr, ended = _ended(proc, victim)
    assert proc.returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert errors[0].startswith(message), errors[0]
    assert ended - signalled < 5 + 3 + 10, ended - signalled


def test_the_launchers_observer_of_a_live_run_lets_a_failed_worker_go(caplog):
    """Three real child processes as a launcher's workers; one is killed at once. Lightning's observer would kill the
    other two and this process within its 1 s poll; the live one logs the failure, leaves the others to end on their
    own (exit 0 after 3 s), and stops watching once every worker has ended."""
    sleep = [sys.executable, "-c", "import time; time.sleep(3)"]
    workers = [subprocess.Popen(sleep), subprocess.Popen(sleep), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])]
    try:
        observer = PatientObserver(workers, live=True)
        observer.start()
        workers[2].kill()
        observer.join(timeout=30)
        assert not observer.is_alive()
        assert [w.poll() for w in workers] == [0, 0, -signal.SIGKILL]
        assert f"worker of rank 3 (pid {workers[2].pid}) ended with exit code -9; membership=live: the others go on without it" in caplog.text
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def test_a_live_run_started_by_the_cli_admits_a_new_worker_and_goes_on_without_a_killed_one(tmp_path):
    """``fit devices=4 membership=live``, and a fifth process started alone on the command line with only the run's
    store address, ``fit devices=1 membership=live ckpt_path=join`` (a replacement host): the members admit it at a
    step boundary and it trains on from a member's replica. Then rank 2, a worker Lightning's launcher started, dies
    (SIGKILL) inside an evaluation, as it starts scoring while the others gather the metrics' states: the launcher's
    observer lets it go instead of killing every process, and that evaluation is skipped (its gathers gave each
    worker its own values), not written. Everyone left ends at max_steps and evaluates the consensus model of the
    four; the launcher and the joiner both exit 0 with a summary naming each change and its step."""
    port, every = free_port(), 50
    # a checkpoint set every 5 steps: the join request comes in the middle of some (which are then not written),
    # and some fall between the members' agreement and the joiner's first step (written by the members already
    # there: the joiner waits for its replica)
    settings = ("membership=live", "max_steps=200", "batch_size=64", "strategy.gossip.peer_timeout=5",
                "checkpoint.every_n_train_steps=5", f"evaluation.every_n_steps={every}")
    kill = tmp_path / "kill"  # rank 2 dies in its first evaluation after the step it holds (tests/workers/kill_in_evaluation)
    env = {**worker_env(), "PYTHONPATH": os.pathsep.join([str(WORKERS / "kill_in_evaluation"), os.environ.get("PYTHONPATH", "")]),
           "DPGAN_TEST_KILL_RANK": "2", "DPGAN_TEST_KILL_FLAG": str(kill)}
    # every output to a file: a pipe nobody reads while the test waits for the join would fill and block the members
    with open(tmp_path / "run.out", "w") as run_out, open(tmp_path / "run.err", "w") as run_err:
        proc = _fit_cli(tmp_path / "run", *settings, env={**env, "MASTER_PORT": str(port)}, output=run_out, errors=run_err)
    with open(tmp_path / "joiner.txt", "w") as joiner_output:  # its output and log, read as it runs
        joiner = _fit_cli(tmp_path / "joiner", *settings, "ckpt_path=join", devices=1, output=joiner_output,
                          env={**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})

    def outputs() -> str:
        return "".join(f"--- {name}\n{(tmp_path / name).read_text()[-3000:]}\n" for name in ("run.out", "run.err", "joiner.txt"))

    deadline = time.monotonic() + 120
    while (joined := re.search(r"worker 4: membership step (\d+): worker\(s\) 4 joined", (tmp_path / "joiner.txt").read_text())) is None:
        assert proc.poll() is None and joiner.poll() is None and time.monotonic() < deadline, outputs()
        time.sleep(0.05)
    kill.write_text(joined.group(1))  # rank 2 dies in its first evaluation after the join
    try:
        proc.wait(timeout=180)
        joiner.wait(timeout=60)
    finally:
        for p in (proc, joiner):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    out, err = (tmp_path / "run.out").read_text(), (tmp_path / "run.err").read_text()
    joiner_out = (tmp_path / "joiner.txt").read_text()
    assert proc.returncode == 0, (out + err)[-3000:]
    assert joiner.returncode == 0, joiner_out[-3000:]
    for stderr in (err, joiner_out):
        assert "Traceback" not in stderr and "error:" not in stderr, stderr[-3000:]
    assert "ended with exit code -9; membership=live: the others go on without it" in out + err, (out + err)[-3000:]
    assert "on 4 processes, 4 at the end (ring, gossip_rounds=1, membership=live" in out, out[-3000:]
    assert "on 1 process, 4 at the end (ring, gossip_rounds=1, membership=live" in joiner_out, joiner_out[-3000:]
    skipped = re.search(r"evaluation at step (\d+) skipped: ", out + err)
    assert skipped is not None, (out + err)[-3000:]
    lost_at = int(skipped.group(1))
    for summary in (out, joiner_out):  # the joiner took the run's history from its donor, and saw the rest itself
        join = re.search(r"^  members: step (\d+): worker\(s\) 4 joined; 5 go on \(0, 1, 2, 3, 4\) on ring$", summary, re.MULTILINE)
        left = re.search(r"^  members: step (\d+): worker\(s\) 2 left; 4 go on \(0, 1, 3, 4\) on ring$", summary, re.MULTILINE)
        assert join is not None and left is not None and int(join.group(1)) < lost_at < int(left.group(1)) <= lost_at + 2, (lost_at, summary[-3000:])
        assert re.search(r"^  consensus model, 100 samples: \d+ modes?, [\d.]+% high quality, reverse KL ([\d.]+|inf)$", summary, re.MULTILINE), summary[-3000:]
    rows = {}
    for run_dir in ("run", "joiner"):
        with open(tmp_path / run_dir / "evaluation.csv") as f:
            rows[run_dir] = {int(row["step"]): {k: v for k, v in row.items() if k != "train_s"} for row in csv.DictReader(f)}
    # every evaluation of the run is there but the one the death fell in; the joiner's from its first on
    assert sorted(rows["run"]) == [s for s in range(every, 201, every) if s != lost_at], sorted(rows["run"])
    assert lost_at not in rows["joiner"] and 200 in rows["joiner"], sorted(rows["joiner"])
    assert rows["run"][200] == rows["joiner"][200], rows  # one consensus model, scored together (the seconds differ)
    # the last checkpoint is a set of the four members at the end, in member order; the joiner, a host of its own,
    # keeps its replica under its own run directory
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    replica_set = replica_set_of(read_main(last))
    assert replica_set.members == (0, 1, 3, 4) and replica_set.world_size == 4, replica_set
    assert [read_replica(last, replica_set, r)[REPLICA_KEY]["rank"] for r in range(3)] == [0, 1, 2]
    assert read_replica(tmp_path / "joiner" / "checkpoints" / "last.ckpt", replica_set, 3)[REPLICA_KEY]["rank"] == 3
    assert re.search(r"^  resume: python -m lightning_dpgan fit ckpt_path=\S+last.ckpt devices=4$", out, re.MULTILINE), out[-3000:]


def _inside_replica_write(pid: int) -> bool:
    """Whether the stopped process holds a replica file open for writing (``rank<r>.pt.tmp<pid>``)."""
    with contextlib.suppress(OSError):
        return any(".pt.tmp" in os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir())
    return False


def test_a_worker_stopped_inside_a_checkpoint_write_is_named_within_the_peer_timeout(tmp_path):
    """A checkpoint every step, and rank 2 stopped (SIGSTOP) while it writes its replica file: the others wait in
    the checkpoint's agreement, once bounded only by the start-up timeout (30 minutes), now by the peer timeout."""
    proc = _fit_cli(tmp_path, "max_steps=100000", "checkpoint.every_n_train_steps=1", "strategy.gossip.peer_timeout=5")
    deadline = time.monotonic() + 120
    while logged_step(tmp_path) < 5:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    victim = _worker_pid(proc.pid, 2)
    rng = random.Random(0)
    for _ in range(2000):  # stop it, and go on until it is caught inside its replica write
        os.kill(victim, signal.SIGSTOP)
        time.sleep(0.01)
        if _inside_replica_write(victim):
            break
        os.kill(victim, signal.SIGCONT)
        time.sleep(rng.uniform(0, 0.05))
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("rank 2 was never caught inside a replica write")
    _named_within_the_peer_timeout(proc, victim, "error: GossipPeerError: rank 2 died or stalled; rank 0: checkpoint (replicas written)")


# ---------------------------------------------------------------------- a full disk
@contextlib.contextmanager
def _small_disk(folder: Path, size: int):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_ends_the_run_with_one_line_and_keeps_the_last_whole_checkpoint(tmp_path):
    """A fit checkpoints at step 5 on a small disk; the disk is then filled, and the resumed fit's checkpoint at
    step 10 does not fit: its replicas, or (the second resume, from the same step 5) only rank 0's main file. Every
    rank stops with the same error, the CLI prints one line naming the file and the space, nothing of the new set is
    left, and the checkpoint of step 5 still loads, whole."""
    with _small_disk(tmp_path / "disk", 32 * 2**20) as disk:
        run_dir, args = disk / "run", ["checkpoint.every_n_train_steps=5", "trainer.log_every_n_steps=1000"]
        first = _fit_cli(run_dir, "max_steps=5", *args, devices=2)
        assert first.wait(timeout=240) == 0, first.communicate()[1][-3000:]
        last = run_dir / "checkpoints" / "last.ckpt"
        replica = next(Path(f"{last}.replicas").glob("step*/rank0.pt")).stat().st_size
        main = last.stat().st_size
        for which, free in [("replica", replica // 2), ("main", 2 * replica + main // 2)]:  # main: room for the replicas
            with open(disk / "filler", "wb") as f:
                f.truncate(0)
                f.write(b"\0" * max(0, shutil.disk_usage(disk).free - free))
            resumed = _fit_cli(run_dir, "max_steps=10", f"ckpt_path={last}", *args, devices=2)
            stderr, _ = _ended(resumed, resumed.pid)
            assert resumed.returncode == 2, (which, stderr[-3000:])
            errors = [line for line in stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "Traceback" not in stderr and "[rank" not in stderr.split("error:")[-1], stderr[-3000:]
            assert f"error: checkpoint file '{run_dir}/checkpoints/epoch=0-step=10.ckpt" in errors[0], errors[0]
            assert ("replicas/step000000010-" in errors[0]) == (which == "replica"), errors[0]
            assert "could not be written (No space left on device); it needs about 1.5 MB and its filesystem has" in errors[0], errors[0]
            assert not list(run_dir.glob("checkpoints/*.replicas/step000000010-*")), f"{which}: a partial set was left"
            assert not list(run_dir.glob("checkpoints/epoch=0-step=10.ckpt*")), f"{which}: a partial file was left"
            check_set(last, 2)  # the set of step 5: its main file and every replica load and belong together
            assert read_main(last)["global_step"] == 5
            check_set(run_dir / "checkpoints" / "epoch=0-step=5.ckpt", 2)
