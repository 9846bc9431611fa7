"""The gossip engine against a dense numpy W^t X reference: on real gloo process groups (torchrun), and in one
process with an in-process transport (the variants, stop agreement, step tags, timeouts)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_dpgan.gossip import GossipOptions, GossipPeerError, StopReason, build_engine, dense_mix
from lightning_dpgan.gossip.buffers import Plan
from lightning_dpgan.gossip.control import HEADER_BYTES
from lightning_dpgan.gossip.base import PeerTimeout
from lightning_dpgan.gossip.options import PEER_TIMEOUT_FLOOR_S, PEER_TIMEOUT_STEPS
from lightning_dpgan.gossip.transport import SEGMENT_CHUNKS, SEGMENTS, schedule, segment_count
from lightning_dpgan.topology import build_topology, ring

from fake_transport import run_ranks
from stale_replay import ReplayedStale
from helpers import torchrun

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from gossip_worker import case_tensors, overlap_shift  # noqa: E402


def path_metropolis(n: int) -> list[list[float]]:
    """Metropolis-Hastings weights of the path 0-1-...-(n-1), written out by hand."""
    deg = [1 if i in (0, n - 1) else 2 for i in range(n)] if n > 1 else [0]
    w = np.zeros((n, n))
    for i in range(n - 1):
        w[i, i + 1] = w[i + 1, i] = 1.0 / (1 + max(deg[i], deg[i + 1]))
    w[np.diag_indices(n)] = 1 - w.sum(axis=1)
    return w.tolist()


def topologies_for(n: int) -> list[tuple[str, dict]]:
    names: list[tuple[str, dict]] = [
        ("ring", {}),
        ("exponential", {}),
        ("one_peer_exponential", {}),
        ("complete", {}),
        ("star", {}),
        ("random_regular", {"seed": 3}),
        ("custom", {"matrix": path_metropolis(n)}),
    ]
    if n in (4, 6, 8, 9):
        names.append(("torus", {}))
    if n & (n - 1) == 0:
        names.append(("hypercube", {}))
    return names


def cases_for(n: int) -> list[dict]:
    cases = [
        {"topology": name, "options": options, "rounds": t}
        for name, options in topologies_for(n)
        for t in (1, 2, 3)
    ]
    cases.append({"topology": "ring", "rounds": 2, "wire_dtype": "bf16"})
    cases.append({"topology": "ring", "rounds": 1, "mixes": 3})  # consecutive mixes reuse the buffers
    # messages cut into many chunks with a remainder (3 float32/float64 or 6 bf16 elements per chunk)
    cases.append({"topology": "ring", "rounds": 2, "chunk_bytes": 12})
    cases.append({"topology": "exponential", "rounds": 1, "chunk_bytes": 12, "wire_dtype": "bf16"})
    cases.append({"topology": "one_peer_exponential", "rounds": 3, "chunk_bytes": 12})
    cases.append({"topology": "exponential", "rounds": 2, "chunk_bytes": None})  # each message whole
    # small chunks also cut each round into segments (packed, cast, sent and combined one after another), their
    # edges inside tensors: a lerp into the tensors (bf16 cast from them, or fp32 packed), a correction, a
    # one-round mix unpacked segment by segment, and a tensor that is not contiguous (the round stays whole)
    cases += [
        {"topology": "one_peer_exponential", "rounds": 1, "chunk_bytes": 12, "wire_dtype": "bf16", "mixes": 2},
        {"topology": "one_peer_exponential", "rounds": 1, "chunk_bytes": 12, "mixes": 2},
        {"topology": "one_peer_exponential", "rounds": 1, "chunk_bytes": 12, "overlap": True, "wire_dtype": "bf16",
         "mixes": 2},
        {"topology": "ring", "rounds": 1, "chunk_bytes": 12, "mixes": 2},
        {"topology": "ring", "rounds": 1, "chunk_bytes": 12, "strided": True},
        {"topology": "one_peer_exponential", "rounds": 1, "chunk_bytes": 4, "wire_dtype": "bf16", "mixes": 2},
        {"topology": "ring", "rounds": 2, "chunk_bytes": 4, "wire_dtype": "bf16"},
    ]
    if n & (n - 1) == 0 and n > 1:
        cases.append({"topology": "one_peer_exponential", "rounds": 1, "mixes": int(math.log2(n))})
    # a one-round mix writes the tensors from its round: one in-neighbour, a bf16 wire cast from the tensors, a
    # tensor that is not contiguous
    cases += [
        {"topology": "one_peer_exponential", "rounds": 1, "wire_dtype": "bf16", "strided": True},
        {"topology": "ring", "rounds": 1, "wire_dtype": "bf16", "strided": True, "mixes": 2},
        {"topology": "one_peer_exponential", "rounds": 1, "mixes": 2, "overlap": True, "wire_dtype": "bf16"},
        {"topology": "exponential", "rounds": 1, "overlap": True, "strided": True},
    ]
    if n == 4:  # two in-neighbours each, with weights that differ: each row must get its own
        uneven = [[0.5, 0.3, 0, 0.2], [0.3, 0.4, 0.3, 0], [0, 0.3, 0.5, 0.2], [0.2, 0, 0.2, 0.6]]
        cases += [{"topology": "custom", "options": {"matrix": uneven}, "rounds": 1, "mixes": 2, "wire_dtype": wire}
                  for wire in ("fp32", "bf16")]
    if n == 4:  # one in-neighbour with weights other than a half: pairs (0,1),(2,3), then (0,2),(1,3)
        pairs = {"matrices": [[[0.75, 0.25, 0, 0], [0.25, 0.75, 0, 0], [0, 0, 0.75, 0.25], [0, 0, 0.25, 0.75]],
                              [[0.6, 0, 0.4, 0], [0, 0.6, 0, 0.4], [0.4, 0, 0.6, 0], [0, 0.4, 0, 0.6]]]}
        cases += [{"topology": "custom", "options": pairs, "rounds": 1, "mixes": 3, "wire_dtype": wire} for wire in ("fp32", "bf16")]
    # a started mix applies W^t to the tensors as they were, keeping what changed while it was in flight
    cases += [
        {"topology": "ring", "rounds": 1, "mixes": 3, "overlap": True},
        {"topology": "ring", "rounds": 3, "overlap": True, "chunk_bytes": 12},
        {"topology": "one_peer_exponential", "rounds": 2, "mixes": 2, "overlap": True, "wire_dtype": "bf16"},
        {"topology": "complete", "rounds": 2, "mixes": 2, "overlap": True},
    ]
    if n == 8:
        cases += [{"topology": "ring", "rounds": t, "mixes": 14, "track_consensus": True} for t in (1, 2, 3)]
    if n in (4, 8):  # bounded staleness, taking each message when a seeded schedule says (tests/reference.py)
        cases += [{"topology": "ring", "rounds": 1, "mixes": 12, "staleness": s, "schedule": 7} for s in (1, 3)]
        cases.append({"topology": "torus" if n == 4 else "exponential", "rounds": 1, "mixes": 10, "staleness": 2, "schedule": 8,
                      "wire_dtype": "bf16"})
    return cases


SIZES = (2, 3, 4, 8)


@pytest.fixture(scope="module")
def gossip_runs(tmp_path_factory) -> Path:
    """One launch of 8 processes; the cases of each world size n run on the first n ranks."""
    out = tmp_path_factory.mktemp("gossip")
    torchrun("gossip_worker.py", max(SIZES), str(out), json.dumps({n: cases_for(n) for n in SIZES}), timeout=300)
    return out


@pytest.fixture(params=SIZES)
def gossip_run(request, gossip_runs):
    n = request.param
    return n, cases_for(n), [np.load(gossip_runs / f"n{n}_rank{r}.npz") for r in range(n)]


def reference(case: dict, index: int, n: int) -> list[np.ndarray]:
    """Each tensor after the case's mixes, rows = ranks: ``x <- W^t x`` per mix (plus each rank's shift when the
    mix was in flight while the rank changed its tensors)."""
    topo = build_topology(case["topology"], n, **case.get("options", {}))
    inputs = [case_tensors(index, r, case) for r in range(n)]
    mixes, t = case.get("mixes", 1), case["rounds"]
    if case.get("staleness"):
        from reference import delivery_schedule, stale_dposg

        schedule = delivery_schedule(n, case["staleness"], case["schedule"])
        stacked = [np.stack([inputs[r][k].astype(np.float64).ravel() for r in range(n)]) for k in range(len(inputs[0]))]
        return [stale_dposg(lambda z: np.zeros_like(z), x, topo.matrix(), mixes, 0.0, schedule) for x in stacked]
    shift = np.array([[overlap_shift(r)] for r in range(n)]) if case.get("overlap") else 0.0
    out = []
    for k in range(len(inputs[0])):
        x = np.stack([inputs[r][k].astype(np.float64).ravel() for r in range(n)])
        phase = 0
        for _ in range(mixes):
            if topo.is_complete:
                product = np.full((n, n), 1.0 / n)  # one exact average whatever t
            else:
                product = np.eye(n)
                for _ in range(t):
                    product = topo.matrices[phase % topo.period] @ product
                    phase += 1
            x = product @ x + shift
        out.append(x)
    return out


def test_gossip_equals_dense_reference(gossip_run):
    n, cases, results = gossip_run
    for index, case in enumerate(cases):
        if case.get("track_consensus"):
            continue
        tol = 2e-2 if case.get("wire_dtype") else 1e-6
        for k, expected in enumerate(reference(case, index, n)):
            got = np.stack([results[r][f"{index}/{k}"].astype(np.float64).ravel() for r in range(n)])
            np.testing.assert_allclose(got, expected, rtol=0, atol=tol, err_msg=f"n={n} case={case} tensor {k}")


def test_one_peer_exponential_exact_average(gossip_run):
    n, cases, results = gossip_run
    if n & (n - 1) or n == 1:
        pytest.skip("exact averaging needs a power-of-two world size")
    index = next(
        i for i, c in enumerate(cases)
        if c["topology"] == "one_peer_exponential" and c.get("mixes") == int(math.log2(n)) and c["rounds"] == 1
        and not c.get("wire_dtype") and not c.get("overlap")
    )
    inputs = [case_tensors(index, r, cases[index]) for r in range(n)]
    for k in range(len(inputs[0])):
        mean = np.mean([inputs[r][k].astype(np.float64) for r in range(n)], axis=0)
        for r in range(n):
            np.testing.assert_allclose(results[r][f"{index}/{k}"], mean, rtol=0, atol=1e-6)


def test_messages_only_to_neighbours(gossip_run):
    n, cases, results = gossip_run
    for index, case in enumerate(cases):
        topo = build_topology(case["topology"], n, **case.get("options", {}))
        mixes, t = case.get("mixes", 1), case["rounds"]
        for r in range(n):
            sent = int(results[r][f"{index}/messages"])
            # the worker's tensors form two dtype buckets (float64, float32): one message stream each
            if topo.is_complete:
                expected = 2 * mixes  # one all_reduce per mix, whatever t
            else:
                expected = 2 * sum(len(topo.neighbours(r, p).send_to) for p in range(mixes * t))
            assert sent == expected, (n, case, r, sent, expected)
    if n == 2:
        assert ring(2).neighbours(0).send_to == (1,)


def test_ring8_contraction_matches_rho_squared(gossip_run):
    n, cases, results = gossip_run
    if n != 8:
        pytest.skip("ring-of-8 contraction is measured at n = 8")
    lam2 = (1 + 2 * math.cos(2 * math.pi / 8)) / 3  # the ring's second eigenvalue, by hand
    for index, case in enumerate(cases):
        if not case.get("track_consensus"):
            continue
        distances = results[0][f"{index}/consensus"]
        # after the fast modes have died out, each mix shrinks consensus distance by rho(W^t)^2
        measured = distances[-1] / distances[-2]
        expected = lam2 ** (2 * case["rounds"])
        assert abs(measured - expected) <= 0.10 * expected, (case["rounds"], measured, expected)
        assert all(np.diff(distances) < 0)


def engine(name: str, n: int = 4, rank: int = 0, **options) -> object:
    return build_engine(build_topology(name, n), rank, GossipOptions(**options), transport=object())


def test_world_size_one_is_noop():
    one = engine("ring", 1, rounds=3)
    x = torch.randn(5)
    before = x.clone()
    one.step([x])
    assert torch.equal(x, before)
    assert one.messages_sent == 0


def test_schedule_posts_every_receive_before_any_send():
    """Receives first, so that their ready notices do not queue behind this worker's data to the same peer; the
    expected order is written out by hand (rank 0 of a ring of 4, two chunks)."""
    assert schedule((1, 3), (1, 3), num_chunks=2) == [
        ("recv", 1, 0), ("recv", 3, 0), ("recv", 1, 1), ("recv", 3, 1),
        ("send", 1, 0), ("send", 3, 0), ("send", 1, 1), ("send", 3, 1),
    ]


@pytest.mark.parametrize("count,bounds", [(1, [0, 30]), (3, [0, 10, 20, 30]), (4, [0, 7, 15, 22, 30])])
def test_segments_cut_the_tensors_and_the_message_without_gaps(count, bounds):
    """Segment ``k`` of 30 elements in 15 + 7 + 8 holds elements ``30k/count`` to ``30(k+1)/count``; its pieces of
    the tensors, its pieces of a buffer, and its bytes of the message (header with the first, padding with the
    last) follow."""
    tensors = [torch.zeros(3, 5), torch.zeros(7), torch.zeros(2, 2, 2)]
    bucket = Plan(tensors).buckets[0]
    segments = bucket.segments(count)
    assert [s.start for s in segments] + [segments[-1].stop] == bounds
    for k, segment in enumerate(segments):
        for piece in segment.tensors():
            piece.fill_(k)
    owner = np.repeat(np.arange(count), np.diff(bounds))
    np.testing.assert_array_equal(np.concatenate([t.numpy().ravel() for t in tensors]), owner)
    buffer = torch.arange(30.0)
    cut = [torch.cat([p.reshape(-1) for p in s.pieces(buffer)]).numpy() for s in segments]
    np.testing.assert_array_equal(np.concatenate(cut), np.arange(30.0))
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        inner = [HEADER_BYTES + b * size for b in bounds[1:-1]]
        message = HEADER_BYTES + -(-30 * size // 8) * 8  # the payload padded to 8 bytes
        assert [s.message_bytes(dtype) for s in segments] == list(zip([0, *inner], [*inner, message]))


@pytest.mark.parametrize(
    "payload_bytes,device,chunk_bytes,count",
    [
        (4 * 1024, "cpu", 1024, 1),  # 4 chunks: one segment of at least SEGMENT_CHUNKS chunks
        (12 * 1024, "cpu", 1024, 3),
        (1 << 30, "cpu", 1024, 8),  # at most SEGMENTS
        (1000, "cpu", 1024, 1),  # less than a chunk
        (1 << 30, "cpu", None, 1),  # whole messages: nothing to hide the passes behind
        (1 << 30, "cuda", 1024, 1),  # NCCL sends whole buffers
    ],
)
def test_the_transport_cuts_a_round_into_segments_of_several_chunks(payload_bytes, device, chunk_bytes, count):
    assert segment_count(payload_bytes, torch.device(device), chunk_bytes) == count
    assert (SEGMENTS, SEGMENT_CHUNKS) == (8, 4)


def test_a_tensor_that_is_not_contiguous_keeps_its_bucket_whole():
    bucket = Plan([torch.zeros(4, 3).t(), torch.zeros(5)]).buckets[0]
    assert len(bucket.segments(4)) == 1


def test_dense_reference_matches_matrix_power():
    topo = ring(5)
    x = np.random.default_rng(0).standard_normal((5, 4))
    np.testing.assert_allclose(dense_mix(x, topo, 3), np.linalg.matrix_power(topo.matrix(), 3) @ x)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rounds": 0}, r"gossip rounds \(t\) must be an integer in \[1, 1000\], got 0"),
        ({"rounds": 1.5}, r"gossip rounds \(t\) must be an integer in \[1, 1000\], got 1.5"),
        ({"wire_dtype": "int8"}, r"unknown wire_dtype 'int8'; allowed: fp32"),
        ({"chunk_bytes": 0}, r"chunk_bytes \(bytes per gossip message chunk; None sends whole messages\) must be an integer >= 1, got 0"),
        ({"chunk_bytes": True}, r"chunk_bytes .* must be an integer >= 1, got True"),
        ({"overlap": "yes"}, r"overlap must be True or False, got 'yes'"),
        ({"peer_timeout": 0}, r"peer_timeout \(seconds; None follows the run\) must be a finite number > 0, got 0"),
        ({"startup_timeout": float("inf")}, r"startup_timeout \(seconds\) must be a finite number > 0, got inf"),
    ],
)
def test_bad_gossip_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GossipOptions(**kwargs)


def test_gossip_options_from_a_mapping_refuse_unknown_keys():
    assert GossipOptions.build({"rounds": 3}) == GossipOptions(rounds=3)
    with pytest.raises(ValueError, match="unknown gossip option.s. round; allowed: catch_up, chunk_bytes"):
        GossipOptions.build({"round": 3})


def test_same_tensor_twice_is_refused():
    # a one-round mix combines into the tensors in place: a tensor listed twice would be combined twice
    t = torch.zeros(3)
    with pytest.raises(ValueError, match="a tensor appears more than once in the list to mix"):
        engine("ring", 2).mix([t, torch.ones(2), t])


def test_integer_tensors_are_refused():
    with pytest.raises(ValueError, match="gossip averages floating-point tensors only, got one of dtype torch.int64"):
        engine("ring", 2).mix([torch.zeros(3), torch.zeros(2, dtype=torch.int64)])


# ---------------------------------------------------------------------- one process, an in-process transport
@pytest.mark.parametrize(
    "name,n,rounds,wire,overlap",
    [
        ("ring", 4, 1, None, False), ("ring", 5, 3, None, False), ("one_peer_exponential", 8, 1, None, False),
        ("complete", 4, 2, None, False), ("torus", 6, 2, None, False), ("exponential", 6, 1, "bf16", False),
        ("ring", 5, 1, None, True), ("one_peer_exponential", 4, 2, None, True),
    ],
)
def test_engine_variants_in_one_process_equal_the_dense_reference(name, n, rounds, wire, overlap):
    """Three steps of each variant (synchronous, or overlapped and then flushed) against ``(W^t)^3 X``; the bf16 wire
    against the same product with every message rounded to bf16 (the worker's own term kept in full)."""
    from reference import bf16, narrow_wire_mix

    topo = build_topology(name, n)
    x0 = np.random.default_rng(3).standard_normal((n, 9))

    def body(rank, transport):
        e = build_engine(topo, rank, GossipOptions(rounds=rounds, wire_dtype=wire, overlap=overlap), transport)
        x = torch.tensor(x0[rank])
        for _ in range(3):
            e.step([x])
        e.flush()
        return x.numpy()

    got = np.stack(run_ranks(n, body))
    mats = [topo.matrix(p) for p in range(3 * rounds)]
    if wire == "bf16":
        expected = narrow_wire_mix(mats, bf16)(x0.astype(np.float32).astype(np.float64))
    else:
        expected = x0
        for k in range(3):
            expected = dense_mix(expected, topo, rounds, phase=k * rounds)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 if wire is None else 1e-6)
    assert np.abs(got - x0).max() > 1e-3  # something was mixed


