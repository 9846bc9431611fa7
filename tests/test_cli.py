"""The command line, run as users run it (``python -m lightning_dpgan <verb> ...`` in a subprocess), and its input
checks called in this process (they end before any worker would start, so no process is needed to test them).

Numbers it prints or writes are recomputed here independently: mode coverage in numpy from the checkpoint's
weights, W and rho(W^t) from a hand-built matrix.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY
from helpers import call_cli, run, worker_env

CLI = [sys.executable, "-m", "lightning_dpgan"]
GRID = np.array([(a, b) for a in range(-4, 5, 2) for b in range(-4, 5, 2)], dtype=float)


def modes_and_quality(points: np.ndarray) -> tuple[int, float]:
    """PacGAN's numbers in numpy: modes with a sample within 3σ = 0.15, and the fraction of such samples."""
    distance = np.sqrt(((points[:, None, :] - GRID[None]) ** 2).sum(-1))
    near = distance.min(1) < 0.15
    return len(set(distance.argmin(1)[near].tolist())), float(near.mean())


def generator_from(ckpt: Path, prefix: str) -> torch.nn.Module:
    """The generator the run's config.yaml describes, with the checkpoint's weights."""
    from hydra.utils import instantiate

    config = yaml.safe_load((ckpt.parent.parent / "config.yaml").read_text())
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    generator = instantiate(config["model"]["generator"])
    generator.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    return generator.eval()


def replica_files(ckpt: Path) -> list[Path]:
    (folder,) = Path(f"{ckpt}.replicas").iterdir()
    return sorted(folder.glob("rank*.pt"))


