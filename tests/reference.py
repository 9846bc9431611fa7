"""DPOSG written out from the paper's equations in numpy: the independent reference the tests compare against."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def adam_direction(g: np.ndarray, m: np.ndarray, v: np.ndarray, k: int, betas: tuple[float, float], eps: float):
    """Adam's bias-corrected direction at step k (1-based); returns (direction, m, v)."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    return (m / (1 - b1**k)) / (np.sqrt(v / (1 - b2**k)) + eps), m, v


def bf16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bfloat16 as torch casts it: to float32, then to the nearest even upper 16 bits."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def narrow_wire_mix(matrices: list[np.ndarray], wire: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Gossip rounds whose messages travel as ``wire(x)``: each round ``x_i <- w_ii x_i + sum_j w_ij wire(x_j)``,
    the worker's own term kept in full precision."""

    def mix(x: np.ndarray) -> np.ndarray:
        for w in matrices:
            own = np.diag(w)
            x = own[:, None] * x + (w - np.diag(own)) @ wire(x)
        return x

    return mix


def dposg(
    grad: Callable[[np.ndarray], np.ndarray],
    z0: np.ndarray,
    mixing: np.ndarray | list[np.ndarray] | Callable[[np.ndarray], np.ndarray],
    steps: int,
    lr: float | np.ndarray,
    adam: tuple[tuple[float, float], float] | None = None,
    overlap: bool = False,
) -> np.ndarray:
    """Workers' ``z`` after ``steps`` gradients, rows = workers.

    ``z^k = W^t x^{k-1} - lr d(z^{k-1})`` and ``x^k = W^t x^{k-1} - lr d(z^k)``, with ``x^0 = z^0`` and ``d = g``
    (OSG) or Adam's direction. ``grad(z)`` maps the (workers, dim) matrix to each worker's gradient; ``lr`` may be
    a per-coordinate vector (param groups); ``mixing`` is one matrix, one per step for time-varying graphs, or a
    function of ``x`` (:func:`narrow_wire_mix`).
    ``overlap``: the mix of ``x^k`` is still in flight when the next gradient is taken
    (``DecentralizedStrategy(overlap=True)``), so ``z^{k+1} = x^k - lr d(z^k)``; the anchors are unchanged.
    """
    z = np.array(z0, dtype=np.float64)
    x = z.copy()
    mats = mixing if isinstance(mixing, list) else [mixing]

    def mix(x: np.ndarray, k: int) -> np.ndarray:
        return mixing(x) if callable(mixing) else mats[k % len(mats)] @ x

    m = np.zeros_like(z)
    v = np.zeros_like(z)
    mixed = x
    for k in range(steps):
        d = grad(z)  # g(z^k); iteration 0 has no anchor update: z^1 = W x^0 - lr d(z^0)
        if adam:
            d, m, v = adam_direction(d, m, v, k + 1, *adam)
        if k > 0:
            x = mixed - lr * d  # x^k
        mixed = mix(x, k)  # W^t x^k
        z = (x if overlap else mixed) - lr * d  # z^{k+1}
    return z
