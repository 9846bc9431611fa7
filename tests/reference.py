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
    joins: dict[int, int] | None = None,
) -> np.ndarray:
    """Workers' ``z`` after ``steps`` gradients, rows = workers.

    ``z^k = W^t x^{k-1} - lr d(z^{k-1})`` and ``x^k = W^t x^{k-1} - lr d(z^k)``, with ``x^0 = z^0`` and ``d = g``
    (OSG) or Adam's direction. ``grad(z)`` maps the (workers, dim) matrix to each worker's gradient; ``lr`` may be
    a per-coordinate vector (param groups); ``mixing`` is one matrix, one per step for time-varying graphs, or a
    function of ``x`` (:func:`narrow_wire_mix`).
    ``overlap``: the mix of ``x^k`` is still in flight when the next gradient is taken
    (``DecentralizedStrategy(overlap=True)``), so ``z^{k+1} = x^k - lr d(z^k)``; the anchors are unchanged.
    ``joins``: ``{k: donor}``: before iteration ``k`` a worker joins as a copy of row ``donor``'s whole state (its
    point, anchor and Adam moments), as the last row; the matrices from then on are one row larger.
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
        if joins and k in joins:
            z, x, m, v, mixed = (np.vstack([a, a[joins[k]]]) for a in (z, x, m, v, mixed))
        d = grad(z)  # g(z^k); iteration 0 has no anchor update: z^1 = W x^0 - lr d(z^0)
        if adam:
            d, m, v = adam_direction(d, m, v, k + 1, *adam)
        if k > 0:
            x = mixed - lr * d  # x^k
        mixed = mix(x, k)  # W^t x^k
        z = (x if overlap else mixed) - lr * d  # z^{k+1}
    return z


def delivery_schedule(n: int, staleness: int, seed: int) -> Callable[[int, int, int], int]:
    """A fixed, seeded schedule of when messages arrive: ``schedule(i, j, m)`` is the step at which worker ``i`` takes
    worker ``j``'s message of step ``m``, from ``m`` to ``m + staleness``, never earlier than an earlier message of
    ``j`` (messages of one sender arrive in order), and step 1's at step 1 (every worker starts in step)."""
    table: dict[tuple[int, int], list[int]] = {}

    def schedule(i: int, j: int, m: int) -> int:
        arrivals = table.setdefault((i, j), [1])  # arrivals[m - 1]: the step message m is taken at
        while len(arrivals) < m:
            step = len(arrivals) + 1
            delay = int(np.random.default_rng([seed, i, j, step]).integers(0, staleness + 1))  # whoever asks first
            arrivals.append(max(arrivals[-1], step + delay))
        return arrivals[m - 1]

    return schedule


def stale_dposg(
    grad: Callable[[np.ndarray], np.ndarray],
    z0: np.ndarray,
    w: np.ndarray,
    steps: int,
    lr: float,
    schedule: Callable[[int, int, int], int],
    adam: tuple[tuple[float, float], float] | None = None,
) -> np.ndarray:
    """DPOSG with bounded staleness, replaying ``schedule``: at step ``k`` worker ``i`` mixes its own anchors with,
    from each neighbour ``j``, the newest message ``x_j^m`` that ``schedule(i, j, m) <= k`` hands it,
    ``x_i <- w_ii x_i^k + sum_j w_ij x_j^m``. ``grad = 0`` with OSG is gossip alone (consensus)."""
    n = len(z0)
    z = np.array(z0, dtype=np.float64)
    x = z.copy()
    m_adam, v_adam = np.zeros_like(z), np.zeros_like(z)
    sent: dict[tuple[int, int], np.ndarray] = {}
    mixed = x
    for k in range(1, steps + 1):
        d = grad(z)
        if adam:
            d, m_adam, v_adam = adam_direction(d, m_adam, v_adam, k, *adam)
        if k > 1:
            x = mixed - lr * d
        for j in range(n):
            sent[(j, k)] = x[j].copy()
        mixed = np.empty_like(x)
        for i in range(n):
            total = w[i, i] * x[i]
            for j in np.flatnonzero(w[i] > 0):
                if j != i:
                    newest = max(m for m in range(1, k + 1) if schedule(i, int(j), m) <= k)
                    total = total + w[i, j] * sent[(int(j), newest)]
            mixed[i] = total
        z = mixed - lr * d
    return z