def test_fit_trains_on_a_ring_and_leaves_a_complete_run_directory(fitted):
    run_dir, proc = fitted
    assert "fit done in" in proc.stdout and "on 2 processes (ring, gossip_rounds=1, OptimisticAdam)" in proc.stdout
    # the evaluation's mode count: "0 modes", "1 mode", "3 modes"
    assert re.search(r"consensus model, 400 samples: \d+ modes?, ", proc.stdout), proc.stdout[-2000:]
    assert "consensus distance: generator" in proc.stdout and str(run_dir) in proc.stdout
    for name in ("config.yaml", "metrics.csv", "evaluation.csv", "samples_step0000020.png", "samples_step0000040.png",
                 "consensus.png", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    assert [p.name for p in replica_files(run_dir / "checkpoints" / "last.ckpt")] == ["rank0.pt", "rank1.pt"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["strategy"]["topology"] == "ring" and config["trainer"]["devices"] == 2  # resolved
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert hparams["topology"]["name"] == "ring" and hparams["max_steps"] == 40  # the config, logged


def test_checkpoints_follow_the_step_cadence_not_the_short_epochs_and_last_is_the_end(fitted):
    """7168 points on 2 workers at batch 512 is an epoch of 7 steps; the checkpoint config asks for every 15, and
    the run of 40 steps ends between two of them: last.ckpt must still be the final model (``FITTED``)."""
    run_dir, proc = fitted
    saved = sorted(run_dir.glob("checkpoints/epoch=*-step=*.ckpt"))
    assert sorted(int(p.stem.rsplit("=", 1)[1]) for p in saved) == [15, 30]
    last = run_dir / "checkpoints" / "last.ckpt"
    for path in [*saved, last]:
        assert len(replica_files(path)) == 2, path
    assert torch.load(last, weights_only=True)["global_step"] == 40
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("last")) == [
        "last.ckpt", "last.ckpt.replicas"]  # overwritten in place, not versioned
    assert "pre-optimization state" not in proc.stderr  # Lightning's warning for manual optimization, silenced


def test_validate_scores_the_checkpoint_as_recomputed_by_hand(fitted, tmp_path):
    run_dir, _ = fitted
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "validate"
    # in this process: validate starts no worker (fit_then_validate runs it as a process of its own)
    status, stdout, err = call_cli("validate", f"ckpt_path={ckpt}", "evaluation.num_samples=1000", f"hydra.run.dir={out}")
    assert status == 0, err[-3000:]
    result = json.loads((out / "validate.json").read_text())
    # the run's own config was used: the EMA generator, noise from the evaluation's seed (1234, rank 0, step 0)
    generator = generator_from(ckpt, "generator_ema.module.")
    with torch.no_grad():
        noise = torch.randn(1000, generator.latent_dim, generator=torch.Generator().manual_seed(1234))
        points = generator(noise).numpy()
    modes, quality = modes_and_quality(points)
    assert result["modes"] == modes and result["high_quality"] == pytest.approx(quality)
    assert f"modes: {modes}" in stdout and (out / "samples.png").stat().st_size > 1000


def test_sample_writes_the_generators_output(fitted, tmp_path):
    run_dir, _ = fitted
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "sample"
    status, _, err = call_cli("sample", f"ckpt_path={ckpt}", "num_samples=300", "seed=7", f"hydra.run.dir={out}")
    assert status == 0, err[-3000:]
    samples = np.load(out / "samples.npy")
    generator = generator_from(ckpt, "generator_ema.module.")  # built first: its initialisation draws random numbers
    torch.manual_seed(7)
    with torch.no_grad():
        expected = generator(torch.randn(300, generator.latent_dim)).numpy()
    np.testing.assert_allclose(samples, expected, rtol=0, atol=1e-6)
    assert (out / "samples.png").stat().st_size > 1000


def test_topology_prints_w_and_rho_without_starting_anything(tmp_path):
    # in this process: the verb starts nothing (the built wheel's test runs it as a process of its own)
    status, stdout, err = call_cli("topology", "topology=ring", "devices=8", "gossip_rounds=3", f"output_dir={tmp_path}")
    assert status == 0 and "Traceback" not in err, err[-2000:]
    w = np.zeros((8, 8))
    for i in range(8):
        for j in (i - 1, i, i + 1):
            w[i, j % 8] = 1 / 3
    printed = [line for line in stdout.splitlines() if line.strip().startswith("[")]
    got = np.array([[float(x) for x in line.replace("[", "").replace("]", "").split()] for line in printed])
    np.testing.assert_allclose(got, w, atol=1e-3)
    rho = np.linalg.norm(np.linalg.matrix_power(w, 3) - np.full((8, 8), 1 / 8), 2)
    assert f"rho(W^t): {rho:.4g}" in stdout
    assert not list(tmp_path.iterdir())  # no run directory


def test_multirun_gives_every_job_its_own_directory(tmp_path):
    proc = run([*CLI, "fit", "-m", "topology=ring,exponential", *TINY, "max_steps=20", f"output_dir={tmp_path}"], timeout=300)
    jobs = sorted((tmp_path / "multirun").glob("*/*/config.yaml"))
    assert len(jobs) == 2, proc.stdout[-2000:]
    names = [p.parent.name for p in jobs]  # named by their overrides
    assert names[0].startswith("0_") and "topology=ring" in names[0] and "topology=exponential" in names[1], names
    topologies = [yaml.safe_load(p.read_text())["strategy"]["topology"] for p in jobs]
    assert topologies == ["ring", "exponential"]
    for path in jobs:
        assert (path.parent / "evaluation.csv").is_file() and (path.parent / "checkpoints" / "last.ckpt").is_file()
    assert proc.stdout.count("fit done in") == 2
    (sweep,) = (tmp_path / "multirun").iterdir()
    assert (sweep / "comparison.png").stat().st_size > 5000 and f"sweep comparison: {sweep}/comparison.png" in proc.stdout
    # a job's printed resume line composes that job again, though its folder name holds '=' and ',' (Hydra's
    # grammar): its topology, the key given with it, its own folder and checkpoint (the resume line's run itself is
    # test_the_printed_resume_line_resumes_the_run_it_names's)
    resume = [line.split("resume: ", 1)[1] for line in proc.stdout.splitlines() if "resume: " in line][1]
    python, module, package, verb, *args = shlex.split(resume)
    last = jobs[1].parent / "checkpoints" / "last.ckpt"
    assert [python, module, package, verb] == ["python", "-m", "lightning_dpgan", "fit"] and args == [f"ckpt_path={last}"]
    assert "=" in last.parents[1].name and "," in last.parents[1].name
    status, out, err = call_cli(verb, *args, "max_steps=25", "--cfg", "all")
    composed = yaml.safe_load(out)
    assert status == 0, err
    assert composed["topology"]["name"] == "exponential" and composed["max_steps"] == 25
    assert composed["ckpt_path"] == str(last) and composed["hydra"]["run"]["dir"] == str(jobs[1].parent)
    # the same sweep again with ckpt_path=last: Lightning resolves it in each job's own folder
    proc = run([*CLI, "fit", "-m", "topology=ring,exponential", *TINY, "max_steps=20", f"output_dir={tmp_path}",
                f"hydra.sweep.dir={sweep}", "ckpt_path=last"], timeout=300)
    for path in jobs:
        assert f"Restoring states from the checkpoint path at {path.parent / 'checkpoints' / 'last.ckpt'}" in proc.stdout + proc.stderr
    assert sorted((tmp_path / "multirun").glob("*/*/config.yaml")) == jobs  # no new job folders


def test_the_printed_resume_line_resumes_the_run_it_names(tmp_path):
    """fit's resume line composes the run's own command line again (its topology, experiment), not the
    defaults, and goes on in the run's directory; keys given with it replace the run's."""
    first = run([*CLI, "fit", "devices=1", "max_steps=12", "topology=exponential", "experiment=digits",
                 "evaluation.every_n_steps=0", "evaluation.num_samples=100", "trainer.enable_progress_bar=false",
                 f"output_dir={tmp_path}"], timeout=240)
    (resume,) = [line.split("resume: ", 1)[1] for line in first.stdout.splitlines() if "resume: " in line]
    (run_dir,) = (tmp_path / "fit").iterdir()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    longer = run([sys.executable, *shlex.split(resume)[1:], "max_steps=20"], timeout=240)
    assert "on 1 process (exponential, gossip_rounds=1" in longer.stdout and "FID" in longer.stdout, longer.stdout[-2000:]
    assert f"run directory: {run_dir}" in longer.stdout and list((tmp_path / "fit").iterdir()) == [run_dir]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["dataset"]["_target_"].endswith("DigitsDataModule") and config["max_steps"] == 20


def test_shell_completion_and_hydra_flags_after_the_verb(monkeypatch):
    def query(line: str) -> str:
        monkeypatch.setenv("COMP_LINE", line)
        status, out, err = call_cli("-sc", "query=bash")  # in this process: nothing starts
        assert status == 0, err
        return out

    assert query("lightning-dpgan ").split() == ["fit", "validate", "sample", "topology", "plan"]
    assert query("lightning-dpgan f").split() == ["fit"]
    assert query("lightning-dpgan p").split() == ["plan"]
    assert "topology=ring" in query("lightning-dpgan fit topology=").split()
    monkeypatch.delenv("COMP_LINE")
    script = str(Path(sys.executable).parent / "lightning-dpgan")  # the command the hook is installed for
    assert run([script, "-sc", "install=bash"], timeout=60).stdout.rstrip().endswith("hydra_bash_completion lightning-dpgan")
    status, out, _ = call_cli("fit", "experiment=grid25", "--cfg", "job")
    cfg = yaml.safe_load(out)
    assert status == 0 and cfg["verb"] == "fit" and cfg["devices"] == 8  # the experiment's 8 workers
    for flags in (["--info"], ["--hydra-help"]):
        status, out, err = call_cli("fit", *flags)
        assert status == 0 and "Traceback" not in err and out.strip(), flags


def test_image_folder_at_another_size_than_the_model_is_refused_and_sampling_needs_no_metric(tmp_path):
    """dataset=imagefolder (64 px by default) with model=dcgan (32 px) trained on scrambled images and exited 0;
    sample on an image checkpoint asked for Inception weights it does not use."""
    from PIL import Image

    for i in range(8):
        (tmp_path / "images" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "images" / "a" / f"{i}.png")
    data = ["dataset=imagefolder", f"dataset.root={tmp_path / 'images'}", "model=dcgan", "batch_size=4", "evaluation.enabled=false"]
    status, _, err = call_cli("fit", *data, "devices=1", f"output_dir={tmp_path}")
    assert status == 2 and err.count("error:") == 1
    assert "dataset=imagefolder gives samples of shape (3, 64, 64) and the model generates (3, 32, 32)" in err
    run_dir = tmp_path / "run"
    run([*CLI, "fit", *data, "dataset.image_size=32", "devices=1", "max_steps=2",
         "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"], timeout=240)
    out = tmp_path / "sample"
    run([*CLI, "sample", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "num_samples=5", f"hydra.run.dir={out}"], timeout=120)
    assert np.load(out / "samples.npy").shape == (5, 3, 32, 32)


@pytest.mark.parametrize(
    "args,message",
    [
        (["train"], "unknown verb 'train'; allowed: fit, validate, sample, topology"),
        (["fit", "topology=rinng"], "unknown topology 'rinng'; allowed: complete, exponential, hypercube, one_peer_exponential"),
        (["fit", "optim=rmsprop"], "unknown optim 'rmsprop'; allowed: adam, optimistic_adam, optimistic_sgd, sgd"),
        (["fit", "experiment=nope"], "unknown experiment 'nope'; allowed: cifar10_dposg, digits"),
        (["fit", "gossip_rounds=1000000000000", "devices=4"], "gossip_rounds must be an integer in [1, 1000], got 1000000000000 (each round"),
        (["fit", "staleness=1000000000"], "staleness (steps a neighbour's anchors may be old) must be an integer in [0, 32]"),
        (["fit", "seed=abc"], "seed must be an integer in [0, 4294967295], got 'abc'"),
        (["fit", "seed=-1"], "seed must be an integer in [0, 4294967295], got -1"),
        (["fit", "trainer=gpu"], "trainer.accelerator=gpu needs a CUDA GPU, and torch sees none on this machine"),
        (["fit", "num_nodes=2"], "num_nodes=2 needs a launcher on every node"),
        (["fit", "batch_size=20000", "dataset.num_samples=40000"], "batch_size=20000 is larger than rank 0's shard of the data (10000 samples over 4 ranks); allowed: at most 10000"),
        (["fit", "dataset=imagefolder"], "dataset.root must be given: add dataset.root=..."),
        (["fit", "devices=1025"], "devices x num_nodes must be an integer in [1, 1024], got 1025"),
        (["topology", "devices=100000"], "devices x num_nodes must be an integer in [1, 1024], got 100000"),
        (["fit", "learning_rate=1"], "Could not override 'learning_rate'"),
        (["fit", "gossip_rounds=0"], "gossip_rounds must be an integer in [1, 1000], got 0"),
        (["fit", "devices=0"], "devices must be an integer >= 1, got 0"),
        (["fit", "devices=two"], "devices must be an integer >= 1, got 'two'"),
        (["fit", "topology=torus", "devices=7"], "'torus' needs world size = rows x cols"),
        (["fit", "topology=hypercube", "devices=3"], "'hypercube' needs a power-of-two world size"),
        (["fit", "dataset=cifar10", "dataset.root=/nonexistent"], "cifar10 not found under '/nonexistent'"),
        (["fit", "model.lr_g=-1"], "lr_g must be a finite number >= 0, got -1"),
        (["fit", "model.lr_d=inf"], "lr_d must be a finite number >= 0, got inf"),
        (["fit", "wire_dtype=int8"], "unknown wire_dtype 'int8'"),
        (["fit", "strategy.gossip.peer_timeout=0"], "peer_timeout (seconds; None follows the run) must be a finite number > 0"),
        (["fit", "lr_scaling=linear"], "unknown lr_scaling 'linear'; allowed: none, sqrt"),
        (["fit", "staleness=2", "topology=one_peer_exponential"], "staleness=2 needs a static topology; 'one_peer_exponential'"),
        (["fit", "compression=sign", "topology=one_peer_exponential"], "compression='sign' keeps a copy of every neighbour"),
        (["fit", "compression=int8", "wire_dtype=bf16"], "compression='int8' sends its own format: leave wire_dtype unset"),
        (["fit", "compression=zip"], "unknown compression 'zip'; allowed: none, int8, topk, sign"),
        (["fit", "gossip_every=0"], "every (optimizer steps per mix) must be an integer >= 1, got 0"),
        (["fit", "membership=elastic"], "unknown membership 'elastic'; allowed: fixed, live"),
        (["fit", "membership=live", "compression=int8"], "membership='live' needs compression=None, got compression='int8'"),
        (["fit", "membership=live", "staleness=2"], "membership='live' needs staleness=0, got staleness=2"),
        (["fit", "membership=live", "gossip_every=4"], "membership='live' needs every=1, got every=4"),
        (["fit", "membership=live", "gossip_rounds=2"], "membership='live' needs rounds=1, got rounds=2"),
        (["fit", "membership=live", "strategy.gossip.overlap=true"], "membership='live' needs overlap=False, got overlap=True"),
        (["fit", "membership=live", "trainer=gpu"], "membership=live runs on CPU workers only (each new member set gets a gloo group), got trainer.accelerator=gpu; use trainer=cpu"),
        (["fit", "membership=live", "topology=one_peer_exponential"], "membership='live' folds and rebuilds one matrix, so it needs a static topology"),
        (["fit", "ckpt_path=join"], "ckpt_path=join joins a live run: it needs membership=live and the run's settings, got membership=fixed"),
        (["fit", "ckpt_path=join", "membership=live"], "ckpt_path=join starts one worker that joins the run: devices=1 num_nodes=1, got devices=4 num_nodes=1"),
        (["fit", "ckpt_path=join", "membership=live", "devices=1"], "ckpt_path=join finds the run in its c10d store at MASTER_ADDR:MASTER_PORT"),
        (["validate", "ckpt_path=join"], "ckpt_path=join joins a live run, which only fit does; validate needs ckpt_path=<a checkpoint file>"),
        (["sample"], "sample needs ckpt_path=<a checkpoint file>, got None"),
        (["fit", "ckpt_path=/nonexistent.ckpt"], "ckpt_path: checkpoint '/nonexistent.ckpt' not found"),
        (["fit", "ckpt_path=/tmp"], "ckpt_path: checkpoint '/tmp' is a directory, not a checkpoint file"),
        (["fit", "hydra.run.dir=/proc/none"], "run directory '/proc/none' cannot be written"),
    ],
)
def test_bad_input_exits_2_with_one_message_before_any_worker(args, message, monkeypatch):
    if "num_nodes=2" in args:  # what a launcher on each node sets: none here
        for name in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "NODE_RANK"):
            monkeypatch.delenv(name, raising=False)
    if "ckpt_path=join" in args:  # where a joiner finds the run: not set here
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(name, raising=False)
    status, out, err = call_cli(*args)
    assert status == 2, err[-2000:]
    assert message in err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "Initializing distributed" not in out + err


