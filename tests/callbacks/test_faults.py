"""Faults inside a measurement never end ``fit``; an interrupt leaves the module as it was.

Faults are injected at real call sites: the module's own ``training_step`` (which the default
loss calls in eval mode, where training never calls it), and the figure the dashboard draws.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import random

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_landscape.dashboard.hessian as hessian_dashboard
import lightning_landscape.sampling.store as store_module
from lightning_landscape import DiffusionMapMonitor, HessianSpectrumMonitor, InPCAMonitor
from lightning_landscape.dashboard.writer import _reset_warn_once
from lightning_landscape.sampling.predictions import PredictionStore
from lightning_landscape.sampling.store import TrajectoryStore
from tests.callbacks._events import load_events
from tests.callbacks._models import DigitsModule, loader


class FailsWhenMeasured(DigitsModule):
    """Raises from training_step only in eval mode, i.e. only inside a measurement."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def training_step(self, batch, batch_idx):
        if not self.training:
            self.hidden = "set by the measurement"
            raise self.error
        return super().training_step(batch, batch_idx)


def _monitor() -> HessianSpectrumMonitor:
    return HessianSpectrumMonitor(every_n_steps=2, top_k=2, density=False, trace=False)


def test_an_unexpected_exception_in_a_measurement_skips_and_training_goes_on(
    make_trainer, tmp_path
):
    _reset_warn_once()
    weights = []
    monitor = _monitor()
    for cbs in ([], [monitor]):
        module = FailsWhenMeasured(RuntimeError("boom"))
        trainer = make_trainer(cbs, root=tmp_path / str(len(cbs)), max_steps=6)
        if cbs:
            with pytest.warns(RuntimeWarning, match=r"RuntimeError: boom at .*training_step"):
                trainer.fit(module, loader(32))
        else:
            trainer.fit(module, loader(32))
        assert trainer.global_step == 6
        weights.append([p.detach().clone() for p in module.parameters()])
        assert not hasattr(module, "hidden")  # the measurement's attribute was removed
    assert monitor.skipped == 4 and monitor.num_measurements == 0  # steps 0, 2, 4, 6
    for a, b in zip(*weights, strict=True):
        assert torch.equal(a, b)


def test_a_failure_while_logging_skips_and_training_goes_on(make_trainer, monkeypatch):
    _reset_warn_once()

    def broken_figure(*args, **kwargs):
        raise ValueError("the figure cannot be drawn")

    monkeypatch.setattr(hessian_dashboard, "spectrum_figure", broken_figure)
    monitor = HessianSpectrumMonitor(every_n_steps=2, top_k=2, num_probe_batches=1)
    trainer = make_trainer([monitor], max_steps=4)
    with pytest.warns(RuntimeWarning, match="skipped the logging at step 0 .*cannot be drawn"):
        trainer.fit(DigitsModule(), loader(32))
    assert trainer.global_step == 4
    assert monitor.num_measurements == 3 and monitor.skipped == 3


class DrawsThenFails(FailsWhenMeasured):
    """Draws from the torch, numpy and Python RNGs inside the measurement, then raises."""

    def training_step(self, batch, batch_idx):
        if not self.training:
            torch.rand(3), np.random.rand(3), random.random()
        return super().training_step(batch, batch_idx)


def _rng_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


