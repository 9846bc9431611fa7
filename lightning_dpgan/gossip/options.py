"""``GossipOptions``: every setting of how replicas gossip, in one frozen object checked once, where it is built.

The strategy, the engine and the command line all take this one object (the CLI's shortcuts ``gossip_rounds=``,
``wire_dtype=``, ``staleness=``, ``gossip_every=``, ``compression=`` and ``membership=`` fill it in), so a setting is validated in one place and a new one is added in one place.
No torch here: the command line checks its options before torch is loaded.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any

from lightning_dpgan.checks import check_bool, check_choice, check_int, check_number
from lightning_dpgan.topology import MAX_ROUNDS, TopologyError

#: names of the wire dtypes; None, "fp32" and "float32" send the tensors' own dtype
WIRE_DTYPE_NAMES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
DEFAULT_CHUNK_BYTES = 256 * 1024
#: an automatic peer timeout is at least this many seconds, and this many step times (docs/reliability.md)
PEER_TIMEOUT_FLOOR_S = 60.0
PEER_TIMEOUT_STEPS = 100
#: the most steps a neighbour's anchors may be old: each worker keeps ``s + 1`` whole messages of every neighbour
#: posted, and anchors that old no longer help the mix (docs/guide.md: bounded staleness)
MAX_STALENESS = 32
#: compressed gossip (CHOCO): the compressors. The consensus step ``gamma`` each gets by default
#: (:meth:`GossipOptions.default_consensus_step`) was measured to converge on every static topology shipped, at every
#: world size up to 64, over thousands of rounds: 1 for int8, ``SIGN_STEP`` for sign and
#: ``min(1, TOPK_STEP_PER_FRACTION * topk_fraction)`` for topk (docs/guide.md: compressed gossip, the consensus step)
COMPRESSIONS = ("int8", "topk", "sign")
#: elements per scale of ``int8`` and ``sign`` (a chunk of a packed bucket, across tensor boundaries)
CHUNK = 1024
#: topk's default ``gamma`` per unit of ``topk_fraction``: 2 converged on every graph measured, 3 diverged on most
#: (the old 4 diverged after 1,000-2,000 rounds): the bound follows the fraction, not the graph
TOPK_STEP_PER_FRACTION = 2.0
#: sign's default ``gamma``: sign stalls at a floor at any step; 0.2 had the lowest floors and smallest rebounds
SIGN_STEP = 0.2
#: who takes part in a run: ``"fixed"``, the workers it started with, a lost one ending the run; ``"live"``, the
#: workers still there, agreed on again whenever one leaves (docs/membership.md)
MEMBERSHIPS = ("fixed", "live")
#: ``fit(ckpt_path=JOIN)`` (``ckpt_path=join`` on the command line): a worker started alone joins the newest live run
#: in the c10d store at ``MASTER_ADDR:MASTER_PORT``, from a member's replica (docs/guide.md: live membership)
JOIN = "join"


@dataclass(frozen=True)
class GossipOptions:
    """How replicas gossip.

    Args:
        rounds: ``t``, rounds of neighbour averaging per optimizer step: workers mix with ``W^t``.
        wire_dtype: ``"bf16"`` or ``"fp16"`` halve the bytes on the wire (the sum stays in the tensors' own dtype);
            ``None`` or ``"fp32"`` send the tensors as they are.
        chunk_bytes: on CPU (gloo), messages go out in chunks of this size, receives posted before sends, which
            keeps both directions of a link busy, and a large message in segments of several chunks, each packed
            and combined while others travel; ``None`` sends each message whole, in one piece.
        overlap: leave each step's mix on the wire while the next forward and backward run, and apply it after the
            next optimizer step (docs/guide.md: overlapped DPOSG).
        mixing: ``False`` turns communication off (local training, an ablation); consensus is still measured.
        staleness: ``s``: a worker mixes with the newest anchors it holds from each neighbour as long as none is more
            than ``s`` steps old, and waits only for a neighbour more than ``s`` steps behind (docs/guide.md: bounded
            staleness). ``0`` is DPOSG as written, every step waiting for every neighbour. Needs one round per step,
            no overlap, a static topology, CPU tensors (gloo), and one mixed optimizer.
        catch_up: with ``staleness``: a worker that finds a neighbour ``s`` steps ahead of it (waiting on it) skips
            computing and only mixes, step after step, until no neighbour is ahead; a host up to ``s + 1`` times
            slower than its neighbours then keeps their pace, contributing fewer gradients (docs/guide.md: catching
            up). Steps stay counted alike on every rank, so stops and checkpoints are unchanged.
        every: ``H``, local steps: mix on every ``H``-th optimizer step only, the steps between are the replica's own
            (DiLoCo-style); ``1`` mixes every step. ``H > 1`` needs one mixed optimizer (a fused G+D step, as
            ``DPGAN``'s): steps are counted over all of them.
        compression: ``"int8"``, ``"topk"`` or ``"sign"``: gossip compressed differences with error feedback
            (CHOCO-gossip, docs/guide.md: compressed gossip); ``None`` sends the tensors. Needs one round per step,
            no overlap, no staleness, no ``wire_dtype``, and a static topology.
        topk_fraction: the fraction of entries ``topk`` sends.
        consensus_step: CHOCO's ``gamma`` in ``(0, 1]``; ``None``: 1 for int8, 0.2 for sign, ``min(1, 2 * topk_fraction)``
            for topk, measured to converge on every static topology shipped up to 64 workers (a larger top-k step
            diverges after hundreds of rounds). A larger one given warns (:meth:`check_topology`).
        peer_timeout: seconds to wait for a neighbour's message before failing with its rank
            (:class:`~lightning_dpgan.gossip.GossipPeerError`). ``None``: follow the run, the larger of
            ``PEER_TIMEOUT_FLOOR_S`` and ``PEER_TIMEOUT_STEPS`` median step times, and ``startup_timeout`` during
            the first steps.
        startup_timeout: seconds for the workers to find each other (rendezvous), and for Lightning's own
            collectives (checkpoints, ``sync_dist``).
        membership: ``"fixed"``: a worker that dies or stays silent past the peer timeout ends the run
            (:class:`~lightning_dpgan.gossip.GossipPeerError`). ``"live"``: the others agree on who is left and go
            on from their replicas, on a graph of the same family rebuilt for them (docs/guide.md: live
            membership). Needs the plain synchronous variant: one round, no overlap, staleness, local steps or
            compression, and a static graph.
    """

    rounds: int = 1
    wire_dtype: str | None = None
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES
    overlap: bool = False
    mixing: bool = True
    staleness: int = 0
    catch_up: bool = False
    every: int = 1
    compression: str | None = None
    topk_fraction: float = 0.01
    consensus_step: float | None = None
    peer_timeout: float | None = None
    startup_timeout: float = 1800.0
    membership: str = "fixed"

    def __post_init__(self) -> None:
        check_int("gossip rounds (t)", self.rounds, 1, MAX_ROUNDS, why="each round sends every neighbour the whole model")
        if self.wire_dtype is not None:
            check_choice("wire_dtype", self.wire_dtype, WIRE_DTYPE_NAMES)
        if self.chunk_bytes is not None:
            check_int("chunk_bytes (bytes per gossip message chunk; None sends whole messages)", self.chunk_bytes, 1)
        check_bool("overlap", self.overlap)
        check_bool("mixing", self.mixing)
        check_int("staleness (steps a neighbour's anchors may be old)", self.staleness, 0, MAX_STALENESS,
                  why="each worker keeps staleness + 1 receives of every neighbour's whole message posted")
        if self.staleness and (self.rounds != 1 or self.overlap):
            raise ValueError(
                f"staleness={self.staleness} mixes the newest anchors a worker holds, once per step: it needs rounds=1 "
                f"and overlap=False (a stale mix already travels while the next steps run), got rounds={self.rounds}, "
                f"overlap={self.overlap}"
            )
        check_bool("catch_up", self.catch_up)
        if self.catch_up and not self.staleness:
            raise ValueError(
                "catch_up=True skips a step only while a neighbour is staleness steps ahead: it needs staleness >= 1, "
                "got staleness=0"
            )
        check_int("every (optimizer steps per mix)", self.every, 1)
        if self.staleness and self.every != 1:
            raise ValueError(f"staleness={self.staleness} needs every=1 (a mix every step), got every={self.every}")
        check_number("topk_fraction", self.topk_fraction, 0, 1, low_open=True, high_open=False)
        if self.consensus_step is not None:
            check_number("consensus_step (CHOCO's gamma)", self.consensus_step, 0, 1, low_open=True, high_open=False)
        if self.compression is not None:
            check_choice("compression", self.compression, ("none", *COMPRESSIONS))
            if self.compression == "none":
                object.__setattr__(self, "compression", None)
        if self.compression is not None and self.wire_dtype not in (None, "fp32", "float32"):
            raise ValueError(
                f"compression={self.compression!r} sends its own format: leave wire_dtype unset, got {self.wire_dtype!r}"
            )
        if self.compression is not None and (self.rounds != 1 or self.overlap or self.staleness):
            raise ValueError(
                f"compression={self.compression!r} gossips once per mixing step: it needs rounds=1, overlap=False and "
                f"staleness=0, got rounds={self.rounds}, overlap={self.overlap}, staleness={self.staleness}"
            )
        if self.peer_timeout is not None:
            check_number("peer_timeout (seconds; None follows the run)", self.peer_timeout, 0, low_open=True)
        check_number("startup_timeout (seconds)", self.startup_timeout, 0, low_open=True)
        check_choice("membership", self.membership, MEMBERSHIPS)
        if self.membership == "live":
            self._check_live()

    def _check_live(self) -> None:
        """Live membership recovers from a departure by finishing the one mix that was under way with the folded
        matrix: each setting below keeps state that spans several mixes (a round in flight, old messages, public
        copies, local steps), which the recovery does not carry across a change of members yet."""
        unsupported = {
            "rounds": (self.rounds, 1, "a departure can cut a mix between its rounds"),
            "overlap": (self.overlap, False, "a mix in flight during the next step would be lost with the old group"),
            "staleness": (self.staleness, 0, "old messages of a worker that left would be mixed on"),
            "every": (self.every, 1, "local steps between mixes are not aligned across a change"),
            "compression": (self.compression, None, "CHOCO's public copies belong to the old neighbours"),
            "mixing": (self.mixing, True, "without mixing there is no group to reconfigure"),
        }
        for name, (value, needed, why) in unsupported.items():
            if value != needed:
                raise ValueError(f"membership='live' needs {name}={needed!r}, got {name}={value!r} ({why})")

    @property
    def variant(self) -> str:
        """The name of the engine variant these options ask for
        (:data:`~lightning_dpgan.gossip.registry.ENGINES`): ``"none"`` without mixing, else ``"choco"`` with a
        compression, ``"stale"`` with staleness, ``"overlapped"`` with overlap, and ``"synchronous"`` otherwise."""
        if not self.mixing:
            return "none"
        if self.membership == "live":
            return "live"
        if self.compression is not None:
            return "choco"
        if self.staleness:
            return "stale"
        return "overlapped" if self.overlap else "synchronous"

    def check_topology(self, topology: Any) -> None:
        """Whether the graph suits :attr:`variant`, checked once, where the topology is built for these options.

        The stale and CHOCO variants keep one state per neighbour (its newest message, its public copy) and talk to
        their neighbours point to point, and the live one folds one matrix when a worker leaves: they need a static
        graph. Raises
        :class:`~lightning_dpgan.topology.TopologyError` for a time-varying one, and warns for a ``consensus_step``
        above :meth:`default_consensus_step` (not refused: the bound is measured, Theorem 2's is far below it)."""
        needs = {
            "live": "membership='live' folds and rebuilds one matrix, so it needs",
            "stale": f"staleness={self.staleness} needs",
            "choco": f"compression={self.compression!r} keeps a copy of every neighbour, so it needs",
        }.get(self.variant)
        if needs and topology.is_time_varying:
            raise TopologyError(f"{needs} a static topology; {topology.name!r} changes its neighbours every round")
        safe = self.default_consensus_step()
        if self.compression is not None and self.consensus_step is not None and self.consensus_step > safe:
            fraction = f" at topk_fraction={self.topk_fraction:g}" if self.compression == "topk" else ""
            warnings.warn(
                f"consensus_step={self.consensus_step:g} is above {safe:.4g}, the largest step measured to converge for "
                f"compression={self.compression!r}{fraction} on every static topology (CHOCO's Theorem 2 guarantees "
                f"up to {theorem_consensus_step(self._quality(), topology):.2g} on this {topology.name!r} graph of "
                f"{topology.world_size}): it may stall or diverge after hundreds of rounds (docs/guide.md: compressed "
                "gossip)",
                stacklevel=2,
            )

    def default_consensus_step(self) -> float:
        """CHOCO's ``gamma`` for this compressor when none is given: a measured rule, not Theorem 2's bound, which
        is 50 to 10^5 times smaller on our graphs and would take as many times more rounds (docs/guide.md)."""
        if self.compression == "topk":
            return min(1.0, TOPK_STEP_PER_FRACTION * self.topk_fraction)
        return SIGN_STEP if self.compression == "sign" else 1.0

    def resolved_consensus_step(self) -> float:
        """CHOCO's ``gamma``: the one given, or :meth:`default_consensus_step`."""
        return self.consensus_step if self.consensus_step is not None else self.default_consensus_step()

    def describe_consensus_step(self, topology: Any) -> str:
        """The resolved ``gamma`` and what Theorem 2 guarantees on this graph, in one line (the CLI prints it)."""
        gamma, theorem = self.resolved_consensus_step(), theorem_consensus_step(self._quality(), topology)
        safe = self.default_consensus_step()
        fraction = f" at topk_fraction={self.topk_fraction:g}" if self.compression == "topk" else ""
        given = f"default for {self.compression}{fraction}" if self.consensus_step is None else f"given{fraction}"
        above = f", above the measured {safe:.4g}: it may diverge" if gamma > safe else ""
        return f"{gamma:.4g} ({given}{above}; CHOCO's Theorem 2 guarantees up to {theorem:.2g} on this graph)"

    def _quality(self) -> float:
        return compression_quality(self.compression or "", self.topk_fraction)

    @classmethod
    def build(cls, value: GossipOptions | dict[str, Any] | None) -> GossipOptions:
        """An options object from itself, a mapping of its fields (a Hydra or LightningCLI config), or ``None``."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"unknown gossip option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
            return cls(**value)
        raise ValueError(f"gossip must be a GossipOptions, a dict of its fields, or None, got {value!r}")


def compression_quality(compression: str, topk_fraction: float) -> float:
    """CHOCO's ``omega``, worst case over every input: the largest ``w`` with ``||Q(v) - v||^2 <= (1 - w) ||v||^2``.
    int8 misses each element of a chunk by at most half of ``max / 127``; top-k keeps at least a ``fraction`` of the
    energy; sign (the chunk's ``mean |v|`` times the signs) keeps ``||v||_1^2 / (n ||v||^2)``, which is ``1 / CHUNK``
    for a lone entry. Typical vectors do far better (sign about 2/pi), which is why the measured steps are larger."""
    if compression == "int8":
        return 1.0 - CHUNK / (4 * 127**2)
    if compression == "topk":
        return topk_fraction
    if compression == "sign":
        return 1.0 / CHUNK
    return 1.0


def theorem_consensus_step(omega: float, topology: Any) -> float:
    """Theorem 2 of Koloskova, Stich and Jaggi (ICML 2019): CHOCO-gossip converges linearly for
    ``gamma* = delta^2 omega / (16 delta + delta^2 + 4 beta^2 + 2 delta beta^2 - 8 delta omega)``, with ``delta =
    1 - |lambda_2(W)|`` the spectral gap and ``beta = ||I - W||_2``, for a static symmetric ``W``. A guarantee, and
    conservative: 0.022 omega on a ring of 4, 0.0035 omega on a ring of 8."""
    if topology.world_size == 1:
        return 1.0
    eigenvalues = topology.eigenvalues()
    delta, beta = topology.spectral_gap, 1.0 - float(eigenvalues[-1])
    return min(1.0, delta**2 * omega / (16 * delta + delta**2 + 4 * beta**2 + 2 * delta * beta**2 - 8 * delta * omega))
