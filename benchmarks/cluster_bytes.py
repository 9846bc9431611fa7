"""Fewer bytes on slow links: DDP, bf16 gossip, CHOCO compressed gossip and local steps, side by side.

    sudo python benchmarks/cluster_bytes.py --hosts 8 --rates 200mbit 50mbit 10mbit --steps 600 --fid 300 200

The widened digits DCGAN of ``cluster_train.py`` on the emulated cluster, one worker per host. Every setting here is
synchronous, so what a link changes is the seconds an iteration takes, not what the iterations compute. The
benchmark measures the two apart, side by side:

* quality, once per setting on an unlimited link: ``--steps`` iterations, FID every ``--every``; the iteration at
  which the consensus model first reaches each ``--fid``, and FID at the last iteration (equal iterations);
* speed, per rate and setting: a run of ``--probe-steps`` on the limited link, seconds per iteration between its two
  evaluations;
* time to each FID target at each rate: that iteration times those seconds per iteration (evaluations excluded);
* bytes a host sends per iteration, from the message sizes (``lightning_dpgan.sim.timing.bytes_per_iteration``:
  the engines' message sizes with their 64-byte header; DDP: a ring all_reduce of fp32 gradients,
  ``2 (n - 1) / n`` of them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import EmulatedCluster, add_link_arguments, link_options, parse_rate, preflight  # noqa: E402
from cluster_train import PARAMETER_BYTES, first_reaching, fit, read_rows, seconds_per_iteration, slug  # noqa: E402

ONE_PEER = ["topology=one_peer_exponential", "gossip_rounds=1"]
RING = ["topology=ring", "gossip_rounds=1"]
SETTINGS = {
    "DDP, all_reduce": ["strategy=ddp"],
    "one-peer exponential, bf16": ONE_PEER + ["wire_dtype=bf16"],
    "ring, bf16": RING + ["wire_dtype=bf16"],
    "ring, int8 CHOCO": RING + ["compression=int8"],
    "ring, top-1 % CHOCO": RING + ["compression=topk"],
    "ring, sign CHOCO": RING + ["compression=sign"],
    "one-peer exponential, bf16, H = 4": ONE_PEER + ["wire_dtype=bf16", "gossip_every=4"],
}
BASELINE = "one-peer exponential, bf16"


def setting_of(overrides: list[str]) -> object:
    """The time model's description (``lightning_dpgan.sim.timing.Setting``) of a setting's CLI overrides."""
    from lightning_dpgan.sim.timing import Setting

    value = dict(o.split("=", 1) for o in overrides)
    if value.get("strategy") == "ddp":
        return Setting.ddp()
    return Setting(topology=value["topology"], rounds=int(value.get("gossip_rounds", 1)), wire_dtype=value.get("wire_dtype"),
                   compression=value.get("compression"), every=int(value.get("gossip_every", 1)))


def bytes_per_iteration(setting: str, hosts: int) -> float:
    """What one host sends per iteration, headers included: the time model's count, from the engines' message sizes."""
    from lightning_dpgan.sim.timing import Workload
    from lightning_dpgan.sim.timing import bytes_per_iteration as sent

    return sent(setting_of(SETTINGS[setting]), Workload(numel=PARAMETER_BYTES // 4, step_s=0.0), hosts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--rates", nargs="+", default=["200mbit", "50mbit", "10mbit"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--probe-steps", type=int, default=20, help="iterations of each limited-link speed run")
    parser.add_argument("--fid", type=float, nargs="+", default=[300.0, 200.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", nargs="+", default=None, help="a subset, by slug")
    parser.add_argument("--out", type=Path, default=Path("runs/cluster_bytes"))
    add_link_arguments(parser)
    args = parser.parse_args()
    preflight(parser, **link_options(args))
    for rate in args.rates:
        if parse_rate(rate) is None:
            parser.error(f"--rates must be limits such as 10mbit, got {rate!r}")
    settings = [s for s in SETTINGS if args.settings is None or slug(s) in args.settings]
    results: dict[str, dict[str, object]] = {}
    for setting in settings:
        out = args.out / f"seed{args.seed}" / slug(setting)
        with EmulatedCluster(args.hosts, None, port=29603, **link_options(args)) as cluster:
            rows = fit(cluster, SETTINGS[setting], out / "quality", args.steps, args.every, args.seed)
        speed = {}
        for rate in args.rates:
            with EmulatedCluster(args.hosts, rate, port=29604, **link_options(args)) as cluster:
                congestion = cluster.congestion_control()
                probe = fit(cluster, SETTINGS[setting], out / rate, args.probe_steps, args.probe_steps // 2, args.seed)
            speed[rate] = seconds_per_iteration(probe)
        results[setting] = {
            "bytes_per_iteration": bytes_per_iteration(setting, args.hosts),
            "steps_to_fid": {fid: (r["step"] if (r := first_reaching(rows, fid)) else None) for fid in args.fid},
            "fid": rows[-1]["fid"], "steps": rows[-1]["step"], "s_per_it": speed, "congestion_control": congestion,
        }
        print(f"{setting}: {json.dumps(results[setting])}", file=sys.stderr, flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"cluster_bytes_seed{args.seed}.json").write_text(json.dumps(results, indent=1))
    congestion = "/".join(sorted({str(r["congestion_control"]) for r in results.values()}))
    base = results.get(BASELINE)
    lines = [f"**{args.hosts} hosts**, TCP {congestion}, seed {args.seed}; time to FID in training seconds "
             "(iterations to the target on an unlimited link × seconds per iteration at the rate)", ""]
    for rate in args.rates:
        head = " | ".join(f"s to FID ≤ {fid:g} | speed-up" for fid in args.fid)
        lines += [f"**{rate}** (bytes and speed-ups against {BASELINE})", "",
                  f"| setting | MB sent per iteration | fewer bytes | it/s | {head} | FID at {args.steps} |",
                  "|---|" + "---:|" * (4 + 2 * len(args.fid))]
        for setting, r in results.items():
            cells = [setting, f"{r['bytes_per_iteration'] / 1e6:.3f}",
                     f"{base['bytes_per_iteration'] / r['bytes_per_iteration']:.1f}×" if base else "",
                     f"{1 / r['s_per_it'][rate]:.2f}"]
            for fid in args.fid:
                steps = r["steps_to_fid"][fid]
                seconds = steps * r["s_per_it"][rate] if steps is not None else None
                base_steps = base["steps_to_fid"][fid] if base else None
                cells.append(f"{seconds:.0f} ({steps:.0f})" if seconds is not None else "not reached")
                cells.append(f"{base_steps * base['s_per_it'][rate] / seconds:.2f}×" if seconds and base_steps else "")
            cells.append(f"{r['fid']:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    (args.out / f"cluster_bytes_seed{args.seed}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
