"""Shared multi-process runs: one torchrun launch of 4 ranks (and one of 2) runs every scenario that needs no launcher
of its own, one fit after another in the same processes. Each test then checks its scenario's folder. Starting
Python, torch and Lightning in 4 processes on 2 cores costs far more than most of these fits, so one launch
instead of thirty keeps the suite fast; the launchers themselves (popen, spawn, torchrun across two agents, the
command line) keep tests of their own."""

from __future__ import annotations

import gc

gc.disable()  # until the collection has imported torch and Lightning (pytest_collection_finish), as the workers do

import json
import os

# three test processes share the cores: one thread each, as worker_env() gives the processes they start (two
# threads cost 10 % more CPU in the in-process tests, waiting for each other)
os.environ.setdefault("OMP_NUM_THREADS", "1")
from pathlib import Path

import pytest

from helpers import run, torchrun

TINY = ["devices=2", "max_steps=40", "evaluation.every_n_steps=20", "evaluation.num_samples=400", "trainer.enable_progress_bar=false"]

BILINEAR_EQUATIONS = [  # test_dposg.py: the strategy against the DPOSG recursion in numpy
    {"topology": "complete", "rounds": 1, "optimizer": "optimistic_adam", "kwargs": {"betas": [0.5, 0.9]}, "overlap": 0},
    {"topology": "ring", "rounds": 1, "optimizer": "optimistic_adam", "kwargs": {"betas": [0.5, 0.9]}, "overlap": 0},
    {"topology": "ring", "rounds": 3, "optimizer": "optimistic_sgd", "kwargs": {}, "overlap": 0},
    {"topology": "ring", "rounds": 1, "optimizer": "optimistic_adam", "kwargs": {"betas": [0.5, 0.9]}, "overlap": 1},
    {"topology": "ring", "rounds": 2, "optimizer": "optimistic_sgd", "kwargs": {}, "overlap": 1},
]
BILINEAR_STALE = [  # test_dposg.py: bounded staleness replaying a seeded schedule, against numpy
    {"optimizer": "optimistic_sgd", "kwargs": {}, "staleness": 2, "schedule": 5},
    {"optimizer": "optimistic_adam", "kwargs": {"betas": [0.5, 0.9]}, "staleness": 3, "schedule": 6},
]
BILINEAR_FEWER_BYTES = [  # test_dposg.py: CHOCO compressed gossip and local steps, against numpy
    {"optimizer": "optimistic_adam", "kwargs": {"betas": [0.5, 0.9]}, "compression": "int8"},
    {"optimizer": "optimistic_sgd", "kwargs": {}, "compression": "sign"},
    {"optimizer": "optimistic_sgd", "kwargs": {}, "compression": "topk", "topk_fraction": 0.25},
    {"optimizer": "optimistic_adam", "kwargs": {"betas": [0.5, 0.9]}, "gossip_every": 3},
]
BILINEAR_CONVERGENCE = {"t1": {"rounds": 1}, "t3": {"rounds": 3}, "t1_overlap": {"rounds": 1, "overlap": 1}, "local": {"rounds": 1, "mixing": 0},
                        "t1_stale2": {"rounds": 1, "staleness": 2}, "t1_sign": {"rounds": 1, "compression": "sign"},
                        "t1_every4": {"rounds": 1, "gossip_every": 4}}
EVALUATE = {"steps": 30, "samples": 400}
# test_simulator.py: the simulator against a real run of the ``grid`` scenario (DPGAN, OptimisticAdam, MLPs of width
# 32, 64 points per worker and step, 200 steps, each replica also saved after SIM_EARLY); n = 4 is a scenario of
# suite4, n = 8 a launch of its own (SIM_N8=1)
SIM_STEPS, SIM_EARLY, SIM_HIDDEN, SIM_BATCH = 200, 20, 32, 64
SIM_CASES = {4: {"topology": "ring", "rounds": 1}, 8: {"topology": "exponential", "rounds": 2}}


# and CHOCO with local steps: top-5 % compressed differences mixed every second step, SIM_CHOCO_STEPS steps
SIM_CHOCO, SIM_CHOCO_STEPS = {"compression": "topk", "topk_fraction": 0.05, "gossip_every": 2}, 60


def sim_real_options(n: int) -> dict:
    return {"devices": n, "steps": SIM_STEPS, "save_at": SIM_EARLY, "hidden": SIM_HIDDEN, "batch_size": SIM_BATCH, "consensus_every": 0,
            "log_every": 1000, **SIM_CASES[n]}