@pytest.mark.parametrize(
    "name,n,options",
    [
        ("ring", 8, {}), ("ring", 8, {"rounds": 3}), ("one_peer_exponential", 8, {}), ("star", 7, {"overlap": True}),
        ("complete", 4, {}), ("ring", 8, {"overlap": True}), ("ring", 8, {"mixing": False}), ("ring", 8, {"staleness": 2}),
        ("ring", 8, {"every": 3}), ("torus", 8, {"compression": "int8"}), ("ring", 8, {"every": 2, "overlap": True}),
    ],
)
def test_a_stop_announced_anywhere_is_taken_by_every_rank_after_the_same_step(name, n, options):
    """Ranks 3 and 6 announce stops after 5 and 7 steps; news travels only with the gossip messages, yet every rank
    stops after the same step: the earlier announcement's, which is its step plus the engine's horizon."""
    topo = build_topology(name, n)
    announcers = {3: 5, 6 % n: 7}

    def body(rank, transport):
        e = build_engine(topo, rank, GossipOptions(**options), transport)
        x = torch.zeros(4)
        while e.due_stop() is None:
            if announcers.get(rank) == e.steps:
                e.announce_stop(StopReason.SIGNAL)
            e.step([x])
            assert e.steps < 100
        return e.steps, e.due_stop(), e.stop_horizon

    results = run_ranks(n, body)
    steps, stops, horizons = zip(*results)
    assert len(set(steps)) == 1 and len(set(stops)) == 1, results
    # announced after 5 steps, so during the 6th; taken the horizon later
    assert stops[0].origin_rank == 3 and stops[0].origin_step == 6 and steps[0] == 5 + horizons[0]