def replayed_dposg(
    grad: Callable[[np.ndarray], np.ndarray],
    z0: np.ndarray,
    w: np.ndarray,
    lr: float,
    traces: list[list],
    adam: tuple[tuple[float, float], float] | None = None,
) -> np.ndarray:
    """DPOSG with bounded staleness and catch-up steps, replaying what each worker recorded: ``traces[i]`` holds one
    ``(step, skipped, [{neighbour: step of the message mixed}])`` per step of worker ``i``. A skipped step computes
    nothing (no gradient, no anchor update, no new direction, no Adam step); every step sends the worker's anchors
    and mixes ``x_i <- w_ii x_i + sum_j w_ij x_j^m``, then extrapolates ``z_i = x_i - lr d_i``. A neighbour's message may
    be of a later step than the receiver's, so the workers are advanced in any order the messages allow."""
    n = len(z0)
    z = np.array(z0, dtype=np.float64)
    x, d = z.copy(), np.zeros_like(z)
    m_adam, v_adam = np.zeros_like(z), np.zeros_like(z)
    computed = [0] * n  # gradient steps each worker has taken (Adam's bias correction counts these)
    done = [0] * n
    sent: dict[tuple[int, int], np.ndarray] = {}
    while any(done[i] < len(traces[i]) for i in range(n)):
        progressed = False
        for i in range(n):
            if done[i] == len(traces[i]):
                continue
            step, skipped, (tags,) = traces[i][done[i]]
            assert step == done[i] + 1
            if (i, step) not in sent:
                if not skipped:
                    computed[i] += 1
                    g = grad(z)[i]
                    if adam:
                        g, m_adam[i], v_adam[i] = adam_direction(g, m_adam[i], v_adam[i], computed[i], *adam)
                    if computed[i] > 1:
                        x[i] = x[i] - lr * g
                    d[i] = g
                sent[(i, step)] = x[i].copy()
                progressed = True
            if any((int(j), tag) not in sent for j, tag in tags.items()):
                continue  # a message this mix used is not sent yet in the replay: another worker goes first
            x[i] = w[i, i] * sent[(i, step)] + sum(w[i, int(j)] * sent[(int(j), tag)] for j, tag in tags.items())
            z[i] = x[i] - lr * d[i]
            done[i] += 1
            progressed = True
        assert progressed, "the traces are not causal: every worker waits on a message not yet sent"
    return z


def every(mixing: Callable[[np.ndarray], np.ndarray], h: int) -> Callable[[np.ndarray], np.ndarray]:
    """Local steps: ``mixing`` on every ``h``-th call (optimizer step), the identity on the others."""
    calls = [0]

    def mix(x: np.ndarray) -> np.ndarray:
        calls[0] += 1
        return mixing(x) if calls[0] % h == 0 else x

    return mix


CHUNK = 1024  # elements per scale of int8 and sign, as the package's compressors


def int8(v: np.ndarray) -> np.ndarray:
    """Per chunk of CHUNK: scale max|v|/127, round half to even, back to floats."""
    out = np.empty_like(v)
    for start in range(0, len(v), CHUNK):
        part = v[start : start + CHUNK]
        scale = np.abs(part).max() / 127
        out[start : start + CHUNK] = np.round(part / scale) * scale if scale > 0 else 0.0
    return out


def sign(v: np.ndarray) -> np.ndarray:
    """Per chunk of CHUNK: mean|v| with the sign of each entry (+ for zero)."""
    out = np.empty_like(v)
    for start in range(0, len(v), CHUNK):
        part = v[start : start + CHUNK]
        out[start : start + CHUNK] = np.where(part >= 0, 1.0, -1.0) * (np.abs(part).sum() / len(part))
    return out


def topk(fraction: float) -> Callable[[np.ndarray], np.ndarray]:
    """The ceil(fraction * n) entries largest in magnitude, the others zero."""

    def compress(v: np.ndarray) -> np.ndarray:
        k = max(1, int(np.ceil(fraction * len(v))))
        out = np.zeros_like(v)
        keep = np.argsort(-np.abs(v), kind="stable")[:k]
        out[keep] = v[keep]
        return out

    return compress


def choco_mix(
    w: np.ndarray, compress: Callable[[np.ndarray], np.ndarray], gamma: float, start: str = "rank0"
) -> Callable[[np.ndarray], np.ndarray]:
    """CHOCO-gossip (Koloskova et al. 2019, Algorithm 1's consensus part), one call per mixing step: every worker's
    public copy ``x_hat_j`` (the same wherever it is held) moves by ``q_j = Q(x_j - x_hat_j)``, then
    ``x_i <- x_i + gamma * sum_j w_ij (x_hat_j - x_hat_i)``. The copies start at worker 0's ``x`` of the first call
    (``start="rank0"``, as the engine broadcasts it) or at zero (``start="zero"``, the paper's)."""
    state: dict[str, np.ndarray] = {}

    def mix(x: np.ndarray) -> np.ndarray:
        if "hat" not in state:
            state["hat"] = np.zeros_like(x) if start == "zero" else np.repeat(x[:1], len(x), axis=0)
        hat = state["hat"]
        for j in range(len(x)):
            hat[j] = hat[j] + compress(x[j] - hat[j])
        out = x.copy()
        for i in range(len(x)):
            for j in np.flatnonzero(w[i] > 0):
                if j != i:
                    out[i] = out[i] + gamma * w[i, j] * (hat[j] - hat[i])
        return out

    return mix
