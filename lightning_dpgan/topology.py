"""Communication graphs and their mixing matrices.

A :class:`Topology` is a cycle of one or more mixing matrices ``W`` over ``world_size`` workers. Worker ``i``
replaces its vector by ``sum_j W[i, j] x_j``: it *receives* from the ``j`` with ``W[i, j] > 0`` and *sends* to the
``j`` with ``W[j, i] > 0``. Static graphs have one matrix; time-varying graphs (one-peer exponential) cycle
through several, one per gossip round.

Every matrix is validated at construction: square, finite, non-negative, rows and columns summing to one
(doubly stochastic, so the average is preserved) and, for static graphs, symmetric (so ``rho`` is a spectral
quantity and the paper's analysis applies). The union graph over one period must be connected.

This module deliberately imports numpy only: topology questions (``python -m lightning_dpgan topology``) are
answered before any torch process exists.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_dpgan.checks import check_choice, check_int

_TOL = 1e-8
#: the most workers a topology is built for: every process builds and checks the dense n x n W, which past this
#: takes minutes and gigabytes (the DPOSG and SGP papers report at most 256 workers)
MAX_WORLD_SIZE = 1024
#: the most gossip rounds per step: each round sends every neighbour the whole model, so 1000 rounds is 1000 times
#: the traffic of the default; a denser graph (exponential, one_peer_exponential) mixes faster for fewer bytes
MAX_ROUNDS = 1000
WEIGHTS = ("auto", "uniform", "metropolis")


class TopologyError(ValueError):
    """A topology, its parameters or its world size is invalid; the message names the value and what is allowed."""


@dataclass(frozen=True)
class Neighbours:
    """What one worker exchanges in one gossip round."""

    self_weight: float
    receive_from: tuple[int, ...]
    receive_weights: tuple[float, ...]
    send_to: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Topology:
    """A validated cycle of mixing matrices. Build one with :func:`build_topology` or the named constructors."""

    name: str
    matrices: tuple[np.ndarray, ...]
    directed: bool = False
    _rho_cache: dict[int, float] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.matrices:
            raise TopologyError(f"topology {self.name!r} has no mixing matrix")
        mats = tuple(np.array(m, dtype=np.float64, copy=True) for m in self.matrices)
        for m in mats:
            m.setflags(write=False)
        object.__setattr__(self, "matrices", mats)
        n = mats[0].shape[0] if mats[0].ndim == 2 else -1
        for k, w in enumerate(mats):
            _validate_matrix(self.name, w, n, k, require_symmetric=not self.directed)
        _validate_connected(self.name, mats)

    # ------------------------------------------------------------------ structure
    @property
    def world_size(self) -> int:
        return self.matrices[0].shape[0]

    @property
    def period(self) -> int:
        """Number of distinct matrices cycled through, one per gossip round."""
        return len(self.matrices)

    @property
    def is_time_varying(self) -> bool:
        return self.period > 1

    @property
    def is_complete(self) -> bool:
        """True when ``W = 11^T/n`` exactly: one all_reduce then does the whole mix."""
        n = self.world_size
        return not self.is_time_varying and bool(np.allclose(self.matrices[0], 1.0 / n, atol=1e-12))

    def matrix(self, phase: int = 0) -> np.ndarray:
        """The mixing matrix used in gossip round number ``phase`` (rounds count from 0 and never reset)."""
        return self.matrices[phase % self.period]

    def mixing_product(self, rounds: int, phase: int = 0) -> np.ndarray:
        """``W^t``: the product of the ``rounds`` matrices applied starting at round ``phase`` (latest on the left)."""
        product = np.eye(self.world_size)
        for r in range(rounds):
            product = self.matrix(phase + r) @ product
        return product

    def neighbours(self, rank: int, phase: int = 0) -> Neighbours:
        return neighbours_in(self.matrix(phase), rank)

    @property
    def degree(self) -> int:
        """Most messages any worker receives in one round (its in-degree in the worst round)."""
        return max(int(((w > 0).sum(axis=1) - 1).max()) for w in self.matrices)

    # ------------------------------------------------------------------ spectral
    def rho(self, rounds: int = 1) -> float:
        """``rho(W^t) = ||W^t - 11^T/n||_2``, worst over starting phases.

        Consensus error ``||X - X_bar||`` shrinks by at least this factor per mix; the consensus *distance*
        (squared) by its square. For symmetric ``W`` this is ``max(|lambda_2|, |lambda_n|)^t``.
        """
        check_rounds(rounds)
        if rounds not in self._rho_cache:
            n = self.world_size
            centred = np.eye(n) - 1.0 / n
            worst = 0.0
            for phase in range(self.period):
                worst = max(worst, float(np.linalg.norm(self.mixing_product(rounds, phase) @ centred, 2)))
            self._rho_cache[rounds] = worst
        return self._rho_cache[rounds]

    @property
    def rho_per_round(self) -> float:
        """Contraction per round: ``rho(W)``, or ``rho(W_period...W_1)^(1/period)`` for time-varying graphs."""
        return self.rho(self.period) ** (1.0 / self.period)

    @property
    def spectral_gap(self) -> float:
        return 1.0 - self.rho_per_round

    def eigenvalues(self) -> np.ndarray:
        """Eigenvalues of a static symmetric ``W``, descending."""
        if self.is_time_varying or self.directed:
            raise TopologyError(f"topology {self.name!r} is time-varying or directed: use rho() instead of eigenvalues")
        return np.sort(np.linalg.eigvalsh(self.matrices[0]))[::-1]

    def rounds_to_shrink(self, factor: float, max_rounds: int = 100_000) -> int:
        """Fewest gossip rounds ``t`` per mix such that one mix shrinks consensus distance by ``factor``.

        Consensus distance is the squared error, so the condition is ``rho(W^t)^2 <= 1/factor``.
        """
        if not factor > 1:
            raise TopologyError(f"shrink factor must be > 1, got {factor!r}")
        if self.world_size == 1:
            return 1
        if not self.is_time_varying:
            rho = self.rho(1)
            if rho <= _TOL:
                return 1
            return max(1, math.ceil(math.log(factor) / (-2.0 * math.log(rho)) - 1e-12))
        target = 1.0 / math.sqrt(factor)
        for t in range(1, max_rounds + 1):
            if self.rho(t) <= target + 1e-12:
                return t
        raise TopologyError(f"topology {self.name!r} does not shrink by {factor} within {max_rounds} rounds")

    def flood_rounds(self) -> int:
        """Rounds until news from any worker has reached every worker, passed on in every message (worst over
        sources and starting phases): how far ahead a stop must be announced for all workers to hear of it."""
        n = self.world_size
        supports = [(w > _TOL) for w in self.matrices]  # support[i, j]: i receives from j
        worst = 0
        for phase in range(self.period):
            reached = np.eye(n, dtype=bool)  # reached[i, o]: worker i has heard from origin o
            rounds = 0
            while not reached.all():
                support = supports[(phase + rounds) % self.period]
                reached = (support.astype(np.int64) @ reached.astype(np.int64)) > 0
                rounds += 1
            worst = max(worst, rounds)
        return worst

    def fingerprint(self) -> str:
        """A digest of the graph itself: the world size and every matrix, weights rounded to 1e-12. Names repeat (a
        torus of another shape, a random_regular of another seed, any custom graph), so a resume that holds state
        per neighbour (CHOCO's public copies) compares this instead."""
        digest = hashlib.sha256(f"{self.world_size}x{self.period}".encode())
        for w in self.matrices:
            digest.update(np.ascontiguousarray(np.round(w, 12) + 0.0).tobytes())  # + 0.0: -0.0 hashes as 0.0
        return digest.hexdigest()[:16]

    def summary(self, rounds: int = 1) -> dict[str, Any]:
        return {
            "topology": self.name,
            "world_size": self.world_size,
            "period": self.period,
            "degree": self.degree,
            "spectral_gap": self.spectral_gap,
            "rho": self.rho_per_round,
            "gossip_rounds": rounds,
            "rho(W^t)": self.rho(rounds),
            "rounds_to_shrink_100x": self.rounds_to_shrink(100.0),
        }


def neighbours_in(w: np.ndarray, rank: int) -> Neighbours:
    """What ``rank`` exchanges in one round of the mixing matrix ``w``."""
    row = w[rank]
    receive_from = tuple(int(j) for j in np.flatnonzero(row > 0) if j != rank)
    send_to = tuple(int(j) for j in np.flatnonzero(w[:, rank] > 0) if j != rank)
    return Neighbours(
        self_weight=float(row[rank]),
        receive_from=receive_from,
        receive_weights=tuple(float(row[j]) for j in receive_from),
        send_to=send_to,
    )


def fold(w: np.ndarray, keep: Sequence[int]) -> np.ndarray:
    """``W`` restricted to the workers ``keep`` (in that order), each dropped neighbour's weight added to the
    diagonal: what the survivors of a departure mix with while they finish the mixes begun before it. Rows stay
    stochastic; a symmetric ``W`` folds to a symmetric, so doubly stochastic, matrix (docs/guide.md: live
    membership)."""
    keep = list(keep)
    dropped = [j for j in range(w.shape[0]) if j not in set(keep)]
    folded = np.array(w[np.ix_(keep, keep)], dtype=np.float64)
    folded[np.diag_indices(len(keep))] += w[np.ix_(keep, dropped)].sum(axis=1)  # exactly 0 without a lost neighbour
    return folded


def rebuild(name: str | Topology, world_size: int, **options: Any) -> tuple[Topology, str | None]:
    """The graph of the same family for a new member count, or a ring where the family does not fit it (a torus at a
    prime count, a built graph, a hypercube off a power of two): ``(topology, why a ring)``."""
    if isinstance(name, Topology) or name == "custom":
        family = name.name if isinstance(name, Topology) else name
        return ring(world_size), f"topology {family!r} was built for a fixed set of workers"
    try:
        return build_topology(name, world_size, **options), None
    except TopologyError as err:
        return ring(world_size), str(err)


# ---------------------------------------------------------------------- stages
def check_rounds(rounds: Any) -> None:
    """``gossip_rounds`` (``t``): an integer in ``[1, MAX_ROUNDS]``."""
    check_int("gossip_rounds", rounds, 1, MAX_ROUNDS, error=TopologyError, why="each round sends every neighbour the whole model")


def _validate_matrix(name: str, w: np.ndarray, n: int, phase: int, require_symmetric: bool) -> None:
    where = f"topology {name!r}" + (f" (round {phase})" if phase else "")
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] < 1:
        raise TopologyError(f"{where}: mixing matrix must be square n x n with n >= 1, got shape {w.shape}")
    if w.shape[0] != n:
        raise TopologyError(f"{where}: every matrix must be {n} x {n}, got {w.shape}")
    if not np.all(np.isfinite(w)):
        raise TopologyError(f"{where}: mixing matrix has non-finite entries")
    if w.min() < -_TOL:
        i, j = np.unravel_index(int(np.argmin(w)), w.shape)
        raise TopologyError(f"{where}: W[{i},{j}] = {w[i, j]:.6g} is negative; weights must be >= 0")
    rows, cols = w.sum(axis=1), w.sum(axis=0)
    if not np.allclose(rows, 1.0, atol=1e-6):
        i = int(np.argmax(np.abs(rows - 1)))
        raise TopologyError(f"{where}: row {i} sums to {rows[i]:.6g}; W must be doubly stochastic (rows sum to 1)")
    if not np.allclose(cols, 1.0, atol=1e-6):
        j = int(np.argmax(np.abs(cols - 1)))
        raise TopologyError(
            f"{where}: column {j} sums to {cols[j]:.6g}; W must be doubly stochastic (columns sum to 1)"
        )
    if require_symmetric and not np.allclose(w, w.T, atol=1e-9):
        i, j = np.unravel_index(int(np.argmax(np.abs(w - w.T))), w.shape)
        raise TopologyError(
            f"{where}: W[{i},{j}] = {w[i, j]:.6g} but W[{j},{i}] = {w[j, i]:.6g}; a static W must be symmetric"
        )


