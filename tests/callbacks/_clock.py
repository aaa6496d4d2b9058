"""A fake clock for the budget tests, and a callback that makes each optimizer step take time."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback

from tests.callbacks._models import DigitsModule


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class AdvanceClock(Callback):
    """Each optimizer step takes ``step_seconds`` fake seconds."""

    def __init__(self, clock: FakeClock, step_seconds: float = 1.0) -> None:
        self.clock, self.step_seconds = clock, step_seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.clock.now += self.step_seconds


class TimedDigits(DigitsModule):
    """Each ``training_step`` call (training, or a monitor's loss) takes ``seconds`` on a fake
    clock: measurements cost what their passes over the probe set cost, machine-independently
    (the budget and the fixed-cost rules then decide the same on a loaded machine)."""

    def __init__(self, clock: FakeClock, seconds: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clock, self.seconds = clock, seconds

    def training_step(self, batch, batch_idx):
        self.clock.now += self.seconds
        return super().training_step(batch, batch_idx)
