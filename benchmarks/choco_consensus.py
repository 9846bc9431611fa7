"""CHOCO's consensus step ``gamma`` against noise: how much consensus each compressor keeps while workers move.

The defaults of ``GossipOptions.consensus_step`` are no longer chosen from this table (300 noisy steps hide the
divergence that thousands of rounds of pure gossip show): they come from the long-horizon runs in docs/log.md
("Compressed gossip that always converges") and ``tests/test_choco_convergence.py`` checks them.

    python benchmarks/choco_consensus.py

Eight workers on a ring, 4096 entries each. Every step each worker moves by Gaussian noise (``--noise``, a stand-in
for its own optimizer steps), then CHOCO-gossips (tests/reference.py's ``choco_mix``, which the tests show equal to
the package's engine). The table prints the consensus error ``mean_i ||x_i - x_bar||^2`` averaged over the last 50 of
``--steps`` steps, against uncompressed gossip's; lower is better, and a diverging setting grows without bound.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import choco_mix, int8, sign, topk  # noqa: E402

GAMMAS = [1.0, 0.5, 0.2, 0.1, 0.04, 0.02]


def ring_matrix(n: int) -> np.ndarray:
    w = np.zeros((n, n))
    for i in range(n):
        w[i, i] = w[i, (i + 1) % n] = w[i, (i - 1) % n] = 1 / 3
    return w


def steady_error(compress, gamma: float, n: int, dim: int, steps: int, noise: float) -> float:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim))
    mix = choco_mix(ring_matrix(n), compress, gamma)
    errors = []
    for _ in range(steps):
        x = mix(x + noise * rng.normal(size=x.shape))
        errors.append(float(np.mean(np.sum((x - x.mean(0)) ** 2, axis=1))))
        if not np.isfinite(errors[-1]) or errors[-1] > 1e12:
            return float("inf")
    return float(np.mean(errors[-50:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--noise", type=float, default=0.01)
    args = parser.parse_args()
    exact = steady_error(lambda v: v, 1.0, args.workers, args.dim, args.steps, args.noise)
    print(f"consensus error of uncompressed gossip: {exact:.3g} (ratios below are to it)\n")
    print("| compressor | " + " | ".join(f"γ = {g:g}" for g in GAMMAS) + " |")
    print("|---|" + "---:|" * len(GAMMAS))
    for name, compress in [("int8", int8), ("sign", sign), ("top-1 %", topk(0.01)), ("top-5 %", topk(0.05))]:
        cells = []
        for gamma in GAMMAS:
            error = steady_error(compress, gamma, args.workers, args.dim, args.steps, args.noise)
            cells.append("diverges" if error == float("inf") else f"{error / exact:.2f}×")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
