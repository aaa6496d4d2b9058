"""Fixed costs: what a monitor does when a fit is too short for its measurements, and what it says.

A measurement is a fixed cost: the budget (``_schedule``) spreads the scheduled ones over a
long fit, but the start-of-fit and end-of-fit ones are paid whatever the fit's length. The
rules (docs/design.md, "Fixed costs and short fits"):

- Under ``fast_dev_run`` a monitor measures nothing and writes nothing, like Lightning's loggers
  and checkpoints; sanity checking never measures (the monitors have no validation hooks).
- A budget-scheduled monitor stays off for a fit when even its reduced measurement is predicted
  to cost more than :data:`FIXED_COST_SHARE` of the whole fit's predicted training time (and more
  than :data:`QUIET_SECONDS`). An explicit ``every_n_*`` schedule is the user's and runs.
- The end-of-fit measurement runs in its reduced form when its predicted cost exceeds
  :data:`FIXED_COST_SHARE` of the training time so far (and :data:`QUIET_SECONDS`), or, for a
  budget-scheduled monitor, what its budget still affords (and :data:`REDUCE_FLOOR_SECONDS`):
  a fit whose budget never afforded a measurement would otherwise pay a whole one at its end.
- A measurement predicted or found to take :data:`QUIET_SECONDS` or more is announced with one
  line before and one after, on rank 0; shorter ones are silent.

Each notice is one line on rank 0 (the progress bar's ``print`` while its bar is live, else
``rank_zero_info``), never a warning.
"""

from __future__ import annotations

from typing import Any

__all__: list[str] = []

#: Fixed costs under this many seconds are paid silently: never reduced, never a reason to stay
#: off, never announced (the tiny models of tests and examples stay quiet).
QUIET_SECONDS = 5.0

#: A start- or end-of-fit measurement may take this share of the fit's training time; beyond it
#: the end-of-fit measurement is reduced, and a budget monitor whose reduced measurement exceeds
#: it for the whole fit stays off.
FIXED_COST_SHARE = 0.5


#: An end-of-fit measurement predicted under this many seconds is never reduced for the
#: budget's sake (the tiny models of tests and examples keep their whole picture).
REDUCE_FLOOR_SECONDS = 0.5


def over_room(cost: float | None, room: float | None) -> bool:
    """Whether an end-of-fit cost of ``cost`` seconds exceeds the ``room`` the budget still
    affords (and :data:`REDUCE_FLOOR_SECONDS`); unknown either way (None): it does not."""
    if cost is None or room is None:
        return False
    return cost >= REDUCE_FLOOR_SECONDS and cost > room


def too_costly(cost: float | None, fit_seconds: float | None) -> bool:
    """Whether a fixed cost of ``cost`` seconds is more than the fit of ``fit_seconds`` affords:
    above :data:`QUIET_SECONDS` and above :data:`FIXED_COST_SHARE` of the fit. Unknown either
    way (None): affordable, the measurement runs as it always did."""
    if cost is None or fit_seconds is None:
        return False
    return cost >= QUIET_SECONDS and cost > FIXED_COST_SHARE * fit_seconds


def say(trainer: Any, message: str) -> None:
    """Print one line on rank 0 without breaking a live progress bar."""
    if not trainer.is_global_zero:
        return
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.utilities import rank_zero_info

    bar = getattr(trainer, "progress_bar_callback", None)
    live = bar is not None and getattr(bar, "is_enabled", False)
    if isinstance(bar, TQDMProgressBar):
        # Its print drops the line when no bar is live (before or after the training loop).
        tqdm = getattr(bar, "_train_progress_bar", None)
        live = live and tqdm is not None and not tqdm.disable
    if live:
        bar.print(message)
    else:
        rank_zero_info(message)
