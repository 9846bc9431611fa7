"""DPGAN under DPOSG with ``n`` replicas in one process, the real algorithm vectorized over the replicas.

Each parameter is held once for all replicas, stacked along a leading replica dimension ``(n, *shape)``. One step:

1. every replica's gradients at its live parameters ``z``, in one call: ``torch.func.vmap`` over the replicas of
   ``torch.func.grad`` of the package's :func:`~lightning_dpgan.gan.player_losses` (the function DPGAN's step
   calls), run on the package's generator and discriminator through ``torch.func.functional_call``;
2. one ``step()`` of the package's own optimizer (:data:`~lightning_dpgan.optim.OPTIMIZERS`, e.g.
   :class:`~lightning_dpgan.optim.OptimisticAdam`), built over the stacked tensors. Its arithmetic is elementwise
   with one learning rate per param group, so on a stacked tensor it is every replica's update at once, and the
   optimizer's code is not written a second time here;
3. its anchor hook mixes the stacked anchors as the gossip does: ``x <- W^t x`` over the replica dimension, with
   ``W`` the package's topology (:mod:`lightning_dpgan.topology`), as one dense ``W^t`` (small ``n``) or ``t``
   sparse products (large ``n``); the optimizer then extrapolates from the mixed anchors.

``streams="exact"`` draws each replica's batches and noise as the real run's rank does: the package's shards
(:class:`~lightning_dpgan.data.sharding.ShardSampler`, reshuffled per epoch), a random stream seeded by
:func:`~lightning_dpgan.seeding.seed_for_rank` after the initial broadcast, one draw from it at each epoch's start
(the DataLoader's base seed), then the step's noise. With the same seeds the simulator then reproduces the
multi-process run replica by replica (``tests/test_simulator.py``). ``streams="fast"`` draws all replicas' noise
in one call from one generator and their batches uniformly from their shards: the same distribution, not the
same numbers, and no Python loop over replicas.

The gossip is given as the real run's :class:`~lightning_dpgan.gossip.GossipOptions`: rounds, local steps
(``every``: the anchor hook mixes on every ``every``-th step, as the engine counts them), CHOCO compression
(``compression``, ``topk_fraction``, ``consensus_step``: one public copy ``x_hat`` per replica, the same on every
worker that holds it, compressed by the package's compressors, :meth:`~lightning_dpgan.gossip.compression.Compressor.roundtrip`
for all replicas at once) and ``mixing=False`` (no communication). It refuses, naming them, what it does not
simulate: a narrow wire dtype, overlap, staleness, live membership, n_critic > 1, EMA, WGAN-GP (its interpolates
draw random numbers inside the vectorized step), BatchNorm (buffers), a scheduler, non-anchored optimizers. R1 is taken through
``torch.func.vjp`` (:func:`~lightning_dpgan.losses.r1_scores`), the same penalty as the worker's autograd one.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_dpgan.data.sharding import ShardSampler
from lightning_dpgan.gan import DPGAN, player_losses
from lightning_dpgan.gossip.combine import lerps
from lightning_dpgan.gossip.compression import build_compressor
from lightning_dpgan.gossip.options import GossipOptions
from lightning_dpgan.mix_sets import AnchoredOptimizer
from lightning_dpgan.optim import OPTIMIZERS
from lightning_dpgan.seeding import rank_seed
from lightning_dpgan.topology import Topology, build_topology

STREAMS = ("exact", "fast")
COMPUTE = ("vmap", "loop")
MIXING = ("auto", "dense", "sparse", "engine")


def replica_streams(world_size: int, seed: int = 0) -> list[torch.Generator]:
    """One generator per replica in the state :func:`~lightning_dpgan.seeding.seed_for_rank` leaves torch's global
    one in on that rank, when ``PL_GLOBAL_SEED`` is ``seed``."""
    return [torch.Generator().manual_seed(rank_seed(seed, rank)) for rank in range(world_size)]


def _flat(tensors: list[Tensor], n: int) -> Tensor:
    """The stacked tensors end to end per replica, ``(n, numel)``: every replica's bucket, as the engine packs it."""
    return torch.cat([t.reshape(n, -1) for t in tensors], dim=1)