def test_live_membership_under_torchrun_needs_one_worker_per_agent(monkeypatch):
    """torchrun's agent stops every worker it started when one fails; Lightning's launcher, in a live run, does not."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "a-run")
    status, out, err = call_cli("fit", "membership=live", "devices=2")
    assert status == 2 and err.count("error:") == 1 and "Traceback" not in err, err[-2000:]
    assert "membership=live under torchrun needs one worker per agent, got devices=2 (--nproc-per-node)" in err
    assert "Initializing distributed" not in out + err


@pytest.mark.parametrize("port", ["abc", "99999", "0"])
def test_a_master_port_that_is_no_port_is_refused_before_any_worker(monkeypatch, port):
    monkeypatch.setenv("MASTER_PORT", port)
    status, out, err = call_cli("fit", "devices=2")
    assert status == 2 and err.count("error:") == 1 and "Traceback" not in err, err[-2000:]
    assert f"MASTER_PORT must be a port number in [1, 65535], got {port!r}" in err


def lr_scaled(run_dir: Path, factor: float) -> None:
    """The rates the optimizer stepped with (read from the checkpoint) and the ones config.yaml records: model.lr_g=0.001
    and model.lr_d=0.003, times ``factor``."""
    groups = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["optimizer_states"][0]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.001 * factor, 0.003 * factor], rel=1e-12)
    model = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    assert [model["lr_g"], model["lr_d"]] == pytest.approx([0.001 * factor, 0.003 * factor], rel=1e-12)


def test_lr_scaling_sqrt_gives_decentralized_workers_sqrt_n_times_the_rate(fitted):
    """``fitted`` runs 2 decentralized workers with lr_scaling=sqrt, the command line's default."""
    run_dir, _ = fitted
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["lr_scaling"] == "sqrt"
    lr_scaled(run_dir, np.sqrt(2.0))


