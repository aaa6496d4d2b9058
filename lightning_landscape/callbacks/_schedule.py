"""When to measure: fixed ``every_n_*`` schedules, or a wall-time budget shared by all monitors.

The budget places each monitor's next measurement so that its time stays under its
``max_overhead`` share of training time (and all monitors together under ``total_overhead``),
always keeping in reserve the end-of-fit measurement of every monitor (each one's latest cost, so
the end-of-fit measurements together fit under the total cap too), and less the per-step cost of
the monitors' hooks (their bodies timed at one call in :data:`HOOK_SAMPLE_EVERY`, Lightning's
dispatch of each :data:`DISPATCH_SECONDS`). Step time is measured after a
warm-up (first steps, compilation), excluding the time spent measuring. Decisions are made on
rank 0 and broadcast, and the coordinator's state is checkpointed so a resumed run continues the
same schedule.

Monitors also share results through the coordinator (:meth:`Coordinator.publish` /
:meth:`Coordinator.latest`, :meth:`Coordinator.request` / :meth:`Coordinator.requested`) rather
than through each other's attributes, and :func:`dependency_order` runs a monitor that provides a
result before the monitors that use it, whatever order the user gave the callbacks in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__: list[str] = []

#: All monitors together stay under this share of wall time (docs/design.md, "Cost"), or under
#: the largest ``max_overhead`` a monitor of the trainer was given, if that is larger.
TOTAL_OVERHEAD = 0.02

#: Measurements are planned against this fraction of each budget: the rest is a margin for what
#: the coordinator cannot time (one-off imports and set-up inside a fit, run-to-run noise of the
#: step time), so that the wall-time overhead users see stays under ``max_overhead``.
PLANNING_SHARE = 0.9

#: Seconds Lightning takes to dispatch one per-step hook to a callback (its profiler context and
#: the call), outside the hook body and so not timed by the monitor: about 1.4-2 µs on 2 CPU
#: cores (``benchmarks/hooks.py``). The budget charges it per hook a monitor works in.
DISPATCH_SECONDS = 2e-6

#: A monitor times its per-step hook bodies at one call in this many and charges each timed call
#: this many times over (a prime, so that with several hooks a step every hook gets sampled).
#: Work a hook does only now and then (a measurement, a recorded sample, a periodic log) is
#: charged in full where it runs and left out of the sampled time.
HOOK_SAMPLE_EVERY = 11

#: The result :class:`~lightning_landscape.HessianSpectrumMonitor` publishes on request: its
#: :class:`~lightning_landscape.HessianSpectrum`, with the top-k eigenvectors.
HESSIAN_EIGENPAIRS = "hessian/eigenpairs"

#: However fast the steps, measurements keep at least this fraction of the planned rate (else a
#: monitor on sub-millisecond steps would measure only at the end of fit).
MIN_RATE_FRACTION = 0.25


class Coordinator:
    """One per trainer: times the training steps and every measurement of every monitor.

    Args:
        clock: seconds, monotonic (tests inject a fake clock).
        warmup_steps: steps not counted in the step time.
        total_overhead: cap on the summed share of all monitors.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        warmup_steps: int = 5,
        total_overhead: float = TOTAL_OVERHEAD,
    ) -> None:
        self.clock = clock
        self.warmup_steps = warmup_steps
        self.total_overhead = total_overhead
        self.train_seconds = 0.0
        self.counted_steps = 0
        self.spent: dict[str, float] = {}
        # Per monitor: the cost of its end-of-fit measurement kept in reserve (its latest cost,
        # measured or guessed), until it has been paid (:meth:`ended`).
        self.reserve: dict[str, float] = {}
        self.monitors: set[str] = set()
        # Per monitor: seconds its hook bodies took (extrapolated from the timed calls) since
        # the warm-up, and how many per-step hooks Lightning dispatches to it.
        self.hook_seconds: dict[str, float] = {}
        self.dispatched_hooks: dict[str, int] = {}
        # Every second ever charged with record(): a hook body leaves these out of its own time.
        self.charged_total = 0.0
        self._last_tick: float | None = None
        self._last_step: int | None = None
        self._measuring_since_tick = 0.0
        self.layout_written = False
        # Results shared between monitors (not checkpointed: each names the step it is of).
        self._board: dict[str, tuple[int, Any]] = {}
        self._requests: set[str] = set()
        self._notices: set[str] = set()  # one-line notices given (once per trainer)

    # -- results shared between monitors -----------------------------------------------------
    def publish(self, name: str, step: int, value: Any) -> None:
        """Make ``value``, measured at ``step``, the latest result called ``name``."""
        self._board[name] = (step, value)

    def withdraw(self, name: str) -> None:
        """Forget the result called ``name`` (its measurement is being redone or failed)."""
        self._board.pop(name, None)

    def latest(self, name: str, step: int | None = None) -> Any | None:
        """The latest result called ``name``; with ``step``, only if it was measured then."""
        entry = self._board.get(name)
        if entry is None or (step is not None and entry[0] != step):
            return None
        return entry[1]

    def request(self, name: str) -> None:
        """Ask whichever monitor can provide ``name`` to publish it at each measurement."""
        self._requests.add(name)

    def requested(self, name: str) -> bool:
        """Whether some monitor asked for ``name`` (read by its provider when it measures)."""
        return name in self._requests

    def first_notice(self, key: str) -> bool:
        """True the first time ``key`` is asked: a notice shared by all monitors of a trainer
        (or by all of one class) is given once."""
        if key in self._notices:
            return False
        self._notices.add(key)
        return True

    # -- timing ------------------------------------------------------------------------------
    def tick(self, step: int) -> None:
        """Called once per optimizer step (by whichever monitor sees it first)."""
        if step == self._last_step:
            return
        now = self.clock()
        if self._last_tick is not None and step > self.warmup_steps:
            dt = now - self._last_tick - self._measuring_since_tick
            self.train_seconds += max(dt, 0.0)
            self.counted_steps += 1
        self._last_tick = now
        self._last_step = step
        self._measuring_since_tick = 0.0

    def register(self, monitor: str, hooks: int = 0, max_overhead: float = 0.0) -> None:
        """Count ``monitor``, to which Lightning dispatches ``hooks`` per-step hooks, among those
        whose per-step cost counts against the total cap, which is at least its
        ``max_overhead`` (a share a user gives one monitor is not cut by the default total)."""
        self.monitors.add(monitor)
        self.dispatched_hooks[monitor] = hooks
        self.total_overhead = max(self.total_overhead, max_overhead)

    def hook(self, monitor: str, seconds: float) -> None:
        """Count ``seconds`` of ``monitor``'s per-step hook bodies (after the warm-up only, the
        period the step time covers). Not charged as a measurement: the budget plans with the
        share of training time they take (:meth:`rate`)."""
        if self.counted_steps > 0:
            self.hook_seconds[monitor] = self.hook_seconds.get(monitor, 0.0) + seconds

    def record(self, monitor: str, seconds: float) -> None:
        """Charge ``seconds`` to ``monitor`` (and keep them out of the step time)."""
        self.spent[monitor] = self.spent.get(monitor, 0.0) + seconds
        self._measuring_since_tick += seconds
        self.charged_total += seconds

    @property
    def step_seconds(self) -> float | None:
        if self.counted_steps == 0:
            return None
        return self.train_seconds / self.counted_steps

    def hook_share(self, monitors: Iterable[str]) -> float:
        """Share of training time the per-step hooks of ``monitors`` take: their bodies' measured
        seconds and Lightning's dispatch (:data:`DISPATCH_SECONDS` a hook a step); 0 before
        the step time is known."""
        t_step = self.step_seconds
        if t_step is None or t_step <= 0:
            return 0.0
        names = set(monitors)
        bodies = sum(self.hook_seconds.get(m, 0.0) for m in names) / self.train_seconds
        dispatch = sum(self.dispatched_hooks.get(m, 0) for m in names) * DISPATCH_SECONDS
        return bodies + dispatch / t_step

    def rate(self, cap: float, monitors: Iterable[str] = ()) -> float | None:
        """Share of training time that measurements may take under ``cap``: ``PLANNING_SHARE ·
        cap`` less the per-step hook cost of ``monitors`` (:meth:`hook_share`), at least
        ``MIN_RATE_FRACTION`` of the former; None before the step time is known."""
        t_step = self.step_seconds
        if t_step is None or t_step <= 0:
            return None
        planned = PLANNING_SHARE * cap
        return max(planned - self.hook_share(monitors), MIN_RATE_FRACTION * planned)

    def _reserved(self, monitor: str, cost: float) -> float:
        """The end-of-fit reserve of every monitor, ``monitor``'s at ``cost`` (its latest cost
        replaces what it reserved before)."""
        self.reserve[monitor] = cost
        return sum(self.reserve.values())

    def ended(self, monitor: str) -> None:
        """``monitor`` has paid its end-of-fit measurement: release its reserve."""
        self.reserve.pop(monitor, None)

    def _rates(self, monitor: str, max_overhead: float) -> tuple[float, float] | None:
        """``monitor``'s own rate and the total cap's, which counts every registered monitor."""
        rate_self = self.rate(max_overhead, (monitor,))
        rate_all = self.rate(self.total_overhead, self.monitors | {monitor})
        if rate_self is None or rate_all is None:
            return None
        return rate_self, rate_all

    def next_step(
        self,
        monitor: str,
        step: int,
        cost: float,
        max_overhead: float,
        final_step: int | None = None,
    ) -> int | None:
        """First step at which a measurement of ``cost`` seconds (plus the end-of-fit reserve:
        as much again for ``monitor``, every other monitor's latest cost for the total cap)
        keeps ``monitor`` within ``max_overhead`` and all monitors within the total cap, both
        at the :meth:`rate` that leaves room for their per-step hook cost, and at least
        ``cost / rate`` seconds of training after ``step`` (no bursts). A step closer than that
        to ``final_step`` (the end-of-fit measurement, which always runs) becomes
        ``final_step``: a measurement seconds before the last one tells nothing new."""
        t_step = self.step_seconds
        rates = self._rates(monitor, max_overhead)
        if t_step is None or rates is None:
            return None
        rate_self, rate_all = rates
        spent_self = self.spent.get(monitor, 0.0)
        spent_all = sum(self.spent.values())
        need_self = (spent_self + 2 * cost) / rate_self
        need_all = (spent_all + cost + self._reserved(monitor, cost)) / rate_all
        need = max(need_self, need_all) - self.train_seconds
        # Never faster than the budget's rate: a measurement needs cost / rate of training
        # since the last one, so budget saved up by a long gap is not spent back to back
        # (consecutive measurements at steps s and s + 1 tell nothing new).
        need = max(need, cost / rate_self)
        nxt = step + max(1, math.ceil(need / t_step))
        if final_step is not None and step < final_step < nxt + cost / rate_self / t_step:
            return final_step
        return nxt

    def affords(
        self, monitor: str, cost: float, max_overhead: float, steps_since: int | None = None
    ) -> bool:
        """Whether a measurement of ``cost`` seconds now (plus the end-of-fit reserve, as in
        :meth:`next_step`) keeps ``monitor`` within ``max_overhead`` and all monitors within the
        total cap, both at their :meth:`rate`: the test for work that can only run at fixed points
        (epoch ends), where :meth:`next_step` cannot place it. As there, no bursts: with
        ``steps_since`` (steps since the monitor's last such measurement) at least ``cost /
        rate`` seconds of training must separate the two, however much budget was saved up."""
        rates = self._rates(monitor, max_overhead)
        if self.train_seconds <= 0 or rates is None:
            return False
        rate_self, rate_all = rates
        t_step = self.step_seconds or 0.0
        if steps_since is not None and steps_since * t_step < cost / rate_self:
            return False
        spent_self = self.spent.get(monitor, 0.0) + 2 * cost
        spent_all = sum(self.spent.values()) + cost + self._reserved(monitor, cost)
        return (
            spent_self <= rate_self * self.train_seconds
            and spent_all <= rate_all * self.train_seconds
        )

    def room(self, monitor: str, max_overhead: float) -> float | None:
        """Seconds of measurement ``monitor`` can still take now within ``max_overhead`` and the
        total cap, both at their :meth:`rate`, less the other monitors' end-of-fit reserves still
        unpaid (negative when over); None before the step time is known. The bound of a fixed
        cost that can be made smaller (an end-of-fit one)."""
        rates = self._rates(monitor, max_overhead)
        if rates is None:
            return None
        rate_self, rate_all = rates
        own = rate_self * self.train_seconds - self.spent.get(monitor, 0.0)
        others = sum(v for k, v in self.reserve.items() if k != monitor)
        return min(own, rate_all * self.train_seconds - sum(self.spent.values()) - others)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "train_seconds": self.train_seconds,
            "counted_steps": self.counted_steps,
            "spent": dict(self.spent),
            "hook_seconds": dict(self.hook_seconds),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("counted_steps", 0) >= self.counted_steps:
            self.train_seconds = float(state.get("train_seconds", 0.0))
            self.counted_steps = int(state.get("counted_steps", 0))
            self.spent = {k: float(v) for k, v in state.get("spent", {}).items()}
            hooks = state.get("hook_seconds", {})
            self.hook_seconds = {k: float(v) for k, v in hooks.items()}


