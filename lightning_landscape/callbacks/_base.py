"""The common Lightning adapters of the monitors.

:class:`ScheduledMonitor` is what every monitor shares: the schedule and budget (through the
trainer's :class:`~._schedule.Coordinator`), the checkpointed state, failure handling (warn once,
count in ``skipped``), scalar logging and the end-of-fit barrier; a subclass supplies
``_measure``. :class:`LandscapeMonitor` adds what the probe-based monitors need: the probe set
(captured, saved, restored on resume), the loss, isolation of the measurement and the a-priori
cost from a timed probe gradient; its subclasses supply ``_compute`` (call a core estimator) and
``_log`` (write what it returned).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils._pytree import tree_leaves
from typing_extensions import override

from .._checks import check_positive_int
from ..dashboard import tensorboard_writer, warn_once, write_custom_scalars_layout
from ..dashboard.layout import merge_layouts
from ..dashboard.writer import mark_resumed
from ..linalg.operators import HessianOperator, HVPFailedError
from . import _context as ctx
from ._fixed_costs import QUIET_SECONDS, over_room, say, too_costly
from ._schedule import HOOK_SAMPLE_EVERY, Coordinator, coordinator_for

__all__: list[str] = []

#: Exceptions that mean "this measurement failed numerically": warn, skip, train on.
NUMERICAL_FAILURES: tuple[type[BaseException], ...] = (
    FloatingPointError,
    HVPFailedError,
    torch.OutOfMemoryError,
    np.linalg.LinAlgError,
)


#: Hooks Lightning calls for every callback at every batch, each through its profiler's context
#: (about 1.4 µs a call on 2 CPU cores; 7 µs a training step for the five a monitor rarely
#: needs), even for a callback that leaves them as :class:`~lightning.pytorch.Callback`'s
#: no-ops. Lightning skips a hook whose attribute is not callable
#: (``lightning.pytorch.trainer.call._call_callback_hooks``), so each monitor class sets the ones
#: it does not override to None (:func:`_drop_unused_batch_hooks`).
_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_test_batch_start",
    "on_test_batch_end",
    "on_predict_batch_start",
    "on_predict_batch_end",
)


#: The per-step hooks of training, whose bodies a monitor times (:func:`_time_step_hooks`).
_STEP_HOOKS = _BATCH_HOOKS[:6]


def _timed_hook(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` with its body timed at one call in :data:`HOOK_SAMPLE_EVERY` (the monitor's
    calls of all its step hooks counted together), that time, less what the body charged
    itself (measurements, samples, periodic logs), counted :data:`HOOK_SAMPLE_EVERY` times
    over by :meth:`Coordinator.hook`. A call inside another timed hook of the same monitor (a
    ``super()`` call) is part of the outer one."""

    @functools.wraps(hook)
    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        coord = self._coord
        if coord is None or self._in_hook:
            return hook(self, *args, **kwargs)
        self._hook_calls += 1
        self._in_hook = True
        try:
            if self._hook_calls % HOOK_SAMPLE_EVERY:
                return hook(self, *args, **kwargs)
            charged, t0 = coord.charged_total, coord.clock()
            try:
                return hook(self, *args, **kwargs)
            finally:
                own = coord.clock() - t0 - (coord.charged_total - charged)
                coord.hook(self.name, HOOK_SAMPLE_EVERY * max(own, 0.0))
        finally:
            self._in_hook = False

    return timed


def _time_step_hooks(cls: type) -> None:
    """Wrap each per-step training hook ``cls`` defines itself with :func:`_timed_hook`."""
    for name in _STEP_HOOKS:
        fn = cls.__dict__.get(name)
        if callable(fn):
            setattr(cls, name, _timed_hook(fn))


def _dispatched_hooks(monitor: Any) -> int:
    """How many per-step training hooks Lightning dispatches to ``monitor`` (not None)."""
    return sum(callable(getattr(monitor, name, None)) for name in _STEP_HOOKS)


def _drop_unused_batch_hooks(cls: type) -> None:
    """Set each of :data:`_BATCH_HOOKS` that ``cls`` inherits unchanged from ``Callback`` to None,
    so that Lightning does not dispatch it at every batch."""
    for hook in _BATCH_HOOKS:
        if getattr(cls, hook, None) is getattr(Callback, hook):
            setattr(cls, hook, None)


