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

from lightning_dpgan import DecentralizedStrategy, GossipOptions, TopologyError
from lightning_dpgan.examples.alternating_gan import AlternatingGAN
from lightning_dpgan.topology import ring

from helpers import WORKERS, free_port, group_alive, lightning_script, run, worker_env
from reference import bf16, dposg, narrow_wire_mix

sys.path.insert(0, str(WORKERS))
from lightning_worker import quadratic_targets  # noqa: E402


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def replicas(out: Path, n: int, when: str = "end") -> list[dict[str, torch.Tensor]]:
    return [load(out / f"{when}_rank{r}.pt") for r in range(n)]


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def replica_files(ckpt: Path) -> list[Path]:
    """The replica files of the set a main checkpoint file commits."""
    (folder,) = Path(f"{ckpt}.replicas").iterdir()
    return sorted(folder.glob("rank*.pt"))


def test_complete_topology_with_sgd_equals_ddp(suite4):
    gossip, ddp = replicas(suite4 / "sgd_complete", 4), replicas(suite4 / "sgd_ddp", 4)
    for r in range(4):
        assert max_diff(gossip[r], ddp[r]) < 1e-5
    from lightning_worker import Classifier

    pl.seed_everything(0, verbose=False)  # the workers' initial weights, rebuilt here
    initial = Classifier(lr=0.2, batchnorm=False).state_dict()
    assert max_diff(initial, ddp[0]) > 1e-2  # 20 steps did move the weights, so equality is not trivial