def coordinator_for(
    trainer: Any,
    monitor: str,
    clock: Callable[[], float] | None = None,
    hooks: int = 0,
    max_overhead: float = 0.0,
) -> Coordinator:
    """The trainer's coordinator, created by the first monitor that asks, with ``monitor``
    registered (its ``hooks`` per-step hooks count against the total cap, which is at least its
    ``max_overhead``)."""
    coord = getattr(trainer, "_landscape_coordinator", None)
    if coord is None:
        coord = Coordinator(clock=clock or time.perf_counter)
        trainer._landscape_coordinator = coord
    elif clock is not None:
        coord.clock = clock
    coord.register(monitor, hooks, max_overhead)
    return coord


def dependency_order(callbacks: Sequence[Any]) -> list[Any]:
    """``callbacks`` with every monitor that provides a result (class attribute ``provides``, a
    tuple of names) moved just before the first monitor that uses it (``uses``), the rest in
    the given order: Lightning calls the hooks in list order, so under one step the provider
    measures first. Stable, and the same list when it is already in that order."""
    order = list(callbacks)
    for _ in range(len(order)):  # a provider moves at most once per pass; no cycles here
        moved = False
        for i, cb in enumerate(order):
            wanted = set(getattr(cb, "uses", ()))
            later = [c for c in order[i + 1 :] if wanted & set(getattr(c, "provides", ()))]
            if later:
                rest = [c for c in order if all(c is not m for m in later)]
                at = next(j for j, c in enumerate(rest) if c is cb)
                order, moved = rest[:at] + later + rest[at:], True
                break
        if not moved:
            return order
    return order
