"""Faults inside a measurement never end ``fit``; an interrupt leaves the module as it was.

Faults are injected at real call sites: the module's own ``training_step`` (which the default
loss calls in eval mode, where training never calls it), and the figure the dashboard draws.
"""

from __future__ import annotations

import pytest
import torch

import lightning_landscape.dashboard.hessian as hessian_dashboard
from lightning_landscape import HessianSpectrumMonitor
from lightning_landscape.dashboard.writer import _reset_warn_once
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


def test_keyboard_interrupt_in_a_measurement_restores_the_module_first(make_trainer):
    module = FailsWhenMeasured(KeyboardInterrupt())
    trainer = make_trainer([_monitor()], max_steps=6)
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after an interrupt
        trainer.fit(module, loader(32))
    assert trainer.interrupted and trainer.global_step == 0
    # The measurement had switched the module to eval mode and set an attribute: both undone
    # before the interrupt reached Lightning.
    assert all(m.training for m in module.modules())
    assert not hasattr(module, "hidden")
