"""The budget-driven default schedule, with a fake clock so that the test is deterministic."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest

from lightning_landscape import HessianSpectrumMonitor
from lightning_landscape.callbacks._schedule import (
    DISPATCH_SECONDS,
    HOOK_SAMPLE_EVERY,
    MIN_RATE_FRACTION,
    PLANNING_SHARE,
    TOTAL_OVERHEAD,
    Coordinator,
)
from tests.callbacks._clock import AdvanceClock, FakeClock
from tests.callbacks._models import DigitsModule, loader

STEP, COST, BUDGET, WARMUP = 1.0, 3.0, 0.05, 5
_REAL_COMPUTE = HessianSpectrumMonitor._compute


def test_coordinator_places_the_earliest_affordable_step():
    clock = FakeClock()
    coord = Coordinator(clock=clock, warmup_steps=WARMUP)
    coord.register("hessian", max_overhead=BUDGET)  # as the monitor does at setup
    for step in range(1, 41):
        clock.now += STEP
        coord.tick(step)
    assert coord.counted_steps == 40 - WARMUP
    assert coord.step_seconds == pytest.approx(STEP)
    coord.record("hessian", COST)
    nxt = coord.next_step("hessian", 40, COST, BUDGET)

    def affordable(step: int) -> bool:  # spent + next + end-of-fit reserve within the budget
        train = coord.train_seconds + (step - 40) * STEP
        share = PLANNING_SHARE * BUDGET  # no hook of this monitor measured or dispatched
        return COST + 2 * COST <= share * train + 1e-9

    assert affordable(nxt) and not affordable(nxt - 1)


def test_total_cap_binds_when_several_monitors_spend():
    coord = Coordinator(clock=FakeClock(), warmup_steps=0, total_overhead=0.10)
    coord.train_seconds, coord.counted_steps = 100.0, 100
    coord.record("other", 20.0)  # another monitor already used 20 s
    nxt = coord.next_step("hessian", 100, COST, BUDGET)
    train_at_next = 100.0 + (nxt - 100) * 1.0
    cap = PLANNING_SHARE * 0.10
    assert 20.0 + 2 * COST <= cap * train_at_next + 1e-9
    assert 20.0 + 2 * COST > cap * (train_at_next - 1.0)


def test_total_cap_keeps_every_monitors_end_of_fit_in_reserve():
    """Each monitor's end-of-fit measurement always runs: the total cap keeps all of them in
    reserve (each at its latest cost), not only the one of the monitor being placed, until a
    monitor has paid its own."""
    coord = Coordinator(clock=FakeClock(), warmup_steps=0, total_overhead=0.10)
    coord.train_seconds, coord.counted_steps = 100.0, 100
    cap = PLANNING_SHARE * 0.10
    coord.next_step("hessian", 100, 4.0, 0.10)  # placed: 4 s kept for its end of fit
    coord.next_step("hessian", 100, 2.0, 0.10)  # its latest cost replaces the first
    coord.record("other", 5.0)
    nxt = coord.next_step("gradient", 100, COST, 0.10)
    train_at = 100.0 + (nxt - 100)  # 1-s steps

    def fits(train: float) -> bool:  # spent + this one + its reserve + the Hessian's reserve
        return 5.0 + 2 * COST + 2.0 <= cap * train + 1e-9

    assert fits(train_at) and not fits(train_at - 1.0)
    # The same test for work at fixed points.
    coord.train_seconds = 200.0  # 18 s at the cap: 5 spent + 2 c + 2 reserved
    assert coord.affords("gradient", 5.5, 0.10) and not coord.affords("gradient", 5.6, 0.10)
    # At the end of fit, the room of one monitor leaves the others' reserves unpaid ...
    assert coord.room("gradient", 0.10) == pytest.approx(cap * 200.0 - 5.0 - 2.0)
    # ... until they have paid theirs.
    coord.ended("hessian")
    assert coord.room("gradient", 0.10) == pytest.approx(cap * 200.0 - 5.0)


def test_total_cap_is_two_percent_unless_a_monitor_is_given_more():
    coord = Coordinator(clock=FakeClock(), warmup_steps=0)
    for name, share in (("hessian", 0.02), ("gradient", 0.01), ("inpca", 0.005)):
        coord.register(name, max_overhead=share)  # the defaults: the total cap stays 2%
    assert coord.total_overhead == TOTAL_OVERHEAD == 0.02
    coord.train_seconds, coord.counted_steps = 100.0, 100
    coord.record("gradient", 1.5)  # another monitor used 1.5 s of 100 s
    # The Hessian monitor's own 2% would allow 1.8 s, the total 2% leaves 1.8 - 1.5 s: a cost
    # of 0.15 s and as much again in reserve for the end of fit.
    assert coord.affords("hessian", 0.15, 0.02) and not coord.affords("hessian", 0.16, 0.02)
    coord.register("diffusion", max_overhead=0.2)  # a user's larger share raises the cap
    assert coord.total_overhead == 0.2
    assert coord.affords("hessian", 0.9, 0.02) and not coord.affords("hessian", 0.91, 0.02)


def _run(tmp_path, monkeypatch, max_steps: int) -> tuple[list[int], HessianSpectrumMonitor]:
    clock = FakeClock()
    monitor = HessianSpectrumMonitor(
        top_k=2, density=False, trace=False, clock=clock, max_overhead=BUDGET
    )
    real = _REAL_COMPUTE
    steps: list[int] = []

    def compute(self, pl_module, *args):
        steps.append(pl_module.global_step)
        clock.now += COST  # each measurement costs COST fake seconds
        return real(self, pl_module, *args)

    monkeypatch.setattr(HessianSpectrumMonitor, "_compute", compute)
    monkeypatch.setattr(HessianSpectrumMonitor, "_cost_guess", lambda self, *args: COST)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[AdvanceClock(clock, STEP), monitor],
        default_root_dir=str(tmp_path),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DigitsModule(hidden=4), loader(16, n=4096))
    return steps, monitor


def test_budget_schedule_keeps_the_overhead_under_max_overhead(tmp_path, monkeypatch):
    steps, monitor = _run(tmp_path, monkeypatch, max_steps=600)
    assert steps[-1] == 600  # the end-of-fit measurement always runs
    scheduled = steps[:-1]
    assert len(scheduled) >= 4, steps  # measurements actually happen
    for i, s in enumerate(scheduled):
        train = (s - WARMUP) * STEP
        # Every scheduled measurement, with the end-of-fit reserve, fits the 5% budget.
        assert (i + 2) * COST <= BUDGET * train + 1e-9, (i, s)
    # The whole run, end-of-fit included, stays under the budget.
    assert len(steps) * COST <= BUDGET * (600 - WARMUP) * STEP
    # Not wastefully sparse: the budget is mostly used.
    assert len(steps) * COST >= 0.6 * BUDGET * (600 - WARMUP) * STEP
    assert monitor.skipped == 0


def test_budget_schedule_is_deterministic(tmp_path, monkeypatch):
    a, _ = _run(tmp_path / "a", monkeypatch, max_steps=300)
    b, _ = _run(tmp_path / "b", monkeypatch, max_steps=300)
    assert a == b


def test_saved_up_budget_is_not_spent_back_to_back():
    """After a long gap the budget has room for many measurements at once; the schedule still
    leaves cost / (share · max_overhead) of training between two of them."""
    coord = Coordinator(clock=FakeClock(), warmup_steps=0)
    coord.register("hessian", max_overhead=BUDGET)
    coord.train_seconds, coord.counted_steps = 1000.0, 1000  # 1 s steps, nothing spent yet
    nxt = coord.next_step("hessian", 1000, COST, BUDGET)
    rate = PLANNING_SHARE * BUDGET
    assert nxt - 1000 == math.ceil(COST / rate)  # 67 steps, not 1


HOOK_S = 20e-6  # measured seconds of each monitor's hook bodies a step


@pytest.mark.parametrize(("monitors", "step_s"), [(1, 0.8e-3), (3, 1.6e-3)])
def test_measured_per_step_cost_of_the_hooks_is_charged_on_fast_steps(monitors, step_s):
    """On millisecond steps each monitor's hooks cost their measured seconds plus Lightning's
    dispatch (2 hooks here) a step (3% of 0.8 ms) of training: measurements get the rest of
    the planned share, so measurements plus hooks stay within it; on 1 s steps the hooks are
    negligible."""
    cost = 0.05
    coord = Coordinator(clock=FakeClock(), warmup_steps=0, total_overhead=0.10)
    names = [f"m{i}" for i in range(monitors)] + ["hessian"]
    for name in names:
        coord.register(name, hooks=2, max_overhead=BUDGET)
    per_step = HOOK_S + 2 * DISPATCH_SECONDS  # each monitor's, timed and dispatched
    spent, step = 0.0, 0
    coord.train_seconds, coord.counted_steps = 1000 * step_s, 1000
    for name in names:
        coord.hook(name, 1000 * HOOK_S)
    end = 200_000
    while True:
        nxt = coord.next_step("hessian", step, cost, BUDGET)
        if nxt > end:
            break
        coord.train_seconds += (nxt - step) * step_s
        coord.counted_steps += nxt - step
        for name in names:
            coord.hook(name, (nxt - step) * HOOK_S)
        coord.record("hessian", cost)
        spent += cost
        step = nxt
    train = end * step_s
    assert spent + end * per_step <= PLANNING_SHARE * BUDGET * train
    # The total cap counts every registered monitor's hooks (with four monitors it binds).
    total = PLANNING_SHARE * coord.total_overhead - (monitors + 1) * per_step / step_s
    assert total > MIN_RATE_FRACTION * PLANNING_SHARE * coord.total_overhead  # not the floor
    assert coord.rate(coord.total_overhead, names) == pytest.approx(total)
    assert spent <= total * train
    # Not wastefully sparse: the share left after the hooks is mostly used.
    own = PLANNING_SHARE * BUDGET - per_step / step_s
    assert spent >= 0.8 * min(own, total) * train
    # Slow steps: the rate is the planned share, to within the hooks' negligible cost.
    coord.train_seconds, coord.counted_steps = 1000.0, 1000
    coord.hook_seconds = {name: 1000 * HOOK_S for name in names}
    assert coord.rate(BUDGET, ["hessian"]) == pytest.approx(PLANNING_SHARE * BUDGET, rel=1e-3)
    # Sub-millisecond steps on which the hooks alone exceed the share: a floor, not zero.
    coord.train_seconds, coord.counted_steps = 1000 * 1e-4, 1000
    assert coord.rate(BUDGET, ["hessian"]) == pytest.approx(
        MIN_RATE_FRACTION * PLANNING_SHARE * BUDGET
    )


def test_hook_bodies_are_timed_and_charged_instead_of_a_constant(make_trainer, monkeypatch):
    """The coordinator charges what a monitor's hook bodies take (timed at one call in
    HOOK_SAMPLE_EVERY, extrapolated), less the measurements they ran (charged as such)."""
    clock, hook_s, steps = FakeClock(), 0.01, 11 * 30

    class SlowHooks(HessianSpectrumMonitor):
        def on_train_batch_end(self, *args, **kwargs):
            clock.now += hook_s  # the body's own bookkeeping
            super().on_train_batch_end(*args, **kwargs)  # inside the same timed call

    def compute(self, *args):
        clock.now += COST  # a measurement, charged as one, not as hook time
        return _REAL_COMPUTE(self, *args)

    monkeypatch.setattr(HessianSpectrumMonitor, "_compute", compute)
    monitor = SlowHooks(top_k=2, density=False, trace=False, clock=clock, every_n_steps=7)
    trainer = make_trainer([AdvanceClock(clock, STEP), monitor], max_steps=steps, logger=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DigitsModule(hidden=4), loader(16, n=4096))
    coord = trainer._landscape_coordinator
    assert coord.dispatched_hooks == {"hessian": 1}  # on_train_batch_end only
    # The calls after the warm-up, each hook_s: sampled ones count HOOK_SAMPLE_EVERY times.
    counted = steps - WARMUP
    assert coord.hook_seconds["hessian"] == pytest.approx(
        counted * hook_s, abs=HOOK_SAMPLE_EVERY * hook_s
    )
    assert coord.spent["hessian"] == pytest.approx(monitor.num_measurements * COST)
    share = coord.hook_seconds["hessian"] / coord.train_seconds + DISPATCH_SECONDS / STEP
    assert coord.rate(BUDGET, ["hessian"]) == pytest.approx(PLANNING_SHARE * BUDGET - share)


def test_a_measurement_just_before_the_end_of_fit_waits_for_it():
    """The end-of-fit measurement always runs: one placed less than the budget's spacing
    before it would measure nearly the same weights again."""
    coord = Coordinator(clock=FakeClock(), warmup_steps=0)
    coord.train_seconds, coord.counted_steps = 1000.0, 1000  # 1 s steps
    free = coord.next_step("hessian", 1000, COST, BUDGET)
    spacing = free - 1000  # COST / rate: 67 steps
    assert coord.next_step("hessian", 1000, COST, BUDGET, final_step=free + 10 * spacing) == free
    assert coord.next_step("hessian", 1000, COST, BUDGET, final_step=free + spacing - 1) == (
        free + spacing - 1
    )
    assert coord.next_step("hessian", 1000, COST, BUDGET, final_step=free - 5) == free - 5


def test_fixed_point_work_is_not_spent_in_a_burst():
    """Budget saved up over a long gap buys one measurement, not several back to back: like
    next_step, affords() wants cost / rate of training since the monitor's last one."""
    coord = Coordinator(clock=FakeClock(), warmup_steps=0)
    coord.train_seconds, coord.counted_steps = 1000.0, 1000  # one-second steps, nothing spent
    rate = PLANNING_SHARE * 0.02
    assert coord.affords("diffusion", 1.0, 0.02)  # never measured: the budget alone decides
    assert coord.affords("diffusion", 1.0, 0.02, steps_since=math.ceil(1.0 / rate))
    assert not coord.affords("diffusion", 1.0, 0.02, steps_since=math.floor(1.0 / rate))
