"""The time model (lightning_dpgan.sim.timing) against numbers derived by hand from its α–β rules.

Every expected value is written out here from the rule in words (hops, bytes per link, frames), not computed by
the module's helpers, so a wrong degree, a missing header or a lost factor fails.
"""

from __future__ import annotations

import pytest

from lightning_dpgan.sim.timing import Network, Setting, Workload, bytes_per_iteration, iteration_seconds

MB = 1_000_000
#: a 1,000,000-parameter fp32 model, 50 ms a step
MODEL = Workload(numel=1_000_000, step_s=0.05)
#: 100 Mbit/s links, 2 ms latency, MTU 1500 Ethernet: a TCP segment carries 1448 bytes in 1538 on the wire
NET = Network(hosts=8, bandwidth_bps=100e6, latency_s=0.002, mtu=1500)
WIRE = 1538 / 1448


def link(payload: float, bps: float = 100e6) -> float:
    return payload * WIRE * 8 / bps


def test_ddp_is_two_n_minus_one_hops_and_two_n_minus_one_over_n_of_the_gradients():
    # 8 hosts: 14 hops of 2 ms; each host sends 14/8 of 4 MB; one bucket (4 MB < 25 MiB): nothing hidden
    comm = 14 * 0.002 + link(14 / 8 * 4 * MB)
    assert iteration_seconds(Setting.ddp(), MODEL, NET) == pytest.approx(0.05 + comm, rel=1e-12)
    assert bytes_per_iteration(Setting.ddp(), MODEL, 8) == pytest.approx(7 * MB)


def test_halving_doubling_moves_the_same_bytes_in_two_log2_n_hops():
    comm = 6 * 0.002 + link(14 / 8 * 4 * MB)
    assert iteration_seconds(Setting.ddp("halving_doubling"), MODEL, NET) == pytest.approx(0.05 + comm, rel=1e-12)
    with pytest.raises(ValueError, match="unknown allreduce 'tree'; allowed: ring, halving_doubling"):
        Setting.ddp("tree")


def test_ring_bf16_sends_two_neighbours_the_header_and_two_bytes_an_element_per_round():
    message = 64 + 2 * MB
    for rounds in (1, 3):
        expected = 0.05 + rounds * (0.002 + link(2 * message))
        assert iteration_seconds(Setting("ring", rounds, "bf16"), MODEL, NET) == pytest.approx(expected, rel=1e-12)
    assert bytes_per_iteration(Setting("ring", 1, "bf16"), MODEL, 8) == 2 * message


def test_one_peer_exponential_has_one_peer_in_every_round():
    message = 64 + 4 * MB
    expected = 0.05 + 2 * (0.002 + link(message))
    assert iteration_seconds(Setting("one_peer_exponential", 2), MODEL, NET) == pytest.approx(expected, rel=1e-12)
    assert bytes_per_iteration(Setting("one_peer_exponential", 2), MODEL, 8) == 2 * message


def test_a_torus_of_two_rows_has_three_neighbours_and_a_busier_host_sets_the_pace():
    # 2 x 4 torus: up and down are the same host, so 3 neighbours; a star's hub sends to all 7 others
    message = 64 + 4 * MB
    torus = Setting("torus", 1)
    assert iteration_seconds(torus, MODEL, NET) == pytest.approx(0.05 + 0.002 + link(3 * message), rel=1e-12)
    star = Setting("star", 1)
    assert iteration_seconds(star, MODEL, NET) == pytest.approx(0.05 + 0.002 + link(7 * message), rel=1e-12)
    assert bytes_per_iteration(star, MODEL, 8) == 7 * message  # the hub's


def test_top_1_percent_choco_sends_values_and_int32_indices_of_one_percent():
    # k = 10,000 kept: 40,000 bytes of fp32 values and 40,000 of int32 indices, a 64-byte header
    message = 64 + 80_000
    setting = Setting("ring", compression="topk", topk_fraction=0.01)
    assert iteration_seconds(setting, MODEL, NET) == pytest.approx(0.05 + 0.002 + link(2 * message), rel=1e-12)
    assert bytes_per_iteration(setting, MODEL, 8) == 2 * message


def test_local_steps_mix_once_every_h_iterations():
    message = 64 + 2 * MB
    expected = 0.05 + (0.002 + link(message)) / 4
    setting = Setting("one_peer_exponential", 1, "bf16", every=4)
    assert iteration_seconds(setting, MODEL, NET) == pytest.approx(expected, rel=1e-12)
    assert bytes_per_iteration(setting, MODEL, 8) == message / 4


@pytest.mark.parametrize("bps", [1e9, 10e6])
def test_overlap_and_staleness_hide_communication_behind_up_to_the_compute(bps):
    net = Network(hosts=8, bandwidth_bps=bps, latency_s=0.002)
    comm = 0.002 + link(2 * (64 + 2 * MB), bps)
    for setting in (Setting("ring", 1, "bf16", overlap=True), Setting("ring", 1, "bf16", staleness=2)):
        assert iteration_seconds(setting, MODEL, net) == pytest.approx(max(0.05, comm), rel=1e-12)
    assert (comm < 0.05) == (bps == 1e9)  # both sides of the max are taken