def test_a_message_of_another_step_is_refused_naming_its_sender():
    """Rank 2 has counted one step more than the others: its neighbours refuse its message instead of mixing it."""
    topo = ring(4)

    def body(rank, transport):
        e = build_engine(topo, rank, GossipOptions(peer_timeout=5), transport)
        if rank == 2:
            e.steps += 1
        try:
            e.step([torch.zeros(3)])
        except GossipPeerError as err:
            return str(err)
        return None

    errors = run_ranks(4, body)
    for rank in (1, 3):
        assert f"rank {rank}: rank 2 sent the message of its gossip step 2 while this rank mixes step 1" in errors[rank]


def test_a_silent_neighbour_is_named_after_the_peer_timeout():
    """Rank 1 is a second late to its first step (twice the peer timeout), then stops sending after the warm-up:
    its neighbours name it after the peer timeout. The lateness reaches rank 3 only in its second exchange, so the
    warm-up (the start-up timeout) lasts the steps news takes to cross the graph, the stop horizon."""
    import time

    topo = ring(4)

    def body(rank, transport):
        e = build_engine(topo, rank, GossipOptions(peer_timeout=0.5, startup_timeout=30), transport)
        warmup = e.stop_horizon
        if rank == 1:
            time.sleep(1.0)
            for _ in range(warmup):
                e.step([torch.zeros(3)])
            return None  # never sends again
        for _ in range(warmup):
            e.step([torch.zeros(3)])
        start = time.monotonic()
        try:
            e.step([torch.zeros(3)])
        except GossipPeerError as err:
            return str(err), time.monotonic() - start
        return None

    results = run_ranks(4, body)
    for rank in (0, 2):  # rank 1's neighbours; rank 3 hears from its own (0 and 2) and finishes
        message, waited = results[rank]
        assert "with rank 1 failed" in message and 0.4 < waited < 5, results[rank]
    assert results[3] is None