class ScheduledMonitor(Callback):
    """Base class of every monitor: decides when to measure, counts failures, holds the state.

    A subclass implements :meth:`_measure` (one scheduled unit of work at an optimizer step;
    it sets ``last_measured_step``) and may override the other hooks below. Measurements run at
    step 0 (with ``every_n_steps``), on the step or epoch schedule or the budget's placement, and
    once at the end of fit (:meth:`_finish_fit`); every rank then waits at one barrier.

    The per-batch hooks a monitor class does not override are None rather than ``Callback``'s
    no-ops, so Lightning does not dispatch them (:data:`_BATCH_HOOKS`); a subclass may still
    define any of them, but has no base implementation to call.

    Args:
        every_n_steps: measure every ``n`` optimizer steps (step 0 included) instead of the budget.
        every_n_epochs: measure at the end of every ``n``-th epoch instead of the budget.
        max_overhead: share of training wall time this monitor may use (budget schedule).
        clock: seconds counter for the budget (tests inject a fake one).
    """

    #: short name used in tags (``landscape/<name>/...``).
    name = "monitor"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _drop_unused_batch_hooks(cls)
        _time_step_hooks(cls)

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        max_overhead: float = 0.02,
        clock: Callable[[], float] | None = None,
    ) -> None:
        check_positive_int("every_n_steps", every_n_steps, allow_none=True)
        check_positive_int("every_n_epochs", every_n_epochs, allow_none=True)
        if every_n_steps is not None and every_n_epochs is not None:
            raise ValueError(
                "every_n_steps and every_n_epochs are exclusive; got "
                f"every_n_steps={every_n_steps}, every_n_epochs={every_n_epochs}"
            )
        if isinstance(max_overhead, bool) or not (
            isinstance(max_overhead, (int, float)) and 0 < max_overhead < 1
        ):
            raise ValueError(f"max_overhead must be a fraction in (0, 1); got {max_overhead!r}")
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.max_overhead = float(max_overhead)
        self._clock = clock
        # Checkpointed state.
        self.last_measured_step: int | None = None
        self.next_step: int | None = None
        self.num_measurements = 0
        self.skipped = 0
        self.last_cost: float | None = None
        self._pending_coordinator: dict[str, Any] | None = None
        # Per-fit objects, created in setup/on_train_start (ddp_spawn pickles callbacks).
        self._coord: Coordinator | None = None
        self._seen_step: int | None = None
        # Why this monitor measures nothing in this fit (fast_dev_run, a fit too short), if so.
        self._off: str | None = None
        self._expected: float | None = None  # seconds the next measurement should take
        self._hook_calls = 0
        self._in_hook = False

    # -- subclass hooks ----------------------------------------------------------------------
    def _measure(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """One scheduled measurement at ``step`` on every rank; sets ``last_measured_step``."""
        raise NotImplementedError

    def _layout(self) -> dict[str, dict[str, list[str]]]:
        return {}

    def _cost_guess(self, trainer: Trainer, pl_module: LightningModule) -> float:
        """A priori cost of one measurement in seconds, for the budget's first placement (none
        known here: the first measurement comes as soon as the budget allows, and times it)."""
        return 0.0

    def _deferred_cost(self) -> float:
        """Seconds a measurement is expected to cost later, outside :meth:`_measure` (e.g. a
        figure written at the next epoch end), for the budget to plan with."""
        return 0.0

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def _reduced(self) -> contextlib.AbstractContextManager[str] | None:
        """A context in which :meth:`_measure` (and :meth:`_cost_guess`) make the monitor's
        reduced measurement, the one a short fit can afford at its end; it yields a few words
        on what is left out. None (the default): the monitor has no reduced form."""
        return None

    def _smaller(self) -> contextlib.AbstractContextManager[str] | None:
        """A further reduction, entered inside :meth:`_reduced` when the reduced end-of-fit
        measurement would still exceed the budget's room (None: none)."""
        return None

    def _what(self) -> str:
        """What a measurement computes, for the progress lines of long measurements."""
        return "its measurement"

    def _step_seconds_guess(self) -> float | None:
        """Seconds of a training step before the coordinator has timed one, if known."""
        return None

    # -- properties --------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # Lightning reads it at every hook call (profiler section names), six times a step per
        # callback: built once from the constructor's arguments, which define it.
        key = self.__dict__.get("_cached_state_key")
        if key is None:
            key = self._cached_state_key = self._state_key()
        return key

    def _state_key(self) -> str:
        return self._generate_state_key()

    @property
    def uses_budget(self) -> bool:
        return self.every_n_steps is None and self.every_n_epochs is None

    @property
    def _now(self) -> Callable[[], float]:
        """The budget's clock (a fake one in tests), ``time.perf_counter`` before setup."""
        return self._coord.clock if self._coord is not None else time.perf_counter

    @property
    def tag_prefix(self) -> str:
        return f"landscape/{self.name}"

    # -- Lightning hooks ---------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        ctx.check_strategy(trainer, type(self).__name__)
        self._coord = coordinator_for(
            trainer, self.name, self._clock, _dispatched_hooks(self), self.max_overhead
        )
        self._off = "fast_dev_run" if getattr(trainer, "fast_dev_run", False) else None
        if self._off is not None and self._coord.first_notice("fast_dev_run"):
            say(
                trainer,
                "lightning_landscape: fast_dev_run, so the landscape monitors measure nothing "
                "and write nothing in this run (like Lightning's loggers and checkpoints).",
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending_coordinator is not None and self._coord is not None:
            self._coord.load_state_dict(self._pending_coordinator)
            self._pending_coordinator = None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._off is not None:
            return
        if trainer.is_global_zero and self._coord is not None and not self._coord.layout_written:
            self._coord.layout_written = True
            writer = tensorboard_writer(trainer)
            layouts = [
                cb._layout()
                for cb in trainer.callbacks
                if isinstance(cb, ScheduledMonitor) and cb._off is None
            ]
            if writer is not None:
                write_custom_scalars_layout(writer, merge_layouts(*layouts))
                if trainer.global_step > 0:  # resumed: the steps after the checkpoint are redone
                    mark_resumed(writer, trainer.global_step + 1)
        step = trainer.global_step
        self._seen_step = step
        if self.every_n_steps is not None and step == 0 and self.last_measured_step != 0:
            self._measure(trainer, pl_module, step)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._seen_step or self._off is not None:  # not an optimizer step, or off
            return
        self._seen_step = step
        assert self._coord is not None
        self._coord.tick(step)
        if self._due(trainer, pl_module, step):
            # The budget places a measurement it cannot afford before the end at the last step:
            # that one is the end-of-fit measurement, bounded as such.
            end = self.uses_budget and step == _final_step(trainer)
            (self._measure_end if end else self._measure)(trainer, pl_module, step)
            if end:
                self._coord.ended(self.name)  # its reserve is paid

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = self.every_n_epochs
        if n is not None and (trainer.current_epoch + 1) % n == 0 and self._off is None:
            step = trainer.global_step
            if step != self.last_measured_step:
                self._measure(trainer, pl_module, step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._off is None:
            self._finish_fit(trainer, pl_module)
        if self._coord is not None:
            self._coord.ended(self.name)  # its end-of-fit reserve is paid (or not needed)
        self._end_barrier(trainer)

    def _finish_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """End-of-fit work of every rank (the last measurement), before the closing barrier."""
        step = trainer.global_step
        if step != self.last_measured_step:
            self._measure_end(trainer, pl_module, step)
            if self.uses_budget and self._coord is not None:
                spent = self._coord.spent.get(self.name, 0.0)
                allowed = self.max_overhead * self._coord.train_seconds
                if trainer.is_global_zero and spent > allowed > 0:
                    warn_once(
                        f"{self.name}-budget",
                        f"{type(self).__name__}: the end-of-fit measurement took the monitor to "
                        f"{spent:.1f} s, over its budget of {allowed:.1f} s "
                        f"({self.max_overhead:.1%} of {self._coord.train_seconds:.1f} s of "
                        "training); the run was too short for this measurement.",
                    )

    def _measure_end(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """The end-of-fit measurement: the reduced one (:meth:`_reduced`) when the full one is
        predicted to cost more than the fit so far affords (``_fixed_costs.too_costly``) or, on
        the budget, more than the budget still affords (``_fixed_costs.over_room``)."""
        reduced = self._reduced()
        if reduced is None:
            self._measure(trainer, pl_module, step)
            return
        full = self._charged_guess(trainer, pl_module)
        cost = self.last_cost if self.last_cost is not None else full
        fit = self._fit_seconds(step)
        coord = self._coord if self.uses_budget else None
        room = coord.room(self.name, self.max_overhead) if coord is not None else None
        short = too_costly(cost, fit)
        if not trainer.strategy.broadcast(short or over_room(cost, room), 0):
            self._measure(trainer, pl_module, step)
            return
        with contextlib.ExitStack() as stack:
            left_out = stack.enter_context(reduced)
            small = self._charged_guess(trainer, pl_module)
            smaller, guess = self._smaller(), cost * small / full if full > 0 else None
            # Still more than affordable (decided on rank 0): a further reduction, if any.
            still = too_costly(guess, fit) if short else over_room(guess, room)
            # Every rank joins the broadcast (one whose probe set failed has no smaller form).
            if trainer.strategy.broadcast(still, 0) and smaller is not None:
                left_out += f", on {stack.enter_context(smaller)}"
                small = self._charged_guess(trainer, pl_module)
            # The reduced cost: the measured one scaled as the a-priori guesses scale.
            self._expected = cost * small / full if full > 0 else None
            if self._coord is not None and self._coord.first_notice(f"end:{self.name}"):
                affords = (
                    f"the fit so far ({fit:.1f} s of training)"
                    if short
                    else f"the monitor's budget ({max(room or 0.0, 0.0):.1f} s left)"
                )
                say(
                    trainer,
                    f"{type(self).__name__}: the end-of-fit measurement (about {cost:.1f} s) "
                    f"would take more than {affords} affords; measuring {left_out} instead.",
                )
            try:
                self._measure(trainer, pl_module, step)
            finally:
                self._expected = None

    def _charged_guess(self, trainer: Trainer, pl_module: LightningModule) -> float:
        """:meth:`_cost_guess`, its timing passes charged to the budget."""
        clock = self._now
        t0 = clock()
        guess = self._cost_guess(trainer, pl_module)
        self._charge(clock() - t0)
        return guess

    def _fit_seconds(self, steps: int) -> float | None:
        """Predicted training seconds of ``steps`` steps (timed steps, else a guess)."""
        per_step = self._coord.step_seconds if self._coord is not None else None
        if per_step is None:
            per_step = self._step_seconds_guess()
        return None if per_step is None else per_step * steps

    def _announce(self, trainer: Trainer, step: int, expected: float | None) -> bool:
        """One line before a measurement expected to take :data:`QUIET_SECONDS` or more."""
        if expected is None or expected < QUIET_SECONDS:
            return False
        name = type(self).__name__
        say(trainer, f"{name}: measuring {self._what()} at step {step} (about {expected:.0f} s)")
        return True

    def _announce_done(self, trainer: Trainer, step: int, seconds: float, announced: bool) -> None:
        """One line after a measurement that was announced or took :data:`QUIET_SECONDS`."""
        if announced or seconds >= QUIET_SECONDS:
            name = type(self).__name__
            say(trainer, f"{name}: measured {self._what()} at step {step} in {seconds:.1f} s")

    def _end_barrier(self, trainer: Trainer) -> None:
        """Hold every rank until rank 0 has finished logging the end of fit.

        Rank 0 writes figures and histograms after the last measurement; a rank that tears down
        its process group meanwhile can abort under ddp_spawn + gloo. Every rank reaches this
        call (single device: a no-op).
        """
        trainer.strategy.barrier(f"{type(self).__name__}.on_train_end")

    # -- schedule ----------------------------------------------------------------------------
    def _due(self, trainer: Trainer, pl_module: LightningModule, step: int) -> bool:
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        if self.every_n_epochs is not None:
            return False
        assert self._coord is not None
        if self.next_step is None:
            if self._coord.counted_steps < self._coord.warmup_steps:
                return False
            # First placement, from the timed steps and an a-priori cost (rank 0 decides).
            if self.last_cost is not None:
                guess = self.last_cost
            else:
                t0 = self._coord.clock()
                guess = self._cost_guess(trainer, pl_module)
                # The timing passes are overhead too: charge them.
                self._charge(self._coord.clock() - t0)
            nxt = self._coord.next_step(
                self.name, step, guess, self.max_overhead, _final_step(trainer)
            )
            self.next_step = trainer.strategy.broadcast(nxt if nxt is not None else step + 1, 0)
            return False
        return step >= self.next_step

    def _reschedule(self, trainer: Trainer, step: int, seconds: float) -> None:
        if not self.uses_budget or self._coord is None:
            return
        nxt = self._coord.next_step(
            self.name, step, seconds, self.max_overhead, _final_step(trainer)
        )
        # No step time yet (a measurement at the start of fit, inside the warm-up): leave the
        # placement to _due once the warm-up steps are timed, not "the next step" (which made
        # InPCAMonitor measure at every warm-up step).
        self.next_step = trainer.strategy.broadcast(nxt, 0)

    def _charge(self, seconds: float) -> None:
        """Count ``seconds`` of this monitor's work against its budget (and out of step time)."""
        if self._coord is not None:
            self._coord.record(self.name, seconds)

    # -- failure and logging -----------------------------------------------------------------
    def _skip(self, trainer: Trainer, step: int, err: BaseException, what: str) -> None:
        """Count a failed ``what`` (e.g. "measurement") and warn once per kind of failure.

        A numerical failure (NaN, no convergence, out of memory) is named; anything else is
        unexpected and the warning carries the traceback's last frames, for a bug report.
        """
        self.skipped += 1
        if not trainer.is_global_zero:
            return
        where = ""
        if not isinstance(err, NUMERICAL_FAILURES):
            frames = traceback.extract_tb(err.__traceback__)[-3:]
            where = " at " + " <- ".join(
                f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames)
            )
        warn_once(
            f"{self.name}-skip-{type(err).__name__}",
            f"{type(self).__name__}: skipped the {what} at step {step} "
            f"({type(err).__name__}: {err}{where}); training goes on. Further skips of this "
            f"kind are counted in {self.tag_prefix}/skipped.",
            category=RuntimeWarning,
        )

    def _log_guarded(self, trainer: Trainer, step: int, result: Any, seconds: float) -> None:
        """:meth:`_log` on rank 0; a failure there (a figure, a logger) skips, never ends fit."""
        try:
            self._log(trainer, step, result, seconds)
        except Exception as err:
            self._skip(trainer, step, err, "logging")

    def _log_cost(self, trainer: Trainer, step: int, seconds: float) -> None:
        """Log ``seconds`` and the running count of skipped measurements."""
        self._log_scalars(trainer, step, {"seconds": seconds, "skipped": float(self.skipped)})

    def _log_scalars(self, trainer: Trainer, step: int, values: dict[str, float]) -> None:
        metrics = {f"{self.tag_prefix}/{k}": float(v) for k, v in values.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # -- state -------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_measured_step": self.last_measured_step,
            "next_step": self.next_step,
            "num_measurements": self.num_measurements,
            "skipped": self.skipped,
            "last_cost": self.last_cost,
            "coordinator": self._coord.state_dict() if self._coord is not None else None,
            **self._extra_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_measured_step = state_dict.get("last_measured_step")
        self.next_step = state_dict.get("next_step")
        self.num_measurements = int(state_dict.get("num_measurements", 0))
        self.skipped = int(state_dict.get("skipped", 0))
        self.last_cost = state_dict.get("last_cost")
        self._pending_coordinator = state_dict.get("coordinator")
        self._load_extra_state(state_dict)


_drop_unused_batch_hooks(ScheduledMonitor)
_time_step_hooks(ScheduledMonitor)


class LandscapeMonitor(ScheduledMonitor):
    """Base class of the probe-based monitors: holds the probe set, isolates and logs.

    On top of :class:`ScheduledMonitor`: the probe set (the first ``num_probe_batches``
    training batches of each rank, or ``probe_dataloader``'s, saved beside the logs so that a
    resumed run measures on the same samples), the loss, the isolation of every measurement
    (training stays bitwise unchanged) and the a-priori cost from one timed probe gradient.
    Subclasses supply ``_compute`` and ``_log``.

    Args:
        every_n_steps: measure every ``n`` optimizer steps (step 0 included) instead of the budget.
        every_n_epochs: measure at the end of every ``n``-th epoch instead of the budget.
        max_overhead: share of training wall time this monitor may use (budget schedule).
        num_probe_batches: batches per rank in the probe set.
        probe_dataloader: take the probe set from this loader instead of the training loader.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default the module's ``training_step``.
        train_mode: measure in train mode (dropout active, batch statistics) instead of eval.
        clock: seconds counter for the budget (tests inject a fake one).
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        max_overhead: float = 0.02,
        num_probe_batches: int = 4,
        probe_dataloader: Iterable[Any] | None = None,
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
        train_mode: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            max_overhead=max_overhead,
            clock=clock,
        )
        check_positive_int("num_probe_batches", num_probe_batches)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(model, batch); got {loss_fn!r}")
        if not isinstance(train_mode, bool):
            raise ValueError(f"train_mode must be a bool; got {train_mode!r}")
        self.num_probe_batches = num_probe_batches
        self.probe_dataloader = probe_dataloader
        self.loss_fn = loss_fn
        self.train_mode = train_mode
        # Checkpointed state.
        self.probe_dir: str | None = None
        # Per-fit objects, created in on_train_start (ddp_spawn pickles callbacks).
        self._probe: list[Any] | None = None
        self._probe_root: str | None = None  # rank 0's log directory, the same on every rank
        self._batch_seconds: float | None = None  # a timed probe gradient, per batch
        self._product_seconds: float | None = None  # a timed Hessian-vector product, per batch
        self._guess: float | None = None  # the latest a-priori cost

    # -- subclass hooks ----------------------------------------------------------------------
    def _compute(
        self, pl_module: LightningModule, batches: list[Any], loss_fn: Any, reduce_fn: Any
    ) -> Any:
        raise NotImplementedError

    def _log(self, trainer: Trainer, step: int, result: Any, seconds: float) -> None:
        raise NotImplementedError

    def _gradient_equivalents(self) -> float:
        """Cost of one measurement in gradient evaluations over the probe set (a priori)."""
        return 300.0

    @override
    def _cost_guess(self, trainer: Trainer, pl_module: LightningModule) -> float:
        """A priori cost of one measurement: one timed gradient over the probe set, scaled.

        The training step time is a poor proxy (for small models it is mostly framework
        overhead), so the probe gradient itself is timed, without touching ``.grad``.
        """
        batches = len(self._probe or ())
        if self._batch_seconds is None:  # timed once a fit: the guesses differ by their scale
            self._batch_seconds = self._shared_batch_seconds(pl_module, batches)
        # Per batch, so that a reduced form on fewer probe batches is guessed as such.
        self._guess = self._gradient_equivalents() * self._batch_seconds * batches
        return self._guess

    def _shared_batch_seconds(self, pl_module: LightningModule, batches: int) -> float:
        """Seconds of a probe gradient per batch, timed by the first monitor of the trainer
        that asks for batches of these shapes, mode and loss; the others reuse it (each timing
        is a few gradients over the probe set: 0.2-0.6 s on a 4M-parameter model)."""
        first = self._probe[0] if self._probe else None
        leaves = [t for t in tree_leaves(first) if isinstance(t, torch.Tensor)]
        shapes = tuple((tuple(t.shape), str(t.dtype)) for t in leaves)
        loss = "training_step" if self.loss_fn is None else id(self.loss_fn)
        key = f"probe-gradient-seconds/{id(pl_module)}/{self.train_mode}/{loss}/{shapes}"
        shared = self._coord.latest(key) if self._coord is not None else None
        if shared is None:
            shared = self._time_probe_gradient(pl_module) / max(batches, 1)
            if self._coord is not None:
                self._coord.publish(key, -1, shared)
        return float(shared)

    def _fastest(self, pl_module: LightningModule, work: Callable[[], Any], runs: int = 1) -> float:
        """Seconds of ``work`` (synchronised on a GPU): the faster of two runs, as the first
        pays one-off initialisation, unless the first is long enough for that to be a small
        part of it (``runs=2``: always two)."""
        clock, times = self._now, []
        while len(times) < runs or (len(times) < 2 and times[0] < QUIET_SECONDS / 10):
            t0 = clock()
            work()
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            times.append(clock() - t0)
        return min(times)

    def _time_probe_gradient(self, pl_module: LightningModule) -> float:
        loss_fn = self.loss_fn or ctx.training_step_loss(pl_module)
        params = [p for p in pl_module.parameters() if p.requires_grad]

        def gradients() -> None:
            for batch in self._probe or []:
                torch.autograd.grad(loss_fn(pl_module, batch), params, allow_unused=True)

        with ctx.isolated(pl_module, train_mode=self.train_mode):
            return self._fastest(pl_module, gradients)

    def _time_probe_product(
        self, pl_module: LightningModule, hvp: Any = "auto", dtype: Any = None, **_: Any
    ) -> float:
        """Seconds of one Hessian-vector product on the first probe batch (the faster of two
        after the graph is built: the first pays one-off set-up), as the measurement computes
        it: exact double backward, or central differences where that is unavailable (then
        quietly: the measurement gives the notice). 0 (unknown) without a probe set, or if the
        product fails here (the measurement will say why)."""
        if not self._probe:
            return 0.0
        loss_fn = self.loss_fn or ctx.training_step_loss(pl_module)
        try:
            with ctx.isolated(pl_module, train_mode=self.train_mode), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                op = HessianOperator(pl_module, loss_fn, self._probe[:1], hvp=hvp, dtype=dtype)
                v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
                v = v.to(device=op.device, dtype=op.dtype)
                return self._fastest(pl_module, lambda: op.matvec(v), runs=2)
        except Exception:  # a guess: never a reason to stop training
            return 0.0

    @override
    def _step_seconds_guess(self) -> float | None:
        # A training step is at least one batch gradient: the probe gradient over one batch.
        if self._batch_seconds is None or not self._probe:
            return None
        return self._batch_seconds

    # -- Lightning hooks ---------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError(
                f"{type(self).__name__}: loss_fn is required with manual optimisation "
                "(calling training_step would step the optimiser); got loss_fn=None"
            )
        precision = str(getattr(trainer, "precision", ""))
        if precision in ("16-true", "bf16-true", "16", "bf16"):
            raise ValueError(
                f"{type(self).__name__}: half-precision weights (precision={precision!r}) are not "
                "supported; use a mixed precision setting such as 'bf16-mixed'"
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After the strategy's setup, which is where sync_batchnorm=True converts the layers.
        if self.train_mode and any(
            isinstance(m, torch.nn.SyncBatchNorm) for m in pl_module.modules()
        ):
            raise ValueError(
                f"{type(self).__name__}: train_mode=True is not supported with SyncBatchNorm "
                "(its batch statistics would be synchronised across ranks inside every "
                "measurement pass); use train_mode=False (eval mode, the default); got "
                "train_mode=True"
            )
        self._batch_seconds = self._product_seconds = self._guess = None
        if self._off is not None:
            return
        t0 = self._coord.clock() if self._coord is not None else 0.0
        self._probe_root = trainer.strategy.broadcast(_log_dir(trainer), 0)
        self._probe = self._guarded_probe(trainer)
        self._check_defaults(trainer, pl_module)
        if self._coord is not None:  # capturing (or loading) the probe set is overhead too
            self._charge(self._coord.clock() - t0)
        self._check_short_fit(trainer, pl_module)
        super().on_train_start(trainer, pl_module)

    def _check_short_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stay off for this fit if even the smallest end-of-fit measurement (:meth:`_reduced`,
        then :meth:`_smaller`) costs more than the whole fit affords (``_fixed_costs``); only on
        the budget: an explicit schedule is the user's."""
        total = _final_step(trainer)
        if not self.uses_budget or total is None or total <= trainer.global_step:
            return
        assert self._coord is not None
        reduced = self._reduced()
        with contextlib.ExitStack() as stack:
            # The smallest form the end of fit may take: reduced, then smaller still.
            left_out = stack.enter_context(reduced) if reduced is not None else ""
            smaller = self._smaller() if reduced is not None else None
            if smaller is not None:
                left_out += f", on {stack.enter_context(smaller)}"
            cost = self._charged_guess(trainer, pl_module)
        fit = self._fit_seconds(total - trainer.global_step)
        if not trainer.strategy.broadcast(too_costly(cost, fit), 0):
            return
        self._off = "short fit"
        if self._coord.first_notice(f"short:{self.name}"):
            smallest = f", {left_out}," if left_out else ""
            say(
                trainer,
                f"{type(self).__name__}: off for this fit: its smallest measurement{smallest} "
                f"would take about {cost:.0f} s, more than this fit of {total} steps (about "
                f"{fit:.1f} s of training) affords. Fit longer, or give every_n_steps.",
            )

    @override
    def _finish_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super()._finish_fit(trainer, pl_module)
        self._probe = None

    # -- measurement -------------------------------------------------------------------------
    @override
    def _measure(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        clock = self._now
        expected = next((c for c in (self._expected, self.last_cost, self._guess) if c), None)
        announced = trainer.is_global_zero and self._announce(trainer, step, expected)
        t0 = clock()
        result = None
        batches = self._probe if self._probe is not None else self._guarded_probe(trainer)
        batches = batches or []
        loss_fn = self.loss_fn or ctx.training_step_loss(pl_module)
        # Decided before the measurement's collectives: a rank without probe batches would skip
        # them all and leave the others waiting in one.
        empty = ctx.any_rank(trainer, not batches, pl_module.device)
        try:
            if empty:
                raise FloatingPointError(
                    "the probe set is empty on "
                    + ("this rank" if not batches else "another rank")
                    + " (the training loader gave no batch, or taking it failed)"
                )
            with ctx.isolated(pl_module, train_mode=self.train_mode):
                result = self._compute(pl_module, batches, loss_fn, ctx.make_reduce(trainer))
        except Exception as err:  # a monitor never ends fit: numerical or not, skip
            self._skip(trainer, step, err, "measurement")
        # Skip on every rank alike: one rank's failure outside a collective (its own shard's
        # post-processing, say) must not leave the others logging a result it lacks.
        if ctx.any_rank(trainer, result is None, pl_module.device) and result is not None:
            result = None
            self.skipped += 1
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        seconds = clock() - t0
        self.last_measured_step = step
        if result is not None:
            self.num_measurements += 1
        if trainer.is_global_zero:
            if result is not None:
                self._log_guarded(trainer, step, result, seconds)
            self._log_cost(trainer, step, seconds)
            self._announce_done(trainer, step, clock() - t0, announced)
        # Writing figures and histograms is overhead too: the budget is charged with it.
        total = clock() - t0
        self._charge(total)
        self.last_cost = total + self._deferred_cost()
        self._reschedule(trainer, step, self.last_cost)

    # -- probe set ---------------------------------------------------------------------------
    def _smaller(self) -> contextlib.AbstractContextManager[str] | None:
        return self._first_probe_batch()  # None when the probe set is one batch already

    def _first_probe_batch(self) -> contextlib.AbstractContextManager[str] | None:
        """A reduced form for a monitor whose cost grows with the probe set: the measurement on
        its first batch alone (None with one batch or none: nothing to leave out)."""
        probe = self._probe
        if probe is None or len(probe) < 2:
            return None

        @contextlib.contextmanager
        def first() -> Any:
            self._probe = probe[:1]
            try:
                yield f"its first probe batch only (of {len(probe)})"
            finally:
                self._probe = probe

        return first()

    def _guarded_probe(self, trainer: Trainer) -> list[Any] | None:
        """The probe set, or None after a failure to take it (out of memory moving it to the
        device, a loader error), warned on the rank that failed and tried again at the next
        measurement.

        No collective inside: a rank that fails here leaves the others unblocked, and its empty
        probe set makes the measurement a skip on every rank (``_measure`` all-reduces it).
        """
        probe_dir = self.probe_dir
        try:
            self._probe = self._load_or_capture_probe(trainer)
        except Exception as err:
            # Not a resume at the retry: the directory is named again then, not read back.
            self._probe, self.probe_dir = None, probe_dir
            warnings.warn(  # this rank only knows; the default filter shows it once
                f"{type(self).__name__}: could not take the probe set on rank "
                f"{trainer.global_rank} ({type(err).__name__}: {err}); measurements are skipped "
                "until it can be taken (tried again at each).",
                RuntimeWarning,
                stacklevel=2,
            )
        return self._probe

    def _check_defaults(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Switch off, with one warning each, the parts whose defaults cannot apply to this
        module (tried on the probe set at fit start, decided on all ranks alike); raise a
        ``ValueError`` for an argument the user passed that cannot apply. Nothing to check here.
        """

    def _probe_file(self, trainer: Trainer) -> str:
        if self.probe_dir is None:
            # Beside the run's logs, never in the working directory; rank 0's directory on
            # every rank (a logger's version may be resolved on rank 0 only), broadcast at fit
            # start: a retry after a failed capture runs on one rank, so no collective here.
            root = self._probe_root or _log_dir(trainer)
            self.probe_dir = os.path.join(root, "landscape_probes")
        key = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.state_key)[:120]
        return os.path.join(self.probe_dir, f"{key}_rank{trainer.global_rank}.pt")

    def _load_or_capture_probe(self, trainer: Trainer) -> list[Any]:
        resumed = self.probe_dir is not None
        path = self._probe_file(trainer)
        if resumed and os.path.exists(path):
            batches = torch.load(
                path, map_location=trainer.strategy.root_device, weights_only=False
            )
            if len(batches) == self.num_probe_batches:
                return batches
        if resumed and trainer.is_global_zero:
            warnings.warn(
                f"{type(self).__name__}: the saved probe set ({path}) was not found; took a new "
                "one, so measurements after the resume use other samples than before.",
                RuntimeWarning,
                stacklevel=2,
            )
        loader = self.probe_dataloader
        if loader is None:
            loader = trainer.train_dataloader
        batches = ctx.capture_probe_batches(trainer, loader, self.num_probe_batches)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save([ctx.clone_batch(_cpu(b)) for b in batches], path)
        except OSError as err:  # a read-only log directory must not stop training
            warn_once(f"{self.name}-probe-save", f"could not save the probe set to {path}: {err}")
        return batches

    # -- state -------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "probe_dir": self.probe_dir}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe_dir = state_dict.get("probe_dir")
        super().load_state_dict(state_dict)


def _cpu(batch: Any) -> Any:
    from lightning.pytorch.utilities import move_data_to_device

    return move_data_to_device(batch, torch.device("cpu"))


def _final_step(trainer: Trainer) -> int | None:
    """The step of the end-of-fit measurement if the trainer knows it (``max_steps``, or
    ``max_epochs`` × batches); None for an open-ended fit."""
    try:
        total = float(trainer.estimated_stepping_batches)
    except Exception:  # no loader length, a mock trainer: the schedule works without it
        return None
    if not np.isfinite(total) or total <= 0:
        return None
    return int(total)


def _log_dir(trainer: Trainer) -> str:
    """The first logger's directory, else ``default_root_dir``.

    Not ``trainer.log_dir``: it broadcasts, and monitors call this on rank 0 only.
    """
    for logger in trainer.loggers:
        directory = getattr(logger, "log_dir", None)
        if directory:
            return str(directory)
    return str(trainer.default_root_dir)
