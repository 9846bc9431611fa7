"""``python -m lightning_dpgan plan``, called in this process (it starts nothing): bad input refused before anything
is built, and the printed numbers against the α–β rules written out here by hand (tests/test_timing.py holds the
model's own cases)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from helpers import call_cli


@pytest.mark.parametrize(
    "args,message",
    [
        (["hosts=0", "bandwidth=1gbit"], "hosts must be an integer in [2, 512], got 0"),
        (["hosts=eight", "bandwidth=1gbit"], "hosts must be an integer in [2, 512], got 'eight'"),
        (["hosts=1024", "bandwidth=1gbit"], "hosts must be an integer in [2, 512], got 1024 (the plan multiplies"),
        (["hosts=8", "bandwidth=fast"], "bandwidth must be a rate such as 100mbit, 1gbit or 10gbit (bits per second, each link and direction), got 'fast'"),
        (["hosts=8", "bandwidth=0gbit"], "got '0gbit'"),
        (["hosts=8", "bandwidth=1gbit", "latency_ms=-5"], "latency_ms must be a finite number >= 0, got -5"),
        (["hosts=8", "bandwidth=1gbit", "latency_ms=inf"], "latency_ms must be a finite number >= 0, got inf"),
        (["hosts=8", "bandwidth=1gbit", "compute_ms=0"], "compute_ms must be a finite number > 0, got 0"),
        (["hosts=8", "bandwidth=1gbit", "mtu=20"], "mtu must be an integer in [576, 65535], got 20"),
        (["bandwidth=1gbit"], "plan needs hosts=...; e.g. plan hosts=64 bandwidth=1gbit latency_ms=30"),
        ([], "plan needs hosts=... and bandwidth=..."),
        # the plan's own keys are checked before Hydra composes anything: the bad model is not reached
        (["hosts=0", "bandwidth=1gbit", "model=nope"], "hosts must be an integer in [2, 512], got 0"),
        (["hosts=8", "bandwidth=1gbit", "model=nope"], "unknown model 'nope'; allowed: dcgan, mlp, sngan"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message):
    status, out, err = call_cli("plan", *args)
    assert status == 2, err[-2000:]
    assert message in err, err
    assert err.count("error:") == 1 and "Traceback" not in err and not out


def numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?<![\w.])\d+\.\d+|(?<![\w.])\d+(?![\w.])", line)]


def test_plan_prints_the_alpha_beta_times_bytes_and_rho_of_each_setting(tmp_path):
    # in this process: plan starts nothing (python -m lightning_dpgan plan runs this same function)
    status, stdout, err = call_cli("plan", "hosts=64", "bandwidth=100mbit", "latency_ms=10", "compute_ms=50", "experiment=digits",
                                   f"output_dir={tmp_path}")
    assert status == 0 and "Traceback" not in err, err[-2000:]
    lines = stdout.splitlines()
    numel = int(re.search(r"model: ([\d,]+) parameters", stdout).group(1).replace(",", ""))
    from lightning_dpgan.models import DCGANDiscriminator, DCGANGenerator  # experiment=digits: 8 px, 1 channel, width 32

    parts = [DCGANGenerator(image_size=8, channels=1, latent_dim=32, width=32), DCGANDiscriminator(image_size=8, channels=1, width=32)]
    assert numel == sum(p.numel() for part in parts for p in part.parameters())

    wire = 1538 / 1448  # MTU 1500 on Ethernet: 1448 bytes of TCP payload in 1538 bytes of link
    def link(payload: float) -> float:
        return payload * wire * 8 / 100e6

    def row(label: str) -> list[float]:
        found = [line for line in lines if line.startswith(label + " ")]
        assert len(found) == 1, (label, stdout)
        return numbers(found[0][len(label):])

    # DDP: 2 x 63 hops of 10 ms, 126/64 of the fp32 gradients through each link; all exact after one iteration
    ddp_bytes = 126 / 64 * 4 * numel
    seconds, mb, rho, its, _ = row("DDP (ring all-reduce)")
    assert seconds == pytest.approx(0.05 + 1.26 + link(ddp_bytes), abs=6e-5)
    assert mb == pytest.approx(ddp_bytes / 1e6, abs=6e-4) and rho == 0 and its == 1
    # one-peer exponential, bf16, one round: one message of the header and 2 bytes an element padded to 8, one hop;
    # exact average after log2(64) = 6 rounds
    message = 64 + math.ceil(2 * numel / 8) * 8
    seconds, mb, rho, its, _ = row("one_peer_exponential, t=1, bf16")
    assert seconds == pytest.approx(0.05 + 0.01 + link(message), abs=6e-5)
    assert mb == pytest.approx(message / 1e6, abs=6e-4) and its == 6
    assert row("one_peer_exponential, t=6, bf16")[3] == 1
    assert row("one_peer_exponential, t=1, bf16, H=4")[3] == 24
    # overlapped, the mix hides behind the 50 ms step
    assert row("one_peer_exponential, t=1, bf16, overlap")[0] == pytest.approx(0.05, abs=6e-5)
    # ring, bf16: two messages a round; rho = (1 + 2 cos(2 pi / 64)) / 3, which never mixes 100-fold in 64 rounds
    seconds, mb, rho, *_ = row("ring, t=1, bf16")
    assert seconds == pytest.approx(0.05 + 0.01 + link(2 * message), abs=6e-5)
    assert rho == pytest.approx((1 + 2 * math.cos(2 * math.pi / 64)) / 3, abs=6e-5)
    assert "> cap" in next(line for line in lines if line.startswith("ring, t=1, bf16"))
    # top-1 % CHOCO on the ring: ceil(0.01 n) fp32 values (padded to 4 bytes) and int32 indices, header, to 2
    k = math.ceil(0.01 * numel)
    choco = 64 + math.ceil(8 * k / 8) * 8
    assert row("ring, t=1, topk 1% CHOCO")[1] == pytest.approx(2 * choco / 1e6, abs=6e-4)
    # exponential graph of 64: neighbours at +-1, 2, 4, 8, 16 and 32, weights 1/12; its eigenvalues by the circulant
    # formula; rho^(2k) <= 1/100 after k iterations
    offsets = [1, 2, 4, 8, 16, 32, -1, -2, -4, -8, -16]
    eigen = [(1 + sum(math.cos(2 * math.pi * o * j / 64) for o in offsets)) / 12 for j in range(1, 64)]
    rho_exp = max(abs(e) for e in eigen)
    seconds, mb, rho, its, _ = row("exponential, t=1, bf16")
    assert rho == pytest.approx(rho_exp, abs=6e-5)
    assert its == math.ceil(math.log(100) / (-2 * math.log(rho_exp)))
    assert seconds == pytest.approx(0.05 + 0.01 + link(11 * message), abs=6e-5)
    # the recommendation: the fastest setting that mixes 100-fold within 10 iterations is the overlapped one-peer mix
    advice = next(line for line in lines if line.startswith("recommendation:"))
    assert "one_peer_exponential, t=1, bf16, overlap" in advice
    # DDP by halving-doubling: 2 log2(64) = 12 hops, the same bytes; the faster DDP is the one compared with
    halving = 0.05 + 0.12 + link(ddp_bytes)
    assert row("DDP (halving-doubling all-reduce)")[0] == pytest.approx(halving, abs=6e-5)
    assert f"{halving / 0.05:.2f}x the pace of the faster DDP" in advice
    assert np.isfinite(seconds) and not list(tmp_path.iterdir())  # no run directory


def test_gossip_is_recommended_only_beyond_the_models_checked_error():
    from lightning_dpgan.command.plan import Row, recommend
    from lightning_dpgan.sim.timing import Setting

    ddp = Row(Setting.ddp(), 1.0, 8e6, 0.0, 1)
    slow_ddp = Row(Setting.ddp("halving_doubling"), 2.0, 8e6, 0.0, 1)
    near = Row(Setting("exponential", 1, "bf16"), 0.9, 4e6, 0.6, 6)  # 1.11x DDP's pace: within ±15 %
    drifting = Row(Setting("ring", 1, "bf16"), 0.1, 4e6, 0.99, None)  # fastest, but never mixes enough
    assert recommend([slow_ddp, ddp, near, drifting]) == (ddp, drifting)
    clear = Row(Setting("one_peer_exponential", 1, "bf16"), 0.8, 2e6, 1.0, 6)  # 1.25x
    assert recommend([slow_ddp, ddp, near, clear, drifting]) == (clear, drifting)
    late = Row(Setting("one_peer_exponential", 1, "bf16", every=4), 0.5, 5e5, 1.0, 24)  # 24 iterations to mix: no
    assert recommend([ddp, late]) == (ddp, late)
