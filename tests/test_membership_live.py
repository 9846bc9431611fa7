"""Live membership (``GossipOptions(membership="live")``) with real gloo processes: a worker killed with SIGKILL
mid-run, the others agreeing on who is left through the c10d store and going on from their replicas.

The workers are plain processes, one per node, started as a user starts one by hand (``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` and torchrun's ``GROUP_RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, which
Lightning's torchelastic environment reads): torchrun's single agent would kill every worker when one dies, and
Lightning's own launcher too (docs/membership.md)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import WORKERS, free_port, worker_env
from reference import dposg

sys.path.insert(0, str(WORKERS))
from lightning_worker import BILINEAR_DIM, BilinearGame, bilinear_matrices  # noqa: E402

from lightning_dpgan.topology import fold, ring

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL and gloo over loopback: Linux only")

STEPS, LR, ADAM = 60, 0.05, ((0.5, 0.9), 1e-8)


def start_by_hand(out: Path, n: int, *opts: str, port: int | None = None) -> list[subprocess.Popen]:
    port, procs = port or free_port(), []
    for rank in range(n):
        env = {**worker_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(n), "RANK": str(rank),
               "GROUP_RANK": str(rank), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
        with open(out / f"stderr_rank{rank}.txt", "w") as err:
            procs.append(subprocess.Popen([sys.executable, str(WORKERS / "lightning_worker.py"), "live_leave", str(out), *opts],
                                          env=env, stdout=subprocess.DEVNULL, stderr=err))
    return procs


def start_joiner(out: Path, port: int, *opts: str) -> subprocess.Popen:
    """A worker started later, alone, with nothing but the run's store address (as a user starts one on a new host)."""
    env = {**worker_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with open(out / "stderr_joiner.txt", "w") as err:
        return subprocess.Popen([sys.executable, str(WORKERS / "lightning_worker.py"), "live_leave", str(out), *opts, "join=1"],
                                env=env, stdout=subprocess.DEVNULL, stderr=err)


def wait_for(procs: list[subprocess.Popen], ranks: list[int], timeout: float) -> dict[int, int | None]:
    """The exit codes of ``ranks`` (``None``: still running after ``timeout``); then every process is ended."""
    deadline, codes = time.monotonic() + timeout, {}
    try:
        for r in ranks:
            try:
                codes[r] = procs[r].wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[r] = None
        return codes
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def bilinear_gradient(n: int):
    _, parts = bilinear_matrices(n)  # each worker keeps its own game, by its rank at the start

    def grad(z: np.ndarray) -> np.ndarray:
        x, y = z[:, :BILINEAR_DIM], z[:, BILINEAR_DIM:]
        return np.concatenate([np.einsum("rij,rj->ri", parts, y), -np.einsum("rij,ri->rj", parts, x)], axis=1)

    return grad


def embedded(w: np.ndarray, keep: list[int], n: int) -> np.ndarray:
    """A survivors' matrix in the n-worker reference: the one that left keeps its own row, touching no one."""
    full = np.eye(n)
    full[np.ix_(keep, keep)] = w
    return full


# the kill on a ring of 6 only: its survivors end up two mixes apart at the change, a ring of 4's one (the same rules)
@pytest.mark.parametrize("n,how", [(4, "silent"), (6, "kill")])
def test_survivors_of_a_lost_worker_go_on_and_equal_the_dposg_reference(tmp_path, n, how):
    """Workers on a ring, optimistic Adam on the split bilinear game; at step 20 of 60 rank 2 kills itself (SIGKILL:
    its connections close) or stops (SIGSTOP: a host gone silent, its connections open, found by the 4 s peer
    timeout). The others reach step 60 with no reload and no relaunch, and their replicas equal DPOSG in numpy:
    ring(n) up to the mix rank 2 last took part in, W_fold (ring(n) without rank 2, its weight on the diagonal) until
    the recorded change step, ring(n - 1) from it. On a ring of 4 the survivors are one mix apart at the change; on a
    ring of 6 two (rank 5, three hops away, had got one mix further than ranks 0 and 4). After the silent one, rank 0
    is sent SIGTERM at step 40: the stop, agreed through the gossip of the new group, ends every survivor after one
    step, as in a fixed run."""
    kill_at, timeout = 20, 10.0 if how == "kill" else 4.0  # a kill closes connections: found without the timeout
    survivors = [r for r in range(n) if r != 2]
    opts = [f"steps={STEPS}", "kill=2", f"at={kill_at}", "optimizer=optimistic_adam", f"lr={LR}", f"timeout={timeout}",
            'kwargs={"betas": [0.5, 0.9]}', *(["sig=STOP", "sigterm_at=40"] if how == "silent" else [])]
    started = time.monotonic()
    procs = start_by_hand(tmp_path, n, *opts, f"nodes={n}")
    if how == "silent":  # the stopped worker's host goes away as the survivors exit: a thread of theirs still waiting
        # on it would wake in a finishing interpreter and abort it (what LiveTransport.abandon prevents)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all((tmp_path / f"end_rank{r}.pt").exists() for r in survivors) and all(
            procs[r].poll() is None for r in survivors
        ):
            time.sleep(0.01)
        procs[2].kill()
    codes = wait_for(procs, survivors, timeout=120)
    elapsed = time.monotonic() - started
    stderr = {r: (tmp_path / f"stderr_rank{r}.txt").read_text() for r in range(n)}
    for r in survivors:
        assert codes[r] == 0, f"rank {r} exited {codes[r]}:\n{stderr[r][-4000:]}"
    records = {r: json.loads((tmp_path / f"changes_rank{r}.json").read_text()) for r in survivors}
    steps = {rec["global_step"] for rec in records.values()}
    assert len(steps) == 1, records  # every survivor ended after the same step
    steps = steps.pop()
    if how == "silent":
        stopped = [json.loads((tmp_path / f"stopped_rank{r}.json").read_text()) for r in survivors]
        assert {s["exception"] for s in stopped} == {"SIGTERMException"} and {s["step"] for s in stopped} == {steps}
        assert 40 < steps < STEPS
    else:
        assert steps == STEPS
    changes = {json.dumps(rec["changes"]) for rec in records.values()}
    assert len(changes) == 1, records  # every survivor went through the same change
    (change,) = records[0]["changes"]
    assert change["left"] == [2] and change["members"] == survivors and change["topology"] == "ring"
    c = change["step"]
    assert kill_at + 1 <= c <= kill_at + n // 2, change  # rank 2 completed 20 mixes; a survivor d hops away d - 1 more
    for r in survivors:  # every member logged who left and when, and the lowest listed it at the end
        assert f"step {c}: worker(s) 2 left; {n - 1} go on ({', '.join(map(str, survivors))}) on ring" in stderr[r], stderr[r][-3000:]
    assert "membership changes in this run" in stderr[0]

    game = BilinearGame("optimistic_adam", LR)
    z0 = np.tile(np.concatenate([game.x.detach().numpy(), game.y.detach().numpy()]), (n, 1))
    grad, w_old, w_new = bilinear_gradient(n), ring(n).matrix(), embedded(ring(n - 1).matrix(), survivors, n)
    w_fold = embedded(fold(w_old, survivors), survivors, n)
    mixes = [w_old if m <= kill_at else w_fold if m < c else w_new for m in range(1, steps + 1)]
    expected = dposg(grad, z0, mixes, steps, LR, ADAM)[survivors]
    got = np.stack([np.concatenate([s["x"].numpy(), s["y"].numpy()]) for s in
                    (torch.load(tmp_path / f"end_rank{r}.pt", weights_only=True) for r in survivors)])
    np.testing.assert_allclose(got, expected, atol=1e-10, rtol=0)
    # the test tells the rules apart: no fold, or no change at all, ends elsewhere
    no_fold = [w_old if m <= kill_at else w_new for m in range(1, steps + 1)]
    assert np.abs(got - dposg(grad, z0, no_fold, steps, LR, ADAM)[survivors]).max() > 1e-6 or c == kill_at + 1
    assert np.abs(got - dposg(grad, z0, w_old, steps, LR, ADAM)[survivors]).max() > 1e-6
    # the survivors step again within seconds of the kill (the goal is 10 s on gloo), not after the peer timeout
    killed = float((tmp_path / "killed_rank2.txt").read_text())
    resumed = max(rec["step_ends"][c - 1] for rec in records.values())  # every survivor has done mix c, on ring(3)
    assert resumed - killed < (10 if how == "kill" else timeout + 5), resumed - killed
    print(f"run {elapsed:.1f} s; change step {c}; every survivor finished step {c} {resumed - killed:.2f} s after the kill")