def test_a_post_to_a_peer_whose_connection_closed_is_named_like_a_failed_wait():
    """Over real gloo, a receive posted to a peer that has already exited raises at the post itself; that error,
    too, is one ``GossipPeerError`` naming the peer, raised by the wait (it once escaped as a bare RuntimeError)."""
    proc = torchrun("peer_gone_worker.py", 2, timeout=120)
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith(("raised:", "nothing raised"))]
    assert line.startswith("raised: rank 1 died or stalled; rank 0: gossip exchange with rank 1 failed at gossip round 1"), line


def test_the_peer_timeout_starts_after_the_warm_up_and_follows_the_step_time():
    fixed = PeerTimeout(fixed=7.0, startup=900.0, warmup=lambda: 3)
    assert fixed.seconds() == 900.0  # before the first exchange (rendezvous, initial broadcast): the start-up timeout
    fixed.tick()
    assert fixed().total_seconds() == 900.0 and fixed.seconds() == 900.0  # the first exchange, a checkpoint after it
    fixed.tick()
    fixed.tick()
    assert fixed().total_seconds() == 900.0  # the third step: the first step's lateness may still be on its way
    fixed.tick()
    assert fixed().total_seconds() == 7.0 and fixed.seconds() == 7.0  # the fourth: warm, exchanges and collectives
    auto = PeerTimeout(fixed=None, startup=900.0)
    assert auto.seconds() == 900.0
    auto.tick()
    auto()
    auto.tick()
    assert auto.seconds() == PEER_TIMEOUT_FLOOR_S  # nothing much measured yet: the floor
    auto._durations.extend([0.01] * 10)
    assert auto.seconds() == PEER_TIMEOUT_FLOOR_S  # fast steps: the floor
    auto._durations.extend([2.0] * 30)
    assert auto.seconds() == PEER_TIMEOUT_STEPS * 2.0  # slow steps: a multiple of the median


