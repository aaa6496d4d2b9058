"""When and on what :class:`~.diffusion.DiffusionMapMonitor` embeds: the schedule's and the
sample count's checks, what an embedding costs, and the end-of-fit plan.

An embedding has two parts: loading and fitting the samples, which scales as
:meth:`~lightning_landscape.embeddings.trajectory.TrajectoryEmbedder.cost` (m landmarks:
m² + (n − m)·m + 200·n, or m² + 200·m landmarks only), and aligning, saving and writing the
coordinates, which costs as much as :data:`WRITE_FIXED_ROWS` rows plus the rows written.
:class:`EmbedCost` keeps both as last measured and predicts another embedding from them;
before any was measured, from :data:`SECONDS_PER_UNIT_DIM` and :data:`SECONDS_PER_ROW`.

The end-of-fit embedding always runs, but on the budget it is bounded (:func:`end_plan`): when
its predicted cost exceeds what the budget still affords (and :data:`FLOOR_SECONDS`), it embeds
the most landmarks that fit, at least :data:`FLOOR_LANDMARKS`, alone: the other samples are not
placed (docs/design.md, "Fixed costs and short fits").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from .._checks import check_positive_int
from ..dashboard import warn_once
from ..embeddings.trajectory import TrajectoryEmbedder

__all__: list[str] = []

#: A-priori seconds of loading and fitting per unit of ``TrajectoryEmbedder.cost`` per number
#: in a sample: numpy on one busy CPU core, rounded up (docs/benchmarks.md, "Bounded end-of-fit
#: embedding").
SECONDS_PER_UNIT_DIM = 1e-10

#: Writing an embedding (figure and histogram whatever its size, projector per row) costs as
#: much as this many rows more than it writes.
WRITE_FIXED_ROWS = 10_000

#: A-priori seconds of aligning, saving and writing per row (and per fixed row).
SECONDS_PER_ROW = 3e-5

#: An end-of-fit embedding predicted under this many seconds is never reduced: a tiny model's
#: picture stays whole (and quiet) whatever its fit's length.
FLOOR_SECONDS = 0.5

#: A reduced end-of-fit embedding keeps at least this many landmarks (or every sample, if fewer).
FLOOR_LANDMARKS = 100


@dataclass
class EmbedCost:
    """The last embedding's measured seconds: ``fit`` for ``units`` of the embedder's cost,
    ``write`` for ``rows`` rows written."""

    fit: float
    units: float
    write: float
    rows: int

    def predict(self, units: float, rows: int) -> float:
        """Seconds of an embedding of ``units`` of the cost model that writes ``rows`` rows."""
        write = self.write * (rows + WRITE_FIXED_ROWS) / (self.rows + WRITE_FIXED_ROWS)
        return self.fit * units / max(self.units, 1.0) + write

    def state(self) -> tuple[float, float, float, int]:
        return (self.fit, self.units, self.write, self.rows)

    @classmethod
    def from_state(cls, state: Any, embedder: TrajectoryEmbedder) -> EmbedCost | None:
        """From :meth:`state`, or from ``(seconds, samples)`` of a checkpoint before the split."""
        if state is None:
            return None
        if len(state) == 2:
            return cls(float(state[0]), embedder.cost(int(state[1])), 0.0, int(state[1]))
        return cls(float(state[0]), float(state[1]), float(state[2]), int(state[3]))

    @classmethod
    def guess(cls, sketch: Any) -> EmbedCost:
        """The a-priori cost for samples of ``sketch.output_dim`` numbers (one unit, no row)."""
        dim = sketch.output_dim if sketch is not None else 1
        return cls(SECONDS_PER_UNIT_DIM * dim, 1.0, SECONDS_PER_ROW * WRITE_FIXED_ROWS, 0)


class Plan(NamedTuple):
    """An embedding: fitted on ``landmarks``, the other samples placed by Nyström or not
    (``nystrom``), predicted to take ``seconds`` where the full one takes ``full``."""

    landmarks: int
    nystrom: bool
    seconds: float
    full: float
    reduced: bool

    def notice(self, name: str, n: int, allowed: float | None) -> str:
        """The one line that says what a reduced end-of-fit embedding of ``n`` samples (always
        on landmarks alone, :func:`end_plan`) leaves out and why (``allowed``: the seconds the
        budget still affords)."""
        return (
            f"{name}: the end-of-fit embedding of {n} samples (about {self.full:.1f} s) would "
            f"take more than the budget still affords ({max(allowed or 0.0, 0.0):.1f} s); "
            f"embedding it on {self.landmarks} landmarks, without placing the others "
            f"(about {self.seconds:.1f} s)."
        )


def end_plan(embedder: TrajectoryEmbedder, n: int, cost: EmbedCost, allowed: float | None) -> Plan:
    """How to embed ``n`` samples at the end of fit within ``allowed`` seconds (None: no bound):
    the full embedding if it fits (or takes under :data:`FLOOR_SECONDS`), else the most
    landmarks (at least :data:`FLOOR_LANDMARKS`) that fit, embedded alone; else the floor's
    landmarks alone. Landmarks alone rather than fewer landmarks with the others placed by
    Nyström: the placement costs about as much per sample as the map per landmark
    (``benchmarks/diffusion_end.py``: 601 landmarks and 6,400 placed took 1.3 s where the
    full map took 1.4 s), and a map of landmarks alone is exact on its rows."""

    def seconds(m: int, nystrom: bool) -> float:
        rows = n if nystrom else min(n, m)
        return cost.predict(embedder.cost(n, max_points=m, nystrom=nystrom), rows)

    def plan(m: int, nystrom: bool) -> Plan:
        return Plan(m, nystrom, seconds(m, nystrom), whole, (m, nystrom) != (top, True))

    top = min(n, embedder.max_points)  # a fit on ``top`` landmarks is the full one
    whole = seconds(top, True)
    target = max(whole if allowed is None else allowed, FLOOR_SECONDS)
    low = min(top, max(embedder.min_samples, FLOOR_LANDMARKS))
    if whole <= target or (low == top and n == top):  # fits, or nothing to leave out
        return plan(top, True)
    m = _largest(low, top, lambda k: seconds(k, False) <= target)
    return plan(low if m is None else m, False)


def _largest(low: int, high: int, fits: Callable[[int], bool]) -> int | None:
    """The largest k in [low, high] with ``fits(k)`` for a ``fits`` true up to some k, else None."""
    if not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def check_schedule(every_n_steps: int | None, n_epochs: Any, n_steps: int | None) -> None:
    """The embedding schedule: ``embed_every_n_epochs`` and ``embed_every_n_steps``."""
    check_positive_int("embed_every_n_epochs", n_epochs, allow_none=True, also=("auto",))
    check_positive_int("embed_every_n_steps", n_steps, allow_none=True)
    if n_steps is not None and every_n_steps is not None and n_steps % every_n_steps:
        raise ValueError(
            f"embed_every_n_steps must be a multiple of every_n_steps ({every_n_steps}); "
            f"got {n_steps}"
        )


def check_sample_count(embedder: TrajectoryEmbedder, total: int, every: int | None) -> None:
    """Warn when a fit of ``total`` steps recording every ``every`` will leave too few samples
    in the window for its end-of-fit embedding (the same warning as :func:`few_samples`)."""
    assert every is not None
    count = embedder.samples_in_window(total, every)
    if count < embedder.min_samples:
        what = f"this fit of {total} steps will record {count} samples (every {every} steps)"
        few_samples(embedder, f"{what} in the embedded window", "no embedding")


def few_samples(embedder: TrajectoryEmbedder, what: str, consequence: str) -> None:
    """Warn once that ``what`` holds fewer samples than an embedding needs: ``consequence``."""
    warn_once(
        "diffusion-few-samples",
        f"DiffusionMapMonitor: {what}, fewer than n_components + 2 = "
        f"{embedder.min_samples}: {consequence} (record more often with every_n_steps, "
        "or lower burn_in_steps).",
    )
