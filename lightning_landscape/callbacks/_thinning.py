"""Per-step work thinned to a share of the step time.

Two monitors do a little work at many steps, outside any scheduled measurement: the gradient
monitor reads the norm of every training gradient (one fused reduction over all gradients, as
much memory traffic as the optimiser's own update), and the diffusion monitor records a
parameter sample every few steps. On fast steps (a small model, a millisecond a step) that work
is a few percent of the fit by itself. :class:`Thinning` times it and widens its interval, in
whole multiples, until its measured cost is at most ``share`` of the step time; on slow steps
(a big model) it keeps the requested interval.

The interval is revised after ``revise_every`` timed runs, or sooner once the runs so far have
cost more than ``revise_every`` runs may and at least :data:`EARLY_REVISION_SECONDS` (expensive
work, such as sketching a 4M-parameter model's weights, thins after a few samples instead of a
hundred), and only ever widened: a
short fit of cheap work (the tests' few steps) keeps its requested interval, so its results are
exactly those of every step, and a revision never shifts the steps already kept (a multiple of
the old interval divides the step grid the same way).
"""

from __future__ import annotations

import math
from typing import Any

from ._base import _final_step

__all__: list[str] = []

#: The gradient monitor's per-step norm reading stays under this share of the step time.
TRACKING_SHARE = 0.0025

#: The diffusion monitor's sample recording stays under this share of the step time.
RECORDING_SHARE = 0.005

#: With ``every_n_steps=None`` the diffusion monitor records often enough (a short fit more
#: often) that the embedded window holds this many times the ``n_components + 2`` samples an
#: embedding needs; widening keeps it.
SAMPLES_PER_MINIMUM = 2

#: Runs timed before the first revision (and between revisions).
REVISE_EVERY = 100

#: A revision before ``REVISE_EVERY`` runs (work found expensive early) needs at least this many
#: seconds spent: a few reads of a tiny model's gradients, whose cost relative to its
#: millisecond steps a loaded machine can inflate, never thin a short fit; a 4M-parameter
#: sketch (tens of milliseconds a sample) still thins after a few samples.
EARLY_REVISION_SECONDS = 0.05


class Thinning:
    """Which steps run a per-step task: every ``every``-th, widened as its timing requires.

    Args:
        share: the task's target share of the step time.
        every: the requested interval (steps).
        revise_every: runs timed between revisions (default :data:`REVISE_EVERY`).
    """

    def __init__(self, share: float, every: int = 1, revise_every: int | None = None) -> None:
        self.share = share
        self.every = every
        self.revise_every = REVISE_EVERY if revise_every is None else revise_every
        self._seconds = 0.0
        self._runs = 0

    def due(self, step: int) -> bool:
        """Whether ``step`` runs the task."""
        return step % self.every == 0

    def ran(self, seconds: float, step_seconds: float | None, *, limit: int | None = None) -> bool:
        """Count one run of ``seconds``; after ``revise_every`` runs (or once the runs have cost
        more than ``revise_every`` runs' share), widen the interval to the smallest multiple
        whose cost per step is at most ``share`` of ``step_seconds`` (never beyond ``limit``).
        Returns whether the interval changed."""
        self._seconds += seconds
        self._runs += 1
        if not step_seconds or step_seconds <= 0:
            return False
        allowed = self.share * step_seconds * self.every  # a run's share
        early = self._seconds > max(self.revise_every * allowed, EARLY_REVISION_SECONDS)
        if self._runs < self.revise_every and not early:
            return False
        per_run = self._seconds / self._runs
        self._seconds, self._runs = 0.0, 0
        factor = math.ceil(per_run / allowed)
        wider = self.every * max(factor, 1)
        if limit is not None:
            wider = min(wider, max(limit - limit % self.every, self.every))
        if wider <= self.every:
            return False
        self.every = wider
        return True


def norm_reading() -> Thinning:
    """The gradient monitor's reading of the training gradients' norms, every step to start."""
    return Thinning(TRACKING_SHARE)


def recording_interval(monitor: Any, trainer: Any, seconds: float) -> int:
    """The diffusion monitor's recording interval after a sample that took ``seconds``: its
    default interval (``every_n_steps=None``) widened by ``monitor.recording`` (a
    :class:`Thinning`) while the fit's window still gets :data:`SAMPLES_PER_MINIMUM` times the
    samples an embedding needs;
    an interval the user chose, or one that must divide ``embed_every_n_steps``, is kept."""
    every = monitor.every_n_steps
    total = _final_step(trainer)
    fixed = monitor.requested_every_n_steps is not None or monitor.embed_every_n_steps is not None
    if fixed or monitor._coord is None or total is None:
        return every
    thinning = monitor.recording
    thinning.every = every
    # The longest interval that still leaves the window its samples: the short-fit rule's own.
    limit = monitor.embedder.recording_interval(
        total, longest=total + 1, per_minimum=SAMPLES_PER_MINIMUM
    )
    thinning.ran(seconds, monitor._coord.step_seconds, limit=limit)
    return thinning.every
