"""DiffusionMapMonitor's end-of-fit embedding on the budget: reduced to fewer landmarks, or to
landmarks only, when the full one does not fit what the budget still affords; whole with a
generous budget or an explicit schedule. Costs are fake seconds (machine-independent)."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_landscape.callbacks._diffusion_plan import (
    FLOOR_LANDMARKS,
    FLOOR_SECONDS,
    WRITE_FIXED_ROWS,
    EmbedCost,
    end_plan,
)
from lightning_landscape.callbacks._schedule import PLANNING_SHARE, Coordinator
from lightning_landscape.callbacks.diffusion import DiffusionMapMonitor
from lightning_landscape.dashboard import writer as dashboard_writer
from lightning_landscape.embeddings import trajectory as embedder_module
from lightning_landscape.embeddings.diffusion import diffusion_map, select_landmarks
from lightning_landscape.embeddings.trajectory import SAMPLE_UNITS, TrajectoryEmbedder
from lightning_landscape.sampling.store import TrajectoryStore
from tests.callbacks._clock import AdvanceClock, FakeClock
from tests.callbacks._events import load_events, scalar_series
from tests.callbacks._models import DigitsModule, loader

TAG = "landscape/diffusion"
STEPS = 328  # one-second steps, a sample at each; epochs of 16 steps: the end is mid-epoch


@pytest.fixture(autouse=True)
def _fresh_notices():
    dashboard_writer._reset_warn_once()


def _run(make_trainer, tmp_path, monkeypatch, per_unit: float, **kwargs):
    """A fit in which fitting a map on m landmarks costs ``per_unit`` fake seconds a unit of the
    cost model, m² + SAMPLE_UNITS · m (the Nyström placement is free). Returns the monitor,
    the landmark counts of the maps fitted, the coordinator and the samples recorded."""
    clock = FakeClock()
    sizes: list[int] = []
    real = embedder_module.diffusion_map

    def timed(X, **kw):
        sizes.append(X.shape[0])
        clock.now += per_unit * (X.shape[0] ** 2 + SAMPLE_UNITS * X.shape[0])
        return real(X, **kw)

    monkeypatch.setattr(embedder_module, "diffusion_map", timed)
    monitor = DiffusionMapMonitor(
        every_n_steps=1, n_components=2, n_neighbors=8, log_figure=False, clock=clock, **kwargs
    )
    trainer = make_trainer([AdvanceClock(clock), monitor], max_steps=STEPS)
    trainer.fit(DigitsModule(hidden=4), loader(32))
    assert monitor.skipped == 0 and monitor.last_embedded_step == STEPS
    traj = TrajectoryStore(monitor.store_dir, monitor.recorder.sketch.output_dim).load()
    assert traj.steps.size == STEPS + 1
    return monitor, sizes, trainer._landscape_coordinator, traj


def _logged_map_is(tmp_path, traj, landmarks: np.ndarray, num_samples: int) -> None:
    """The spectrum logged at the end is the map of ``landmarks`` (exact reference), and
    ``num_samples`` rows were embedded."""
    acc = load_events(str(tmp_path))
    reference = diffusion_map(traj.vectors[landmarks], n_components=2, n_neighbors=8)
    for i, value in enumerate(reference.eigenvalues, 1):
        assert scalar_series(acc, f"{TAG}/eigenvalue_{i:02d}")[STEPS] == pytest.approx(
            value, rel=1e-6
        )
    assert scalar_series(acc, f"{TAG}/num_samples")[STEPS] == num_samples


def test_end_of_fit_embedding_shrinks_to_the_landmarks_the_budget_affords(
    tmp_path, make_trainer, monkeypatch, said
):
    per_unit = 1e-4
    monitor, sizes, coord, traj = _run(make_trainer, tmp_path, monkeypatch, per_unit)
    n, m = STEPS + 1, sizes[-1]
    assert FLOOR_LANDMARKS <= m < n and len(sizes) >= 2  # an epoch end's ran, then this one
    # The most landmarks whose predicted cost (per_unit, as the earlier embedding measured it;
    # writing took no fake time) fits what the budget still afforded before it, embedded alone.
    share = monitor.max_overhead
    spent_before = coord.spent["diffusion"] - per_unit * monitor.embedder.cost(m, nystrom=False)
    room = coord.rate(share, ("diffusion",)) * coord.train_seconds - spent_before
    predicted = [
        per_unit * monitor.embedder.cost(n, max_points=k, nystrom=False) for k in (m, m + 1)
    ]
    assert predicted[0] <= room < predicted[1]
    assert coord.spent["diffusion"] <= share * coord.train_seconds  # bounded: within its share
    landmarks = select_landmarks(n, m)
    coords, steps = monitor._last[0], monitor._last[1]
    assert coords.shape == (m, 2) and np.isfinite(coords).all()  # the landmarks alone
    np.testing.assert_array_equal(steps, traj.steps[landmarks])
    _logged_map_is(tmp_path, traj, landmarks, m)
    notices = [line for line in said if "end-of-fit embedding" in line]
    assert len(notices) == 1 and f"on {m} landmarks, without placing" in notices[0], said


def test_end_of_fit_embedding_keeps_landmarks_only_when_even_the_floor_does_not_fit(
    tmp_path, make_trainer, monkeypatch, said
):
    monitor, sizes, _, traj = _run(make_trainer, tmp_path, monkeypatch, per_unit=1e-3)
    n = STEPS + 1
    # Even 100 landmarks with Nyström (1e-3 · 329 · 300 s) and 100 alone (30 s) exceed the
    # room: the floor's 100 landmarks alone, the picture the end of fit always gives.
    assert sizes[-1] == FLOOR_LANDMARKS
    landmarks = select_landmarks(n, FLOOR_LANDMARKS)
    coords, steps = monitor._last[0], monitor._last[1]
    assert coords.shape == (FLOOR_LANDMARKS, 2) and np.isfinite(coords).all()
    np.testing.assert_array_equal(steps, traj.steps[landmarks])
    _logged_map_is(tmp_path, traj, landmarks, FLOOR_LANDMARKS)
    notices = [line for line in said if "end-of-fit embedding" in line]
    assert len(notices) == 1 and "100 landmarks, without placing the others" in notices[0]


@pytest.mark.parametrize(
    ("per_unit", "kwargs"),
    [(1e-5, {}), (1e-2, {"embed_every_n_epochs": 4})],
    ids=["fits-the-room", "explicit-schedule"],
)
def test_end_of_fit_embedding_is_whole_when_affordable_or_scheduled(
    tmp_path, make_trainer, monkeypatch, said, per_unit, kwargs
):
    monitor, sizes, coord, traj = _run(make_trainer, tmp_path, monkeypatch, per_unit, **kwargs)
    n = STEPS + 1
    # The last map is the end of fit's (not an epoch end's: the one at the last, partial epoch
    # did not fit with its reserve, or is not on the schedule), on every sample.
    assert sizes[-2] < n and sizes[-1] == n and monitor._last[0].shape == (n, 2)
    _logged_map_is(tmp_path, traj, np.arange(n), n)
    assert not [line for line in said if "end-of-fit embedding" in line], said
    share = monitor.max_overhead
    if kwargs:  # the user's schedule ran whatever it cost: epochs 4, 8, …, 20, then the end
        assert sizes == [16 * e + 1 for e in range(4, 21, 4)] + [n]
        assert coord.spent["diffusion"] > share * coord.train_seconds
    else:  # the whole one fitted what the budget still afforded
        assert coord.spent["diffusion"] <= share * coord.train_seconds


def test_end_plan_order_and_floors():
    embedder = TrajectoryEmbedder(n_components=2, max_points=1000)
    cost = EmbedCost(fit=1e-6, units=1.0, write=0.0, rows=0)  # 1e-6 s a unit, writing free
    n = 2000
    full = end_plan(embedder, n, cost, None)  # no bound known: whole
    assert (full.landmarks, full.nystrom, full.reduced) == (1000, True, False)
    assert full.seconds == pytest.approx(1e-6 * (n * 1000 + 200 * n))
    assert not end_plan(embedder, n, cost, full.seconds).reduced
    # Under the floor of seconds nothing is reduced, whatever the room.
    assert not end_plan(embedder, 30, cost, 0.0).reduced and 1e-6 * 6900 < FLOOR_SECONDS
    # Landmarks alone, the most that fit: 1e-6 · (m² + 200 m) <= 0.59: 674 (with the others
    # placed by Nyström 1e-6 · n · (m + 200) <= 0.59 would allow only 95).
    plan = end_plan(embedder, n, cost, 0.59)
    assert (plan.landmarks, plan.nystrom, plan.reduced) == (674, False, True)
    assert plan.seconds <= 0.59 < 1e-6 * (675**2 + 200 * 675) and plan.full == full.seconds
    plan = end_plan(embedder, n, cost, 1.0)  # 1e-6 · (m² + 200 m) <= 1: 904 of the 1,000
    assert (plan.landmarks, plan.nystrom, plan.reduced) == (904, False, True)
    dear = EmbedCost(fit=1e-3, units=1.0, write=0.0, rows=0)  # 100 landmarks alone: 30 s
    plan = end_plan(embedder, n, dear, 0.0)  # nothing fits: the floor, landmarks only
    assert (plan.landmarks, plan.nystrom, plan.seconds) == (100, False, pytest.approx(30.0))
    # Fewer samples than the floor: nothing to leave out.
    assert not end_plan(embedder, 90, dear, 0.0).reduced
    # Writing: a fixed part as large as WRITE_FIXED_ROWS rows, and each row.
    written = EmbedCost(fit=0.0, units=1.0, write=1.0, rows=WRITE_FIXED_ROWS)
    assert written.predict(0.0, 0) == pytest.approx(0.5)
    assert written.predict(0.0, 3 * WRITE_FIXED_ROWS) == pytest.approx(2.0)
    # Checkpointed as plain numbers; a checkpoint's (seconds, samples) reads as all fitting.
    assert EmbedCost.from_state(cost.state(), embedder) == cost
    old = EmbedCost.from_state((2.0, 600), embedder)
    assert old.predict(embedder.cost(600), 600) == pytest.approx(2.0)
    ratio = embedder.cost(1200) / embedder.cost(600)
    assert old.predict(embedder.cost(1200), 1200) == pytest.approx(2.0 * ratio)


def test_coordinator_room_is_what_both_caps_still_afford():
    coord = Coordinator(clock=FakeClock(), warmup_steps=0, total_overhead=0.10)
    assert coord.room("diffusion", 0.05) is None  # no step timed yet: unknown
    coord.train_seconds, coord.counted_steps = 100.0, 100
    coord.record("diffusion", 1.0)
    assert coord.room("diffusion", 0.05) == pytest.approx(PLANNING_SHARE * 5.0 - 1.0)
    coord.record("other", 7.0)  # now the total cap binds: 9 s planned, 8 s spent
    room = coord.room("diffusion", 0.05)
    assert room == pytest.approx(PLANNING_SHARE * 10.0 - 8.0)
    # affords() is the same room with the end-of-fit reserve: a cost of half of it.
    assert coord.affords("diffusion", room / 2, 0.05)
    assert not coord.affords("diffusion", room / 2 + 1e-6, 0.05)
    coord.record("other", 5.0)
    assert coord.room("diffusion", 0.05) == pytest.approx(PLANNING_SHARE * 10.0 - 13.0)
