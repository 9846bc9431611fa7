"""``DPGAN``: a GAN LightningModule whose iteration is DPOSG's: both gradients at the same point, one fused step.

One iteration (one batch) is:

1. noise and the real batch are drawn once; ``L_D`` and ``L_G`` are computed at the same parameters ``z``;
2. one ``manual_backward`` puts ``∇_D L_D`` into D's parameters and ``∇_G L_G`` into G's, nothing else (G's loss
   goes through D with its parameters detached);
3. a single ``optimizer.step()`` on one optimizer holding G and D as two param groups. Under
   :class:`~lightning_dpgan.strategy.DecentralizedStrategy` that is one gossip exchange per neighbour per round
   for both players together; with an optimistic optimizer it is DPOSG, with ``strategy="ddp"`` CPOSG, and with
   ``optimizer="adam"`` simultaneous Adam gradient descent/ascent.

With ``n_critic > 1`` only every ``n_critic``-th iteration gives G a gradient; the others are discriminator-only
(G's parameters have no gradient, so the optimizer leaves them, but they are still mixed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import IO, Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import _MAP_LOCATION_TYPE, _PATH
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from typing_extensions import Self, override

from lightning_dpgan.checks import check_choice, check_int, check_number
from lightning_dpgan.losses import GANLoss, build_loss, gradient_penalty, r1_penalty, r1_scores
from lightning_dpgan.optim import OPTIMIZERS
from lightning_dpgan.seeding import seed_for_rank


def check_learning_rate(name: str, lr: Any) -> None:
    """One rule for a player's rate, shared with the CLI, which checks it before ``lr_scaling`` changes it."""
    check_number(name, lr, 0)


OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[[Optimizer], LRScheduler]


