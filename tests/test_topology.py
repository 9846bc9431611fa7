"""Topologies against hand-derived weights and spectra; every bad input raises its documented error."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from lightning_dpgan import topology as T
from lightning_dpgan.topology import TopologyError, build_topology

STATIC = [
    ("ring", 8, {}),
    ("ring", 3, {}),
    ("torus", 9, {}),
    ("torus", 8, {"shape": (2, 4)}),
    ("exponential", 8, {}),
    ("exponential", 6, {}),
    ("hypercube", 8, {}),
    ("complete", 5, {}),
    ("star", 6, {}),
    ("random_regular", 10, {"degree": 3, "seed": 7}),
]


def test_ring8_weights_and_lambda2_by_hand():
    w = T.ring(8).matrix()
    expected = np.zeros((8, 8))
    for i in range(8):
        expected[i, [i, (i - 1) % 8, (i + 1) % 8]] = 1 / 3
    np.testing.assert_allclose(w, expected)
    lam = T.ring(8).eigenvalues()
    assert lam[1] == pytest.approx((1 + 2 * math.cos(2 * math.pi / 8)) / 3, abs=1e-12)
    assert lam[1] == pytest.approx(0.805, abs=1e-3)
    assert T.ring(8).rho(1) == pytest.approx(lam[1])


def test_ring_of_two_has_one_peer():
    nb = T.ring(2).neighbours(0)
    assert nb.receive_from == (1,) and nb.send_to == (1,)
    np.testing.assert_allclose(T.ring(2).matrix(), np.full((2, 2), 0.5))


@pytest.mark.parametrize("name,n,options", STATIC)
def test_static_matrices_are_symmetric_doubly_stochastic(name, n, options):
    w = build_topology(name, n, **options).matrix()
    assert w.shape == (n, n)
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w.sum(0), 1)
    np.testing.assert_allclose(w.sum(1), 1)
    assert w.min() >= 0


@pytest.mark.parametrize("name,n,options", STATIC)
def test_rho_of_wt_is_second_largest_singular_value(name, n, options):
    topo = build_topology(name, n, **options)
    w = topo.matrix()
    eig = np.sort(np.abs(np.linalg.eigvalsh(w)))[::-1]
    rho = eig[1] if n > 1 else 0.0  # the largest |eigenvalue| is 1 (the consensus direction)
    for t in (1, 2, 3):
        assert topo.rho(t) == pytest.approx(rho**t, abs=1e-10)
    assert topo.spectral_gap == pytest.approx(1 - rho, abs=1e-10)


@pytest.mark.parametrize("name,n,options", STATIC + [("one_peer_exponential", 8, {}), ("one_peer_exponential", 6, {})])
def test_rounds_to_shrink_is_smallest_sufficient(name, n, options):
    topo = build_topology(name, n, **options)
    n_ = topo.world_size
    centred = np.eye(n_) - 1 / n_

    def shrink(t: int) -> float:  # worst-case squared contraction of t rounds, by brute force
        worst = 0.0
        for phase in range(topo.period):
            p = np.eye(n_)
            for r in range(t):
                p = topo.matrices[(phase + r) % topo.period] @ p
            worst = max(worst, np.linalg.norm(p @ centred, 2) ** 2)
        return worst

    for factor in (10.0, 100.0):
        t = topo.rounds_to_shrink(factor)
        assert shrink(t) <= 1 / factor + 1e-9
        if t > 1:
            assert shrink(t - 1) > 1 / factor


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_one_peer_exponential_averages_exactly_over_a_period(n):
    topo = T.one_peer_exponential(n)
    assert topo.period == int(math.log2(n)) and topo.degree == 1
    np.testing.assert_allclose(topo.mixing_product(topo.period), np.full((n, n), 1 / n), atol=1e-12)
    for k in range(topo.period):  # round k pairs i with i + 2^k
        nb = topo.neighbours(0, k)
        assert nb.receive_from == (2**k % n,) and nb.self_weight == 0.5


def test_star_metropolis_weights_by_hand():
    n = 5
    w = T.star(n).matrix()
    assert w[0, 0] == pytest.approx(1 / n) and w[0, 3] == pytest.approx(1 / n)
    assert w[3, 3] == pytest.approx(1 - 1 / n) and w[3, 1] == 0


def test_hypercube_and_torus_neighbours():
    assert set(T.hypercube(8).neighbours(5).receive_from) == {4, 7, 1}
    assert set(T.torus(9).neighbours(4).receive_from) == {1, 7, 3, 5}
    assert T.torus(12).matrix().shape == (12, 12)
    assert set(T.exponential(8).neighbours(0).receive_from) == {1, 2, 4, 6, 7}


def test_random_regular_is_seeded_regular_and_connected():
    a, b = T.random_regular(12, degree=3, seed=5), T.random_regular(12, degree=3, seed=5)
    np.testing.assert_array_equal(a.matrix(), b.matrix())
    assert not np.array_equal(a.matrix(), T.random_regular(12, degree=3, seed=6).matrix())
    assert all(len(a.neighbours(i).receive_from) == 3 for i in range(12))
    assert a.rho(1) < 1


def test_custom_from_matrix_edges_and_weighted_graph():
    w = [[0.5, 0.5, 0], [0.5, 0.25, 0.25], [0, 0.25, 0.75]]
    np.testing.assert_allclose(T.custom(matrix=w).matrix(), w)
    path = T.custom(world_size=3, edges=[(0, 1), (1, 2)])  # Metropolis: 1/(1+max deg) = 1/3
    np.testing.assert_allclose(path.matrix(), [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    weighted = T.custom(edges={(0, 1): 0.3, (1, 2): 0.2})
    np.testing.assert_allclose(weighted.matrix(), [[0.7, 0.3, 0], [0.3, 0.5, 0.2], [0, 0.2, 0.8]])


def test_complete_is_detected_for_all_reduce():
    assert T.complete(4).is_complete and T.ring(3).is_complete and not T.ring(4).is_complete


def test_topology_module_does_not_import_torch():
    """``topology.py`` and the pure-Python checks it uses, loaded alone: numpy only. (Importing them through the
    package loads torch, because ``import lightning_dpgan`` registers the strategy with Lightning.)"""
    import subprocess
    import sys

    from lightning_dpgan import checks

    code = (
        "import importlib.util, sys, types\n"
        "package = types.ModuleType('lightning_dpgan'); package.__path__ = []; sys.modules['lightning_dpgan'] = package\n"
        "for name, path in (('lightning_dpgan.checks', sys.argv[1]), ('lightning_dpgan.topology', sys.argv[2])):\n"
        "    spec = importlib.util.spec_from_file_location(name, path); m = importlib.util.module_from_spec(spec)\n"
        "    sys.modules[name] = m; spec.loader.exec_module(m)\n"
        "assert sys.modules['lightning_dpgan.topology'].ring(8).world_size == 8\n"
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code, checks.__file__, T.__file__], capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr


BAD = [
    (lambda: build_topology("rng", 4), r"unknown topology 'rng'; allowed: ring, torus"),
    (lambda: T.torus(7), r"'torus' needs world size = rows x cols .* 7 has no such factors"),
    (lambda: T.torus(8, shape=(3, 3)), r"shape \(3, 3\) must have rows, cols >= 2 and rows x cols = 8"),
    (lambda: T.hypercube(6), r"'hypercube' needs a power-of-two world size .* got 6"),
    (lambda: T.ring(0), r"'ring': world size must be an integer >= 1, got 0"),
    (lambda: T.random_regular(5, degree=3), r"world size x degree must be even, got 5 x 3"),
    (lambda: T.random_regular(4, degree=4), r"degree must be an integer in \[0, 3\], got 4"),
    (lambda: T.ring(6, weights="max"), r"unknown weights 'max'; allowed: auto, uniform, metropolis"),
    (lambda: T.custom(matrix=[[0.5, 0.5], [0.2, 0.8]]), r"column 0 sums to 0.7; W must be doubly stochastic"),
    (lambda: T.custom(matrix=[[1.2, -0.2], [-0.2, 1.2]]), r"W\[0,1\] = -0.2 is negative; weights must be >= 0"),
    (lambda: T.custom(matrix=[[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.3, 0.2, 0.5]]), r"a static W must be symmetric"),
    (lambda: T.custom(matrix=np.eye(3)), r"'custom' is not connected: it has 3 components"),
    (lambda: T.custom(matrix=np.ones((2, 3)) / 3), r"must be square n x n"),
    (lambda: T.custom(world_size=4, matrix=np.eye(2)), r"'custom' has 2 workers but the world size is 4"),
    (lambda: T.custom(world_size=3, edges=[(0, 3)]), r"edge \(0, 3\) must join two distinct ranks in \[0, 2\]"),
    (lambda: T.custom(world_size=3), r"needs exactly one of matrix=, matrices= or edges="),
    (lambda: build_topology(T.ring(4), 8), r"'ring' was built for 4 workers but the world size is 8"),
    (lambda: build_topology("ring", 4, degree=2), r"topology 'ring': bad options \['degree'\]"),
    (lambda: T.ring(4).rho(0), r"gossip_rounds must be an integer in \[1, 1000\], got 0"),
    (lambda: T.ring(4).rounds_to_shrink(0.5), r"shrink factor must be > 1, got 0.5"),
    (lambda: T.one_peer_exponential(4).eigenvalues(), r"time-varying or directed"),
]


@pytest.mark.parametrize("make,message", BAD)
def test_bad_topology_raises_documented_error(make, message):
    with pytest.raises(TopologyError, match=message):
        make()


@pytest.mark.parametrize("name,n,left", [("ring", 4, [2]), ("ring", 8, [3, 4]), ("torus", 9, [4]), ("exponential", 8, [0])])
def test_a_fold_keeps_every_survivor_doubly_stochastic_and_touches_only_the_lost_neighbours_rows(name, n, left):
    """``W_fold`` (live membership, docs/guide.md): the survivors' block of ``W``, each lost weight on the diagonal."""
    w = build_topology(name, n).matrix()
    keep = [r for r in range(n) if r not in left]
    folded = T.fold(w, keep)
    np.testing.assert_allclose(folded, folded.T, atol=1e-15)
    np.testing.assert_allclose(folded.sum(axis=0), 1.0, atol=1e-15)
    assert (folded >= 0).all()
    for i, r in enumerate(keep):
        lost = w[r, left].sum()
        assert folded[i, i] == pytest.approx(w[r, r] + lost, abs=1e-15)
        if lost == 0:  # a survivor with no lost neighbour mixes exactly as before
            np.testing.assert_array_equal(folded[i], w[r, keep])


def test_rebuild_keeps_the_family_or_says_why_a_ring():
    topology, why = T.rebuild("torus", 6)
    assert topology.name == "torus" and topology.world_size == 6 and why is None
    topology, why = T.rebuild("torus", 7)
    assert topology.name == "ring" and topology.world_size == 7 and "7 has no such factors" in why
    topology, why = T.rebuild("hypercube", 3)
    assert topology.name == "ring" and "power-of-two" in why
    topology, why = T.rebuild(T.ring(5), 4)
    assert topology.name == "ring" and "built for a fixed set of workers" in why