class _SeesTheInterrupt(Callback):
    """Records the RNG states before the monitor's first measurement (it runs first) and what
    Lightning's on_exception hook sees when the interrupt reaches it."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.before = _rng_states()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.at_exception = _rng_states()
        self.modes = [m.training for m in pl_module.modules()]
        self.hidden = hasattr(pl_module, "hidden")


def test_keyboard_interrupt_in_a_measurement_restores_the_module_first(make_trainer):
    module = DrawsThenFails(KeyboardInterrupt())
    seen = _SeesTheInterrupt()
    trainer = make_trainer([seen, _monitor()], max_steps=6)
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after an interrupt
        trainer.fit(module, loader(32))
    assert trainer.interrupted and trainer.global_step == 0
    # The measurement had switched the module to eval mode, set an attribute and drawn from
    # every RNG: all undone before the interrupt reached Lightning.
    assert all(seen.modes) and not seen.hidden
    assert all(m.training for m in module.modules())
    torch_state, np_state, py_state = seen.at_exception
    assert torch.equal(torch_state, seen.before[0])
    np.testing.assert_array_equal(np_state, seen.before[1])
    assert py_state == seen.before[2]


# -- disk full -------------------------------------------------------------------------------


class _DiskFull:
    """A store module's ``open``: appends write half their bytes, then fail with ENOSPC, at the
    steps ``full_at`` (switched on by :class:`_FullAt` at each step end, before the monitor)."""

    def __init__(self, full_at: set[int], active: bool = False) -> None:
        self.full_at, self.active, self.failures = full_at, active, 0

    def open(self, path, mode="r", *args, **kwargs):
        # Every file opened for writing: the store may keep its handles open across steps, so
        # the disk fills up under a handle opened while it still had room.
        f = builtins.open(path, mode, *args, **kwargs)
        return _HalfWriter(f, self) if "a" in mode or "w" in mode else f

    def savez_compressed(self, file, *args, **kwargs):  # numpy's, for the prediction store
        if self.active:
            file.write(b"PK\x03\x04 half a record")
            self.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _SAVEZ(file, *args, **kwargs)


_SAVEZ = np.savez_compressed


class _HalfWriter:
    def __init__(self, f, disk: _DiskFull) -> None:
        self.f, self.disk = f, disk

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def write(self, data) -> int:
        if not self.disk.active:
            return self.f.write(data)
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        self.disk.failures += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)

    def __getattr__(self, name):
        return getattr(self.f, name)


class _FullAt(Callback):
    def __init__(self, disk: _DiskFull) -> None:
        self.disk = disk

    def on_train_start(self, trainer, pl_module) -> None:
        self.disk.active = trainer.global_step in self.disk.full_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.disk.active = trainer.global_step in self.disk.full_at


def _read_trajectory(directory: str):
    with open(os.path.join(directory, "store.json"), encoding="utf-8") as f:
        dim = json.load(f)["dim"]
    return TrajectoryStore(directory, dim).load()


def test_disk_full_in_the_trajectory_store_keeps_earlier_samples(
    tmp_path, make_trainer, monkeypatch
):
    _reset_warn_once()
    stores = []
    for full_at in (set(), {3, 4}):
        disk = _DiskFull(full_at)
        monkeypatch.setattr(store_module, "open", disk.open, raising=False)
        monitor = DiffusionMapMonitor(every_n_steps=1, n_components=2, embed_every_n_epochs=None)
        trainer = make_trainer([_FullAt(disk), monitor], max_steps=8, root=tmp_path / str(full_at))
        if full_at:
            with pytest.warns(RuntimeWarning, match=r"skipped the sample at step 3 .*Errno 28"):
                trainer.fit(DigitsModule(hidden=4), loader(32))
        else:
            trainer.fit(DigitsModule(hidden=4), loader(32))
        assert trainer.global_step == 8 and disk.failures == len(full_at)
        assert monitor.skipped == len(full_at)
        stores.append(_read_trajectory(str(monitor.store_dir)))
    full, holed = stores
    kept = [i for i, s in enumerate(full.steps) if s not in (3, 4)]
    assert list(full.steps) == list(range(9)) and list(holed.steps) == [0, 1, 2, 5, 6, 7, 8]
    # Every sample before and after the failures is intact, row for row (training unchanged).
    np.testing.assert_array_equal(holed.vectors, full.vectors[kept])
    np.testing.assert_array_equal(holed.losses, full.losses[kept])


def test_disk_full_when_the_trajectory_store_is_created_records_nothing_and_trains_on(
    tmp_path, make_trainer, monkeypatch
):
    _reset_warn_once()
    disk = _DiskFull(set(), active=True)
    monkeypatch.setattr(store_module, "open", disk.open, raising=False)
    monitor = DiffusionMapMonitor(every_n_steps=1, n_components=2)
    trainer = make_trainer([monitor], max_steps=3)
    with pytest.warns(RuntimeWarning, match=r"could not open the trajectory store .*Errno 28"):
        trainer.fit(DigitsModule(hidden=4), loader(32))
    assert trainer.global_step == 3 and disk.failures == 1
    assert monitor.num_measurements == 0


def test_disk_full_in_the_prediction_store_keeps_earlier_records(
    tmp_path, make_trainer, monkeypatch
):
    _reset_warn_once()
    disk = _DiskFull({2})
    monkeypatch.setattr(np, "savez_compressed", disk.savez_compressed)
    monitor = InPCAMonitor(every_n_steps=1, num_probe_batches=1, geometry=False)
    trainer = make_trainer([_FullAt(disk), monitor], max_steps=4)
    with pytest.warns(UserWarning, match=r"could not write predictions .*Errno 28"):
        trainer.fit(DigitsModule(hidden=4), loader(32))
    assert trainer.global_step == 4 and disk.failures == 1
    store = PredictionStore.open(str(monitor.store_dir))
    assert store.steps() == [0, 1, 3, 4]
    assert not [n for n in os.listdir(store.path) if n.startswith(".tmp_")]  # no half record
    # The records on disk are the ones the monitor computed (its in-memory trajectory).
    records = {r.step: r for r in store.records()}
    for step, logp in zip(monitor._trajectory.steps, monitor._trajectory.logps, strict=True):
        if step != 2:
            np.testing.assert_array_equal(records[step].logp, logp)


# -- killed mid-measurement, resumed from the last checkpoint ----------------------------------


class Killed(BaseException):
    """Stands for the process being killed: nothing catches it."""


class KilledWhenMeasured(DigitsModule):
    def __init__(self, kill_at: int | None) -> None:
        super().__init__(hidden=4)
        self.kill_at = kill_at

    def training_step(self, batch, batch_idx):
        if not self.training and self.trainer.global_step == self.kill_at:
            raise Killed
        return super().training_step(batch, batch_idx)


def test_killed_mid_measurement_and_resumed_logs_every_step_once(tmp_path, make_trainer):
    def fit(kill_at: int | None, ckpt_path: str | None = None) -> list:
        monitors = [
            HessianSpectrumMonitor(every_n_steps=2, top_k=2, density=False, trace=False),
            DiffusionMapMonitor(every_n_steps=1, n_components=2, embed_every_n_epochs=None),
        ]
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
        trainer = make_trainer([*monitors, saver], max_steps=10, enable_checkpointing=True)
        trainer.fit(KilledWhenMeasured(kill_at), loader(32), ckpt_path=ckpt_path)
        return monitors

    with pytest.raises(Killed):
        fit(kill_at=6)  # inside the Hessian measurement at step 6, before the step-6 checkpoint
    saved = sorted(os.listdir(tmp_path / "ckpt"))
    assert saved == ["epoch=0-step=3.ckpt"]
    hessian, diffusion = fit(None, ckpt_path=str(tmp_path / "ckpt" / saved[0]))
    assert hessian.num_measurements == 6 and hessian.skipped == 0  # 0, 2 and 4 to 10 resumed
    acc = load_events(str(tmp_path))
    for tag in ("landscape/hessian/eigenvalue_01", "landscape/hessian/seconds"):
        assert [e.step for e in acc.Scalars(tag)] == [0, 2, 4, 6, 8, 10], tag
    assert list(_read_trajectory(str(diffusion.store_dir)).steps) == list(range(11))