def _unflatten(flat: Tensor, tensors: list[Tensor]) -> None:
    torch._foreach_copy_(tensors, [part.view_as(t) for part, t in zip(flat.split([t[0].numel() for t in tensors], 1), tensors)])


class _Players(nn.Module):
    """The generator and discriminator as one module, so that one ``functional_call`` swaps in a replica's both."""

    def __init__(self, gan: DPGAN) -> None:
        super().__init__()
        self.generator, self.discriminator, self.loss = gan.generator, gan.discriminator, gan.loss

    def forward(self, real: Tensor, noise: Tensor) -> Tensor:
        loss_d, loss_g = player_losses(self.generator, self.discriminator, self.loss, real, noise, True, transformed=True)
        assert loss_g is not None
        return loss_d + loss_g  # one backward: ∇_D L_D lands in D, ∇_G L_G in G, as in DPGAN.training_step


class Simulator:
    """``world_size`` replicas of ``gan`` trained on ``datamodule`` with DPOSG over ``topology``, ``rounds`` rounds.

    Args:
        gan: a :class:`~lightning_dpgan.gan.DPGAN`; its generator, discriminator, loss, optimizer (an anchored one),
            learning rates and optimizer arguments are the simulated ones. Every replica starts from its weights
            (the real run broadcasts rank 0's).
        datamodule: a sharded datamodule (e.g. ``GaussianMixtureDataModule``) of in-memory tensors.
        topology: a name of :func:`~lightning_dpgan.topology.build_topology` or a built topology.
        rounds: gossip rounds per mix (``t``), when ``gossip`` is not given.
        gossip: the real run's gossip options (rounds, ``every``, CHOCO compression, ``mixing``); see the module.
        seed: the run's global seed (``pl.seed_everything(seed)``).
        mixing: ``"dense"`` (one ``W^t`` matrix), ``"sparse"`` (``t`` sparse products per step), ``"auto"``
            (dense up to 64 replicas), or ``"engine"`` (each replica's round with the gossip engine's own arithmetic,
            one call per replica: the real run to the bit, for checking).
        streams: ``"exact"`` (each replica's numbers as the real run draws them) or ``"fast"`` (see the module).
        compute: ``"vmap"`` (all replicas' gradients in one vectorized call) or ``"loop"`` (``torch.func.grad`` on
            one replica at a time: the same kernels as a worker's backward, bit for bit, where a batched matmul
            rounds differently; for checking, not for speed).
    """

    def __init__(
        self,
        gan: DPGAN,
        datamodule: Any,
        world_size: int,
        topology: str | Topology = "ring",
        rounds: int = 1,
        seed: int = 0,
        mixing: str = "auto",
        streams: str = "exact",
        compute: str = "vmap",
        gossip: GossipOptions | None = None,
        **topology_options: Any,
    ) -> None:
        if streams not in STREAMS:
            raise ValueError(f"streams must be one of {STREAMS}, got {streams!r}")
        if mixing not in MIXING:
            raise ValueError(f"mixing must be one of {MIXING}, got {mixing!r}")
        unsupported = [
            name for name, on in (("n_critic > 1", gan.n_critic > 1), ("ema_decay", gan.ema_decay is not None),
                                  ("wgan-gp", bool(gan.loss.gradient_penalty)),
                                  ("a scheduler", gan.scheduler_factory is not None),
                                  ("buffers", any(True for _ in gan.buffers() if _.dim() > 0)))
            if on
        ]
        if unsupported:
            raise ValueError(f"the simulator does not simulate {', '.join(unsupported)} yet")
        if gossip is not None and rounds not in (1, gossip.rounds):
            raise ValueError(f"rounds={rounds} and gossip.rounds={gossip.rounds}: give the rounds in gossip only")
        self.options = gossip if gossip is not None else GossipOptions(rounds=rounds)
        refused = [f"{name}={value!r}" for name, value, plain in (
            ("wire_dtype", self.options.wire_dtype, self.options.wire_dtype in (None, "fp32", "float32")),
            ("overlap", self.options.overlap, not self.options.overlap),
            ("staleness", self.options.staleness, not self.options.staleness),
            ("membership", self.options.membership, self.options.membership == "fixed"),
        ) if not plain]
        if refused:
            raise ValueError(f"the simulator does not simulate {', '.join(refused)} yet; it simulates rounds, every, "
                             "compression and mixing=False")
        self.n, self.rounds, self.streams = world_size, self.options.rounds, streams
        self.topology = topology if isinstance(topology, Topology) else build_topology(topology, world_size, **topology_options)
        if self.topology.world_size != world_size:
            raise ValueError(f"the topology has {self.topology.world_size} workers, not {world_size}")
        self.options.check_topology(self.topology)  # CHOCO: a static graph, and a warning for a large consensus step
        self.compressor = (build_compressor(self.options.compression, self.options.topk_fraction)
                           if self.options.compression is not None else None)
        self.consensus_step = self.options.resolved_consensus_step()
        self.public: Tensor | None = None  # CHOCO's public copies x_hat, (n, numel): identical wherever held
        self.hook_steps = 0  # anchor-hook calls: the engine's ``steps``, which ``every`` counts
        self.players = _Players(gan)
        self.latent_dim = gan.latent_dim

        # parameters stacked over the replicas; generator first, as DPGAN's param groups
        def stacked(module: nn.Module, prefix: str) -> dict[str, Tensor]:
            return {f"{prefix}.{name}": p.detach().unsqueeze(0).repeat(world_size, *([1] * p.dim())).contiguous()
                    for name, p in module.named_parameters()}

        self.params = {**stacked(gan.generator, "generator"), **stacked(gan.discriminator, "discriminator")}
        g_names = [k for k in self.params if k.startswith("generator.")]
        d_names = [k for k in self.params if k.startswith("discriminator.")]
        factory = OPTIMIZERS[gan.optimizer_spec] if isinstance(gan.optimizer_spec, str) else gan.optimizer_spec
        self.optimizer = factory(
            [{"params": [self.params[k] for k in g_names], "lr": gan.lr_g, "name": "generator"},
             {"params": [self.params[k] for k in d_names], "lr": gan.lr_d, "name": "discriminator"}],
            **gan.optimizer_kwargs,
        )
        if not isinstance(self.optimizer, AnchoredOptimizer):
            raise ValueError(f"the simulator mixes anchors: {type(self.optimizer).__name__} has none (use an optimistic optimizer)")
        self.optimizer.register_anchor_hook(lambda optimizer, anchors: self.gossip_step(anchors))
        self._names = g_names + d_names

        # mixing: W^t over the replica dimension; a time-varying graph's rounds go on counting across steps
        if mixing == "auto":
            mixing = "dense" if world_size <= 64 else "sparse"
        if mixing == "engine" and self.topology.is_complete:
            raise ValueError("mixing='engine' follows the neighbour rounds; a complete graph averages with one all_reduce (use 'dense')")
        self._dense = mixing == "dense"
        self.mixing = mixing
        self.phase = 0  # gossip rounds run so far, as the engine's ``phase``
        self._mixers: dict[int, list[Tensor]] = {}

        # data: every replica's shard of the training set, as the datamodule hands it to each rank
        datamodule.setup("fit")
        self.batch_size = datamodule.batch_size
        dataset = datamodule.train_set
        self.data = dataset.dataset.tensors[0][torch.as_tensor(dataset.indices)] if hasattr(dataset, "indices") else dataset.tensors[0]
        self.samplers = [ShardSampler(dataset, world_size, rank, datamodule.shard, datamodule.train_labels, seed=datamodule.seed)
                         for rank in range(world_size)]
        self.batches_per_epoch = len(self.samplers[0]) // self.batch_size  # the loader drops the last partial batch
        self.generators = replica_streams(world_size, seed)
        self._order: Tensor | None = None
        self._fast_generator = torch.Generator().manual_seed(seed)
        self._shards = torch.as_tensor(np.stack([np.resize(s.indices, len(s)) for s in self.samplers]))
        self.steps = 0

        if compute not in COMPUTE:
            raise ValueError(f"compute must be one of {COMPUTE}, got {compute!r}")
        self.compute = compute
        self._grad = vmap(grad(self._loss), in_dims=(0, 0, 0), randomness="error")
        self._grad_one = grad(self._loss)

    def _loss(self, params: dict[str, Tensor], real: Tensor, noise: Tensor) -> Tensor:
        return functional_call(self.players, params, (real, noise))

    # ------------------------------------------------------------------ the streams
    def _next_batches(self) -> tuple[Tensor, Tensor]:
        """``(n, batch, *sample)`` real batches and ``(n, batch, latent)`` noise for this step."""
        b, position = self.batch_size, self.steps % self.batches_per_epoch
        if self.streams == "fast":
            pick = torch.randint(self._shards.shape[1], (self.n, b), generator=self._fast_generator)
            real = self.data[torch.gather(self._shards, 1, pick)]
            return real, torch.randn(self.n, b, self.latent_dim, generator=self._fast_generator)
        if position == 0:  # an epoch starts: each rank's loader reshuffles its shard and draws its base seed
            epoch = self.steps // self.batches_per_epoch
            orders = []
            for sampler, generator in zip(self.samplers, self.generators):
                sampler.set_epoch(epoch)
                orders.append(torch.as_tensor(list(iter(sampler))[: self.batches_per_epoch * b]))
                torch.empty((), dtype=torch.int64).random_(generator=generator)
            self._order = torch.stack(orders)
        assert self._order is not None
        real = self.data[self._order[:, position * b : (position + 1) * b]]
        noise = torch.stack([torch.randn(b, self.latent_dim, generator=g, dtype=real.dtype) for g in self.generators])
        return real, noise

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def gossip_step(self, tensors: list[Tensor]) -> None:
        """What the real run's engine does with the anchors at one optimizer step (the anchor hook): on every
        ``every``-th step, CHOCO's compressed mix or the ``W^t`` mix, and nothing without mixing."""
        self.hook_steps += 1
        if not self.options.mixing or self.hook_steps % self.options.every:
            return
        if self.compressor is not None:
            self.choco_mix(tensors)
        else:
            self.mix(tensors)

    @torch.no_grad()
    def choco_mix(self, tensors: list[Tensor]) -> None:
        """One CHOCO round (:mod:`lightning_dpgan.gossip.choco`) over the replica dimension::

            q = Q(x - x_hat);  x_hat <- x_hat + q;  x <- x + gamma (W - I) x_hat

        Every worker's copy of replica ``j``'s ``x_hat`` is the same (each adds the same decoded ``q``), so one copy
        per replica stands for all. The copies start at replica 0's tensors at the first mix, as the engine's
        broadcast starts them. ``mixing="engine"`` compresses one replica at a time with the engine's
        ``encode``/``decode`` and combines in the engine's order, to the bit; otherwise ``Q`` runs on all rows at
        once (:meth:`~lightning_dpgan.gossip.compression.Compressor.roundtrip`) and ``(W - I) x_hat`` is one product."""
        assert self.compressor is not None
        flat = _flat(tensors, self.n)
        if self.public is None:
            self.public = flat[:1].repeat(self.n, 1)
        public, gamma = self.public, self.consensus_step
        if self.mixing == "engine":
            payload = torch.zeros(self.compressor.wire_bytes(flat.shape[1], flat.dtype), dtype=torch.uint8)
            decoded = torch.empty(flat.shape[1], dtype=flat.dtype)
            for i in range(self.n):
                self.compressor.encode(torch.sub(flat[i], public[i]), payload)
                self.compressor.decode(payload, decoded)
                public[i].add_(decoded)
            for i in range(self.n):  # each worker adds its in-neighbours' terms in the engine's order
                nb = self.topology.neighbours(i, 0)
                for j, weight in zip(nb.receive_from, nb.receive_weights):
                    flat[i].add_(public[j] - public[i], alpha=gamma * weight)
        else:
            public.add_(self.compressor.roundtrip(flat - public))
            flat.add_(self._mixed(public, 0) - public, alpha=gamma)
        _unflatten(flat, tensors)
        self.phase += 1

    @torch.no_grad()
    def mix(self, tensors: list[Tensor]) -> None:
        """``x <- W^t x`` over the replica dimension, in place (the synchronous engine's ``mix``)."""
        start = self.phase % self.topology.period
        if self.mixing == "engine":
            flat = _flat(tensors, self.n)
            for r in range(self.rounds):
                flat = self._engine_round(flat, start + r)
            _unflatten(flat, tensors)
        else:
            for tensor in tensors:  # tensor by tensor: packing them into one buffer first would cost a pass more
                tensor.copy_(self._mixed(tensor.view(self.n, -1), start).view_as(tensor))
        self.phase += self.rounds

    def _mixed(self, rows: Tensor, start: int) -> Tensor:
        """``W^t rows`` from round ``start`` of the graph's cycle: one dense ``W^t``, or ``t`` sparse products."""
        if start not in self._mixers:
            if self._dense:
                self._mixers[start] = [torch.tensor(self.topology.mixing_product(self.rounds, start), dtype=torch.float32)]
            else:
                with warnings.catch_warnings():  # "sparse CSR support is in beta": the product below is all it does
                    warnings.simplefilter("ignore", UserWarning)
                    self._mixers[start] = [torch.tensor(self.topology.matrix(start + r), dtype=torch.float32).to_sparse_csr()
                                           for r in range(self.rounds)]
        for m in self._mixers[start]:
            rows = m @ rows
        return rows

    def _engine_round(self, flat: Tensor, phase: int) -> Tensor:
        """One gossip round with the engine's arithmetic on every replica (``gossip/combine.py``): a lerp for one
        in-neighbour whose weight and the replica's own sum to 1, else ``x_i <- w_ii x_i + rows^T w`` in one
        ``addmv`` over the in-neighbours' rows in the engine's order. The same operations on the same numbers as
        each worker's, so the result is the same to the bit (one call per replica: for checking, not for speed)."""
        out = flat.clone()
        for i in range(self.n):
            nb = self.topology.neighbours(i, phase)
            if not nb.receive_from:
                continue
            rows = flat[list(nb.receive_from)]
            if lerps(nb.self_weight, nb.receive_weights):
                out[i].lerp_(rows[0], nb.receive_weights[0])
            else:
                out[i].addmv_(rows.t(), torch.tensor(nb.receive_weights, dtype=flat.dtype), beta=nb.self_weight)
        return out

    def step(self) -> None:
        """One DPOSG iteration on every replica."""
        real, noise = self._next_batches()
        if self.compute == "vmap":
            grads = self._grad(self.params, real, noise)
        else:  # one replica at a time: the kernels a worker runs, so the gradients are its own to the bit
            each = [self._grad_one({k: p[i] for k, p in self.params.items()}, real[i], noise[i]) for i in range(self.n)]
            grads = {k: torch.stack([g[k] for g in each]) for k in self._names}
        for name in self._names:
            self.params[name].grad = grads[name]
        self.optimizer.step()
        self.steps += 1

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()

    def replica_state(self, rank: int) -> dict[str, Tensor]:
        """Replica ``rank``'s live parameters ``z``, named as in DPGAN's ``state_dict``."""
        return {name: p[rank].detach().clone() for name, p in self.params.items()}

