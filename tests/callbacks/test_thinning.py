"""Per-step work thinned to a share of the step time: the gradient monitor's norm reading and
the diffusion monitor's recording, on a fake clock (machine-independent), against references
computed by a loop over every step."""

from __future__ import annotations

import importlib

import pytest
import torch
from lightning.pytorch import Callback

from lightning_landscape.callbacks import _thinning
from lightning_landscape.callbacks._thinning import Thinning
from lightning_landscape.callbacks.diffusion import DiffusionMapMonitor
from lightning_landscape.callbacks.gradient import GradientCovarianceMonitor
from lightning_landscape.sampling.store import TrajectoryStore
from tests.callbacks._clock import AdvanceClock, FakeClock
from tests.callbacks._events import load_events, scalar_series
from tests.callbacks._models import DigitsModule, loader


def test_thinning_widens_by_whole_multiples_only_after_enough_runs_and_never_narrows():
    t = Thinning(share=0.01, every=10, revise_every=3)
    # A run may take 0.01 * 1 s * 10 = 0.1 s: three runs within it are revised by count, and
    # keep the interval.
    assert not t.ran(0.099, 1.0) and not t.ran(0.099, 1.0) and not t.ran(0.099, 1.0)
    assert t.every == 10
    # 0.25 s a run: after two runs (0.5 s) more than three runs may take (0.3 s) is spent, so
    # the interval is revised at once: 0.25 / 0.1 = 2.5 -> 3 x 10.
    assert not t.ran(0.25, 1.0) and t.every == 10
    assert t.ran(0.25, 1.0) and t.every == 30
    assert [s for s in range(100) if t.due(s)] == [0, 30, 60, 90]
    # Cheap runs never bring the interval back (the kept steps stay on one grid).
    for _ in range(3):
        t.ran(0.0, 1.0)
    assert t.every == 30
    # The limit caps the widening at a multiple of the current interval.
    assert t.ran(100.0, 1.0, limit=100) and t.every == 90
    # No step time yet: nothing is decided, and the runs counted so far are kept.
    u = Thinning(share=0.01, revise_every=2)
    assert not u.ran(1.0, None) and not u.ran(1.0, None) and u.every == 1


def test_cheap_work_is_not_thinned_early_whatever_its_share():
    """Before REVISE_EVERY runs, a revision needs EARLY_REVISION_SECONDS spent as well: a tiny
    model's gradient-norm reads (0.1 ms against 2-ms steps: 5%, above the 0.25% share, as a
    loaded machine can make them) keep every step in a short fit; expensive work still thins
    after a few runs."""
    t = Thinning(share=0.0025)
    for _ in range(99):
        assert not t.ran(1e-4, 2e-3)
    assert t.every == 1 and 99 * 1e-4 < _thinning.EARLY_REVISION_SECONDS
    assert t.ran(1e-4, 2e-3) and t.every == 20  # at REVISE_EVERY runs: 5% / 0.25% = 20
    u = Thinning(share=0.0025)
    assert not u.ran(0.03, 2e-3)  # 0.03 s < EARLY_REVISION_SECONDS: not yet
    assert u.ran(0.03, 2e-3) and u.every == 6000  # 0.06 s spent: revised after two runs


class _GradNorms(Callback):
    """||grad||^2 of every optimizer step, by a loop over the parameters."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.values.append(sum(float(p.grad.double().pow(2).sum()) for p in pl_module.parameters()))


def test_gradient_norms_are_read_every_kth_step_once_reading_costs_too_much(
    tmp_path, make_trainer, monkeypatch
):
    clock = FakeClock()
    tracker = importlib.import_module("lightning_landscape.linalg.noise_scale")
    update = tracker.GradientNoiseTracker.update

    def slow_update(self, *args, **kwargs):  # each read takes 0.035 fake s
        clock.now += 0.035
        return update(self, *args, **kwargs)

    monkeypatch.setattr(tracker.GradientNoiseTracker, "update", slow_update)
    monitor = GradientCovarianceMonitor(every_n_steps=1000, top_k=2, clock=clock)
    norms = _GradNorms()
    trainer = make_trainer(
        [monitor, norms, AdvanceClock(clock)], max_steps=160, log_every_n_steps=20
    )
    trainer.fit(DigitsModule(hidden=6, dtype=torch.float64), loader(16, dtype=torch.float64))
    # Steps of 1.035 s (the reads are inside them); a read may take 0.25% of that, 0.0025875 s:
    # after 8 reads (0.28 s) more than 100 reads may take (0.25875 s) is spent, and from then
    # on every ceil(0.035 / 0.0025875) = 14th step is read.
    assert _thinning.TRACKING_SHARE == 0.0025
    assert monitor._tracking.every == 14
    read = [i for i in range(160) if i < 8 or i % 14 == 0]
    beta, num, w = 0.9, 0.0, 0.0
    for i in read:
        num, w = beta * num + (1 - beta) * norms.values[i], beta * w + (1 - beta)
    got = scalar_series(load_events(str(tmp_path)), "landscape/gradient/train_grad_norm_sq")
    assert got[160] == pytest.approx(num / w, rel=1e-6)
    assert len(norms.values) == 160  # the reference read every step


@pytest.mark.parametrize("every_n_steps", [None, 10])
def test_diffusion_recording_widens_only_its_default_interval(
    tmp_path, make_trainer, monkeypatch, every_n_steps
):
    clock = FakeClock()
    recorder = importlib.import_module("lightning_landscape.callbacks._recorder")
    record = recorder.TrajectoryRecorder.record

    def slow_record(self, *args, **kwargs):  # a sample takes 0.3 fake s, steps 1 s
        clock.now += 0.3
        return record(self, *args, **kwargs)

    monkeypatch.setattr(recorder.TrajectoryRecorder, "record", slow_record)
    monitor = DiffusionMapMonitor(every_n_steps=every_n_steps, embed_every_n_epochs=None,
                                  clock=clock)  # fmt: skip
    make_trainer([monitor, AdvanceClock(clock)], max_steps=600).fit(DigitsModule(), loader(16))
    store = TrajectoryStore(monitor.store_dir, monitor.recorder.sketch.output_dim)
    steps = [int(s) for s in store.load().steps]
    if every_n_steps == 10:  # the user's interval is kept, whatever it costs
        assert steps == list(range(0, 601, 10))
        return
    # Default interval 10; a sample may take 0.5% of 10 steps of 1 s = 0.05 s. After 17 samples
    # (steps 0-160: 5.1 s) more than REVISE_EVERY = 100 samples may take (5 s) is spent:
    # 0.3 / 0.05 -> 6 x 10 steps, capped at 30 so that the 600-step fit still records
    # 2 x (n_components + 2) = 16 samples (601 // 16 = 37 -> 30).
    assert _thinning.REVISE_EVERY == 100 and _thinning.RECORDING_SHARE == 0.005
    assert steps[:17] == list(range(0, 161, 10))
    assert monitor.every_n_steps == 30
    assert steps[17:] == list(range(180, 601, 30))
    # The end-of-fit embedding still has the samples it needs.
    assert monitor.last_result is not None and len(steps) >= 2 * monitor.embedder.min_samples
