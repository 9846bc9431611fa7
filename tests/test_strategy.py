"""DecentralizedStrategy in real multi-process Lightning runs (popen, spawn, torchrun), on gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_dpgan import DecentralizedStrategy, TopologyError
from lightning_dpgan.examples.alternating_gan import AlternatingGAN
from lightning_dpgan.topology import ring

from helpers import WORKERS, free_port, lightning_script, run, worker_env
from reference import bf16, dposg, narrow_wire_mix

sys.path.insert(0, str(WORKERS))
from lightning_worker import quadratic_targets  # noqa: E402


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)


def replicas(out: Path, n: int, when: str = "end") -> list[dict[str, torch.Tensor]]:
    return [load(out / f"{when}_rank{r}.pt") for r in range(n)]


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def test_complete_topology_with_sgd_equals_ddp(tmp_path):
    lightning_script("lightning_worker.py", "sgd", str(tmp_path / "gossip"), "strategy=complete")
    lightning_script("lightning_worker.py", "sgd", str(tmp_path / "ddp"), "strategy=ddp")
    gossip, ddp = replicas(tmp_path / "gossip", 4), replicas(tmp_path / "ddp", 4)
    for r in range(4):
        assert max_diff(gossip[r], ddp[r]) < 1e-5
    from lightning_worker import Classifier

    pl.seed_everything(0, verbose=False)  # the workers' initial weights, rebuilt here
    initial = Classifier(lr=0.2, batchnorm=False).state_dict()
    assert max_diff(initial, ddp[0]) > 1e-2  # 20 steps did move the weights, so equality is not trivial


def test_two_optimizer_gan_consensus_with_and_without_gossip(tmp_path):
    lightning_script("lightning_worker.py", "gan", str(tmp_path / "mix"), "mixing=1")
    lightning_script("lightning_worker.py", "gan", str(tmp_path / "local"), "mixing=0")
    mixed = json.loads((tmp_path / "mix" / "consensus.json").read_text())
    local = json.loads((tmp_path / "local" / "consensus.json").read_text())
    assert len(mixed) == len(local) == 12  # 60 batches, every 5 steps of each optimizer
    for entry in mixed:
        assert set(entry) == {"generator", "discriminator"}
        assert max(entry.values()) < 0.05  # bounded under gossip
    for name in ("generator", "discriminator"):
        assert local[-1][name] > 10 * local[0][name]  # replicas drift apart without mixing
        assert local[-1][name] > 100 * mixed[-1][name]
    # buffers are allocated once and reused: per optimizer at most one plan to mix and one to measure consensus
    # (G's differ because G's mix includes its BatchNorm buffers). Fresh plans per step would fill the cache (8).
    assert json.loads((tmp_path / "mix" / "buffers.json").read_text())["plans"] == 3
    header = (tmp_path / "mix" / "log" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "consensus/generator" in header and "consensus/discriminator" in header


def batches_seen(out: Path, rank: int) -> list[list[float]]:
    return [json.loads(line) for line in (out / f"batches_rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("overlap", "interruptions"),
    [(0, ["epochs=1"]), (1, ["epochs=1"]), (1, ["every=4", "stop=20", "stop=24"])],
    ids=["synchronous", "overlap", "overlap-twice-mid-epoch"],
)
def test_resume_reproduces_uninterrupted_run_on_every_rank(tmp_path, overlap, interruptions):
    # With overlap=1 each optimizer's mix (G's with its BatchNorm buffers) is in flight when a checkpoint is taken; a
    # checkpoint lands it early, so the uninterrupted run takes the same checkpoints. An epoch is 7 batches of 2
    # optimizer steps (14 steps): steps 20 and 24 are batches 3 and 5 of the second epoch, where the data must go on
    # in the second epoch's order rather than restart that epoch.
    every = [arg for arg in interruptions if arg.startswith("every=")]
    stops = [arg for arg in interruptions if arg not in every]
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["epochs=3", f"overlap={overlap}", *every]
    lightning_script("lightning_worker.py", "resume", str(full), *common)
    ckpt = None
    for stop in stops:
        resume = [f"ckpt={ckpt}"] if ckpt else []
        lightning_script("lightning_worker.py", "resume", str(part), *common, stop, *resume)
        step = int(stop.split("=")[1]) if stop.startswith("stop=") else 14
        ckpt = part / "ckpt" / f"epoch={(step - 1) // 14}-step={step}.ckpt"
    lightning_script("lightning_worker.py", "resume", str(part), *common, f"ckpt={ckpt}")
    uninterrupted, resumed = replicas(full, 4), replicas(part, 4)
    for r in range(4):
        assert batches_seen(part, r) == batches_seen(full, r), r
        for key, value in uninterrupted[r].items():
            assert torch.equal(value, resumed[r][key]), (r, key)
    checksums = [checksum for _, _, checksum in batches_seen(full, 0)]
    assert len(checksums) == 21  # 3 epochs of 7, so the resumed run repeated and left out none
    assert checksums[:7] != checksums[7:14]  # each epoch has its own order, so the resumed epoch's order was checked
    assert max_diff(uninterrupted[0], uninterrupted[1]) > 1e-4  # replicas are distinct, so shards mattered

    # the main file holds the consensus model: the average of the replicas in the shards
    main = load(ckpt)
    shards = [load(Path(f"{ckpt}.replicas") / f"rank{r}.pt") for r in range(4)]
    for key, value in main["state_dict"].items():
        if value.is_floating_point():
            mean = sum(s["state_dict"][key].double() for s in shards) / 4
            torch.testing.assert_close(value.double(), mean, atol=1e-6, rtol=0)
    model = AlternatingGAN.load_from_checkpoint(ckpt)
    assert torch.equal(model.generator.net[0].weight, main["state_dict"]["generator.net.0.weight"])


def test_resume_at_another_world_size_starts_from_consensus(tmp_path):
    first = tmp_path / "four"
    lightning_script("lightning_worker.py", "resume", str(first), "epochs=1")
    ckpt = first / "ckpt" / "last.ckpt"
    out = tmp_path / "two"
    proc = lightning_script("lightning_worker.py", "resume", str(out), "epochs=2", "devices=2", f"ckpt={ckpt}", "save=start")
    assert "written by 4 workers and this run has 2" in proc.stderr + proc.stdout
    consensus = load(ckpt)["state_dict"]
    for replica in replicas(out, 2, "start"):
        assert max_diff(replica, consensus) == 0.0


def test_killed_worker_stops_the_rest_naming_it(tmp_path):
    start = time.monotonic()
    proc = lightning_script("lightning_worker.py", "kill", str(tmp_path), "timeout=20", "rank=2", timeout=180, check=False)
    assert proc.returncode != 0
    assert time.monotonic() - start < 120
    assert "GossipPeerError" in proc.stderr and "with rank 2 failed" in proc.stderr


@pytest.mark.parametrize("strategy", ["decentralized", "ddp"])
def test_sigterm_to_rank_zero_stops_every_rank_at_the_same_step(tmp_path, strategy):
    """Rank 0 is signalled at step 5 while the others wait for it in a gossip exchange (or DDP's all-reduce).

    With Lightning's own handler the decentralized run hangs (its broadcast waits for ranks that cannot run
    their handlers) and the DDP run fails on mismatched collectives; see ``lightning_dpgan/signals.py``.
    """
    cmd = [sys.executable, str(WORKERS / "lightning_worker.py"), "sigterm", str(tmp_path), f"strategy={strategy}",
           "devices=3", "timeout=600"]
    proc = subprocess.Popen(cmd, env=worker_env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"the run was still going 180 s after the SIGTERM at step 5\n{stderr[-3000:]}")
    deadline = time.monotonic() + 60
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _group_alive(proc.pid), "rank 0 exited, but some of the ranks it launched are still running"
    assert proc.returncode == 0, stderr[-3000:]  # Lightning's SIGTERMException is a SystemExit
    stopped = [json.loads((tmp_path / f"stopped_rank{r}.json").read_text()) for r in range(3)]
    assert stopped == [{"step": 5 + 1, "exception": "SIGTERMException"}] * 3  # every rank finished step 5, then stopped


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_automatic_optimization_clipping_bf16_sampler_and_callbacks(tmp_path):
    lightning_script("lightning_worker.py", "features", str(tmp_path))
    seen = [set(json.loads((tmp_path / f"seen_rank{r}.json").read_text())) for r in range(4)]
    assert set.union(*seen) == set(range(1797))  # DistributedSampler: every sample, each rank its shard
    overlap = sum(len(a & b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    assert overlap <= 3  # only the padding that makes 1797 divisible by 4
    best = Path(json.loads((tmp_path / "best.json").read_text())["best"])
    ckpts = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))
    assert best.name in ckpts and len(ckpts) == 2  # save_top_k=2 removed the others, with their shards
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.replicas")) == [c + ".replicas" for c in ckpts]
    ends = replicas(tmp_path, 4)
    assert max_diff(ends[0], ends[3]) > 0  # replicas stay distinct: no DDP all-reduce
    metrics = (tmp_path / "log" / "version_0" / "metrics.csv").read_text()
    assert "consensus/body" in metrics and "val_loss" in metrics


@pytest.mark.parametrize("wire", ["fp32", "bf16"])
def test_anchored_optimizer_mixes_anchors_then_extrapolates_under_spawn(tmp_path, wire):
    """DPOSG through the strategy against numpy; with a bf16 wire every message is rounded to bf16 (the
    reference rounds by hand) while each worker keeps its own term in full precision."""
    lightning_script("lightning_worker.py", "anchored", str(tmp_path), "rounds=2", "start_method=spawn", f"wire_dtype={wire}")
    c = quadratic_targets(4, 6)
    w = ring(4).matrix()
    exact = dposg(lambda z: z - c, np.zeros((4, 6)), np.linalg.matrix_power(w, 2), 5, 0.3)
    expected = exact if wire == "fp32" else dposg(lambda z: z - c, np.zeros((4, 6)), narrow_wire_mix([w, w], bf16), 5, 0.3)
    got = np.stack([replica["z"].numpy() for replica in replicas(tmp_path, 4)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    if wire == "bf16":
        assert np.abs(got - exact).max() > 1e-4  # the wire's rounding is visible: the test tells the wires apart


def test_two_nodes_by_torchrun(tmp_path):
    """2 nodes x 2 processes: two torchrun agents on this machine, as on two hosts."""
    port = free_port()
    script = str(WORKERS / "lightning_worker.py")

    def agent(node: int) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=2",
            "--master-addr=127.0.0.1", f"--master-port={port}", script, "anchored", str(tmp_path),
            "devices=2", "nodes=2", "topology=one_peer_exponential", "steps=4",
        ]

    import subprocess

    from helpers import worker_env

    second = subprocess.Popen(agent(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=worker_env(), text=True)
    try:
        run(agent(0), timeout=240)
        assert second.wait(timeout=60) == 0, second.stdout.read()
    finally:
        second.kill()
    from lightning_dpgan.topology import one_peer_exponential

    c = quadratic_targets(4, 6)  # the time-varying graph walks W_0, W_1, W_0, ... one matrix per step
    z = dposg(lambda z: z - c, np.zeros((4, 6)), list(one_peer_exponential(4).matrices), 4, 0.3)
    for r, replica in enumerate(replicas(tmp_path, 4)):
        np.testing.assert_allclose(replica["z"].numpy(), z[r], atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"topology": "ringg"}, TopologyError, r"unknown topology 'ringg'; allowed: ring, torus"),
        ({"gossip_rounds": 0}, TopologyError, r"gossip_rounds must be an integer >= 1, got 0"),
        ({"gossip_rounds": 1.5}, TopologyError, r"gossip_rounds must be an integer >= 1, got 1.5"),
        ({"wire_dtype": "int8"}, ValueError, r"unknown wire_dtype 'int8'; allowed: fp32"),
        ({"consensus_every": -1}, ValueError, r"consensus_every must be an integer >= 0"),
        ({"timeout": 0}, ValueError, r"timeout must be a positive number of seconds, got 0"),
        ({"overlap": "yes"}, ValueError, r"overlap must be True or False, got 'yes'"),
        ({"chunk_bytes": 0}, ValueError, r"chunk_bytes must be a positive integer .* or None \(unchunked\), got 0"),
    ],
)
def test_bad_strategy_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        DecentralizedStrategy(**kwargs)


@pytest.mark.parametrize(
    "topology,devices,message",
    [
        ("hypercube", 3, r"'hypercube' needs a power-of-two world size .* got 3"),
        ("torus", 5, r"'torus' needs world size = rows x cols .* 5 has no such factors"),
    ],
)
def test_bad_world_size_fails_in_trainer_before_any_process_starts(topology, devices, message):
    with pytest.raises(TopologyError, match=message):
        pl.Trainer(accelerator="cpu", devices=devices, strategy=DecentralizedStrategy(topology), logger=False)


def test_registered_by_name():
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="decentralized", logger=False)
    assert isinstance(trainer.strategy, DecentralizedStrategy) and trainer.strategy.topology.name == "ring"
    spawn = pl.Trainer(accelerator="cpu", devices=2, strategy="decentralized_spawn", logger=False)
    assert spawn.strategy._start_method == "spawn"


def test_one_process_fit_equals_plain_trainer(tmp_path):
    """World size 1: no process group, no mixing, the same result as a plain Trainer."""
    from torch.utils.data import DataLoader

    from lightning_worker import Classifier, digits

    def fit(strategy) -> dict[str, torch.Tensor]:
        pl.seed_everything(0, verbose=False)
        model = Classifier(lr=0.2)
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, strategy=strategy, max_steps=15, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            use_distributed_sampler=False, default_root_dir=tmp_path,
        )
        trainer.fit(model, DataLoader(digits(), batch_size=32, shuffle=True))
        return model.state_dict()

    plain, decentralized = fit("auto"), fit(DecentralizedStrategy("ring", gossip_rounds=3))
    for key, value in plain.items():
        assert torch.equal(value, decentralized[key]), key