def test_a_complete_graph_mixes_with_one_all_reduce():
    comm = 14 * 0.002 + link(14 / 8 * 4 * MB)
    assert iteration_seconds(Setting("complete", 1), MODEL, NET) == pytest.approx(0.05 + comm, rel=1e-12)


def test_ddp_hides_every_bucket_but_the_last_behind_the_backward_pass():
    # 50 MB of gradients in 25 MiB buckets: two, the last 50e6 - 26,214,400 bytes; the first hides behind the
    # backward pass (2/3 of a 9 s step), which is long enough
    model = Workload(numel=12_500_000, step_s=9.0)
    last = 50 * MB - 25 * 2**20
    exposed = 14 * 0.002 + link(14 / 8 * last)
    assert iteration_seconds(Setting.ddp(), model, NET) == pytest.approx(9.0 + exposed, rel=1e-12)
    # with a 0.3 s step only 0.2 s of backward can hide the first bucket's all-reduce
    quick = Workload(numel=12_500_000, step_s=0.3)
    whole = 14 * 0.002 + link(14 / 8 * 50 * MB)
    assert iteration_seconds(Setting.ddp(), quick, NET) == pytest.approx(0.3 + whole - 0.2, rel=1e-12)


def test_emulated_hosts_on_tbf_links_count_the_ethernet_header_only():
    net = Network(hosts=8, bandwidth_bps=100e6, mtu=9000, frame_bytes=14)
    comm = (64 + 2 * MB) * (9014 / 8948) * 8 / 100e6
    assert iteration_seconds(Setting("one_peer_exponential", 1, "bf16"), MODEL, net) == pytest.approx(0.05 + comm, rel=1e-12)


def test_one_host_sends_nothing():
    net = Network(hosts=1, bandwidth_bps=1e6, latency_s=1.0)
    for setting in (Setting.ddp(), Setting("ring", 3)):
        assert iteration_seconds(setting, MODEL, net) == 0.05
        assert bytes_per_iteration(setting, MODEL, 1) == 0


@pytest.mark.parametrize("bad,message", [
    (lambda: Network(hosts=0, bandwidth_bps=1e9), "hosts must be an integer >= 1, got 0"),
    (lambda: Network(hosts=4, bandwidth_bps=0), "bandwidth (bits per second) must be a finite number > 0, got 0"),
    (lambda: Network(hosts=4, bandwidth_bps=1e9, latency_s=-1), "latency (seconds) must be a finite number >= 0, got -1"),
    (lambda: Workload(numel=0, step_s=0.1), "numel (parameters) must be an integer >= 1, got 0"),
])
def test_bad_values_are_refused_naming_them(bad, message):
    with pytest.raises(ValueError) as err:
        bad()
    assert message in str(err.value)


def test_on_shared_cores_a_step_is_the_shared_compute_then_the_communication():
    # 8 hosts on 2 cores: all computing at once, a 50 ms step takes 8 / 2 x 50 = 200 ms
    slow = Network(hosts=8, bandwidth_bps=100e6, cores=2)
    assert iteration_seconds(Setting.ddp(), MODEL, slow) == pytest.approx(0.2 + link(14 / 8 * 4 * MB), rel=1e-12)
    one_peer = Setting("one_peer_exponential", 1, "bf16")
    assert iteration_seconds(one_peer, MODEL, slow) == pytest.approx(0.2 + link(64 + 2 * MB), rel=1e-12)
    measured = Workload(numel=1_000_000, step_s=0.05, shared_step_s=0.3)  # measured where the cores are shared
    assert iteration_seconds(Setting("ring", 1, "bf16"), measured, slow) == pytest.approx(0.3 + link(2 * (64 + 2 * MB)), rel=1e-12)
    overlapped = Setting("one_peer_exponential", 1, "bf16", overlap=True)
    assert iteration_seconds(overlapped, measured, slow) == pytest.approx(0.3, rel=1e-12)
    # as many cores as hosts: a core each, the shared measurement unused
    assert iteration_seconds(one_peer, measured, Network(hosts=8, bandwidth_bps=100e6, cores=8)) == pytest.approx(
        0.05 + link(64 + 2 * MB), rel=1e-12)


