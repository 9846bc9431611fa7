"""Where Lightning users are: the strategy by name, Fabric, offline FID for natural images, the built wheel, and the
command line's run folder, pictures and shell completion."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import call_cli, run, worker_env

CLI = [sys.executable, "-m", "lightning_dpgan"]
ROOT = Path(__file__).resolve().parents[1]


def fresh(code: str, **kwargs) -> subprocess.CompletedProcess:
    """Python code in a fresh interpreter (nothing imported before it)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=worker_env(), **kwargs)


# ---------------------------------------------------------------------- the strategy by name
def test_import_lightning_dpgan_registers_the_strategy_for_the_trainer_fabric_and_lightning_cli(tmp_path):
    code = """
import lightning_dpgan
import lightning.pytorch as pl
from lightning.fabric import Fabric
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="decentralized", logger=False)
spawn = pl.Trainer(accelerator="cpu", devices=2, strategy="decentralized_spawn", logger=False)
fabric = Fabric(accelerator="cpu", devices=2, strategy="decentralized")
cli = LightningCLI(BoringModel, BoringDataModule, run=False, save_config_callback=None,
                   args=["--trainer.strategy=decentralized", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.logger=false"])
print(type(trainer.strategy).__name__, spawn.strategy._start_method, type(fabric.strategy).__name__, type(cli.trainer.strategy).__name__)
"""
    proc = fresh(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["DecentralizedStrategy", "spawn", "DecentralizedFabricStrategy", "DecentralizedStrategy"]


# ---------------------------------------------------------------------- Fabric
def test_the_fabric_gan_example_trains_on_four_processes(tmp_path):
    """A real 4-process Fabric run (Fabric's own launcher); its numerics are checked against DPOSG in numpy in
    ``test_dposg.py::test_a_fabric_loop_equals_the_dposg_equations_and_resumes_exactly``. 30 steps: what is checked
    here (the example runs to its end on 4 processes and reports) does not need a trained generator."""
    proc = run([*CLI[:1], "-m", "lightning_dpgan.examples.fabric_gan", "--devices", "4", "--steps", "30", "--batch-size", "64"],
               timeout=240)
    found = re.search(r"consensus generator after 30 steps on 4 workers \(ring\): (\d+) of 25 modes", proc.stdout)
    assert found, proc.stdout[-2000:]


# ---------------------------------------------------------------------- torch.compile
def test_a_compiled_dpgan_trains_under_the_strategy_as_it_does_eager(suite2):
    """``torch.compile(model)`` compiles DPGAN's ``training_step``, inside which its optimizer steps; dynamo traced the
    optimizer, the gossip, the non-finite check and the consensus measurement into graphs, and failed (issue 46: a
    RecursionError in the non-finite check; here, at step 50, a compiled buffer pack given another bucket's buffer).
    The step now runs eagerly (``DecentralizedStrategy.optimizer_step``, compiler-disabled): dynamo compiles
    frames of DPGAN only, and each rank's replica after 6 compiled steps (gossip, consensus and logs every 2) is the
    one the same run without compiling ends with."""
    import csv
    import json

    for rank in range(2):
        compiled_frames = json.loads((suite2 / "compiled" / f"compiled_rank{rank}.json").read_text())
        assert "gan.DPGAN.training_step" in compiled_frames  # it was compiled
        assert [name for name in compiled_frames if not name.startswith("gan.")] == []
        assert json.loads((suite2 / "eager" / f"compiled_rank{rank}.json").read_text()) == []
    for rank in range(2):
        compiled = torch.load(suite2 / "compiled" / f"end_rank{rank}.pt", weights_only=True)
        eager = torch.load(suite2 / "eager" / f"end_rank{rank}.pt", weights_only=True)
        assert compiled.keys() == eager.keys()
        for key, value in eager.items():
            torch.testing.assert_close(compiled[key], value, rtol=1e-5, atol=1e-6, msg=key)
    first, second = (torch.load(suite2 / "eager" / f"end_rank{r}.pt", weights_only=True) for r in range(2))
    assert max(float((first[k] - second[k]).abs().max()) for k in first if first[k].is_floating_point()) > 1e-4  # two replicas
    with open(suite2 / "compiled" / "log" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["consensus/generator"]] == [1, 3, 5]


# ---------------------------------------------------------------------- FID/IS for natural images, offline
@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """A weights file of torch-fidelity's Inception architecture, here with its random initial weights (the real
    ones are a download this machine cannot make): what matters is that FID/IS build and run from a file, offline."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    original_load, original_url = fidelity.FeatureExtractorInceptionV3.load_state_dict, fidelity.load_state_dict_from_url
    fidelity.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None
    fidelity.load_state_dict_from_url = lambda *args, **kwargs: {}
    try:
        state = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"]).state_dict()
    finally:
        fidelity.FeatureExtractorInceptionV3.load_state_dict, fidelity.load_state_dict_from_url = original_load, original_url
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path


@pytest.fixture()
def no_cached_inception(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # torch's hub cache: empty


def test_fid_and_is_of_natural_images_run_offline_from_a_weights_file(inception_weights, no_cached_inception):
    from lightning_dpgan.metrics import fid_metric, inception_score_metric

    fid, score = fid_metric("cifar10", str(inception_weights)), inception_score_metric("cifar10", str(inception_weights))
    real, fake = torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    score.update(fake)
    assert torch.isfinite(fid.compute()) and torch.isfinite(score.compute()[0])


def _image_folder(root: Path) -> Path:
    from torchvision.utils import save_image

    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            save_image(torch.rand(3, 16, 16), root / label / f"{i}.png")
    return root


IMAGES = ["dataset=imagefolder", "dataset.image_size=32", "model=dcgan", "model.generator.image_size=32",
          "model.discriminator.image_size=32", "devices=2", "batch_size=4"]


def test_images_without_inception_weights_are_refused_before_any_worker(tmp_path, no_cached_inception):
    from lightning_dpgan.metrics.image_quality import INCEPTION_WEIGHTS_FILE, inception_cache_path

    folder = _image_folder(tmp_path / "images")
    status, _, err = call_cli("fit", *IMAGES, f"dataset.root={folder}", f"output_dir={tmp_path / 'runs'}")
    assert status == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert INCEPTION_WEIGHTS_FILE in err and inception_cache_path() in err, err
    assert "evaluation.inception_weights=" in err and "evaluation.enabled=false" in err
    status, _, err = call_cli("fit", *IMAGES, f"dataset.root={folder}", f"evaluation.inception_weights={tmp_path}/none.pth",
                              f"output_dir={tmp_path / 'runs'}")
    assert status == 2 and f"Inception weights file '{tmp_path}/none.pth' not found" in err, err
    assert not (tmp_path / "runs").exists()


def test_images_with_a_weights_file_or_evaluation_off_pass_the_checks(tmp_path, inception_weights, no_cached_inception):
    from hydra import compose, initialize_config_module

    from lightning_dpgan.command.checks import prepare

    folder = _image_folder(tmp_path / "images")
    for extra in ([f"evaluation.inception_weights={inception_weights}"], ["evaluation.enabled=false"]):
        with initialize_config_module("lightning_dpgan.conf", version_base="1.3"):
            cfg = compose("config", overrides=[*IMAGES, f"dataset.root={folder}", *extra])
        prepare("fit", cfg, str(tmp_path))  # raises UsageError otherwise


def test_a_download_without_network_is_refused_before_any_worker(tmp_path):
    status, _, err = call_cli("fit", "dataset=mnist", "dataset.download=true", f"dataset.root={tmp_path}", "model=dcgan",
                              "model.generator.image_size=28", "model.discriminator.image_size=28", "evaluation.enabled=false")
    assert status == 2 and err.count("error:") == 1, err
    assert f"could not download mnist to '{tmp_path}'" in err


def test_the_cifar10_hint_names_the_override(tmp_path):
    status, _, err = call_cli("fit", "dataset=cifar10", f"dataset.root={tmp_path}")
    assert status == 2 and "dataset.download=true" in err, err


# ---------------------------------------------------------------------- the built wheel
def test_the_built_wheel_carries_configs_license_types_and_version(tmp_path):
    """Build the wheel, install it elsewhere, run the CLI from a folder that is not the checkout."""
    from lightning_dpgan import __version__

    # -v: pip shows setuptools' own output, where a folder left out of the package list is "would be ignored"
    build = run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ROOT)],
                timeout=180)
    assert "would be ignored" not in build.stdout + build.stderr, (build.stdout + build.stderr)[-3000:]
    wheel = next((tmp_path / "dist").glob("lightning_dpgan-*.whl"))
    assert wheel.name.startswith(f"lightning_dpgan-{__version__}-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "lightning_dpgan/py.typed" in names and any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    # every config of the checkout and the shipped extractors' weights, against the source tree's own files
    configs = {f"lightning_dpgan/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    weights = {f"lightning_dpgan/metrics/weights/{p.name}" for p in (ROOT / "lightning_dpgan/metrics/weights").iterdir()}
    assert len(configs) > 30 and weights >= {"lightning_dpgan/metrics/weights/digits.pt", "lightning_dpgan/metrics/weights/mnist5k.pt"}
    assert configs | weights <= set(names), sorted((configs | weights) - set(names))
    assert "License-Expression: Apache-2.0" in metadata
    assert "Provides-Extra: data" in metadata and "Provides-Extra: tensorboard" in metadata
    assert re.search(r"Requires-Dist: scikit-learn.*; extra == \"data\"", metadata) and re.search(r"Requires-Dist: matplotlib", metadata)
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], timeout=180)
    env = dict(worker_env(), PYTHONPATH=str(tmp_path / "site"))
    # one interpreter: where the package comes from, then the CLI twice, as ``python -m lightning_dpgan`` runs it
    code = """import gc, runpy, sys
import lightning_dpgan
print(lightning_dpgan.__file__, gc.isenabled(), gc.get_freeze_count())
for sys.argv[1:] in (["--version"], ["topology", "topology=torus", "devices=6"]):
    try:
        runpy.run_module("lightning_dpgan", run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        assert exit.code in (None, 0), exit.code
"""
    proc = subprocess.run([sys.executable, "-c", code, "lightning_dpgan"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, version, *topology = proc.stdout.splitlines()
    module, collecting, frozen = where.split()
    assert module.startswith(str(tmp_path / "site")), where
    # the import paused the garbage collector, froze what it made (torch's and Lightning's objects) and restarted it
    assert collecting == "True" and int(frozen) > 100_000, where
    assert version == f"lightning-dpgan {__version__}", proc.stdout[-2000:]
    assert "topology: torus" in topology and "world_size: 6" in topology, proc.stdout[-2000:]


# ---------------------------------------------------------------------- the command line
def test_shell_completion_and_version_work_before_or_after_the_verb():
    from lightning_dpgan import __version__

    status, out, err = call_cli("fit", "-sc", "install=bash")  # in this process (test_cli.py runs the installed script)
    assert status == 0 and "complete" in out and "hydra_bash_completion" in out, (out + err)[-2000:]
    for args in (["--version"], ["fit", "--version"], ["-V"]):
        status, out, _ = call_cli(*args)
        assert status == 0 and out.strip() == f"lightning-dpgan {__version__}"


def test_a_run_folder_is_clean_and_its_output_says_each_thing_once(fitted):
    """No empty per-rank logs, no logger warnings about the folder, each Lightning line once, a progress bar that
    counts toward max_steps, and a summary that lists only what is there."""
    run_dir, proc = fitted
    assert not [p for p in run_dir.iterdir() if p.is_file() and p.stat().st_size == 0]
    assert not list(run_dir.glob("*.log")) and not list(run_dir.glob(".pl_hydra*"))
    assert "exists and is not empty" not in proc.stderr
    for line in ("GPU available: False, used: False", "`Trainer.fit` stopped: `max_steps=40` reached."):
        assert (proc.stdout + proc.stderr).count(line) == 1, line
    listed = proc.stdout.split("run directory:")[1].splitlines()[1].strip()
    for name in listed.split(", "):
        assert list(run_dir.glob(name.split(" ")[0])), name


def test_image_sample_grids_are_big_enough_to_see_and_titled(tmp_path):
    from PIL import Image

    from lightning_dpgan.evaluation import save_samples_picture

    path = tmp_path / "grid.png"
    save_samples_picture(torch.rand(64, 1, 8, 8) * 2 - 1, "digits", str(path), "step 1000")
    width, height = Image.open(path).size
    assert width >= 600 and height >= 600  # 8x8 digits, enlarged


def test_the_progress_bar_counts_toward_max_steps_not_per_epoch(tmp_path):
    """An epoch of this shard is 5 steps; the bar goes once from 0 to max_steps (12)."""
    import lightning.pytorch as pl

    from lightning_dpgan import DPGAN
    from lightning_dpgan.data import GaussianMixtureDataModule
    from lightning_dpgan.models import MLPDiscriminator, MLPGenerator
    from lightning_dpgan.progress import StepProgressBar

    seen = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            bar = trainer.progress_bar_callback.train_progress_bar
            seen.append((bar.total, bar.n))

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=12, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[StepProgressBar(), Watch()], default_root_dir=tmp_path)
    trainer.fit(DPGAN(MLPGenerator(hidden=8), MLPDiscriminator(hidden=8)), datamodule=GaussianMixtureDataModule(num_samples=320, batch_size=64))
    assert seen == [(12, step) for step in range(1, 13)], seen


def test_fabric_state_keys_like_the_strategys_records_come_back_as_saved(tmp_path):
    """A user's ``step`` (or ``rank``, ``token``, ...) overwrote the replica's own record, and ``fabric.load`` then
    refused the file as another checkpoint's; ``load`` also handed back the strategy's records as the user's."""
    import json

    from helpers import lightning_script

    lightning_script("fabric_state_keys.py", str(tmp_path), timeout=240)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["remainder"] == result["user"]  # exactly what was saved beside the model and optimizer
        weights = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in weights["saved"].items():
            torch.testing.assert_close(weights["loaded"][name], value, rtol=0, atol=0)  # this rank's own replica
        assert "'lightning_dpgan' is written by lightning_dpgan" in (tmp_path / f"clash{rank}.txt").read_text()
    first, second = (next(iter(torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["saved"].values())) for r in range(2))
    assert not torch.equal(first, second)  # two replicas, each restored to its own


def test_in_a_log_file_each_progress_update_is_one_line_with_both_losses(tmp_path, capsys):
    """Where the output is not a terminal (here: pytest's capture), each tqdm draw is a line: one per step, none
    twice (the step, then its numbers, were two draws; an epoch's start and end drew again), and the numbers are
    both players' losses. Epochs of 5 steps, so the bar crosses two epoch ends."""
    import re

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from lightning_dpgan import DPGAN
    from lightning_dpgan.data import GaussianMixtureDataModule
    from lightning_dpgan.models import MLPDiscriminator, MLPGenerator
    from lightning_dpgan.progress import StepProgressBar

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=12, logger=CSVLogger(tmp_path), log_every_n_steps=2,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[StepProgressBar()])
    trainer.fit(DPGAN(MLPGenerator(hidden=8), MLPDiscriminator(hidden=8)), datamodule=GaussianMixtureDataModule(num_samples=320, batch_size=64))
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().out) if line.startswith("Steps:")]
    steps = [int(re.search(r"\| (\d+)/12 ", line).group(1)) for line in lines]
    assert steps[:-1] == list(range(13)), steps  # the last line is tqdm's own, when the bar closes
    assert steps[-1] == 12
    for line in lines[3:]:  # from step 2, the first the logger writes
        assert "loss_d=" in line and "loss_g=" in line, line