# ---------------------------------------------------------------------- bounded staleness
def _stale_consensus(topo, staleness: int, steps: int, seed: int, x0: np.ndarray) -> np.ndarray:
    from reference import delivery_schedule

    def body(rank, transport):
        schedule = delivery_schedule(topo.world_size, staleness, seed)
        e = ReplayedStale(topo, rank, transport, GossipOptions(staleness=staleness), lambda sender, tag: schedule(rank, sender, tag))
        x = torch.tensor(x0[rank])
        for _ in range(steps):
            e.step([x])
        e.close()
        return x.numpy()

    return np.stack(run_ranks(topo.world_size, body))


@pytest.mark.parametrize("name,n,staleness", [("ring", 6, 1), ("ring", 6, 3), ("exponential", 6, 2), ("torus", 6, 2)])
def test_bounded_staleness_equals_the_replayed_schedule_in_one_process(name, n, staleness):
    """Consensus alone with staleness s: every worker takes each neighbour's message of step m at a seeded step in
    [m, m + s]; the numpy reference replays the same schedule, to float precision, and differs from synchronous."""
    from reference import delivery_schedule, stale_dposg

    topo = build_topology(name, n)
    x0 = np.random.default_rng(5).standard_normal((n, 7))
    got = _stale_consensus(topo, staleness, 12, 3, x0)
    expected = stale_dposg(lambda z: np.zeros_like(z), x0, topo.matrix(), 12, 0.0, delivery_schedule(n, staleness, 3))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    synchronous = np.linalg.matrix_power(topo.matrix(), 12) @ x0
    assert np.abs(got - synchronous).max() > 1e-6  # the staleness is visible: the test tells the two apart


