"""Fewer bytes: CHOCO compressed gossip and local steps (``GossipOptions(compression=..., every=...)``), in one
process against the numpy references of tests/reference.py. The real multi-process runs are in test_dposg.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_dpgan.gossip import GossipOptions, build_engine
from lightning_dpgan.gossip.compression import CHUNK, Compressor, build_compressor
from lightning_dpgan.topology import TopologyError, build_topology, ring

from fake_transport import run_ranks
from reference import choco_mix, every, int8, sign, topk

REFERENCE = {"int8": int8, "sign": sign, "topk": topk(0.05)}


def _run(topo, options: GossipOptions, x0: np.ndarray, steps: int, compressor: Compressor | None = None):
    """Every rank's tensor after ``steps`` engine steps, and the bytes each rank sent."""

    def body(rank, transport):
        e = build_engine(topo, rank, options, transport)
        if compressor is not None:
            e.compressor = compressor
        x = torch.tensor(x0[rank])
        for _ in range(steps):
            e.step([x])
        e.flush()
        return x.numpy(), transport.hub.sent_bytes[rank]

    results = run_ranks(topo.world_size, body)
    return np.stack([r[0] for r in results]), [r[1] for r in results]


@pytest.mark.parametrize("compression", ["int8", "sign", "topk"])
@pytest.mark.parametrize("name,n", [("ring", 6), ("torus", 6), ("ring", 3)])  # ring(3) has W = 11^T / 3
def test_choco_equals_the_numpy_reference(compression, name, n):
    """Ten CHOCO steps (vectors of 2.5 chunks, so that a partial chunk is covered) against CHOCO written out in numpy
    with its own compressors: the same numbers to float precision, and not those of plain gossip."""
    topo = build_topology(name, n)
    x0 = np.random.default_rng(7).standard_normal((n, 2 * CHUNK + CHUNK // 2))
    options = GossipOptions(compression=compression, topk_fraction=0.05)
    got, _ = _run(topo, options, x0, 10)
    mix = choco_mix(topo.matrix(), REFERENCE[compression], options.resolved_consensus_step())
    expected = x0
    for _ in range(10):
        expected = mix(expected)
    # 1e-10: near consensus the differences are tiny, and a last-bit difference in the order of a sum can move an
    # int8 rounding by one quantum of a tiny scale (seen once: 7e-12 on ring(3))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)
    plain = np.linalg.matrix_power(topo.matrix(), 10) @ x0
    if n > 3:  # on ring(3), W = 11^T / 3: both reach the exact average within the ten steps
        assert np.abs(got - plain).max() > 1e-5  # compression is visible (int8 comes within 3e-4 of plain gossip)
    np.testing.assert_allclose(got.mean(0), x0.mean(0), rtol=0, atol=1e-12)  # CHOCO keeps the average


class _Exact(Compressor):
    """The identity: the difference sent whole, as raw bytes."""

    def wire_bytes(self, numel, dtype):
        return numel * torch.empty((), dtype=dtype).element_size()

    def encode(self, v, out):
        out[: self.wire_bytes(v.numel(), v.dtype)].view(v.dtype).copy_(v)

    def decode(self, payload, out):
        out.copy_(payload[: self.wire_bytes(out.numel(), out.dtype)].view(out.dtype))


def test_choco_with_an_exact_compressor_is_plain_gossip():
    """Q the identity and gamma 1: the public copies are the tensors themselves, and the step is x <- W x."""
    topo = ring(5)
    x0 = np.random.default_rng(8).standard_normal((5, 33))
    got, _ = _run(topo, GossipOptions(compression="int8", consensus_step=1.0), x0, 6, compressor=_Exact())
    np.testing.assert_allclose(got, np.linalg.matrix_power(topo.matrix(), 6) @ x0, rtol=0, atol=1e-12)


def test_compressed_messages_are_many_times_smaller_than_bf16():
    """Bytes a worker sends per step for a 1 M-element fp32 model on a ring, counted on the wire: bf16 halves fp32;
    int8 is about 4x below fp32, sign about 31x, top-1% 50x (fp32 values and int32 indices)."""
    topo, numel = ring(4), 1 << 20
    x0 = np.random.default_rng(9).standard_normal((4, numel)).astype(np.float32)
    sent = {}
    for label, options in {
        "fp32": GossipOptions(), "bf16": GossipOptions(wire_dtype="bf16"), "int8": GossipOptions(compression="int8"),
        "sign": GossipOptions(compression="sign"), "topk": GossipOptions(compression="topk", topk_fraction=0.01),
    }.items():
        sent[label] = _run(topo, options, x0, 2)[1][0] / 2
    assert sent["fp32"] / sent["bf16"] == pytest.approx(2, rel=1e-3)
    scale = 4 / CHUNK  # an fp32 scale per chunk, per element
    assert sent["bf16"] / sent["int8"] == pytest.approx(2 / (1 + scale), rel=1e-3)
    assert sent["bf16"] / sent["sign"] == pytest.approx(2 / (1 / 8 + scale), rel=1e-3)  # 15.5
    assert sent["bf16"] / sent["topk"] == pytest.approx(2 / (0.01 * 8), rel=1e-3)  # 25


@pytest.mark.parametrize("compression", ["int8", "sign", "topk"])
def test_each_compressor_reads_back_what_numpy_computes(compression):
    v = torch.tensor(np.random.default_rng(10).standard_normal(CHUNK + 77))
    v[3] = 0.0  # a zero: sign sends it as +scale
    compressor = build_compressor(compression, 0.05)
    payload = torch.zeros(compressor.wire_bytes(v.numel(), v.dtype), dtype=torch.uint8)
    compressor.encode(v, payload)
    out = torch.empty_like(v)
    compressor.decode(payload, out)
    np.testing.assert_allclose(out.numpy(), REFERENCE[compression](v.numpy()), rtol=0, atol=1e-15)


@pytest.mark.parametrize("compression", ["int8", "sign", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_roundtrip_of_many_rows_is_each_rows_encode_and_decode(compression, dtype):
    """What the simulator compresses for all replicas at once is, row by row, what a worker's decode reads back."""
    rows = torch.tensor(np.random.default_rng(11).standard_normal((5, 2 * CHUNK + 33)), dtype=dtype)
    rows[1, :CHUNK] = 0.0  # a chunk of zeros: int8's scale falls back to 1, sign's is 0
    compressor = build_compressor(compression, 0.05)  # REFERENCE's fraction
    together = compressor.roundtrip(rows)
    for row, got in zip(rows, together):
        payload = torch.zeros(compressor.wire_bytes(row.numel(), dtype), dtype=torch.uint8)
        compressor.encode(row, payload)
        alone = torch.empty_like(row)
        compressor.decode(payload, alone)
        assert torch.equal(got, alone)
        if dtype == torch.float32:
            np.testing.assert_allclose(got.double().numpy(), REFERENCE[compression](row.double().numpy()), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_topk_reads_back_the_largest_entries_for_every_dtype(dtype):
    """An odd number of kept 2-byte values: the int32 indices after them must still be aligned."""
    v = torch.tensor(np.random.default_rng(14).standard_normal(99), dtype=dtype)
    compressor = build_compressor("topk", 0.05)  # keeps 5
    payload = torch.zeros(compressor.wire_bytes(v.numel(), v.dtype) + 64, dtype=torch.uint8)[64:]
    compressor.encode(v, payload)
    out = torch.empty_like(v)
    compressor.decode(payload, out)
    keep = np.argsort(-np.abs(v.double().numpy()), kind="stable")[:5]
    expected = np.zeros(99)
    expected[keep] = v.double().numpy()[keep]
    np.testing.assert_array_equal(out.double().numpy(), expected)


def test_local_steps_and_staleness_refuse_a_module_with_two_optimizers():
    from lightning_dpgan.gossiper import Gossiper

    module = torch.nn.Linear(2, 2)
    optimizers = [torch.optim.SGD([module.weight], lr=0.1), torch.optim.SGD([module.bias], lr=0.1)]
    for options, setting in ((GossipOptions(every=2), "every=2"), (GossipOptions(staleness=1), "staleness=1")):
        with pytest.raises(ValueError, match=f"{setting} counts the steps of one mixed optimizer; this module steps 2"):
            Gossiper("ring", options, None, 0, True).attach(module, optimizers)
    Gossiper("ring", GossipOptions(every=2), None, 0, True).attach(module, optimizers[:1])  # one is fine


@pytest.mark.parametrize("overlap", [False, True])
def test_local_steps_mix_every_h_th_step(overlap):
    """``every=3``: seven steps mix after steps 3 and 6 only (overlapped: each mix lands at the next step)."""
    topo = ring(4)
    x0 = np.random.default_rng(11).standard_normal((4, 9))
    got, sent = _run(topo, GossipOptions(every=3, overlap=overlap), x0, 7)
    mix = every(lambda x: topo.matrix() @ x, 3)
    expected = x0
    for _ in range(7):
        expected = mix(expected)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    once, once_sent = _run(topo, GossipOptions(overlap=overlap), x0, 2)
    assert sent[0] == once_sent[0]  # two mixes' bytes in seven steps
    np.testing.assert_allclose(got, once, rtol=0, atol=1e-12)  # no input changes between mixes here


def test_choco_copies_resume_exactly_from_a_replica_state():
    """Five steps, the engine state and the copies saved; five more by fresh engines restored from them equal ten
    steps of one engine."""
    topo = ring(4)
    x0 = np.random.default_rng(12).standard_normal((4, 50))
    options = GossipOptions(compression="sign")
    straight, _ = _run(topo, options, x0, 10)

    def body(rank, transport):
        e = build_engine(topo, rank, options, transport)
        x = torch.tensor(x0[rank])
        for _ in range(5):
            e.step([x])
        saved, copies = e.state_dict(), e.replica_state()
        again = build_engine(topo, rank, options, transport)
        again.load_state_dict(saved)
        again.load_replica_state(copies)
        for before, after in zip(copies["choco_copies"], again.replica_state()["choco_copies"]):
            assert torch.equal(before, after)  # a checkpoint before the first mix keeps the restored copies
        for _ in range(5):
            again.step([x])
        return x.numpy()

    np.testing.assert_array_equal(np.stack(run_ranks(4, body)), straight)


def test_compression_and_local_steps_are_refused_where_they_cannot_work():
    with pytest.raises(ValueError, match="unknown compression 'zip'; allowed: none, int8, topk, sign"):
        GossipOptions(compression="zip")
    with pytest.raises(ValueError, match="compression='int8' gossips once per mixing step: it needs rounds=1"):
        GossipOptions(compression="int8", rounds=2)
    with pytest.raises(ValueError, match=r"topk_fraction must be a finite number in \(0, 1\], got 0"):
        GossipOptions(compression="topk", topk_fraction=0)
    with pytest.raises(ValueError, match="every .optimizer steps per mix. must be an integer"):
        GossipOptions(every=0)
    with pytest.raises(ValueError, match="staleness=2 needs every=1"):
        GossipOptions(staleness=2, every=4)
    assert GossipOptions(compression="none").compression is None
    with pytest.raises(TopologyError, match="compression='sign' keeps a copy of every neighbour, so it needs a static"):
        build_engine(build_topology("one_peer_exponential", 4), 0, GossipOptions(compression="sign"), transport=object())
    with pytest.raises(ValueError, match="compression='int8' sends its own format: leave wire_dtype unset, got 'bf16'"):
        GossipOptions(compression="int8", wire_dtype="bf16")
    # the default consensus steps
    assert GossipOptions(compression="topk", topk_fraction=0.01).resolved_consensus_step() == pytest.approx(0.02)
    assert GossipOptions(compression="topk", topk_fraction=0.6).resolved_consensus_step() == 1.0
    assert GossipOptions(compression="sign").resolved_consensus_step() == 0.2
    assert GossipOptions(compression="int8").resolved_consensus_step() == 1.0
    assert GossipOptions(compression="sign", consensus_step=0.7).resolved_consensus_step() == 0.7

