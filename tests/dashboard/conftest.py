"""Fixtures for the dashboard tests: a real SummaryWriter and an event reader."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import event_accumulator
from torch.utils.tensorboard import SummaryWriter

# 0 keeps every event: TensorBoard's defaults sample (e.g. 10 images per tag).
_KEEP_ALL = {
    event_accumulator.COMPRESSED_HISTOGRAMS: 0,
    event_accumulator.HISTOGRAMS: 0,
    event_accumulator.IMAGES: 0,
    event_accumulator.SCALARS: 0,
    event_accumulator.TENSORS: 0,
}


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def writer(logdir: Path) -> Iterator[SummaryWriter]:
    summary_writer = SummaryWriter(log_dir=str(logdir))
    yield summary_writer
    summary_writer.close()


@pytest.fixture
def read_events(
    logdir: Path, writer: SummaryWriter
) -> Callable[[], event_accumulator.EventAccumulator]:
    """Flush the writer and load everything it wrote."""

    def read() -> event_accumulator.EventAccumulator:
        writer.flush()
        accumulator = event_accumulator.EventAccumulator(str(logdir), size_guidance=_KEEP_ALL)
        accumulator.Reload()
        return accumulator

    return read