@pytest.mark.parametrize("staleness", [1, 3])
def test_a_stale_worker_runs_at_most_s_steps_past_a_silent_neighbour(staleness):
    """Rank 2 takes one step, then stops sending. Its neighbours go on for exactly s more steps on its last message,
    then wait for it and name it after the timeout (the start-up one: this is the warm-up, so both are short);
    rank 0, two hops away, is held back only through them."""
    topo = ring(4)

    def body(rank, transport):
        e = build_engine(topo, rank, GossipOptions(staleness=staleness, peer_timeout=0.3, startup_timeout=0.3), transport)
        x = torch.zeros(3)
        try:
            for _ in range(1 if rank == 2 else 10):
                e.step([x])
        except GossipPeerError as err:
            return e.steps - 1, str(err)  # the steps finished before the one that waited
        return e.steps, ""

    results = run_ranks(4, body)
    for rank in (1, 3):
        finished, message = results[rank]
        assert finished == 1 + staleness and "with rank 2 failed" in message, results


def test_catch_up_needs_staleness():
    with pytest.raises(ValueError, match="catch_up=True skips a step only while a neighbour is staleness steps ahead: it needs staleness >= 1, got staleness=0"):
        GossipOptions(catch_up=True)
    assert GossipOptions(staleness=1, catch_up=True).catch_up


