"""A Fabric loop whose saved state uses the names the strategy's own records use (``step``, ``rank``, ``token``):
2 processes (Fabric's launcher), 3 steps, ``fabric.save``, 2 more steps, ``fabric.load``. Writes what ``load``
returned and each replica's parameters before and after, as rank<r>.json / rank<r>.pt in the folder given."""

from __future__ import annotations

import gc

gc.disable()  # while torch and Lightning import, as lightning_dpgan/__init__.py does for its own imports

import json
import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_dpgan import DecentralizedFabricStrategy
from lightning_dpgan.optim import OptimisticAdam

gc.freeze()
gc.enable()


def main(out: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy=DecentralizedFabricStrategy("ring"))
    fabric.launch()
    fabric.seed_everything(0, verbose=False)
    model = nn.Linear(3, 1)
    model, optimizer = fabric.setup(model, OptimisticAdam([{"params": model.parameters()}], lr=0.1))

    def train(steps: int) -> None:
        for _ in range(steps):
            loss = model(torch.randn(8, 3)).pow(2).mean()
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()

    train(3)
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    user = {"step": 7, "rank": "mine", "token": [1, 2], "run_id": "own", "topology": "ours"}
    fabric.save(out / "state.ckpt", {"model": model, "optimizer": optimizer, **user})
    train(2)
    remainder = fabric.load(out / "state.ckpt", {"model": model, "optimizer": optimizer})
    loaded = {name: p.detach().clone() for name, p in model.named_parameters()}
    rank = fabric.global_rank
    (out / f"rank{rank}.json").write_text(json.dumps({"remainder": remainder, "user": user}))
    torch.save({"saved": saved, "loaded": loaded}, out / f"rank{rank}.pt")
    try:
        fabric.save(out / "clash.ckpt", {"model": model, "lightning_dpgan": 1})
    except ValueError as err:
        (out / f"clash{rank}.txt").write_text(str(err))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    gc.freeze()  # exiting would walk every object of torch and Lightning: seconds per rank
