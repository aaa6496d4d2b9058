"""A fake clock for the budget tests, and a callback that makes each optimizer step take time."""

from __future__ import annotations

from lightning.pytorch import Callback


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
