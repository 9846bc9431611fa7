"""``GossipOptions``: every setting of how replicas gossip, in one frozen object checked once, where it is built.

The strategy, the engine and the command line all take this one object (the CLI's shortcuts ``gossip_rounds=`` and
``wire_dtype=`` fill it in), so a setting is validated in one place and a new one is added in one place.
No torch here: the command line checks its options before torch is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lightning_dpgan.checks import check_bool, check_choice, check_int, check_number

#: names of the wire dtypes; None, "fp32" and "float32" send the tensors' own dtype
WIRE_DTYPE_NAMES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
DEFAULT_CHUNK_BYTES = 256 * 1024
#: an automatic peer timeout is at least this many seconds, and this many step times (docs/reliability.md)
PEER_TIMEOUT_FLOOR_S = 60.0
PEER_TIMEOUT_STEPS = 100


@dataclass(frozen=True)
class GossipOptions:
    """How replicas gossip.

    Args:
        rounds: ``t``, rounds of neighbour averaging per optimizer step: workers mix with ``W^t``.
        wire_dtype: ``"bf16"`` or ``"fp16"`` halve the bytes on the wire (the sum stays in the tensors' own dtype);
            ``None`` or ``"fp32"`` send the tensors as they are.
        chunk_bytes: on CPU (gloo), messages go out in chunks of this size, receives posted before sends, which
            keeps both directions of a link busy; ``None`` sends each message whole.
        overlap: leave each step's mix on the wire while the next forward and backward run, and apply it after the
            next optimizer step (docs/guide.md: overlapped DPOSG).
        mixing: ``False`` turns communication off (local training, an ablation); consensus is still measured.
        peer_timeout: seconds to wait for a neighbour's message before failing with its rank
            (:class:`~lightning_dpgan.gossip.GossipPeerError`). ``None``: follow the run, the larger of
            ``PEER_TIMEOUT_FLOOR_S`` and ``PEER_TIMEOUT_STEPS`` median step times, and ``startup_timeout`` during
            the first steps.
        startup_timeout: seconds for the workers to find each other (rendezvous), and for Lightning's own
            collectives (checkpoints, ``sync_dist``).
    """

    rounds: int = 1
    wire_dtype: str | None = None
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES
    overlap: bool = False
    mixing: bool = True
    peer_timeout: float | None = None
    startup_timeout: float = 1800.0

    def __post_init__(self) -> None:
        check_int("gossip rounds (t)", self.rounds, 1)
        if self.wire_dtype is not None:
            check_choice("wire_dtype", self.wire_dtype, WIRE_DTYPE_NAMES)
        if self.chunk_bytes is not None:
            check_int("chunk_bytes (bytes per gossip message chunk; None sends whole messages)", self.chunk_bytes, 1)
        check_bool("overlap", self.overlap)
        check_bool("mixing", self.mixing)
        if self.peer_timeout is not None:
            check_number("peer_timeout (seconds; None follows the run)", self.peer_timeout, 0, low_open=True)
        check_number("startup_timeout (seconds)", self.startup_timeout, 0, low_open=True)

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