def test_staleness_is_refused_where_it_cannot_work():
    from lightning_dpgan.topology import TopologyError

    with pytest.raises(ValueError, match="staleness=2 mixes the newest anchors a worker holds, once per step: it needs rounds=1"):
        GossipOptions(staleness=2, rounds=3)
    with pytest.raises(TopologyError, match="staleness=2 needs a static topology; 'one_peer_exponential' changes its"):
        build_engine(build_topology("one_peer_exponential", 4), 0, GossipOptions(staleness=2), transport=object())
    with pytest.raises(ValueError, match="staleness=2 keeps receives posted ahead of sends .* NCCL does not"):
        build_engine(ring(4), 0, GossipOptions(staleness=2), transport=object()).step([torch.zeros(3, device="meta")])
    assert type(build_engine(ring(4), 0, GossipOptions(staleness=0), transport=object())).__name__ == "SynchronousGossip"


# ---------------------------------------------------------------------- the package's shape
def _gossip_imports() -> dict[str, set[str]]:
    """Each module of lightning_dpgan/gossip/ (``__init__`` for the package) -> the modules of gossip/ it imports,
    at any depth in its code: a lazy import inside a function counts as much as one at the top."""
    import ast

    import lightning_dpgan.gossip as package

    folder = Path(package.__file__).parent
    names = {path.stem for path in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        edges = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = "lightning_dpgan.gossip" if node.level else (node.module or "")
                if node.level and node.module:
                    base += "." + node.module
                if base == "lightning_dpgan.gossip":  # the package itself, or a submodule by name
                    edges.update(a.name if a.name in names else "__init__" for a in node.names)
                elif base.startswith("lightning_dpgan.gossip."):
                    edges.add(base.split(".")[2])
            elif isinstance(node, ast.Import):
                edges.update(a.name.split(".")[2] for a in node.names if a.name.startswith("lightning_dpgan.gossip."))
    return graph


def test_the_gossip_package_imports_no_module_in_a_circle():
    """``import lightning_dpgan.gossip`` walks a graph without a cycle: a variant imports the base, the registry
    imports the variants, and no module reaches back (nor needs a lazy import to avoid it)."""
    graph = _gossip_imports()
    assert graph["registry"] >= {"base", "synchronous", "stale", "choco", "none", "live"} and "registry" not in graph["base"]
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph.get(module, ())):
            assert state.get(other) != 1, f"import circle: {' -> '.join(path + [module, other])}"
            if other not in state:
                visit(other, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_each_variant_is_named_by_its_options_and_registered():
    """``GossipOptions.variant`` picks the variant by its fields, in the order the settings override each other, and
    the registry builds that class (a variant added is one class and one line in ``ENGINES``)."""
    from lightning_dpgan.gossip import ENGINES, GossipEngine

    cases = {
        "synchronous": GossipOptions(),
        "overlapped": GossipOptions(overlap=True),
        "stale": GossipOptions(staleness=1),
        "choco": GossipOptions(compression="int8"),
        "none": GossipOptions(mixing=False, compression="int8"),
        "live": GossipOptions(membership="live"),
    }
    for name, options in cases.items():
        assert options.variant == name
        engine = build_engine(ring(4), 0, options, transport=object())
        assert type(engine) is ENGINES[name] and isinstance(engine, GossipEngine)
    assert set(ENGINES) == set(cases)
