"""Run under torchrun with 2 ranks: one exchange, then rank 1 exits; rank 0 posts a second exchange once rank 1's
connection has closed (gloo then raises at the post, not at the wait) and prints what waiting for it raised."""

import gc

gc.disable()  # while torch and Lightning import, as lightning_dpgan/__init__.py does for its own imports

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from lightning_dpgan.gossip import DistributedTransport, GossipPeerError

gc.freeze()
gc.enable()


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    transport = DistributedTransport(rank)
    received = torch.zeros(1, 3)
    for posted in transport.exchange(torch.full((3,), float(rank)), received, [1 - rank], [1 - rank]):
        transport.wait(posted, timedelta(seconds=30), 0)
    assert received[0, 0].item() == 1 - rank
    if rank == 1:
        os._exit(0)
    time.sleep(2)  # rank 1's sockets are closed by now
    try:
        for posted in transport.exchange(torch.zeros(3), received, [1], [1]):
            transport.wait(posted, timedelta(seconds=10), 1)
    except GossipPeerError as err:
        print(f"raised: {err}", flush=True)
        os._exit(0)
    print("nothing raised", flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