def test_lr_scaling_sqrt_gives_ddp_the_rate(tmp_path):
    """The run ``fit`` builds (in this process: its workers build the same from the same configuration), its rates
    as its optimizer takes them: DDP keeps model.lr_g=0.001 and model.lr_d=0.003, the same line with the
    decentralized strategy scales them by sqrt(2) (``fitted``'s checkpoint shows them stepped)."""
    from hydra import compose, initialize_config_module

    from lightning_dpgan.command.checks import prepare

    for strategy, factor in (["strategy=ddp"], 1.0), ([], np.sqrt(2.0)):
        with initialize_config_module("lightning_dpgan.conf", version_base="1.3"):
            cfg = compose("config", overrides=["verb=fit", *TINY, *strategy, "lr_scaling=sqrt", "model.lr_g=0.001",
                                               "model.lr_d=0.003"])
        run = prepare("fit", cfg, str(tmp_path))
        groups = run.model.configure_optimizers().param_groups
        assert [g["lr"] for g in groups] == pytest.approx([0.001 * factor, 0.003 * factor], rel=1e-12), strategy
        assert [run.cfg.model.lr_g, run.cfg.model.lr_d] == pytest.approx([0.001 * factor, 0.003 * factor], rel=1e-12)


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"], ["-h", "fit", "topology=ring"]])
def test_help_lists_verbs_and_groups_before_or_after_the_verb(args):
    status, out, _ = call_cli(*args)
    assert status == 0
    for word in ("fit", "validate", "sample", "topology", "dataset", "one_peer_exponential", "optimistic_adam", "wandb"):
        assert word in out