class DPGAN(pl.LightningModule):
    """A GAN trained with simultaneous, fused updates.

    Args:
        generator: maps ``(N, latent_dim)`` noise to samples; its ``latent_dim`` attribute is used unless given.
        discriminator: maps samples to ``(N,)`` (or ``(N, 1)``) raw scores.
        optimizer: a name from :data:`lightning_dpgan.optim.OPTIMIZERS` or a callable taking param groups
            (e.g. a Hydra ``_partial_``); it receives ``optimizer_kwargs``.
        lr_g, lr_d: the two param groups' learning rates.
        optimizer_kwargs: further arguments, e.g. ``betas``.
        loss: ``"ns"`` (non-saturating), ``"hinge"`` or ``"wgan-gp"``, or a built :class:`~lightning_dpgan.losses.GANLoss`.
        gradient_penalty: WGAN-GP's weight (with a loss name).
        n_critic: iterations per generator update (the others update D alone).
        ema_decay: keep an exponential moving average of G (``generator_ema``, a ``torch.optim.swa_utils.AveragedModel``)
            for evaluation; ``None``: none.
        latent_dim: noise size, when the generator has no ``latent_dim``.
        scheduler: a callable taking the optimizer and returning an LR scheduler (e.g. a Hydra ``_partial_`` of
            ``torch.optim.lr_scheduler.LinearLR``), stepped once per iteration; ``None``: constant learning rates.
        r1: the R1 penalty's weight γ on D (with a loss name; a built ``GANLoss`` carries its own): ``γ/2 ·
            E_real ||∇ₓD(x)||²``, which keeps D from sharpening around narrow modes faster than G follows.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        optimizer: str | OptimizerFactory = "optimistic_adam",
        lr_g: float = 2e-4,
        lr_d: float = 2e-4,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        loss: str | GANLoss = "ns",
        gradient_penalty: float = 10.0,
        n_critic: int = 1,
        ema_decay: float | None = None,
        latent_dim: int | None = None,
        scheduler: SchedulerFactory | None = None,
        r1: float = 0.0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        if isinstance(optimizer, str):
            check_choice("optimizer (a name, or a callable)", optimizer, OPTIMIZERS)
        for name, lr in (("lr_g", lr_g), ("lr_d", lr_d)):
            check_learning_rate(name, lr)
        check_int("n_critic", n_critic, 1)
        if ema_decay is not None:
            check_number("ema_decay (or None)", ema_decay, 0, 1)
        latent_dim = latent_dim if latent_dim is not None else getattr(generator, "latent_dim", None)
        check_int("latent_dim (or the generator's latent_dim)", latent_dim, 1)
        if scheduler is not None and not callable(scheduler):
            raise ValueError(f"scheduler must be a callable taking the optimizer, or None, got {scheduler!r}")
        optimizer, optimizer_kwargs = _named_optimizer(optimizer, optimizer_kwargs)
        built_loss = loss if isinstance(loss, GANLoss) else build_loss(loss, gradient_penalty, r1)
        # hyperparameters as plain values (names, numbers), so that they log as YAML and load_from_checkpoint
        # rebuilds the same module from them
        self.save_hyperparameters(ignore=["generator", "discriminator", "scheduler", "loss", "gradient_penalty", "r1"])
        penalty = built_loss.gradient_penalty if built_loss.name == "wgan-gp" else gradient_penalty
        self.hparams.update(loss=built_loss.name, gradient_penalty=penalty, r1=built_loss.r1)
        self.generator = generator
        self.discriminator = discriminator
        self.loss = built_loss
        self.optimizer_spec = optimizer
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.lr_g, self.lr_d = lr_g, lr_d
        self.scheduler_factory = scheduler
        self.n_critic = n_critic
        self.latent_dim = latent_dim
        self.ema_decay = ema_decay
        self.generator_ema = _moving_average(generator, ema_decay) if ema_decay is not None else None
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    @_restricted_classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: _PATH | IO,
        map_location: _MAP_LOCATION_TYPE = None,
        hparams_file: _PATH | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Self:
        """Lightning's, always reading the checkpoint as data: Lightning unpickles a URL (its default for URLs is not
        weights-only) and follows ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` unless told, and either would run a tampered
        file's code."""
        if weights_only is False:
            raise ValueError("DPGAN checkpoints are read as data only: weights_only must be True or None, got False")
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, weights_only=True, **kwargs)

    @override
    def forward(self, noise: Tensor) -> Tensor:
        return self.generator(noise)

    def sample(self, n: int, ema: bool = True) -> Tensor:
        """``n`` samples from the EMA generator if there is one (and ``ema``), else from the generator, in eval mode."""
        model = self.generator_ema if ema and self.generator_ema is not None else self.generator
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(torch.randn(n, self.latent_dim, device=self.device))
        model.train(was_training)
        return out

    @override
    def setup(self, stage: str) -> None:
        # seed_everything seeds every rank alike: under DDP all ranks would draw the same noise, and the all-reduced
        # gradient would see one fake batch world_size times over instead of world_size different ones. A strategy
        # that seeds each rank itself (DecentralizedStrategy, after its initial broadcast) is left to do it.
        strategy = self.trainer.strategy
        if stage == "fit" and self.trainer.world_size > 1 and not getattr(strategy, "seeds_per_rank", False):
            seed_for_rank(self.trainer.global_rank)

    @override
    def configure_optimizers(self) -> Any:
        groups = [
            {"params": list(self.generator.parameters()), "lr": self.lr_g, "name": "generator"},
            {"params": list(self.discriminator.parameters()), "lr": self.lr_d, "name": "discriminator"},
        ]
        factory = OPTIMIZERS[self.optimizer_spec] if isinstance(self.optimizer_spec, str) else self.optimizer_spec
        optimizer = factory(groups, **self.optimizer_kwargs)
        if self.scheduler_factory is None:
            return optimizer
        # manual optimization: Lightning checkpoints the scheduler, training_step steps it
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = batch[0] if isinstance(batch, (list, tuple)) else batch
        optimizer = self.optimizers()
        update_g = int(self.iteration) % self.n_critic == self.n_critic - 1
        optimizer.zero_grad(set_to_none=True)

        noise = torch.randn(real.shape[0], self.latent_dim, device=real.device, dtype=real.dtype)
        loss_d, loss_g = player_losses(self.generator, self.discriminator, self.loss, real, noise, update_g)
        total = loss_d if loss_g is None else loss_d + loss_g
        # One backward for both players at the same z: ∇_D L_D lands in D, ∇_G L_G in G. One pass also keeps DDP's
        # reducer (CPOSG baseline) and AMP's grad scaler to their one-backward-per-step contract.
        self.manual_backward(total)
        if self._logger_writes_this_step():
            self._log_step(loss_d.detach(), loss_g.detach() if update_g else None)

        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()  # the next step() uses the new rate
        self.iteration += 1
        if self.generator_ema is not None and update_g:
            self.generator_ema.update_parameters(self.generator)
            # buffers are copied: AveragedModel(use_buffers=True) would lerp integer ones (BatchNorm's batch count)
            for average, live in zip(self.generator_ema.module.buffers(), self.generator.buffers()):
                average.copy_(live)

    @torch.compiler.disable
    def _log_step(self, loss_d: Tensor, loss_g: Tensor | None) -> None:
        """The losses and gradient norms for the logger, both losses for the progress bar. Not traced under
        ``torch.compile``: each metric name would be a guard on ``self.log``, one recompilation per name."""
        logs = {"loss/d": loss_d, "grad_norm/discriminator": _grad_norm(self.discriminator)}
        if loss_g is not None:
            logs.update({"loss/g": loss_g, "grad_norm/generator": _grad_norm(self.generator)})
        self.log_dict(logs, prog_bar=False)
        self.log("loss_d", loss_d, prog_bar=True, logger=False)
        if loss_g is not None:
            self.log("loss_g", loss_g, prog_bar=True, logger=False)

    @torch.compiler.disable
    def _logger_writes_this_step(self) -> bool:
        """Whether the logger writes this iteration's values. Each ``self.log`` costs Lightning milliseconds on the
        CPU, as much as a small model's whole step, and the logger only writes every ``log_every_n_steps``
        iterations, so the other iterations log nothing. (DPGAN steps once per batch, so ``global_step`` counts
        batches.) Not traced under ``torch.compile``: the step number would be a guard, one recompilation a step."""
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.trainer.global_step + 1) % every == 0


def _named_optimizer(
    optimizer: str | OptimizerFactory, kwargs: Mapping[str, Any] | None
) -> tuple[str | OptimizerFactory, dict[str, Any]]:
    """A partial of one of :data:`OPTIMIZERS` (e.g. from a Hydra ``_partial_``) as its name and keyword arguments."""
    func = getattr(optimizer, "func", None)
    names = {cls: name for name, cls in OPTIMIZERS.items()}
    if func in names and not getattr(optimizer, "args", ()):
        return names[func], {**getattr(optimizer, "keywords", {}), **(kwargs or {})}
    return optimizer, dict(kwargs or {})


def player_losses(
    generator: nn.Module,
    discriminator: nn.Module,
    loss: GANLoss,
    real: Tensor,
    noise: Tensor,
    update_g: bool = True,
    transformed: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Both players' losses at the same parameters: ``(L_D, L_G)``, ``L_G`` ``None`` on a discriminator-only
    iteration. ``L_D`` reaches D's parameters only (the fake batch is detached) and ``L_G`` G's only (through
    :func:`frozen_forward`), so one backward of their sum gives each player the gradient of its own loss. DPGAN's
    step and the many-replica simulator (:mod:`lightning_dpgan.sim`, through ``torch.func``) both call this; the
    simulator with ``transformed``, where R1 is taken by ``torch.func`` instead of autograd."""
    fake = generator(noise)
    r1 = None
    if loss.r1 and transformed:
        real_scores, r1 = r1_scores(discriminator, real)
    else:
        if loss.r1:
            real = real.detach().requires_grad_(True)  # R1 differentiates D's scores by the real inputs
        real_scores = discriminator(real)
        if loss.r1:
            r1 = r1_penalty(real_scores, real)
    loss_d = loss.discriminator(real_scores, discriminator(fake.detach()))
    if loss.gradient_penalty:
        loss_d = loss_d + loss.gradient_penalty * gradient_penalty(discriminator, real, fake)
    if r1 is not None:
        loss_d = loss_d + loss.r1 / 2 * r1
    # G's loss through a frozen copy of D's function: its gradient reaches G and stops at D's parameters
    loss_g = loss.generator(frozen_forward(discriminator, fake)) if update_g else None
    return loss_d, loss_g


def frozen_forward(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` with detached parameters, so that G's loss through D reaches G and stops at D's parameters, and
    throwaway copies of its buffers (running statistics and spectral norm vectors are left as the discriminator's own
    forward passes set them)."""
    state = {name: p.detach() for name, p in module.named_parameters()}
    state.update((name, b.clone()) for name, b in module.named_buffers())
    return functional_call(module, state, (x,))


def _grad_norm(module: nn.Module) -> Tensor:
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else torch.zeros(())


class _EMAUpdate:
    """torch's EMA update (``get_ema_multi_avg_fn``) as a picklable object: spawn-started workers get the module
    pickled, and the function torch returns is a closure, which pickle refuses."""

    def __init__(self, decay: float) -> None:
        self.decay = decay

    def __call__(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        get_ema_multi_avg_fn(self.decay)(averaged, current, num_averaged)


def _moving_average(module: nn.Module, decay: float) -> AveragedModel:
    """torch's exponential moving average of ``module`` (its parameters; frozen: no optimizer trains it)."""
    average = AveragedModel(module, multi_avg_fn=_EMAUpdate(decay))
    average.requires_grad_(False)
    return average
