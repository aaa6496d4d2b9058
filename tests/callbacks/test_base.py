"""The common adapters: a monitor needs only ``_measure``; hooks a monitor does not use are not
dispatched by Lightning at all."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import lightning as L
import pytest
from lightning.pytorch import Callback
from lightning.pytorch.profilers import PassThroughProfiler

from lightning_landscape import (
    DiffusionMapMonitor,
    GradientCovarianceMonitor,
    HessianSpectrumMonitor,
    InPCAMonitor,
)
from lightning_landscape.callbacks._base import _BATCH_HOOKS, LandscapeMonitor, ScheduledMonitor
from tests.callbacks._models import DigitsModule, loader

STEPS = 6
TRAIN_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)
#: The per-step hooks each monitor works in (the gradient monitor tracks the training noise).
USED = {
    HessianSpectrumMonitor: {"on_train_batch_end"},
    GradientCovarianceMonitor: {
        "on_train_batch_start",
        "on_before_optimizer_step",
        "on_train_batch_end",
    },
    DiffusionMapMonitor: {"on_train_batch_end"},
    InPCAMonitor: {"on_train_batch_end"},
}


class _CountingProfiler(PassThroughProfiler):
    """Counts the sections Lightning enters: one per hook it dispatches to each callback."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    @contextlib.contextmanager
    def profile(self, action_name: str) -> Iterator[str]:
        self.calls[action_name] += 1
        yield action_name


def _fit(tmp_path, callbacks: list[Callback]) -> _CountingProfiler:
    profiler = _CountingProfiler()
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        profiler=profiler,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(DigitsModule(), train_dataloaders=loader(32))
    return profiler


def _dispatched(profiler: _CountingProfiler, callback: Callback, hook: str) -> int:
    return profiler.calls[f"[Callback]{callback.state_key}.{hook}"]


@pytest.mark.parametrize("cls", list(USED), ids=lambda c: c.__name__)
def test_unused_batch_hooks_are_not_dispatched(tmp_path, cls):
    monitor = cls(every_n_steps=STEPS)
    plain = Callback()  # a plain callback's no-op hooks are dispatched: the count can fail
    profiler = _fit(tmp_path, [monitor, plain])
    for hook in TRAIN_HOOKS:
        assert _dispatched(profiler, plain, hook) == STEPS, hook
        assert _dispatched(profiler, monitor, hook) == (STEPS if hook in USED[cls] else 0), hook
    assert set(TRAIN_HOOKS) <= set(_BATCH_HOOKS)
    assert monitor.num_measurements >= 1


def test_a_subclass_that_overrides_a_dropped_hook_gets_it_called(tmp_path):
    class Counting(HessianSpectrumMonitor):
        def on_before_backward(self, trainer, pl_module, loss):
            self.backward_calls = getattr(self, "backward_calls", 0) + 1

    assert HessianSpectrumMonitor.on_before_backward is None
    monitor = Counting(every_n_steps=STEPS)
    profiler = _fit(tmp_path, [monitor])
    assert monitor.backward_calls == STEPS
    assert _dispatched(profiler, monitor, "on_before_backward") == STEPS
    assert _dispatched(profiler, monitor, "on_after_backward") == 0


class _StepLog(ScheduledMonitor):
    """The least a monitor needs: a name and ``_measure``."""

    name = "steps"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps: list[int] = []

    def _measure(self, trainer, pl_module, step) -> None:
        self.last_measured_step = step
        self.steps.append(step)


def test_a_scheduled_monitor_needs_only_measure(tmp_path):
    monitor = _StepLog(every_n_steps=4)
    profiler = _fit(tmp_path, [monitor])
    assert monitor.steps == [0, 4, STEPS]  # step 0, the schedule, the end of fit (once)
    assert monitor.state_dict()["last_measured_step"] == STEPS
    assert "probe_dir" not in monitor.state_dict()  # no probe set: nothing captured or saved
    assert not (tmp_path / ".landscape_probes").exists()
    assert _dispatched(profiler, monitor, "on_before_backward") == 0
    assert _StepLog.on_train_batch_start is None


def test_only_the_probe_based_monitors_are_landscape_monitors():
    for cls in (HessianSpectrumMonitor, GradientCovarianceMonitor, InPCAMonitor):
        assert issubclass(cls, LandscapeMonitor), cls
    assert issubclass(DiffusionMapMonitor, ScheduledMonitor)
    assert not issubclass(DiffusionMapMonitor, LandscapeMonitor)