def sim_choco_options() -> dict:
    return {**sim_real_options(4), "steps": SIM_CHOCO_STEPS, **SIM_CHOCO}


# The runs that several tests share, by fixture: the tests that use one run in one xdist worker (``--dist
# loadgroup``), so that each run is made once, not once per worker.
SHARED_RUNS = {"suite4": "suites", "suite2": "suites", "fitted": "fitted", "gossip_runs": "gossip",
               "real_run": "suites", "inception_weights": "inception", "fit_then_validate": "validate",
               "one_process_fit": "one_process"}


# The tests that take longest on their own (wall time on 2 cores, three at a time: 50 to 170 s), longest first. xdist
# (--dist loadgroup) hands out the groups first, largest first, then single tests in collection order, each worker
# keeping up to 3 queued; these go out first, and the many short tests last fill the cores while the last long ones
# end. A test missing here, or renamed, only starts later.
LONG_FIRST = [
    "test_cli.py::test_multirun_gives_every_job_its_own_directory",
    "test_reliability.py::test_kill_9_during_checkpoint_writes_leaves_a_whole_set_and_every_resume_is_exact",
    "test_membership_engine.py::test_survivors_of_a_kill_agree_and_a_joiner_is_admitted",
    "test_recipes.py::test_elastic_restart_after_losing_a_host_ends_with_three_workers",
    "test_strategy.py::test_anchored_optimizer_mixes_anchors_then_extrapolates_under_spawn",
    "test_cli.py::test_the_printed_resume_line_resumes_the_run_it_names",
    "test_reliability.py::test_two_runs_started_together_get_a_directory_each",
    "test_reliability.py::test_a_full_disk_ends_the_run_with_one_line_and_keeps_the_last_whole_checkpoint",
    "test_strategy.py::test_sigterm_to_rank_zero_stops_every_rank_at_the_same_step",
    "test_reliability.py::test_sigterm_to_the_process_group_stops_every_rank_at_one_step_with_a_checkpoint",
    "test_integration.py::test_the_built_wheel_carries_configs_license_types_and_version",
    "test_strategy.py::test_two_nodes_by_torchrun",
    "test_reliability.py::test_the_worker_that_died_is_named_not_the_neighbour_that_left",
    "test_reliability.py::test_a_worker_stopped_inside_a_checkpoint_write_is_named_within_the_peer_timeout",
    "test_reliability.py::test_an_overflowing_learning_rate_ends_the_cli_with_one_line",
    "test_reliability.py::test_rank_zero_dying_in_setup_takes_its_workers_with_it",
    "test_recipes.py::test_live_run_by_torchrun_goes_on_without_a_lost_host_and_restarts_nobody",
    "test_reliability.py::test_a_stalled_worker_is_named_and_does_not_outlive_the_run",
    "test_recipes.py::test_sweep_runs_one_combination_offline",
    "test_membership_live.py::test_survivors_of_a_lost_worker_go_on_and_equal_the_dposg_reference",
    "test_recipes.py::test_two_nodes_by_torchrun_through_the_recipe",
    "test_reliability.py::test_a_live_run_started_by_the_cli_admits_a_new_worker_and_goes_on_without_a_killed_one",
    "test_membership_live.py::test_a_worker_started_later_joins_from_its_donors_replica_and_every_replica_equals_the_dposg_reference",
    "test_membership_live.py::test_a_worker_lost_while_a_checkpoint_is_written_leaves_no_partial_set_and_the_others_go_on",
    "test_membership_live.py::test_a_donor_lost_during_a_join_ends_the_joiner_with_one_error_and_the_others_go_on",
    "test_integration.py::test_the_fabric_gan_example_trains_on_four_processes",
    "test_reliability.py::test_two_runs_on_one_explicit_master_port_started_together",
    "test_integration.py::test_fabric_state_keys_like_the_strategys_records_come_back_as_saved",
]


def _long_first_rank(item: pytest.Item) -> int:
    name = f"{item.path.name}::{item.originalname}"
    return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        groups = sorted({group for fixture, group in SHARED_RUNS.items() if fixture in item.fixturenames})
        if item.path.name == "test_cluster.py":  # the emulated cluster's namespaces and bridge have fixed names
            groups.append("cluster")
        if groups:
            item.add_marker(pytest.mark.xdist_group("+".join(groups)))
    if hasattr(config, "workerinput"):  # an xdist worker's collection, which the scheduler hands out in this order
        items.sort(key=_long_first_rank)  # stable: the others keep their order


