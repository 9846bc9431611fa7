"""A GAN trained by a Lightning Fabric loop with DPOSG: two players, one optimistic optimizer, gossip on a ring.

    python -m lightning_dpgan.examples.fabric_gan --devices 4 --steps 3000

Each of ``--devices`` CPU processes trains its own replica on its own shard of PacGAN's grid of 25 Gaussians.
Every iteration computes both players' losses at the same parameters on the same batch, puts ``∇_D L_D`` into D
and ``∇_G L_G`` into G with one backward, and takes one step of one ``OptimisticAdam`` holding both players:
``DecentralizedFabricStrategy`` mixes its anchors with the ring's neighbours inside that step. At the end rank 0
prints the consensus generator's mode coverage (the generator averaged over the replicas with ``fabric.all_reduce``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_dpgan.data import mixture_modes, sample_mixture
from lightning_dpgan.fabric import DecentralizedFabricStrategy
from lightning_dpgan.gan import frozen_forward
from lightning_dpgan.gossip import GossipOptions
from lightning_dpgan.losses import build_loss, r1_penalty
from lightning_dpgan.metrics import mode_coverage
from lightning_dpgan.models import MLPDiscriminator, MLPGenerator
from lightning_dpgan.optim import OptimisticAdam


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256, help="per worker")
    parser.add_argument("--lr", type=float, default=1.5e-3, help="a centralized rate; each worker steps at sqrt(devices) x it")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse(argv)
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy=DecentralizedFabricStrategy(args.topology, gossip=GossipOptions()))
    fabric.launch()
    fabric.seed_everything(args.seed, verbose=False)
    players = nn.ModuleDict({"generator": MLPGenerator(latent_dim=16, output_scale=4.0), "discriminator": MLPDiscriminator()})
    lr = args.lr * math.sqrt(fabric.world_size)  # a worker's Adam step on its own batch is ~1/sqrt(n) of DDP's
    optimizer = OptimisticAdam(
        [{"params": players["generator"].parameters(), "lr": lr}, {"params": players["discriminator"].parameters(), "lr": lr}],
        betas=(0.5, 0.9),
    )
    players, optimizer = fabric.setup(players, optimizer)  # rank 0's weights everywhere, then a random stream per rank
    generator, discriminator = players.module["generator"], players.module["discriminator"]
    points, _ = sample_mixture("grid", 100_000, args.seed)
    shard = torch.as_tensor(points, dtype=torch.float32)[fabric.global_rank :: fabric.world_size]
    loss = build_loss("ns", r1=0.5)
    for _ in range(args.steps):
        real = shard[torch.randint(len(shard), (args.batch_size,))].requires_grad_(True)
        fake = generator(torch.randn(args.batch_size, generator.latent_dim))
        real_scores = discriminator(real)
        loss_d = loss.discriminator(real_scores, discriminator(fake.detach()))
        penalty = r1_penalty(real_scores, real)
        loss_g = loss.generator(frozen_forward(discriminator, fake))  # G's gradient only: D's parameters detached
        optimizer.zero_grad()
        fabric.backward(loss_d + loss.r1 / 2 * penalty + loss_g)  # both players at the same point, one backward
        optimizer.step()  # one optimistic step of both players, the anchors mixed with the neighbours inside it
    with torch.no_grad():  # the consensus generator: the replicas' average
        for p in generator.parameters():
            p.copy_(fabric.all_reduce(p.detach().clone(), reduce_op="mean"))
        samples = generator(torch.randn(2500, generator.latent_dim, generator=torch.Generator().manual_seed(1234)))
    scores = {k: float(v) for k, v in mode_coverage(samples, *mixture_modes("grid")).items()}
    if fabric.global_rank == 0:
        print(f"consensus generator after {args.steps} steps on {fabric.world_size} workers ({args.topology}): "
              f"{scores['modes']:.0f} of 25 modes, {100 * scores['high_quality']:.1f}% high quality")
    return scores


if __name__ == "__main__":
    main()
