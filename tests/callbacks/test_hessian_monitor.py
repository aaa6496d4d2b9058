"""HessianSpectrumMonitor with a real Trainer and TensorBoardLogger, checked against exact
dense Hessians and by reading the event files back."""

from __future__ import annotations

import copy
import os
import types
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_landscape import HessianSpectrumMonitor
from lightning_landscape.callbacks import _context
from tests._reference import cross_entropy_loss, dense_hessian
from tests.callbacks._clock import FakeClock, TimedDigits
from tests.callbacks._events import load_events, scalar_series
from tests.callbacks._models import DigitsModule, loader


def _final_weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_logged_eigenvalues_match_exact_hessian_of_probe_set(tmp_path, make_trainer):
    torch.manual_seed(0)
    module = DigitsModule(hidden=12)
    monitor = HessianSpectrumMonitor(every_n_steps=5, top_k=5, num_probe_batches=2)
    trainer = make_trainer([monitor], max_steps=10)
    train = loader(32)
    trainer.fit(module, train)

    it = iter(loader(32))  # the unshuffled loader: the probe set is its first two batches
    probe = [next(it), next(it)]
    module.eval()
    exact = np.linalg.eigvalsh(dense_hessian(module, cross_entropy_loss, probe).numpy())[::-1]
    acc = load_events(str(tmp_path))
    logged = [scalar_series(acc, f"landscape/hessian/eigenvalue_{i:02d}")[10] for i in range(1, 6)]
    np.testing.assert_allclose(logged, exact[:5], rtol=1e-4)
    residuals = [scalar_series(acc, f"landscape/hessian/residual_{i:02d}")[10] for i in range(1, 6)]
    for a, b, r in zip(logged, exact[:5], residuals, strict=True):
        assert abs(a - b) <= r + 1e-6 * exact[0]  # the logged error bounds are honest
    steps = sorted(scalar_series(acc, "landscape/hessian/eigenvalue_01"))
    assert steps == [0, 5, 10]  # step 0, the schedule, and the end (not measured twice)
    assert scalar_series(acc, "landscape/hessian/skipped")[10] == 0
    assert monitor.num_measurements == 3
    # Trace, outliers, histogram, figure, layout and axis card are all written.
    tags = acc.Tags()
    for tag in (
        "trace",
        "trace_stderr",
        "n_outliers",
        "bulk_edge",
        "lambda_min",
        "seconds",
        "num_hvps",
        "ratio_max_over_kth",
    ):
        assert f"landscape/hessian/{tag}" in tags["scalars"], tag
    assert "landscape/hessian/spectrum_signed_log" in tags["tensors"]
    assert len(acc.Tensors("landscape/hessian/spectrum_signed_log")) == 3
    assert "landscape/hessian/density" in tags["images"]
    assert "custom_scalars__config__" in tags["tensors"]
    trace = scalar_series(acc, "landscape/hessian/trace")[10]
    assert abs(trace - exact.sum()) <= 0.05 * np.abs(exact).sum()


def test_training_step_logging_is_silenced(tmp_path, make_trainer):
    calls: list[int] = []  # outside the module: the measurement restores the module's counters

    class Counting(DigitsModule):
        def training_step(self, batch, batch_idx):
            calls.append(batch_idx)
            return super().training_step(batch, batch_idx)

    module = Counting()
    monitor = HessianSpectrumMonitor(every_n_steps=3, top_k=3, density=False, trace=False)
    make_trainer([monitor], max_steps=9).fit(module, loader(32))
    assert monitor.num_measurements == 4
    # training_step ran for the measurements too, but only the 9 real steps reached self.log,
    # and the module's own counter saw only those.
    assert len(calls) > 9
    assert module.log_calls == 9
    assert module.step_calls == 9


@pytest.mark.parametrize(
    ("dropout", "shuffle", "train_mode"),
    [(0.0, False, False), (0.3, True, False), (0.3, True, True)],
)
def test_training_is_bitwise_unchanged(tmp_path, dropout, shuffle, train_mode, make_trainer):
    def run(with_monitor: bool) -> list[torch.Tensor]:
        L.seed_everything(1)
        module = DigitsModule(dropout=dropout)
        cbs = [HessianSpectrumMonitor(every_n_steps=4, top_k=3, train_mode=train_mode)]
        trainer = make_trainer(
            root=tmp_path / str(with_monitor), callbacks=cbs if with_monitor else [], max_steps=10
        )
        trainer.fit(module, loader(32, shuffle=shuffle))
        if with_monitor:
            assert cbs[0].num_measurements == 4  # steps 0, 4, 8 and the end (10)
        return _final_weights(module)

    for a, b in zip(run(False), run(True), strict=True):
        assert torch.equal(a, b)


def test_batchnorm_buffers_restored_in_train_mode():
    module = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    module.train()
    before = copy.deepcopy(module.state_dict())
    with _context.isolated(module, train_mode=True):
        module(torch.randn(16, 4))  # moves the running statistics
    after = module.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert module.training and all(m.training for m in module.modules())