def pytest_collection_finish(session: pytest.Session) -> None:
    gc.freeze()
    gc.enable()


def pytest_unconfigure(config: pytest.Config) -> None:
    gc.freeze()  # the process exits next: walking every object of torch and Lightning first takes seconds


def suite4_scenarios(out: Path) -> list[list]:
    sync, overlap = out / "resume_sync", out / "resume_overlap"
    scenarios: list[list] = [
        ["sgd", "sgd_complete", {"strategy": "complete"}],
        ["sgd", "sgd_ddp", {"strategy": "ddp"}],
        ["gan", "gan_mix", {"mixing": 1}],
        ["gan", "gan_local", {"mixing": 0}],
        ["features", "features", {}],
        ["anchored", "anchored_bf16", {"rounds": 2, "wire_dtype": "bf16"}],
        # resume: synchronous from an epoch's end; overlapped at an epoch's end and twice mid-epoch, one full run each
        ["resume", "resume_sync/full", {"epochs": 3}],
        ["resume", "resume_sync/part", {"epochs": 1}],
        ["resume", "resume_sync/part", {"epochs": 3, "ckpt": str(sync / "part/ckpt/epoch=0-step=14.ckpt")}],
        ["resume", "resume_overlap/full", {"epochs": 3, "overlap": 1, "every": 4}],
        ["resume", "resume_overlap/end", {"epochs": 2, "overlap": 1, "every": 4}],
        ["resume", "resume_overlap/end", {"epochs": 3, "overlap": 1, "every": 4, "ckpt": str(overlap / "end/ckpt/epoch=1-step=28.ckpt")}],
        ["resume", "resume_overlap/mid", {"epochs": 3, "overlap": 1, "every": 4, "stop": 20}],
        ["resume", "resume_overlap/mid", {"epochs": 3, "overlap": 1, "every": 4, "stop": 24, "ckpt": str(overlap / "mid/ckpt/epoch=1-step=20.ckpt")}],
        ["resume", "resume_overlap/mid", {"epochs": 3, "overlap": 1, "every": 4, "ckpt": str(overlap / "mid/ckpt/epoch=1-step=24.ckpt")}],
        ["grid", "messages", {"steps": 6, "rounds": 3, "n_critic": 2, "loss": "wgan-gp", "ema": 0.99, "consensus_every": 2}],
        ["grid", "noise_ddp", {"steps": 1, "strategy": "ddp"}],
        ["grid", "noise_decentralized", {"steps": 1}],
        ["grid", "cposg", {"steps": 5, "strategy": "ddp", "n_critic": 2, "loss": "wgan-gp"}],
        ["grid", "sim_real4", sim_real_options(4)],
        ["grid", "sim_choco4", sim_choco_options()],
        # torch.distributed calls per training step: gossip only, consensus every 5 steps, and DDP
        ["grid", "calls_gossip", {"steps": 12, "count": 1, "consensus_every": 0, "log_every": 50}],
        ["grid", "calls_consensus5", {"steps": 12, "count": 1, "consensus_every": 5, "log_every": 50}],
        ["grid", "calls_ddp", {"steps": 12, "count": 1, "strategy": "ddp", "log_every": 50}],
        ["evaluate", "eval_consensus", EVALUATE],
        ["evaluate", "eval_plain", {**EVALUATE, "eval": 0}],
        ["evaluate", "eval_local", {**EVALUATE, "model": "local", "mixing": 0}],
        ["shards", "shards_iid", {"shard": "iid", "n": 2000, "val": 200}],
        ["shards", "shards_by_label", {"shard": "by_label", "n": 2000, "val": 200}],
        ["fabric_bilinear", "fabric_bilinear", {"optimizer": "optimistic_adam", "kwargs": json.dumps({"betas": [0.5, 0.9]}),
                                                "lr": 0.05, "steps": 6, "save_at": 3}],
        ["fabric_bilinear", "fabric_bilinear_sign", {"optimizer": "optimistic_adam", "kwargs": json.dumps({"betas": [0.5, 0.9]}),
                                                     "lr": 0.05, "steps": 6, "save_at": 3, "compression": "sign"}],
        # a NaN on rank 2 after step 7: agreed at the next checkpoint (every 2 steps), or through the gossip (every 20)
        ["nonfinite", "nonfinite_checkpoint", {"poison_rank": 2, "poison_step": 7, "every": 2}],
        ["nonfinite", "nonfinite_gossip", {"poison_rank": 2, "poison_step": 7, "every": 20}],
    ]
    for i, case in enumerate(BILINEAR_EQUATIONS):
        scenarios.append(["bilinear", f"bilinear_equations{i}", {
            **{k: v for k, v in case.items() if k != "kwargs"}, "kwargs": json.dumps(case["kwargs"]), "lr": 0.05, "steps": 6,
            "consensus_every": 2 if case["overlap"] else 0,
        }])
    for i, case in enumerate(BILINEAR_STALE):
        scenarios.append(["bilinear", f"bilinear_stale{i}", {
            **{k: v for k, v in case.items() if k != "kwargs"}, "kwargs": json.dumps(case["kwargs"]), "lr": 0.05, "steps": 12,
        }])
    # catching up: rank 2 computes 30 ms slower, so with s = 2 its neighbours wait on it and it skips computations;
    # through the Trainer and through a Fabric loop
    catch_up = {"optimizer": "optimistic_adam", "kwargs": json.dumps({"betas": [0.5, 0.9]}), "lr": 0.05, "steps": 40,
                "staleness": 2, "catch_up": 1, "slow_rank": 2, "slow_s": 0.03, "trace": 1}
    scenarios += [["bilinear", "bilinear_catch_up", catch_up], ["fabric_catch_up", "fabric_catch_up", catch_up]]
    for i, case in enumerate(BILINEAR_FEWER_BYTES):
        scenarios.append(["bilinear", f"bilinear_fewer_bytes{i}", {
            **{k: v for k, v in case.items() if k != "kwargs"}, "kwargs": json.dumps(case["kwargs"]), "lr": 0.05, "steps": 12,
        }])
    for name, opts in BILINEAR_CONVERGENCE.items():
        steps = 2000 if "staleness" in opts else 600  # stale copies slow the contraction down (numpy: 1.5e-6 at 2000)
        scenarios.append(["bilinear", f"bilinear_{name}", {"optimizer": "optimistic_sgd", "lr": 0.1, "steps": steps, "per_batch": 10, **opts}])
    return scenarios