def test_a_shaped_link_passes_its_bucket_at_once_after_idling_for_the_compute():
    # tbf framing at MTU 1500: 1448 bytes of payload in 1514 counted; a 64 KiB bucket at 10 Mbit/s refills in
    # 65,536 x 8 / 10e6 = 52.4 ms, less than the 200 ms step
    tbf = 1514 / 1448
    bucket = 64 * 1024
    shaped = Network(hosts=8, bandwidth_bps=10e6, mtu=1500, frame_bytes=14, burst_bytes=bucket)
    step = Workload(numel=1_000_000, step_s=0.2)
    choco = Setting("ring", compression="topk", topk_fraction=0.01)  # two 80,064-byte messages a host
    on_wire = 2 * 80_064 * tbf
    assert iteration_seconds(choco, step, shaped) == pytest.approx(0.2 + (on_wire - bucket) * 8 / 10e6, rel=1e-12)
    # a 20 ms step refills 25,000 bytes of the bucket only
    quick = Workload(numel=1_000_000, step_s=0.02)
    assert iteration_seconds(choco, quick, shaped) == pytest.approx(0.02 + (on_wire - 25_000) * 8 / 10e6, rel=1e-12)
    # a bucket larger than the mix: only the latency is left
    wide = Network(hosts=8, bandwidth_bps=10e6, latency_s=0.002, mtu=1500, frame_bytes=14, burst_bytes=1_000_000)
    assert iteration_seconds(choco, step, wide) == pytest.approx(0.2 + 0.002, rel=1e-12)
    # DDP: 14/8 of the 4 MB gradients, less the bucket
    ddp = (14 / 8 * 4 * MB * tbf - bucket) * 8 / 10e6
    assert iteration_seconds(Setting.ddp(), step, shaped) == pytest.approx(0.2 + ddp, rel=1e-12)
    # a mix every 4 steps: the bucket counts once in 4 iterations, refilled over 4 steps (100,000 bytes: full)
    every4 = Setting("ring", compression="topk", topk_fraction=0.01, every=4)
    assert iteration_seconds(every4, quick, shaped) == pytest.approx(0.02 + (on_wire - bucket) * 8 / 10e6 / 4, rel=1e-12)
    # overlap keeps the link busy: no bucket to spend
    overlapped = Setting("ring", 1, "bf16", overlap=True)
    assert iteration_seconds(overlapped, step, shaped) == pytest.approx(2 * (64 + 2 * MB) * tbf * 8 / 10e6, rel=1e-12)
    with pytest.raises(ValueError, match="burst_bytes must be an integer >= 0, got -1"):
        Network(hosts=8, bandwidth_bps=10e6, burst_bytes=-1)


def test_ddps_all_reduce_on_shared_cores_takes_the_longer_of_its_transfer_and_its_cpu():
    # 8 hosts on 2 cores: the step without communication 270 ms, the all-reduce's own CPU 110 ms; Ethernet at MTU 1500
    # carries 1448 bytes of payload in 1538, and the all-reduce moves 14/8 of the 4 MB gradients through each link
    step = Workload(numel=1_000_000, step_s=0.04, shared_step_s=0.27, shared_allreduce_cpu_s=0.11)
    wire = 14 / 8 * 4 * MB * 1538 / 1448 * 8
    slow = Network(hosts=8, bandwidth_bps=200e6, cores=2)  # the transfer, 297 ms, is the longer
    assert iteration_seconds(Setting.ddp(), step, slow) == pytest.approx(0.27 + wire / 200e6, rel=1e-12)
    fast = Network(hosts=8, bandwidth_bps=1e9, cores=2)  # the transfer, 59 ms, hides in the CPU's 110 ms
    assert iteration_seconds(Setting.ddp(), step, fast) == pytest.approx(0.27 + 0.11, rel=1e-12)
    own = Network(hosts=8, bandwidth_bps=1e9)  # a core per host: the one-core step, and no shared CPU to count
    assert iteration_seconds(Setting.ddp(), step, own) == pytest.approx(0.04 + wire / 1e9, rel=1e-12)
    # 40 MB of gradients: two buckets, the first (25 MiB) all-reduced during the backward pass, so only the last
    # one's 13,785,600 bytes are exposed, in transfer (20.5 ms at 10 Gbit/s) and in their share of the CPU (37.9 ms)
    large = Workload(numel=10_000_000, step_s=0.04, shared_step_s=0.27, shared_allreduce_cpu_s=0.11)
    last = 40_000_000 - 25 * 2**20
    wide = Network(hosts=8, bandwidth_bps=10e9, cores=2)
    assert last / 40e6 * 0.11 > 14 / 8 * last * 1538 / 1448 * 8 / 10e9
    assert iteration_seconds(Setting.ddp(), large, wide) == pytest.approx(0.27 + 0.11 * last / 40e6, rel=1e-12)
    # a gossip mix's CPU is in its own run's step (before and after its transfer): the field is DDP's alone
    gossip = Setting("ring", 1, "bf16")
    assert iteration_seconds(gossip, step, fast) == iteration_seconds(gossip, Workload(1_000_000, 0.04, shared_step_s=0.27), fast)
    with pytest.raises(ValueError, match="shared_allreduce_cpu_s"):
        Workload(numel=1, step_s=0.1, shared_allreduce_cpu_s=-1)