def test_module_modes_restored_individually():
    module = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    module.train()
    module[1].eval()  # a user froze one submodule
    with _context.isolated(module, train_mode=False):
        assert not any(m.training for m in module.modules())
    assert module.training and module[0].training and not module[1].training


def test_works_with_no_arguments_budget_schedule(tmp_path, make_trainer):
    # A fake clock (each loss evaluation 1 ms) makes the budget's decisions machine-independent.
    clock = FakeClock()
    module = TimedDigits(clock, seconds=1e-3)
    monitor = HessianSpectrumMonitor(clock=clock)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the end-of-fit measurement overshoots a 15-step budget
        make_trainer([monitor], max_steps=15).fit(module, loader(32))
    acc = load_events(str(tmp_path))
    assert 15 in scalar_series(acc, "landscape/hessian/eigenvalue_01")  # end-of-fit
    assert monitor.skipped == 0 and monitor.num_measurements >= 1


def test_per_layer_groups_are_logged(tmp_path, make_trainer):
    module = DigitsModule(hidden=8)
    monitor = HessianSpectrumMonitor(every_n_steps=100, top_k=3, groups="layer")
    make_trainer([monitor], max_steps=2).fit(module, loader(32))
    acc = load_events(str(tmp_path))
    for group in ("net.0", "net.2"):
        assert f"landscape/hessian/{group}/eigenvalue_01" in acc.Tags()["scalars"]


def test_nan_loss_warns_once_skips_and_training_goes_on(tmp_path, make_trainer):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        return cross_entropy_loss(model, batch) * float("nan")

    module = DigitsModule()
    monitor = HessianSpectrumMonitor(every_n_steps=2, top_k=3, loss_fn=loss_fn)
    with pytest.warns(RuntimeWarning, match="skipped the measurement") as record:
        make_trainer([monitor], max_steps=6).fit(module, loader(32))
    skip_warnings = [w for w in record if "skipped the measurement" in str(w.message)]
    assert len(skip_warnings) == 1
    assert monitor.skipped == 4 and monitor.num_measurements == 0
    assert module.global_step == 6
    acc = load_events(str(tmp_path))
    assert scalar_series(acc, "landscape/hessian/skipped")[6] == 4


def test_resume_continues_schedule_without_gaps_or_duplicates(tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=10, save_top_k=-1)
    monitor = HessianSpectrumMonitor(every_n_steps=5, top_k=3, density=False)
    trainer = L.Trainer(
        max_steps=10,
        accelerator="cpu",
        callbacks=[monitor, ckpt],
        enable_progress_bar=False,
        logger=TensorBoardLogger(str(tmp_path / "a"), name="", version=0),
        default_root_dir=str(tmp_path),
    )
    trainer.fit(DigitsModule(), loader(32))
    path = os.path.join(str(tmp_path / "ckpt"), "epoch=0-step=10.ckpt")
    assert os.path.exists(path)

    monitor2 = HessianSpectrumMonitor(every_n_steps=5, top_k=3, density=False)
    trainer2 = L.Trainer(
        max_steps=20,
        accelerator="cpu",
        callbacks=[monitor2],
        enable_progress_bar=False,
        logger=TensorBoardLogger(str(tmp_path / "b"), name="", version=0),
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    trainer2.fit(DigitsModule(), loader(32), ckpt_path=path)
    first = sorted(
        scalar_series(load_events(str(tmp_path / "a")), "landscape/hessian/eigenvalue_01")
    )
    second = sorted(
        scalar_series(load_events(str(tmp_path / "b")), "landscape/hessian/eigenvalue_01")
    )
    assert first == [0, 5, 10]
    assert second == [15, 20]
    assert monitor2.num_measurements == 3 + 2  # the count continues from the checkpoint


def test_probe_set_survives_resume(tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4, save_top_k=-1)
    monitor = HessianSpectrumMonitor(every_n_steps=4, top_k=2, density=False, trace=False)
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        callbacks=[monitor, ckpt],
        enable_progress_bar=False,
        logger=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(DigitsModule(), loader(32, shuffle=True))
    first_probe = monitor._probe_file(trainer)
    saved = torch.load(first_probe, weights_only=False)
    monitor2 = HessianSpectrumMonitor(every_n_steps=4, top_k=2, density=False, trace=False)
    captured = {}
    original = monitor2._load_or_capture_probe

    def spy(trainer_):
        captured["batches"] = original(trainer_)
        return captured["batches"]

    monitor2._load_or_capture_probe = spy
    trainer2 = L.Trainer(
        max_steps=8,
        accelerator="cpu",
        callbacks=[monitor2],
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    # A different shuffle seed: a re-captured probe set would differ from the saved one.
    torch.manual_seed(123)
    trainer2.fit(
        DigitsModule(),
        loader(32, shuffle=True),
        ckpt_path=os.path.join(str(tmp_path / "ckpt"), "epoch=0-step=4.ckpt"),
    )
    for (xa, ya), (xb, yb) in zip(saved, captured["batches"], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_scalars_reach_any_logger_and_warn_once_without_tensorboard(tmp_path, make_trainer):
    from lightning_landscape.dashboard import writer as dashboard_writer

    dashboard_writer._reset_warn_once()
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    monitor = HessianSpectrumMonitor(every_n_steps=2, top_k=2)
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        make_trainer([monitor], max_steps=4, logger=logger).fit(DigitsModule(), loader(32))
    text = open(os.path.join(logger.log_dir, "metrics.csv")).read()
    assert "landscape/hessian/eigenvalue_01" in text


def test_gradient_accumulation_measures_once_per_optimizer_step(tmp_path, make_trainer):
    monitor = HessianSpectrumMonitor(every_n_steps=2, top_k=2, density=False, trace=False)
    make_trainer([monitor], max_steps=4, accumulate_grad_batches=3).fit(DigitsModule(), loader(16))
    acc = load_events(str(tmp_path))
    assert sorted(scalar_series(acc, "landscape/hessian/eigenvalue_01")) == [0, 2, 4]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "top_k must be a positive integer; got 0"),
        ({"every_n_steps": -1}, "every_n_steps must be a positive integer or None; got -1"),
        ({"every_n_epochs": 0}, "every_n_epochs must be a positive integer or None; got 0"),
        ({"every_n_steps": 2, "every_n_epochs": 1}, "exclusive"),
        ({"max_overhead": 1.5}, r"max_overhead must be a fraction in \(0, 1\); got 1.5"),
        ({"num_probe_batches": 0}, "num_probe_batches must be a positive integer; got 0"),
        ({"loss_fn": 3}, "loss_fn must be callable"),
        ({"train_mode": "yes"}, "train_mode must be a bool"),
        ({"groups": 5}, "groups must be None, 'layer' or a mapping; got 5"),
        ({"slq_stepz": 5}, r"unknown option\(s\) \['slq_stepz'\]"),
    ],
)
def test_bad_configuration_raises_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianSpectrumMonitor(**kwargs)