def test_in_a_log_file_a_long_run_draws_about_a_hundred_progress_lines(tmp_path, capsys):
    """A line every step was 3,800 lines for the main job; off a terminal the bar draws every max_steps / 100."""
    import re

    import lightning.pytorch as pl

    from lightning_dpgan import DPGAN
    from lightning_dpgan.data import GaussianMixtureDataModule
    from lightning_dpgan.models import MLPDiscriminator, MLPGenerator
    from lightning_dpgan.progress import StepProgressBar

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=300, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[StepProgressBar()])
    trainer.fit(DPGAN(MLPGenerator(hidden=8), MLPDiscriminator(hidden=8)), datamodule=GaussianMixtureDataModule(num_samples=320, batch_size=64))
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().out) if line.startswith("Steps:")]
    steps = [int(re.search(r"\| (\d+)/300 ", line).group(1)) for line in lines]
    assert steps[:-1] == list(range(0, 301, 3)), steps  # the last line is tqdm's own, when the bar closes


def test_the_sweep_comparison_shows_modes_beside_the_high_quality_fraction(tmp_path):
    """A ring collapsed onto one mode (high-quality fraction 0.87) looked better than an exponential graph covering
    18 modes (0.41) when only the fraction was plotted; the modes panel shows the collapse. Job folders as a ``-m``
    sweep names them, with evaluation.csv as fit writes it."""
    from PIL import Image

    from lightning_dpgan.sweep import plot_sweep

    header = "step,train_s,modes,high_quality,reverse_kl,consensus/generator,consensus/discriminator\n"
    jobs = {"0_devices=4,topology=ring": ["1000,10,3,0.52,1.9,0.01,0.02", "2000,20,1,0.87,3.2,0.001,0.002"],
            "1_devices=4,topology=exponential": ["1000,10,12,0.30,0.8,0.01,0.02", "2000,20,18,0.41,0.3,0.001,0.002"]}
    for name, lines in jobs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "evaluation.csv").write_text(header + "\n".join(lines) + "\n")
    path = plot_sweep(str(tmp_path))
    described = Image.open(path).text["Description"]
    assert described == "modes: topology=ring 1, topology=exponential 18; high_quality: topology=ring 0.87, topology=exponential 0.41"
    assert Image.open(path).size[0] >= 1500  # three panels: modes, high-quality fraction, consensus distance


def test_a_checkout_finds_its_configs_without_the_editable_install(tmp_path):
    """From a clone's root, ``python -m lightning_dpgan`` imports the source tree (it shadows an installed wheel),
    whose configs sit at the root (conf/), not in the package: the editable install's finder maps them, and
    without it (a wheel installed beside a clone) the package itself must find them."""
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "for name in [n for n in sys.modules if n.startswith('lightning_dpgan')]: del sys.modules[name]\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from lightning_dpgan import cli\n"
        "import lightning_dpgan.conf\n"
        "print(lightning_dpgan.conf.__file__)\n"
        "cli.main(['topology', 'topology=ring', 'devices=4'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=worker_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == str(ROOT / "conf" / "__init__.py") and "rho(W^t)" in proc.stdout