def _components(support: np.ndarray) -> int:
    n = support.shape[0]
    seen = np.zeros(n, dtype=bool)
    count = 0
    for start in range(n):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            i = stack.pop()
            for j in np.flatnonzero(support[i] & ~seen):
                seen[j] = True
                stack.append(int(j))
    return count


def _validate_connected(name: str, mats: Sequence[np.ndarray]) -> None:
    # For doubly stochastic matrices weak connectivity of the union graph implies strong connectivity.
    support = np.zeros(mats[0].shape, dtype=bool)
    for w in mats:
        support |= (w > _TOL) | (w.T > _TOL)
    parts = _components(support)
    if parts > 1:
        over = " over one period" if len(mats) > 1 else ""
        raise TopologyError(f"topology {name!r} is not connected{over}: it has {parts} components; gossip needs one")


# ---------------------------------------------------------------------- weights
def _weights_from_neighbours(name: str, nbrs: Sequence[set[int]], weights: str) -> np.ndarray:
    """Mixing weights for an undirected graph: ``uniform`` (regular graphs) or Metropolis-Hastings."""
    check_choice("weights", weights, WEIGHTS, error=TopologyError)
    n = len(nbrs)
    degrees = [len(s) for s in nbrs]
    if weights == "auto":
        weights = "uniform" if len(set(degrees)) <= 1 else "metropolis"
    w = np.zeros((n, n))
    if weights == "uniform":
        if len(set(degrees)) > 1:
            raise TopologyError(
                f"topology {name!r}: uniform weights need a regular graph, but degrees range from "
                f"{min(degrees)} to {max(degrees)}; use weights='metropolis'"
            )
        for i, s in enumerate(nbrs):
            for j in s:
                w[i, j] = 1.0 / (degrees[i] + 1)
    else:  # metropolis
        for i, s in enumerate(nbrs):
            for j in s:
                w[i, j] = 1.0 / (1 + max(degrees[i], degrees[j]))
    w[np.diag_indices(n)] = 1.0 - w.sum(axis=1)
    return w


