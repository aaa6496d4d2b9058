"""Read TensorBoard event files back (everything kept: size_guidance 0)."""

from __future__ import annotations

import glob
import os

from tensorboard.backend.event_processing import event_accumulator

KEEP_ALL = {
    event_accumulator.COMPRESSED_HISTOGRAMS: 0,
    event_accumulator.HISTOGRAMS: 0,
    event_accumulator.IMAGES: 0,
    event_accumulator.SCALARS: 0,
    event_accumulator.TENSORS: 0,
}


def load_events(logdir: str) -> event_accumulator.EventAccumulator:
    files = glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no event file under {logdir}"
    acc = event_accumulator.EventAccumulator(os.path.dirname(files[0]), size_guidance=KEEP_ALL)
    acc.Reload()
    return acc


def scalar_series(acc: event_accumulator.EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}
