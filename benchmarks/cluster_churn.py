"""Churn on the emulated cluster: a host lost mid-run and a replacement started later, against the undisturbed run.

    sudo python benchmarks/cluster_churn.py --hosts 8 --rate 200mbit --steps 800 --kill-at 300 --join-at 500 --fid 300 200

The widened digits DCGAN of ``cluster_train.py``, one worker per host, the real command line on every host, the same
seed. Four runs:

* **undisturbed**: ``fit ... membership=live`` on ring gossip (bf16 on the wire); nobody leaves;
* **live**: the same run; the last host's worker is killed (SIGKILL) once the checkpoint of iteration ``--kill-at``
  is on disk, and a new worker is started in that host's namespace once the checkpoint of ``--join-at`` is:
  ``fit devices=1 membership=live ckpt_path=join`` with ``MASTER_ADDR`` = host 0 (docs/guide.md: joining);
* **elastic**: ``recipes/elastic_torchrun.sh`` on every host (fixed membership, ``--nnodes=N-1:N``, ``ckpt_path=last``):
  the kill takes the last host's agent and worker; the other agents restart their workers at N-1 from the newest
  checkpoint; the replacement is a new agent on that host, which makes every agent restart its worker at N;
* **DDP**: the same recipe with ``strategy=ddp``.

Every run writes a checkpoint every ``--every`` iterations (the elastic recipe's cadence; the others pay the same
writes) and evaluates nothing while it trains. Afterwards ``validate`` scores each checkpoint's consensus model
(FID on the digits, the embedded extractor). The time to quality is the wall time from the launch to the moment the
first checkpoint with FID <= each ``--fid`` was written: it holds every cost of a change, the restarts and the
iterations done again included. The kill falls just after a checkpoint, the elastic recipe's best case (it redoes
no iterations); a host lost at a random moment costs it half a checkpoint interval more on average.

The hosts share this machine's cores: every host's worker (its torchrun agent too) runs in a cgroup held to a fair
share, the cores divided by ``--hosts``, so that a host that leaves does not make the others faster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import CpuQuota, EmulatedCluster, add_link_arguments, link_options, preflight  # noqa: E402
from cluster_train import MODEL, slug  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOSSIP = ["topology=ring", "gossip_rounds=1", "wire_dtype=bf16"]  # live membership needs a static graph
DDP_OVERRIDES = ["strategy=ddp"]
UNDISTURBED, LIVE, ELASTIC, DDP = "undisturbed", "live membership", "elastic torchrun (gossip)", "DDP, elastic torchrun"
SETTINGS = (UNDISTURBED, LIVE, ELASTIC, DDP)
#: what the cluster sets for a worker it starts itself; a torchrun agent or a joiner must not inherit it
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID")
RDZV_PORT = 29400


def own_env(**variables: str) -> list[str]:
    """``env`` without the cluster's torchrun-style worker variables, with ``variables`` (and the venv's tools on
    ``PATH``: torchrun)."""
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    return ["env", *(f"--unset={name}" for name in LAUNCHER_ENV), f"PATH={path}", *(f"{k}={v}" for k, v in variables.items())]


class Churn:
    """One run on the cluster: its hosts' processes, the kill and the replacement, the checkpoints' times."""

    def __init__(self, setting: str, cluster: EmulatedCluster, quotas: list[CpuQuota], run_dir: Path,
                 args: argparse.Namespace) -> None:
        self.setting, self.cluster, self.quotas, self.run_dir, self.args = setting, cluster, quotas, run_dir, args
        self.fit_dir = run_dir / "run"  # the run's own folder (Hydra's run directory, every host's): beside the logs
        self.victim = cluster.hosts - 1
        self.procs: dict[str, subprocess.Popen] = {}
        self.events: dict[str, float] = {}

    # ------------------------------------------------------------------ commands
    def _overrides(self) -> list[str]:
        a = self.args
        training = DDP_OVERRIDES if self.setting == DDP else GOSSIP
        return [*MODEL, *training, f"max_steps={a.steps}", f"seed={a.seed}", "evaluation.enabled=false",
                f"checkpoint.every_n_train_steps={a.every}", "checkpoint.save_top_k=-1"]

    def command(self, host: int, replacement: bool = False) -> list[str]:
        if self.setting in (ELASTIC, DDP):
            hosts = self.cluster.hosts
            recipe = own_env(RDZV_HOST=self.cluster.address(0), RDZV_PORT=str(RDZV_PORT), RDZV_ID=f"churn-{slug(self.setting)}",
                             MIN_NODES=str(hosts - 1), MAX_NODES=str(hosts), RESTARTS="3", RUN_DIR=str(self.fit_dir),
                             CHECKPOINT_EVERY=str(self.args.every), OMP_NUM_THREADS="1", LOCAL_ADDR=self.cluster.address(host),
                             RDZV_IS_HOST="1" if host == 0 and not replacement else "0")  # no hostname to match in a namespace
            return [*recipe, "bash", str(ROOT / "recipes" / "elastic_torchrun.sh"), *self._overrides()]
        fit = [sys.executable, "-m", "lightning_dpgan", "fit", *self._overrides(), "membership=live"]
        if replacement:  # alone, with the run's store address: it joins
            join = own_env(MASTER_ADDR=self.cluster.address(0), MASTER_PORT=str(self.cluster.port), OMP_NUM_THREADS="1")
            return [*join, *fit, "devices=1", "ckpt_path=join", f"hydra.run.dir={self.run_dir / 'joiner'}"]
        return [*fit, "devices=1", f"num_nodes={self.cluster.hosts}", f"hydra.run.dir={self.fit_dir}"]

    def start(self, name: str, host: int, command: list[str]) -> None:
        with open(self.run_dir / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
            proc = self.cluster.start(host, command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.quotas[host].add(proc.pid)
        self.procs[name] = proc

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        churn = self.setting != UNDISTURBED
        self.started = time.time()
        for host in range(self.cluster.hosts):
            self.start(f"host{host}", host, self.command(host))
        deadline, failed = self.started + self.args.timeout, []
        try:
            while any(p.poll() is None for p in self.procs.values()):
                steps = self.checkpoints()
                if churn and "kill" not in self.events and self.args.kill_at in steps:
                    os.killpg(self.procs[f"host{self.victim}"].pid, signal.SIGKILL)
                    self.events["kill"] = time.time() - self.started
                if churn and "join" not in self.events and self.args.join_at in steps and "kill" in self.events:
                    self.start("replacement", self.victim, self.command(self.victim, replacement=True))
                    self.events["join"] = time.time() - self.started
                failed = [name for name, p in self.procs.items() if p.poll() not in (None, 0) and not self._killed(name)]
                if failed:
                    break  # reported below, with its log
                if time.time() > deadline:
                    raise TimeoutError(f"{self.setting}: not done after {self.args.timeout} s")
                time.sleep(0.2)
        finally:
            for proc in self.procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for name in failed or [n for n, p in self.procs.items() if p.returncode != 0 and not self._killed(n)]:
            tail = (self.run_dir / f"{name}.log").read_text()[-4000:]
            raise RuntimeError(f"{self.setting}: {name} exited {self.procs[name].returncode}:\n{tail}")
        return {"checkpoints": {step: [str(path), seconds] for step, (path, seconds) in self.checkpoints().items()},
                "events": self.events, "changes": self.changes()}

    def _killed(self, name: str) -> bool:
        return name == f"host{self.victim}" and "kill" in self.events

    def checkpoints(self) -> dict[int, tuple[Path, float]]:
        """Iteration -> (the newest file of that iteration's periodic checkpoint, seconds from the launch to it)."""
        found: dict[int, tuple[Path, float]] = {}
        for path in (self.fit_dir / "checkpoints").glob("*step=*.ckpt"):
            match = re.search(r"step=(\d+)(?:-v\d+)?\.ckpt$", path.name)
            if not match or path.name.startswith("last"):
                continue
            step, seconds = int(match.group(1)), path.stat().st_mtime - self.started
            if step not in found or seconds > found[step][1]:
                found[step] = (path, seconds)
        return found

    def changes(self) -> list[str]:
        """What each run said about its members: a live run's changes, the restarts of a torchrun agent."""
        text = (self.run_dir / "host0.log").read_text(errors="replace")
        said = re.findall(r"membership step \d+: [^\n]*", text)
        restarts = len(re.findall(r"Restarting worker group|restarting worker group", text, flags=re.IGNORECASE))
        return said + ([f"host 0's agent restarted its worker {restarts} time(s)"] if restarts else [])



def score(run_dir: Path, checkpoints: dict[int, list], seed: int) -> dict[int, float]:
    """FID of each checkpoint's consensus model, by ``validate`` (in this process: one start for them all)."""
    from lightning_dpgan import cli

    fids = {}
    for step, (path, _) in sorted(checkpoints.items()):
        target = run_dir / "validate" / str(step)
        try:
            cli.main(["validate", *MODEL, f"ckpt_path={path}", f"seed={seed}", f"hydra.run.dir={target}"])
        except SystemExit as exit_:
            if exit_.code:
                raise RuntimeError(f"validate {path} exited {exit_.code}") from exit_
        fids[step] = json.loads((target / "validate.json").read_text())["fid"]
    return fids


def time_to(result: dict, fid: float) -> tuple[float, int] | None:
    """(seconds from the launch, iteration) of the first checkpoint with FID <= ``fid``, or None."""
    for step in sorted(result["fid"], key=int):
        if result["fid"][step] <= fid:
            return result["checkpoints"][step][1], int(step)
    return None


def table(results: dict[str, dict], args: argparse.Namespace, congestion: str) -> str:
    base = results.get(UNDISTURBED)
    head = " | ".join(f"s to FID ≤ {fid:g} (it.) | ÷ undisturbed" for fid in args.fid)
    lines = [
        f"**{args.hosts} hosts at {args.rate}**, TCP {congestion}, MTU {args.mtu}, each host a cgroup of "
        f"{os.cpu_count() / args.hosts:.2f} cores; host {args.hosts - 1} killed after the checkpoint of iteration "
        f"{args.kill_at}, a replacement started after that of {args.join_at}; a checkpoint every {args.every}; seed {args.seed}",
        "",
        f"| run | {head} | s to {args.steps} it. | ÷ undisturbed | FID at {args.steps} | killed, replaced at (s) | what the members said |",
        "|---|" + "---:|---:|" * len(args.fid) + "---:|---:|---:|---:|---|",
    ]
    for setting, r in results.items():
        cells = [setting]
        for fid in args.fid:
            reach, ref = time_to(r, fid), time_to(base, fid) if base else None
            cells.append(f"{reach[0]:.0f} ({reach[1]})" if reach else "not reached")
            cells.append(f"{reach[0] / ref[0]:.2f}×" if reach and ref else "")
        last = str(max(map(int, r["checkpoints"])))
        end, ref_end = r["checkpoints"][last][1], base["checkpoints"][last][1] if base and last in base["checkpoints"] else None
        ev = r["events"]
        cells += [f"{end:.0f}", f"{end / ref_end:.2f}×" if ref_end else "", f"{r['fid'][last]:.1f}",
                  f"{ev['kill']:.0f}, {ev['join']:.0f}" if "join" in ev else "", "; ".join(r["changes"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--rate", default="200mbit")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every", type=int, default=100, help="a checkpoint every this many iterations (each is scored)")
    parser.add_argument("--kill-at", type=int, default=300)
    parser.add_argument("--join-at", type=int, default=500)
    parser.add_argument("--fid", type=float, nargs="+", default=[300.0, 200.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    parser.add_argument("--settings", nargs="+", default=None, help="a subset, by slug: " + " ".join(map(slug, SETTINGS)))
    parser.add_argument("--out", type=Path, default=Path("runs/cluster_churn"))
    parser.add_argument("--collect", action="store_true", help="only rebuild the table from the runs in --out")
    add_link_arguments(parser)
    args = parser.parse_args()
    if not 0 < args.kill_at < args.join_at < args.steps or args.kill_at % args.every or args.join_at % args.every:
        parser.error(f"need 0 < --kill-at < --join-at < --steps, both multiples of --every ({args.every}); got "
                     f"{args.kill_at}, {args.join_at}, {args.steps}")
    if not args.collect:
        preflight(parser, **link_options(args))
    settings = [s for s in SETTINGS if args.settings is None or slug(s) in args.settings]
    saved = args.out / "cluster_churn.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    congestion = results.pop("_congestion_control", "not recorded")
    if not args.collect:
        share = os.cpu_count() / args.hosts
        for setting in settings:
            with contextlib.ExitStack() as stack:
                quotas = [stack.enter_context(CpuQuota(f"dpgan_churn{os.getpid()}_h{h}", share)) for h in range(args.hosts)]
                cluster = stack.enter_context(EmulatedCluster(args.hosts, args.rate, port=29610, **link_options(args)))
                congestion = cluster.congestion_control()
                run = Churn(setting, cluster, quotas, args.out / slug(setting), args).run()
            run["fid"] = score(args.out / slug(setting), run["checkpoints"], args.seed)
            results[setting] = json.loads(json.dumps(run))  # the keys as strings, as they are read back
            print(f"{setting}: {json.dumps(results[setting])}", file=sys.stderr, flush=True)
            args.out.mkdir(parents=True, exist_ok=True)  # after every run: a benchmark cut short keeps what it measured
            saved.write_text(json.dumps({"_congestion_control": congestion, **results}, indent=1))
    ordered = {s: results[s] for s in SETTINGS if s in results}
    text = table(ordered, args, congestion)
    print(text)
    (args.out / "cluster_churn.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