def test_two_optimizer_gan_consensus_with_and_without_gossip(suite4):
    mixed = json.loads((suite4 / "gan_mix" / "consensus.json").read_text())
    local = json.loads((suite4 / "gan_local" / "consensus.json").read_text())
    assert len(mixed) == len(local) == 12  # 60 batches, every 5 steps of each optimizer
    for entry in mixed:
        assert set(entry) == {"generator", "discriminator"}
        assert max(entry.values()) < 0.05  # bounded under gossip
    for name in ("generator", "discriminator"):
        assert local[-1][name] > 10 * local[0][name]  # replicas drift apart without mixing
        assert local[-1][name] > 100 * mixed[-1][name]
    # buffers are allocated once and reused: per optimizer one plan to mix and one to measure consensus. Fresh
    # plans per step would fill the cache (8).
    assert json.loads((suite4 / "gan_mix" / "buffers.json").read_text())["plans"] == 4
    header = (suite4 / "gan_mix" / "log" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "consensus/generator" in header and "consensus/discriminator" in header


def batches_seen(out: Path, rank: int) -> list[list[float]]:
    return [json.loads(line) for line in (out / f"batches_rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("full", "part", "last"),
    [
        ("resume_sync/full", "resume_sync/part", "epoch=0-step=14.ckpt"),
        ("resume_overlap/full", "resume_overlap/end", "epoch=1-step=28.ckpt"),
        ("resume_overlap/full", "resume_overlap/mid", "epoch=1-step=24.ckpt"),
    ],
    ids=["synchronous-at-an-epoch-end", "overlap-at-an-epoch-end", "overlap-twice-mid-epoch"],
)
def test_resume_reproduces_uninterrupted_run_on_every_rank(suite4, full, part, last):
    """An epoch is 7 batches of 2 optimizer steps (14 steps). With overlap each optimizer's mix (G's with its
    BatchNorm buffers) is in flight when a checkpoint is taken; a checkpoint lands it early, so the uninterrupted
    run takes the same checkpoints (every 4 steps). Steps 20 and 24 are batches 3 and 5 of the second epoch, where
    the data must go on in the second epoch's order rather than restart that epoch."""
    full, part = suite4 / full, suite4 / part
    uninterrupted, resumed = replicas(full, 4), replicas(part, 4)
    for r in range(4):
        assert batches_seen(part, r) == batches_seen(full, r), r
        for key, value in uninterrupted[r].items():
            assert torch.equal(value, resumed[r][key]), (r, key)
    checksums = [checksum for _, _, checksum in batches_seen(full, 0)]
    assert len(checksums) == 21  # 3 epochs of 7, so the resumed run repeated and left out none
    assert checksums[:7] != checksums[7:14]  # each epoch has its own order, so the resumed epoch's order was checked
    assert max_diff(uninterrupted[0], uninterrupted[1]) > 1e-4  # replicas are distinct, so shards mattered

    # the main file holds the consensus model: the average of the replicas of its set
    ckpt = part / "ckpt" / last
    main = load(ckpt)
    shards = [load(path) for path in replica_files(ckpt)]
    own = [s["lightning_dpgan"] for s in shards]  # each replica file's own record, apart from what was saved
    assert [o["rank"] for o in own] == [0, 1, 2, 3] and {o["token"] for o in own} == {main["decentralized"]["token"]}
    for key, value in main["state_dict"].items():
        if value.is_floating_point():
            mean = sum(s["state_dict"][key].double() for s in shards) / 4
            torch.testing.assert_close(value.double(), mean, atol=1e-6, rtol=0)
    model = AlternatingGAN.load_from_checkpoint(ckpt)
    assert torch.equal(model.generator.net[0].weight, main["state_dict"]["generator.net.0.weight"])


def test_resume_at_another_world_size_starts_from_consensus(suite4, suite2):
    out = suite2 / "resume_two"
    assert "written by 4 workers and this run has 2" in (out / "warnings_rank0.txt").read_text()
    consensus = load(suite4 / "resume_sync" / "full" / "ckpt" / "last.ckpt")["state_dict"]
    for replica in replicas(out, 2, "start"):
        assert max_diff(replica, consensus) == 0.0


@pytest.mark.parametrize("strategy", ["decentralized", "ddp"])
def test_sigterm_to_rank_zero_stops_every_rank_at_the_same_step(tmp_path, strategy):
    """Rank 0 is signalled at step 5 while rank 1 waits for it in a gossip exchange (or DDP's all-reduce).

    With Lightning's own handler the decentralized run hangs (its broadcast waits for ranks that cannot run
    their handlers) and the DDP run fails on mismatched collectives; see ``lightning_dpgan/signals.py``. The
    decentralized ranks agree on a stop step through their gossip, a few steps on; DDP's stop after step 5.
    """
    cmd = [sys.executable, str(WORKERS / "lightning_worker.py"), "sigterm", str(tmp_path), f"strategy={strategy}",
           "devices=2", "timeout=600"]  # ring(2) and ring(3) are complete: one neighbour waiting shows it
    proc = subprocess.Popen(cmd, env=worker_env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"the run was still going 180 s after the SIGTERM at step 5\n{stderr[-3000:]}")
    deadline = time.monotonic() + 60
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not group_alive(proc.pid), "rank 0 exited, but some of the ranks it launched are still running"
    assert proc.returncode == 0, stderr[-3000:]  # Lightning's SIGTERMException is a SystemExit
    stopped = [json.loads((tmp_path / f"stopped_rank{r}.json").read_text()) for r in range(2)]
    assert all(s["exception"] == "SIGTERMException" for s in stopped)
    steps = {s["step"] for s in stopped}
    assert len(steps) == 1, stopped  # every rank finished the same step, then stopped
    assert steps == {5 + 1} if strategy == "ddp" else 5 < steps.pop() <= 5 + 4, stopped


def test_automatic_optimization_clipping_bf16_sampler_and_callbacks(suite4):
    out = suite4 / "features"
    seen = [set(json.loads((out / f"seen_rank{r}.json").read_text())) for r in range(4)]
    assert set.union(*seen) == set(range(1797))  # DistributedSampler: every sample, each rank its shard
    overlap = sum(len(a & b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    assert overlap <= 3  # only the padding that makes 1797 divisible by 4
    best = Path(json.loads((out / "best.json").read_text())["best"])
    ckpts = sorted(p.name for p in (out / "ckpt").glob("*.ckpt"))
    assert best.name in ckpts and len(ckpts) == 2  # save_top_k=2 removed the others, with their replicas
    assert sorted(p.name for p in (out / "ckpt").glob("*.replicas")) == [c + ".replicas" for c in ckpts]
    for ckpt in ckpts:
        assert len(replica_files(out / "ckpt" / ckpt)) == 4  # one set each: older sets of a file are gone
    ends = replicas(out, 4)
    assert max_diff(ends[0], ends[3]) > 0  # replicas stay distinct: no DDP all-reduce
    metrics = (out / "log" / "version_0" / "metrics.csv").read_text()
    assert "consensus/body" in metrics and "val_loss" in metrics


def anchored_reference(wire: str) -> np.ndarray:
    c = quadratic_targets(4, 6)
    w = ring(4).matrix()
    if wire == "bf16":
        return dposg(lambda z: z - c, np.zeros((4, 6)), narrow_wire_mix([w, w], bf16), 5, 0.3)
    return dposg(lambda z: z - c, np.zeros((4, 6)), np.linalg.matrix_power(w, 2), 5, 0.3)


def test_anchored_optimizer_mixes_anchors_then_extrapolates_under_spawn(tmp_path):
    """DPOSG through the strategy's anchor hook against numpy, workers started by Lightning's spawn launcher."""
    lightning_script("lightning_worker.py", "anchored", str(tmp_path), "rounds=2", "start_method=spawn")
    got = np.stack([replica["z"].numpy() for replica in replicas(tmp_path, 4)])
    np.testing.assert_allclose(got, anchored_reference("fp32"), rtol=0, atol=1e-12)


def test_a_bf16_wire_rounds_every_message_and_keeps_the_own_term(suite4):
    """The same with a bf16 wire: every message is rounded to bf16 (the reference rounds by hand) while each worker
    keeps its own term in full precision."""
    got = np.stack([replica["z"].numpy() for replica in replicas(suite4 / "anchored_bf16", 4)])
    np.testing.assert_allclose(got, anchored_reference("bf16"), rtol=0, atol=1e-12)
    assert np.abs(got - anchored_reference("fp32")).max() > 1e-4  # the wire's rounding is visible: the wires differ


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
        ({"gossip": {"rounds": 0}}, ValueError, r"gossip rounds \(t\) must be an integer in \[1, 1000\], got 0"),
        ({"gossip": {"wire_dtype": "int8"}}, ValueError, r"unknown wire_dtype 'int8'; allowed: fp32"),
        ({"gossip": {"round": 3}}, ValueError, r"unknown gossip option\(s\) round; allowed: catch_up, chunk_bytes"),
        ({"gossip": 3}, ValueError, r"gossip must be a GossipOptions, a dict of its fields, or None, got 3"),
        ({"consensus_every": -1}, ValueError, r"consensus_every must be an integer >= 0, got -1"),
        ({"mix_buffers": "yes"}, ValueError, r"mix_buffers must be True or False, got 'yes'"),
        # the DDP wrapper's arguments would be ignored, and the timeout is the gossip's start-up timeout
        ({"find_unused_parameters": True}, TypeError, r"DecentralizedStrategy got unexpected argument\(s\) find_unused_parameters; allowed besides the gossip's: accelerator, checkpoint_io"),
        ({"timeout": 5, "precision": None}, TypeError, r"unexpected argument\(s\) precision, timeout; allowed .* precision_plugin, process_group_backend, start_method$"),
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

    strategy = DecentralizedStrategy("ring", gossip=GossipOptions(rounds=3))
    plain, decentralized = fit("auto"), fit(strategy)
    for key, value in plain.items():
        assert torch.equal(value, decentralized[key]), key
    assert "training_step" not in vars(strategy)  # without catch_up the step is Lightning's own, unchecked


def test_both_strategies_take_the_gossip_arguments_and_their_framework_s_ddp_ones():
    from lightning.fabric.plugins import Precision as FabricPrecision
    from lightning.pytorch.plugins.precision import Precision

    from lightning_dpgan.fabric import DecentralizedFabricStrategy

    gossip = dict(topology="torus", gossip={"rounds": 2}, topology_options={"shape": (2, 2)}, consensus_every=7, mix_buffers=False)
    trainer = DecentralizedStrategy(**gossip, precision_plugin=Precision(), process_group_backend="gloo", start_method="spawn")
    fabric = DecentralizedFabricStrategy(**gossip, precision=FabricPrecision(), process_group_backend="gloo", start_method="spawn")
    for strategy in (trainer, fabric):
        assert strategy.gossip.rounds == 2 and strategy.gossiper.consensus_every == 7 and not strategy.gossiper.mix_buffers
        assert strategy.gossiper.topology_options == {"shape": (2, 2)} and strategy._start_method == "spawn"
        assert strategy.process_group_backend == "gloo" and strategy._timeout.total_seconds() == strategy.gossip.startup_timeout
    with pytest.raises(TypeError, match=r"DecentralizedFabricStrategy got unexpected argument\(s\) precision_plugin"):
        DecentralizedFabricStrategy(precision_plugin=Precision())


def test_a_training_step_talks_to_its_neighbours_only(suite4):
    """torch.distributed calls counted per training step on 4 ranks (DPGAN, a ring): with gossip only, no step makes
    a collective call, only point-to-point ones; measuring consensus every 5 steps adds collectives on those steps
    alone; DDP makes at least one in every step (Lightning's SIGTERM broadcast; its gradient all-reduce runs in C++)."""
    for r in range(4):
        gossip = json.loads((suite4 / "calls_gossip" / f"calls_rank{r}.json").read_text())
        assert len(gossip) == 12 and all(s["collective"] == 0 and s["p2p"] > 0 for s in gossip), gossip
        periodic = json.loads((suite4 / "calls_consensus5" / f"calls_rank{r}.json").read_text())
        assert [k + 1 for k, s in enumerate(periodic) if s["collective"]] == [5, 10], periodic
        ddp = json.loads((suite4 / "calls_ddp" / f"calls_rank{r}.json").read_text())
        assert all(s["collective"] >= 1 and s["p2p"] == 0 for s in ddp), ddp


def test_catch_up_is_refused_for_automatic_optimization(tmp_path):
    """A catch-up step replaces training_step by a mix only; under automatic optimization Lightning would skip the
    optimizer step it needs, so the strategy says so when fitting starts."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    strategy = DecentralizedStrategy(gossip=GossipOptions(staleness=1, catch_up=True))
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=2, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="catch_up=True replaces a training_step by a mix only.*automatic_optimization = False"):
        trainer.fit(BoringModel())


def test_a_live_run_on_another_backend_than_gloo_is_refused_before_its_process_group(tmp_path):
    """Each new member set of a live run gets a gloo group, which cannot carry CUDA tensors: a live strategy whose
    framework group would be NCCL (a GPU run) is refused at setup, before any group is made, naming the backend."""
    from torch.utils.data import DataLoader

    from lightning_worker import Classifier, digits

    strategy = DecentralizedStrategy("ring", gossip=GossipOptions(membership="live"), process_group_backend="nccl")
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"membership='live' runs on CPU workers only \(gloo\).*CUDA tensors; got process_group_backend='nccl'"):
        trainer.fit(Classifier(lr=0.2), DataLoader(digits(), batch_size=32))
    assert not torch.distributed.is_initialized()