@pytest.fixture(scope="session")
def suite4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("suite4")
    torchrun("lightning_worker.py", 4, "suite", str(out), json.dumps(suite4_scenarios(out)), timeout=900)
    return out


@pytest.fixture(scope="session")
def suite2(tmp_path_factory, suite4) -> Path:
    """2 ranks (a core each): a 4-rank checkpoint resumed at another world size, FID on digits, and a GAN trained
    long enough to cover the grid's modes."""
    out = tmp_path_factory.mktemp("suite2")
    scenarios = [
        ["resume", "resume_two", {"epochs": 4, "devices": 2, "save": "start", "ckpt": str(suite4 / "resume_sync/full/ckpt/last.ckpt")}],
        ["evaluate", "eval_digits", {"dataset": "digits", "devices": 2, "steps": 20, "samples": 200}],
        ["grid", "smoke", {"devices": 2, "steps": 2000, "batch_size": 128, "ema": 0.99, "log_every": 1000}],  # logs: 40 % of its CPU
        # torch.compile(model) under the strategy, and the same run eager (last: nothing compiled outlives them)
        ["compile", "compiled", {"devices": 2, "steps": 6, "compile": 1}],
        ["compile", "eager", {"devices": 2, "steps": 6}],
    ]
    torchrun("lightning_worker.py", 2, "suite", str(out), json.dumps(scenarios), timeout=600)
    return out


# ``fitted``: TINY, with what three tests that each started a fit of their own check in the same run: the rates
# lr_scaling=sqrt gives (G's and D's told apart), and checkpoints every 15 steps, all kept, over epochs of 7 steps
# (7168 points on 2 workers at batch 512), so that the run's end (40) falls between two of them
FITTED = [*TINY, "model.lr_g=0.001", "model.lr_d=0.003", "dataset.num_samples=7168",
          "checkpoint.every_n_train_steps=15", "checkpoint.save_top_k=-1"]


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    """A tiny run of the command line (2 workers, 40 iterations; ``FITTED``), shared by the command-line,
    reliability and integration tests."""
    import sys

    run_dir = tmp_path_factory.mktemp("fit") / "run"
    proc = run([sys.executable, "-m", "lightning_dpgan", "fit", *FITTED, f"hydra.run.dir={run_dir}"], timeout=240)
    return run_dir, proc