@pytest.fixture(scope="module")
def one_process_fit(tmp_path_factory):
    """One worker, 2 steps: experiment=ring8, TensorBoard as the logger, and no evaluation."""
    run_dir = tmp_path_factory.mktemp("one_process") / "run"
    proc = run([*CLI, "fit", "experiment=ring8", "logger=tensorboard", "evaluation.enabled=false", "devices=1", "max_steps=2",
                "evaluation.every_n_steps=0", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"], timeout=240)
    return run_dir, proc


def test_tensorboard_writes_into_the_run_directory(one_process_fit):
    run_dir, proc = one_process_fit
    assert "fit done" in proc.stdout
    assert any("events.out.tfevents" in p.name for p in run_dir.rglob("*")), sorted(p.name for p in run_dir.rglob("*"))


def test_without_evaluation_there_are_no_samples_and_no_evaluation_csv(one_process_fit):
    run_dir, proc = one_process_fit
    assert "fit done" in proc.stdout and (run_dir / "config.yaml").is_file()
    assert not list(run_dir.glob("samples_step*")) and not (run_dir / "evaluation.csv").exists()


def test_the_mnist5k_experiment_runs_the_dcgan_recipe_with_fid(tmp_path):
    run_dir = tmp_path / "run"
    proc = run([*CLI, "fit", "devices=1", "max_steps=2", "evaluation.every_n_steps=0", "trainer.enable_progress_bar=false",
                "experiment=mnist5k", "evaluation.num_samples=100", f"hydra.run.dir={run_dir}"], timeout=240)
    assert "fit done" in proc.stdout
    assert any("samples_step0000002.png" in p.name for p in run_dir.rglob("*")), sorted(p.name for p in run_dir.rglob("*"))


def test_ring8_experiment_trains_with_r1_and_its_checkpoint_rebuilds_it(one_process_fit):
    """experiment=ring8 sets loss.r1=0.1 (docs/quality.md: without it D overpowers G in some seeds); the checkpoint's
    hyperparameters carry it, so load_from_checkpoint rebuilds the penalised loss."""
    from lightning_dpgan import DPGAN
    from lightning_dpgan.models import MLPDiscriminator, MLPGenerator

    run_dir, proc = one_process_fit
    assert "fit done" in proc.stdout
    gan = DPGAN.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", generator=MLPGenerator(hidden=128, depth=3),
                                     discriminator=MLPDiscriminator(hidden=128, depth=3), weights_only=True)
    assert gan.loss.r1 == 0.1 and gan.loss.name == "ns"
