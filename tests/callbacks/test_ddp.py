"""DDP on CPU (gloo, ddp_spawn, 2 processes): results equal one process on the same global data,
and a failure on one rank is skipped on all ranks without a deadlock."""

from __future__ import annotations

from datetime import timedelta

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

from lightning_landscape import HessianSpectrumMonitor
from tests.callbacks._events import load_events, scalar_series
from tests.callbacks._models import DigitsModule, DistributedDigits, nan_on_rank1_loss

pytestmark = pytest.mark.ddp

TOP_K = 6


class AdamDigits(DigitsModule):
    """Adam: the monitor also logs the preconditioned sharpness from the optimizer's state."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01, betas=(0.9, 0.99))


def _fit(tmp_path, devices: int, *, loss_fn=None, steps: int = 6, module=DigitsModule) -> None:
    per_rank = 32 // devices  # the same global batch of 32 samples in both runs
    strategy = (
        DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120)) if devices > 1 else "auto"
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        use_distributed_sampler=False,
        logger=TensorBoardLogger(str(tmp_path), name="", version=0),
        callbacks=[
            HessianSpectrumMonitor(
                every_n_steps=3, top_k=TOP_K, num_probe_batches=2, loss_fn=loss_fn
            )
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module(hidden=12, dtype=torch.float64), DistributedDigits(per_rank))


def _logged(tmp_path) -> dict[str, dict[int, float]]:
    acc = load_events(str(tmp_path))
    tags = [f"landscape/hessian/eigenvalue_{i:02d}" for i in range(1, TOP_K + 1)]
    tags += ["landscape/hessian/trace", "landscape/hessian/n_outliers", "landscape/hessian/skipped"]
    tags += [f"landscape/hessian/lambda_max_batch_{s}" for s in ("mean", "min", "max", "std")]
    tags += ["landscape/hessian/preconditioned_sharpness", "landscape/hessian/sharpness_ratio"]
    present = acc.Tags()["scalars"]  # Adam's tags only with Adam
    return {t: scalar_series(acc, t) for t in tags if t in present}


def test_ddp_spawn_equals_single_process(tmp_path):
    _fit(tmp_path / "one", devices=1)
    _fit(tmp_path / "two", devices=2)
    one, two = _logged(tmp_path / "one"), _logged(tmp_path / "two")
    for i in range(1, TOP_K + 1):
        tag = f"landscape/hessian/eigenvalue_{i:02d}"
        assert sorted(one[tag]) == sorted(two[tag]) == [0, 3, 6]
        a = np.array([one[tag][s] for s in (0, 3, 6)])
        b = np.array([two[tag][s] for s in (0, 3, 6)])
        np.testing.assert_allclose(b, a, rtol=1e-6)
    np.testing.assert_allclose(
        [two["landscape/hessian/trace"][s] for s in (0, 3, 6)],
        [one["landscape/hessian/trace"][s] for s in (0, 3, 6)],
        rtol=1e-6,
    )
    assert two["landscape/hessian/skipped"][6] == 0


def test_nan_on_one_rank_is_skipped_on_all_ranks(tmp_path):
    # The warning is raised in the spawned worker; the logged counts show what happened.
    _fit(tmp_path, devices=2, loss_fn=nan_on_rank1_loss)
    acc = load_events(str(tmp_path))
    assert scalar_series(acc, "landscape/hessian/skipped") == {0: 1.0, 3: 2.0, 6: 3.0}
    assert "landscape/hessian/eigenvalue_01" not in acc.Tags()["scalars"]


def test_ddp_spawn_equals_single_process_for_adam_sharpness_and_batch_spread(tmp_path):
    """Adam's preconditioned sharpness (from each rank's optimizer state, identical after DDP's
    averaged gradients) and the per-batch λ_max spread (batch i is the global batch i, split
    over the ranks) are the same as in one process on the same global batches."""
    _fit(tmp_path / "one", devices=1, module=AdamDigits)
    _fit(tmp_path / "two", devices=2, module=AdamDigits)
    one, two = _logged(tmp_path / "one"), _logged(tmp_path / "two")
    spread = [f"landscape/hessian/lambda_max_batch_{s}" for s in ("mean", "min", "max", "std")]
    adam = ["landscape/hessian/preconditioned_sharpness", "landscape/hessian/sharpness_ratio"]
    for tag in ["landscape/hessian/eigenvalue_01", *spread, *adam]:
        steps = [3, 6] if tag in adam else [0, 3, 6]  # Adam has no state before its first step
        assert sorted(one[tag]) == sorted(two[tag]) == steps, tag
        a = np.array([one[tag][s] for s in steps])
        b = np.array([two[tag][s] for s in steps])
        # The std is a difference of nearby eigenvalues: its error is that of λ (1e-6 relative).
        scale = [one[spread[0]][s] for s in (0, 3, 6)] if tag.endswith("std") else 0.0
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * np.max(scale), err_msg=tag)
    # The spread is of real per-batch values, not one repeated number.
    assert one["landscape/hessian/lambda_max_batch_std"][6] > 0