def test_manual_optimisation_requires_loss_fn(tmp_path, make_trainer):
    class Manual(DigitsModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    with pytest.raises(ValueError, match="loss_fn is required with manual optimisation"):
        make_trainer([HessianSpectrumMonitor()], max_steps=2).fit(Manual(), loader(32))
    monitor = HessianSpectrumMonitor(
        every_n_steps=1, top_k=2, loss_fn=cross_entropy_loss, density=False, trace=False
    )
    make_trainer(root=tmp_path / "ok", callbacks=[monitor], max_steps=2).fit(Manual(), loader(32))
    assert monitor.num_measurements == 3


def test_sharded_strategies_are_refused():
    for name in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"):
        strategy = type(name, (), {})()
        with pytest.raises(RuntimeError, match=f"does not support the {name} strategy"):
            _context.check_strategy(
                types.SimpleNamespace(strategy=strategy), "HessianSpectrumMonitor"
            )


def test_half_precision_weights_are_refused(tmp_path):
    trainer = types.SimpleNamespace(strategy=object(), precision="bf16-true")
    monitor = HessianSpectrumMonitor()
    with pytest.raises(ValueError, match="half-precision weights"):
        monitor.setup(trainer, DigitsModule(), "fit")


def test_sync_batchnorm_in_train_mode_is_refused(tmp_path, make_trainer):
    class WithSyncBN(DigitsModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(64, 16), nn.SyncBatchNorm(16), nn.Tanh(), nn.Linear(16, 10)
            )

    with pytest.raises(ValueError, match="train_mode=True is not supported with SyncBatchNorm"):
        make_trainer([HessianSpectrumMonitor(every_n_steps=1, train_mode=True)], max_steps=2).fit(
            WithSyncBN(), loader(32)
        )
    monitor = HessianSpectrumMonitor(every_n_steps=1, top_k=2, density=False, trace=False)
    make_trainer(root=tmp_path / "eval", callbacks=[monitor], max_steps=2).fit(
        WithSyncBN(), loader(32)
    )
    assert monitor.num_measurements == 3 and monitor.skipped == 0


def test_without_any_logger_the_notice_says_nothing_is_recorded(tmp_path, make_trainer):
    from lightning_landscape.dashboard.writer import _reset_warn_once

    _reset_warn_once()
    monitor = HessianSpectrumMonitor(every_n_steps=2, top_k=2, num_probe_batches=1)
    with pytest.warns(UserWarning, match="no logger at all: neither scalars nor the spectrum"):
        make_trainer([monitor], max_steps=2, logger=False).fit(DigitsModule(), loader(32))
    assert monitor.num_measurements == 2