def test_the_agreement_drops_a_silent_member_and_every_survivor_reads_one_set():
    """Three members on an in-process store: one stops beating (a host gone silent), one is reported dead by a
    survivor (its connection closed); the survivors, agreeing from two threads at once, read the same set, the change
    step one past the furthest, and nobody waits for the silent one longer than its timeout plus the grace."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from lightning_dpgan.gossip.membership import GRACE_S, Membership

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    address = ("127.0.0.1", server.port)
    members = [Membership("t", i, range(4), address) for i in range(4)]
    members[2].close()  # stops beating: silent
    members[3].close()
    timeout, results = 0.3, {}
    time.sleep(timeout)  # their last beats are older than the timeout
    started = time.monotonic()

    def agree(i: int, completed: int, dead: tuple[int, ...]) -> None:
        results[i] = members[i].agree(completed, dead, timeout)

    threads = [threading.Thread(target=agree, args=(0, 21, ())), threading.Thread(target=agree, args=(1, 20, (3,)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    elapsed = time.monotonic() - started
    assert results[0] == results[1], results
    assert results[0].members == (0, 1) and results[0].completed == {0: 21, 1: 20} and results[0].change_step == 22
    assert results[0].number == 1 and members[0].generation == results[0]
    assert elapsed < GRACE_S + timeout + 2, elapsed
    for m in members:
        m.close()


def test_a_member_lost_while_the_next_set_is_formed_is_left_out_by_one_more_agreement(tmp_path):
    """Faults within faults: on a ring of 4, rank 2 is killed at step 20, and rank 3 dies as it starts building the
    group of the members agreed on next (0, 1, 3). The others' build fails within the peer timeout; they agree
    again, without rank 3, and reach step 60 on a ring of 2, each recording one change in which 2 and 3 left. No
    step waits longer than the two timeouts (the build, then rank 3's silence) and the agreement."""
    n, timeout = 4, 5.0
    opts = [f"steps={STEPS}", "kill=2", "at=20", "optimizer=optimistic_adam", f"lr={LR}", f"timeout={timeout}",
            'kwargs={"betas": [0.5, 0.9]}', "die_in_group=3", f"nodes={n}"]
    procs = start_by_hand(tmp_path, n, *opts)
    codes = wait_for(procs, [0, 1, 3], timeout=120)
    stderr = {r: (tmp_path / f"stderr_rank{r}.txt").read_text() for r in range(n)}
    assert codes[3] == -9, stderr[3][-3000:]  # it did die building the group
    for r in (0, 1):
        assert codes[r] == 0, f"rank {r} exited {codes[r]}:\n{stderr[r][-4000:]}"
    records = [json.loads((tmp_path / f"changes_rank{r}.json").read_text()) for r in (0, 1)]
    assert [rec["global_step"] for rec in records] == [STEPS, STEPS]
    assert records[0]["changes"] == records[1]["changes"], records
    (change,) = records[0]["changes"]
    assert change["left"] == [2, 3] and change["members"] == [0, 1] and change["topology"] == "ring", change
    for r in (0, 1):
        assert "the group of members 0, 1, 3 was not built" in stderr[r], stderr[r][-3000:]
        assert f"step {change['step']}: worker(s) 2, 3 left; 2 go on (0, 1) on ring" in stderr[r], stderr[r][-3000:]
        ends = np.array(records[r]["step_ends"])
        assert np.diff(ends).max() < 2 * timeout + 8, np.diff(ends).max()
    ends = [torch.load(tmp_path / f"end_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(bool(torch.isfinite(t).all()) for end in ends for t in end.values())


@pytest.mark.parametrize("asked_in", ["step", "checkpoint"])
def test_a_worker_started_later_joins_from_its_donors_replica_and_every_replica_equals_the_dposg_reference(tmp_path, asked_in):
    """Three workers on a ring; once they are past step 10 a fourth process starts alone with only the store's
    address and ``fit(ckpt_path="join")`` (the three wait at step 30 until it asks, however slow its start: at the
    step's start, or inside the checkpoint set they write then, which the request cuts short). The members admit it
    at a step boundary; its donor (its highest neighbour
    on the ring of 4, worker 2) sends it the whole replica: parameters, optimistic Adam's anchors and moments, the
    loops' step. All four end at the same step, and equal DPOSG in numpy: ring(3) before the recorded change step,
    the joiner a copy of worker 2's whole state there, ring(4) from it. The joiner's first parameters are its
    donor's at that step, bit for bit."""
    n, steps, port = 3, 80, free_port()
    opts = [f"steps={steps}", "kill=-1", "at=0", "optimizer=optimistic_adam", f"lr={LR}", "timeout=10",
            'kwargs={"betas": [0.5, 0.9]}', "pace=0.05", "hold=30", f"nodes={n}"]
    if asked_in == "checkpoint":
        opts += ["every=10", "hold_in=checkpoint"]
    procs = start_by_hand(tmp_path, n, *opts, port=port)
    progress, deadline = tmp_path / "progress.txt", time.monotonic() + 120
    while time.monotonic() < deadline and not (progress.exists() and progress.read_text().strip() and int(progress.read_text()) >= 10):
        time.sleep(0.05)
    procs.append(start_joiner(tmp_path, port, *opts))
    codes = wait_for(procs, list(range(n + 1)), timeout=180)
    stderr = {r: (tmp_path / f"stderr_rank{r}.txt").read_text() for r in range(n)} | {n: (tmp_path / "stderr_joiner.txt").read_text()}
    for r in range(n + 1):
        assert codes[r] == 0, f"worker {r} exited {codes[r]}:\n{stderr[r][-4000:]}"
    records = {r: json.loads((tmp_path / f"changes_rank{r}.json").read_text()) for r in range(n + 1)}
    assert {rec["global_step"] for rec in records.values()} == {steps}, records
    assert len({json.dumps(rec["changes"]) for rec in records.values()}) == 1, records  # one history, the joiner's too
    (change,) = records[0]["changes"]
    assert change["joined"] == [n] and change["left"] == [] and change["members"] == list(range(n + 1)) and change["topology"] == "ring"
    c = change["step"]
    assert 10 < c < steps, change
    for r in range(n):
        assert f"step {c}: worker(s) {n} joined; {n + 1} go on (0, 1, 2, 3) on ring" in stderr[r], stderr[r][-3000:]
    assert "worker 2: sent its replica" in stderr[2] and f"joins at step {c}" in stderr[2]

    game = BilinearGame("optimistic_adam", LR)
    z0 = np.tile(np.concatenate([game.x.detach().numpy(), game.y.detach().numpy()]), (n, 1))
    _, parts = bilinear_matrices(n)
    parts = np.concatenate([parts, bilinear_matrices(1)[1]])  # the joiner, one process of its own, plays the whole game

    def grad(z: np.ndarray) -> np.ndarray:
        x, y, a = z[:, :BILINEAR_DIM], z[:, BILINEAR_DIM:], parts[: len(z)]
        return np.concatenate([np.einsum("rij,rj->ri", a, y), -np.einsum("rij,ri->rj", a, x)], axis=1)

    mixes = [ring(n).matrix() if m < c else ring(n + 1).matrix() for m in range(1, steps + 1)]
    expected = dposg(grad, z0, mixes, steps, LR, ADAM, joins={c - 1: 2})
    ends = [torch.load(tmp_path / f"end_rank{r}.pt", weights_only=True) for r in range(n + 1)]
    got = np.stack([np.concatenate([s["x"].numpy(), s["y"].numpy()]) for s in ends])
    np.testing.assert_allclose(got, expected, atol=1e-10, rtol=0)
    # the joiner began as its donor was at the change step's start
    start = torch.load(tmp_path / f"start_rank{n}.pt", weights_only=True)
    donor_then = torch.load(tmp_path / "params_rank2.pt", weights_only=True)[c - 1]
    assert torch.equal(torch.cat([start["x"], start["y"]]), donor_then)
    # the test tells the rules apart: the members without a joiner, or a joiner from another donor, end elsewhere
    alone = dposg(grad, z0, ring(n).matrix(), steps, LR, ADAM)
    assert np.abs(got[:n] - alone).max() > 1e-6
    assert np.abs(got - dposg(grad, z0, mixes, steps, LR, ADAM, joins={c - 1: 1})).max() > 1e-6


def test_a_donor_lost_during_a_join_ends_the_joiner_with_one_error_and_the_others_go_on(tmp_path):
    """Faults within faults: worker 2, the donor of a worker joining a ring of 3, dies (SIGKILL) as it is about to
    send its replica. The joiner ends with one error naming its donor; workers 0 and 1 find both gone at the change
    step's mix, agree once more, and reach ``max_steps`` on a ring of 2, each recording the join and then the
    departure of 2 and 3. No wait outlasts the peer timeout."""
    n, steps, port, timeout = 3, 80, free_port(), 5.0
    opts = [f"steps={steps}", "kill=-1", "at=0", "optimizer=optimistic_adam", f"lr={LR}", f"timeout={timeout}",
            'kwargs={"betas": [0.5, 0.9]}', "pace=0.05", "hold=30", f"nodes={n}", "die_donating=1"]
    procs = start_by_hand(tmp_path, n, *opts, port=port)
    progress, deadline = tmp_path / "progress.txt", time.monotonic() + 120
    while time.monotonic() < deadline and not (progress.exists() and progress.read_text().strip() and int(progress.read_text()) >= 10):
        time.sleep(0.05)
    procs.append(start_joiner(tmp_path, port, *opts))
    codes = wait_for(procs, [0, 1, 2, 3], timeout=180)
    stderr = {r: (tmp_path / f"stderr_rank{r}.txt").read_text() for r in range(n)} | {n: (tmp_path / "stderr_joiner.txt").read_text()}
    assert codes[2] == -9, stderr[2][-3000:]  # the donor did die, sending
    assert codes[n] not in (0, None), stderr[n][-3000:]
    assert stderr[n].count("worker 3 could not join: its donor, worker 2, was lost before its replica arrived") == 1, stderr[n][-3000:]
    for r in (0, 1):
        assert codes[r] == 0, f"worker {r} exited {codes[r]}:\n{stderr[r][-4000:]}"
    records = [json.loads((tmp_path / f"changes_rank{r}.json").read_text()) for r in (0, 1)]
    assert [rec["global_step"] for rec in records] == [steps, steps]
    assert records[0]["changes"] == records[1]["changes"], records
    join, leave = records[0]["changes"]
    assert join["joined"] == [3] and leave["left"] == [2, 3] and leave["members"] == [0, 1] and join["step"] <= leave["step"], records
    # from the step before the change on (the members' wait for the joiner to ask comes before it)
    longest = max(b - a for rec in records for a, b in zip(rec["step_ends"][join["step"] - 2:], rec["step_ends"][join["step"] - 1:]))
    assert longest < 2 * timeout + 5, longest  # the agreement, not a hang


def test_a_worker_lost_while_a_checkpoint_is_written_leaves_no_partial_set_and_the_others_go_on(tmp_path):
    """A ring of 4 writes a checkpoint set every 20 steps; rank 2 dies (SIGKILL) inside the one of step 20, after the
    consensus average, while the others are in the set's agreements. No set of step 20 is left on disk, every
    survivor says why, they agree at their next step and train on to max_steps, their replicas equal the DPOSG
    reference (ring(4) up to mix 20, ring(3) after), and the sets of steps 40 and 60 are whole sets of the three.
    A probe of the failed collective's group names the lost worker: the survivors step again well within the peer
    timeout.

    The set of step 40, after the change, names its members (0, 1, 3) and holds one replica each, in member order,
    and a main file whose model is their average (recomputed here in numpy); three workers started afresh from it
    each begin from their own replica, bit for bit, and train on to max_steps."""
    n, kill_at = 4, 20
    opts = [f"steps={STEPS}", "kill=2", f"at={kill_at}", "kill_in=checkpoint", "optimizer=optimistic_adam", f"lr={LR}",
            "timeout=10", 'kwargs={"betas": [0.5, 0.9]}', "every=20", f"nodes={n}"]
    procs = start_by_hand(tmp_path, n, *opts)
    survivors = [0, 1, 3]
    codes = wait_for(procs, survivors, timeout=120)
    stderr = {r: (tmp_path / f"stderr_rank{r}.txt").read_text() for r in range(n)}
    assert codes == {0: 0, 1: 0, 3: 0}, {r: stderr[r][-3000:] for r in survivors}
    assert procs[2].returncode == -signal.SIGKILL
    for r in survivors:
        assert "step=20.ckpt of step 20 not written" in stderr[r], stderr[r][-3000:]
    checkpoints = tmp_path / "ckpt"
    assert not list(checkpoints.glob("*step=20*")), sorted(p.name for p in checkpoints.iterdir())
    records = {r: json.loads((tmp_path / f"changes_rank{r}.json").read_text()) for r in survivors}
    assert {rec["global_step"] for rec in records.values()} == {STEPS}
    (change,) = records[0]["changes"]
    assert change["left"] == [2] and change["members"] == survivors, change
    c = change["step"]
    assert c == kill_at + 1, change  # every survivor had finished step 20: they agree at the first mix of step 21
    # the survivors whose collective failed name the lost worker by a probe of their group (gloo's error names no
    # rank): nobody waits for its silence (the 10 s peer timeout)
    killed = float((tmp_path / "killed_rank2.txt").read_text())
    resumed = max(rec["step_ends"][c - 1] for rec in records.values())
    assert resumed - killed < 8, resumed - killed

    game = BilinearGame("optimistic_adam", LR)
    z0 = np.tile(np.concatenate([game.x.detach().numpy(), game.y.detach().numpy()]), (n, 1))
    grad, w_old, w_new = bilinear_gradient(n), ring(n).matrix(), embedded(ring(n - 1).matrix(), survivors, n)
    expected = dposg(grad, z0, [w_old if m <= kill_at else w_new for m in range(1, STEPS + 1)], STEPS, LR, ADAM)[survivors]
    got = np.stack([np.concatenate([s["x"].numpy(), s["y"].numpy()]) for s in
                    (torch.load(tmp_path / f"end_rank{r}.pt", weights_only=True) for r in survivors)])
    np.testing.assert_allclose(got, expected, atol=1e-10, rtol=0)
    assert np.abs(got - dposg(grad, z0, w_old, STEPS, LR, ADAM)[survivors]).max() > 1e-6

    from lightning_dpgan.replicas import read_main, read_replica, replica_set_of

    for step in (40, 60):
        (path,) = checkpoints.glob(f"*step={step}.ckpt")
        replica_set = replica_set_of(read_main(path))
        assert replica_set.members == (0, 1, 3) and replica_set.world_size == 3 and replica_set.step == step, replica_set
        for r in range(3):
            read_replica(path, replica_set, r)  # raises for a missing or foreign replica

    (path,) = checkpoints.glob("*step=40.ckpt")
    main = read_main(path)
    replicas = [read_replica(path, replica_set_of(main), r) for r in range(3)]
    params = np.stack([np.concatenate([rep["state_dict"]["x"].numpy(), rep["state_dict"]["y"].numpy()]) for rep in replicas])
    consensus = np.concatenate([main["state_dict"]["x"].numpy(), main["state_dict"]["y"].numpy()])
    np.testing.assert_allclose(consensus, params.mean(axis=0), atol=1e-12, rtol=0)
    assert np.abs(params - params.mean(axis=0)).max() > 1e-6  # the replicas differ: each must be resumed as its own
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    resume_opts = [f"steps={STEPS}", "kill=-1", "at=0", "optimizer=optimistic_adam", f"lr={LR}", "timeout=10",
                   'kwargs={"betas": [0.5, 0.9]}', f"resume={path}", "nodes=3"]
    procs = start_by_hand(resumed, 3, *resume_opts)
    codes = wait_for(procs, [0, 1, 2], timeout=120)
    assert codes == {0: 0, 1: 0, 2: 0}, {r: (resumed / f"stderr_rank{r}.txt").read_text()[-3000:] for r in range(3)}
    for r in range(3):
        start = torch.load(resumed / f"start_rank{r}.pt", weights_only=True)
        assert torch.equal(start["x"], replicas[r]["state_dict"]["x"]) and torch.equal(start["y"], replicas[r]["state_dict"]["y"]), r
        assert json.loads((resumed / f"changes_rank{r}.json").read_text())["global_step"] == STEPS
