"""The standalone ``pytorch_lightning`` package: its Trainer and TensorBoardLogger work too.

``lightning`` depends on ``pytorch_lightning``, so this runs wherever the package is installed.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as ptl
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import HessianSpectrumMonitor
from tests._reference import digits_data
from tests.callbacks._events import load_events, scalar_series


class StandaloneDigits(ptl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_pytorch_lightning_trainer_and_logger(tmp_path) -> None:
    x, y = digits_data()
    loader = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=32)
    trainer = ptl.Trainer(
        max_steps=6,
        callbacks=[HessianSpectrumMonitor(every_n_steps=3, top_k=3, slq_steps=20)],
        logger=ptl.loggers.TensorBoardLogger(str(tmp_path), name="run"),
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(StandaloneDigits(), loader)
    acc = load_events(str(tmp_path))
    assert set(scalar_series(acc, "landscape/hessian/eigenvalue_01")) == {0, 3, 6}
    assert set(scalar_series(acc, "landscape/hessian/skipped").values()) == {0.0}
    # Histograms and figures need the writer: found through the standalone logger as well.
    assert "landscape/hessian/spectrum_signed_log" in acc.Tags()["tensors"]
    assert len(acc.Images("landscape/hessian/density")) == 3
    assert np.isfinite(list(scalar_series(acc, "landscape/hessian/trace").values())).all()
