"""CUDA and NCCL paths. Skipped without a GPU (CI has none); run them where one is lent."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import torchrun
from test_gossip import reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@cuda
def test_dpgan_trains_on_cuda_through_the_strategy(tmp_path):
    """One GPU: DPGAN + OptimisticAdam + bf16 autocast through DecentralizedStrategy; state follows the module."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_dpgan import DPGAN, DecentralizedStrategy
    from lightning_dpgan.data import DigitsDataModule
    from lightning_dpgan.models import DCGANDiscriminator, DCGANGenerator

    class DeviceRecord(pl.Callback):
        """Where parameters and optimizer state live during training (teardown moves everything back to CPU)."""

        def __init__(self) -> None:
            self.devices: set[str] = set()

        def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: object) -> None:
            optimizer = trainer.optimizers[0]
            state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            self.devices |= {t.device.type for t in [*module.parameters(), *optimizer.anchors(), *state]}

    pl.seed_everything(0)
    record = DeviceRecord()
    gan = DPGAN(DCGANGenerator(8, channels=1, latent_dim=32), DCGANDiscriminator(8, channels=1), ema_decay=0.9)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, strategy=DecentralizedStrategy("ring"), precision="bf16-mixed",
        max_steps=20, logger=False, callbacks=[checkpoint, record], enable_progress_bar=False,
    )
    trainer.fit(gan, datamodule=DigitsDataModule(batch_size=64))
    assert record.devices == {"cuda"}
    assert torch.isfinite(torch.stack([p.detach().float().norm() for p in gan.parameters()])).all()
    restored = DPGAN.load_from_checkpoint(
        checkpoint.last_model_path,
        generator=DCGANGenerator(8, channels=1, latent_dim=32), discriminator=DCGANDiscriminator(8, channels=1),
    )
    for key, value in gan.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key].to(value.device), value)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL gossip needs at least 2 GPUs (one rank per GPU)")
def test_nccl_gossip_equals_dense_reference(tmp_path, monkeypatch):
    n = min(torch.cuda.device_count(), 4)
    cases = [{"topology": name, "rounds": t} for name in ("ring", "one_peer_exponential", "complete") for t in (1, 3)]
    # a bf16 wire: packed and combined by addmv (ring), or cast from the tensors and lerped into them (one-peer)
    cases += [{"topology": name, "rounds": 1, "wire_dtype": "bf16"} for name in ("ring", "one_peer_exponential")]
    monkeypatch.setenv("GOSSIP_BACKEND", "nccl")
    torchrun("gossip_worker.py", n, str(tmp_path), json.dumps({n: cases}), timeout=300)
    results = [np.load(tmp_path / f"n{n}_rank{r}.npz") for r in range(n)]
    for index, case in enumerate(cases):
        for k, expected in enumerate(reference(case, index, n)):
            got = np.stack([results[r][f"{index}/{k}"].astype(np.float64).ravel() for r in range(n)])
            tol = 2e-2 if case.get("wire_dtype") else 1e-5  # as in test_gossip: bf16 rounds each received row
            np.testing.assert_allclose(got, expected, rtol=0, atol=tol, err_msg=f"{case} tensor {k}")
