"""Run under torchrun: mix seeded random tensors with every case given and save what each rank ends with.

Usage: gossip_worker.py OUT_DIR CASES_JSON, where CASES_JSON maps a world size n to its cases, run by the first n
ranks on a process group of their own (one launch covers several world sizes), and each case is {"topology",
"options", "rounds", "mixes", "wire_dtype", "chunk_bytes", "overlap", "strided", "staleness", "schedule"};
with "staleness" each worker takes its neighbours' messages when ``reference.delivery_schedule(n, staleness,
schedule)`` says;
with "overlap" each mix is start_mix, then every tensor is shifted by
``overlap_shift(rank)`` while the mix is in flight, then finish_mix; with "strided" the first tensor is a transposed view (not contiguous). Rank r's tensors are drawn from numpy seed (case index, r), which the test redraws for its
dense reference. GOSSIP_BACKEND=nccl puts each rank's tensors on cuda:LOCAL_RANK (the GPU tests).
"""

import gc

gc.disable()  # while torch and Lightning import, as lightning_dpgan/__init__.py does for its own imports

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from lightning_dpgan.gossip import DistributedTransport, GossipOptions, build_engine
from lightning_dpgan.topology import build_topology

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reference import delivery_schedule  # noqa: E402
from stale_replay import ReplayedStale  # noqa: E402

gc.freeze()
gc.enable()

SHAPES = [((3, 5), "float64"), ((7,), "float64"), ((2, 2, 2), "float32"), ((11,), "float32")]


def case_tensors(case_index: int, rank: int, case: dict) -> list[np.ndarray]:
    rng = np.random.default_rng([case_index, rank])
    return [rng.standard_normal(shape).astype(dtype) for shape, dtype in SHAPES]


def overlap_shift(rank: int) -> float:
    """What a rank adds to its tensors while a started mix is in flight (an optimizer step, say)."""
    return 0.25 * (rank + 1)


def main() -> None:
    out_dir, by_size = sys.argv[1], json.loads(sys.argv[2])
    backend = os.environ.get("GOSSIP_BACKEND", "gloo")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    rank = dist.get_rank()
    for size, cases in sorted(by_size.items(), key=lambda item: int(item[0])):
        n = int(size)
        group = dist.new_group(list(range(n)))  # every rank takes part in creating it
        if rank < n:
            run_cases(out_dir, cases, rank, n, group, device)
    dist.barrier()
    dist.destroy_process_group()


def run_cases(out_dir: str, cases: list[dict], rank: int, world: int, group: dist.ProcessGroup, device: torch.device) -> None:
    results = {}
    for index, case in enumerate(cases):
        topology = build_topology(case["topology"], world, **case.get("options", {}))
        chunking = {"chunk_bytes": case["chunk_bytes"]} if "chunk_bytes" in case else {}  # else the default
        options = GossipOptions(rounds=case["rounds"], wire_dtype=case.get("wire_dtype"), staleness=case.get("staleness", 0), **chunking)
        transport = DistributedTransport(rank, group, options.chunk_bytes)
        if case.get("staleness"):  # each message taken at its seeded step
            schedule = delivery_schedule(world, case["staleness"], case["schedule"])
            engine = ReplayedStale(topology, rank, transport, options, lambda sender, tag, schedule=schedule: schedule(rank, sender, tag))
        else:
            engine = build_engine(topology, rank, options, transport)
        tensors = [torch.from_numpy(a).to(device) for a in case_tensors(index, rank, case)]
        if case.get("strided"):
            tensors[0] = tensors[0].t().contiguous().t()  # the same values, stored column by column
        distances = []
        group_ids = [0] * len(tensors)
        for _ in range(case.get("mixes", 1)):
            if case.get("overlap"):
                pending = engine.start_mix(tensors)
                for t in tensors:
                    t.add_(overlap_shift(rank))
                engine.finish_mix(pending)
            else:
                engine.step(tensors)
            if case.get("track_consensus"):
                distances.append(float(engine.consensus_distance(tensors, group_ids, 1)[0]))
        engine.close()
        for k, t in enumerate(tensors):
            results[f"{index}/{k}"] = t.cpu().numpy()
        results[f"{index}/messages"] = np.array(engine.messages_sent)
        results[f"{index}/consensus"] = np.array(distances)
    np.savez(os.path.join(out_dir, f"n{world}_rank{rank}.npz"), **results)


if __name__ == "__main__":
    main()
    gc.freeze()  # exiting would walk every object of torch and Lightning: seconds per rank