def _check_world_size(name: str, n: Any, minimum: int = 1) -> int:
    return check_int(f"topology {name!r}: world size", n, minimum, error=TopologyError)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _graph(name: str, nbrs: Sequence[set[int]], weights: str) -> Topology:
    return Topology(name, (_weights_from_neighbours(name, nbrs, weights),))


# ---------------------------------------------------------------------- named graphs
def ring(world_size: int, weights: str = "auto") -> Topology:
    """Each worker talks to ``i - 1`` and ``i + 1``; a ring of 2 has a single peer."""
    n = _check_world_size("ring", world_size)
    return _graph("ring", [{(i - 1) % n, (i + 1) % n} - {i} for i in range(n)], weights)


def torus(world_size: int, shape: Sequence[int] | None = None, weights: str = "auto") -> Topology:
    """2-D torus ``rows x cols``: four neighbours (fewer where a side has length 2). Default: the squarest grid."""
    n = _check_world_size("torus", world_size)
    if shape is None:
        rows = max((r for r in range(2, math.isqrt(n) + 1) if n % r == 0), default=None)
        if rows is None:
            raise TopologyError(
                f"topology 'torus' needs world size = rows x cols with rows, cols >= 2; {n} has no such factors"
                " (allowed: 4, 6, 8, 9, ...)"
            )
        shape = (rows, n // rows)
    rows, cols = (int(s) for s in shape)
    if rows < 2 or cols < 2 or rows * cols != n:
        raise TopologyError(f"topology 'torus': shape {tuple(shape)} must have rows, cols >= 2 and rows x cols = {n}")

    def at(r: int, c: int) -> int:
        return (r % rows) * cols + (c % cols)

    nbrs = [
        {at(r - 1, c), at(r + 1, c), at(r, c - 1), at(r, c + 1)} - {at(r, c)} for r in range(rows) for c in range(cols)
    ]
    return _graph("torus", nbrs, weights)


def exponential(world_size: int, weights: str = "auto") -> Topology:
    """Static exponential graph: neighbours ``i +- 2^k`` for ``2^k < n`` (undirected, so W is symmetric)."""
    n = _check_world_size("exponential", world_size)
    offsets = [2**k for k in range(max(1, math.ceil(math.log2(n))))] if n > 1 else []
    nbrs = [{(i + s * o) % n for o in offsets for s in (1, -1)} - {i} for i in range(n)]
    return _graph("exponential", nbrs, weights)


def one_peer_exponential(world_size: int) -> Topology:
    """Time-varying one-peer exponential graph (Ying et al., NeurIPS 2021).

    In round ``k`` worker ``i`` averages with ``i + 2^(k mod tau)``, ``tau = ceil(log2 n)``:
    ``W_k = (I + P^(2^k)) / 2``. Each matrix is doubly stochastic but directed; for ``n`` a power of two the
    product over one period is exactly ``11^T/n``.
    """
    n = _check_world_size("one_peer_exponential", world_size)
    if n == 1:
        return Topology("one_peer_exponential", (np.ones((1, 1)),))
    tau = math.ceil(math.log2(n))
    mats = []
    for k in range(tau):
        w = 0.5 * np.eye(n)
        for i in range(n):
            w[i, (i + 2**k) % n] += 0.5
        mats.append(w)
    return Topology("one_peer_exponential", tuple(mats), directed=True)


def hypercube(world_size: int) -> Topology:
    """``d``-dimensional hypercube: neighbours ``i XOR 2^k``; needs ``n = 2^d``."""
    n = _check_world_size("hypercube", world_size)
    if not _is_power_of_two(n):
        raise TopologyError(f"topology 'hypercube' needs a power-of-two world size (1, 2, 4, 8, ...), got {n}")
    dims = n.bit_length() - 1
    return _graph("hypercube", [{i ^ (1 << k) for k in range(dims)} for i in range(n)], "uniform")


def complete(world_size: int) -> Topology:
    """Everyone averages with everyone: ``W = 11^T/n``, executed as one all_reduce."""
    n = _check_world_size("complete", world_size)
    return Topology("complete", (np.full((n, n), 1.0 / n),))


def star(world_size: int) -> Topology:
    """Worker 0 is the hub; Metropolis-Hastings weights keep W doubly stochastic."""
    n = _check_world_size("star", world_size)
    nbrs = [set(range(1, n))] + [{0} for _ in range(1, n)]
    return _graph("star", nbrs, "metropolis")


def random_regular(world_size: int, degree: int | None = None, seed: int = 0, weights: str = "auto") -> Topology:
    """A seeded, connected random ``degree``-regular graph (the same on every worker for the same seed)."""
    n = _check_world_size("random_regular", world_size)
    if degree is None:
        degree = next((d for d in (3, 2, 1, 0) if d < n and (n * d) % 2 == 0), 0)
    degree = check_int("topology 'random_regular': degree", degree, 0, n - 1, error=TopologyError)
    if (n * degree) % 2:
        raise TopologyError(f"topology 'random_regular': world size x degree must be even, got {n} x {degree}")
    if n > 1 and degree == 0:
        raise TopologyError(f"topology 'random_regular': degree 0 is disconnected for world size {n}; use >= 1")
    if n > 2 and degree == 1:
        raise TopologyError(f"topology 'random_regular': degree 1 is disconnected for world size {n}; use >= 2")
    rng = np.random.default_rng(seed)
    for _ in range(10_000):
        nbrs = _pair_stubs(n, degree, rng)
        if nbrs is not None and _components(_support(nbrs)) == 1:
            return _graph("random_regular", nbrs, weights)
    raise TopologyError(f"topology 'random_regular': no connected {degree}-regular graph on {n} nodes found")


def _pair_stubs(n: int, degree: int, rng: np.random.Generator) -> list[set[int]] | None:
    """One try of the configuration model; ``None`` on a self-loop or repeated edge."""
    stubs = rng.permutation(np.repeat(np.arange(n), degree))
    nbrs: list[set[int]] = [set() for _ in range(n)]
    for a, b in zip(stubs[::2], stubs[1::2]):
        a, b = int(a), int(b)
        if a == b or b in nbrs[a]:
            return None
        nbrs[a].add(b)
        nbrs[b].add(a)
    return nbrs


def _support(nbrs: Sequence[set[int]]) -> np.ndarray:
    s = np.eye(len(nbrs), dtype=bool)
    for i, js in enumerate(nbrs):
        s[i, list(js)] = True
    return s


def custom(
    world_size: int | None = None,
    matrix: Any = None,
    matrices: Sequence[Any] | None = None,
    edges: Mapping[tuple[int, int], float] | Sequence[Sequence[float]] | None = None,
    weights: str = "auto",
) -> Topology:
    """A user-supplied topology: one ``matrix``, a cycle of ``matrices``, or an undirected graph ``edges``.

    ``edges`` is either a list of ``(i, j)`` pairs (weights from ``weights``: uniform or Metropolis-Hastings)
    or a mapping ``{(i, j): w_ij}`` of off-diagonal weights; the self weight fills each row to 1.
    """
    given = sum(x is not None for x in (matrix, matrices, edges))
    if given != 1:
        raise TopologyError("topology 'custom' needs exactly one of matrix=, matrices= or edges=")
    if matrix is not None:
        mats: tuple[np.ndarray, ...] = (np.asarray(matrix, dtype=np.float64),)
    elif matrices is not None:
        mats = tuple(np.asarray(m, dtype=np.float64) for m in matrices)
    else:
        mats = (_matrix_from_edges(world_size, edges, weights),)
    if world_size is not None and mats and mats[0].shape[0] != world_size:
        raise TopologyError(f"topology 'custom' has {mats[0].shape[0]} workers but the world size is {world_size}")
    return Topology("custom", mats, directed=len(mats) > 1)


def _matrix_from_edges(world_size: int | None, edges: Any, weights: str) -> np.ndarray:
    pairs = list(edges.keys()) if isinstance(edges, Mapping) else [tuple(e) for e in edges]
    for e in pairs:
        if len(e) != 2:
            raise TopologyError(f"topology 'custom': an edge must be a pair (i, j), got {e!r}")
    n = world_size if world_size is not None else 1 + max((max(e) for e in pairs), default=0)
    for i, j in pairs:
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise TopologyError(f"topology 'custom': edge {(i, j)} must join two distinct ranks in [0, {n - 1}]")
    if not isinstance(edges, Mapping):
        nbrs: list[set[int]] = [set() for _ in range(n)]
        for i, j in pairs:
            nbrs[int(i)].add(int(j))
            nbrs[int(j)].add(int(i))
        return _weights_from_neighbours("custom", nbrs, weights)
    w = np.zeros((n, n))
    for (i, j), v in edges.items():
        w[i, j] = w[j, i] = float(v)
    w[np.diag_indices(n)] = 1.0 - w.sum(axis=1)
    return w


TOPOLOGIES: dict[str, Callable[..., Topology]] = {
    "ring": ring,
    "torus": torus,
    "exponential": exponential,
    "one_peer_exponential": one_peer_exponential,
    "hypercube": hypercube,
    "complete": complete,
    "star": star,
    "random_regular": random_regular,
    "custom": custom,
}


def build_topology(name: str | Topology, world_size: int, **options: Any) -> Topology:
    """Build a named topology for ``world_size`` workers, or check a given one against it."""
    check_int("world size (devices x num_nodes)", world_size, 1, MAX_WORLD_SIZE, error=TopologyError,
              why="every worker builds and checks the dense n x n mixing matrix")
    if isinstance(name, Topology):
        if name.world_size != world_size:
            raise TopologyError(
                f"topology {name.name!r} was built for {name.world_size} workers but the world size is {world_size}"
            )
        return name
    check_choice("topology", name, TOPOLOGIES, error=TopologyError)
    try:
        return TOPOLOGIES[name](world_size, **options)
    except TypeError as err:  # an option the constructor does not take
        raise TopologyError(f"topology {name!r}: bad options {sorted(options)}: {err}") from None
