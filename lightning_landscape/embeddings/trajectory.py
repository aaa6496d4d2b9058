r"""Diffusion maps of a growing trajectory: which samples, fitted how, aligned to the last map.

A trajectory recorded along training (parameter vectors, Fjellström & Nyström 2022) is embedded
again and again as it grows. :class:`TrajectoryEmbedder` does one such embedding at a time:

1. **Selection.** Samples taken before ``burn_in_steps`` are left out (the early transient makes
   any trajectory look one-dimensional); with ``window_steps`` only the latest count.
2. **Landmarks.** Above ``max_points`` samples the map
   (:func:`~lightning_landscape.embeddings.diffusion.diffusion_map`) is fitted on evenly spaced
   ones (:func:`~lightning_landscape.embeddings.diffusion.select_landmarks`) and the others are
   placed by Nyström extension
   (:func:`~lightning_landscape.embeddings.diffusion.landmark_coordinates`), which is accurate
   inside the sampled support that evenly spaced landmarks cover. One call may use fewer
   landmarks (``fit(X, max_points=m)``); fitting on :meth:`TrajectoryEmbedder.landmarks` alone
   is the landmarks-only embedding, which leaves the Nyström placement out.
3. **Alignment.** The new coordinates are rotated onto the previous embedding on their common
   steps (:func:`~lightning_landscape.embeddings.diffusion.align_to_previous`: Procrustes
   within groups of near-equal eigenvalues), so the axes do not jump between two embeddings.
   The previous embedding can be saved and reloaded, so this holds across a resume too.

Costs, for n selected samples of d numbers and m = min(n, ``max_points``): O(m² d) for the
exact neighbours of the landmarks (pynndescent above ``exact_max_n`` points), O((n − m) m d) for
the Nyström placement, O(n d) for checking and copying the samples
(:meth:`TrajectoryEmbedder.cost` is this model, for budgets, with or without the placement),
O(n k²) for the alignment; memory O(n d) for the samples.

numpy/scipy only: no Lightning, no TensorBoard.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from typing_extensions import Unpack

from .._checks import forward_options
from .diffusion import (
    DiffusionMap,
    DiffusionOptions,
    align_to_previous,
    diffusion_map,
    landmark_coordinates,
    select_landmarks,
)

__all__ = ["TrajectoryEmbedder"]

#: Options of ``diffusion_map`` that :class:`TrajectoryEmbedder` sets itself; the rest of its
#: keyword options are passed on (read from its signature).
_SET_HERE = ("n_components", "n_neighbors", "alpha", "epsilon", "t", "seed")

#: The work an embedding does per sample whatever its landmarks (checking and copying it, and
#: for a placed one its neighbour search and weights), in units of :meth:`TrajectoryEmbedder.cost`
#: (one landmark distance); measured in docs/benchmarks.md ("Bounded end-of-fit embedding").
SAMPLE_UNITS = 200


class TrajectoryEmbedder:
    """Embeds the samples of a trajectory by a diffusion map, aligned to the previous embedding.

    Args:
        n_components: diffusion coordinates / eigenvalues to compute.
        n_neighbors: neighbours per sample in the kNN graph (at most the number of samples).
        alpha: density normalisation of the diffusion map (1: Laplace–Beltrami).
        epsilon: kernel bandwidth: ``"auto"``, ``"variable"``, ``"local"``, ``"median"`` or a
            positive number (see ``diffusion_map``).
        t: diffusion time of the coordinates.
        burn_in_steps: leave out the samples taken before this step.
        window_steps: only embed the samples of the last ``window_steps`` steps.
        max_points: fit the map on at most this many samples (O(max_points² · d) time).
        seed: seeds the eigensolver.
        **diffusion_kwargs: further options of ``diffusion_map`` (``neighbors``,
            ``exact_max_n``, ``disconnected``, ``tol``).

    Attributes:
        previous: ``(steps, coordinates)`` of the latest aligned embedding, or None.

    Raises:
        ValueError: On an option out of range (the message names it and the value).
    """

    def __init__(
        self,
        *,
        n_components: int = 6,
        n_neighbors: int = 16,
        alpha: float = 1.0,
        epsilon: float | str = "auto",
        t: float = 1.0,
        burn_in_steps: int = 0,
        window_steps: int | None = None,
        max_points: int = 1000,
        seed: int = 0,
        **diffusion_kwargs: Unpack[DiffusionOptions],
    ) -> None:
        _check_map(n_components, n_neighbors, alpha, epsilon, t, diffusion_kwargs)
        _check_int("burn_in_steps", burn_in_steps, 0)
        _check_positive("window_steps", window_steps, allow_none=True)
        _check_int("max_points", max_points, 8)
        _check_int("seed", seed, 0)
        self.n_components = n_components
        self.n_neighbors = n_neighbors
        self.alpha = float(alpha)
        self.epsilon = epsilon
        self.t = float(t)
        self.burn_in_steps = burn_in_steps
        self.window_steps = window_steps
        self.max_points = max_points
        self.seed = seed
        self.diffusion_kwargs = diffusion_kwargs
        self.previous: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def min_samples(self) -> int:
        """Fewest samples an embedding needs: ``n_components + 2`` (the trivial eigenvector
        and one point more than coordinates)."""
        return self.n_components + 2

    def select(self, steps: Any, step: int) -> np.ndarray:
        """Indices of the samples to embed at ``step``: taken at ``burn_in_steps`` or later, at
        ``step`` or earlier, and within the last ``window_steps`` steps."""
        s = np.asarray(steps)
        keep = (s >= self.burn_in_steps) & (s <= step)
        if self.window_steps is not None:
            keep &= s > step - self.window_steps
        return np.flatnonzero(keep)

    def window_start(self, total: int) -> int:
        """First step of the window an embedding at step ``total`` takes its samples from."""
        start = self.burn_in_steps
        if self.window_steps is not None:
            start = max(start, total - self.window_steps + 1)
        return start

    def samples_in_window(self, total: int, every: int) -> int:
        """Samples a recording every ``every`` steps (and at step ``total``, the end of fit)
        leaves in the window of an embedding at step ``total``."""
        start = self.window_start(total)
        ends = total % every != 0 and total >= start
        return max(total // every - -(-max(start, 0) // every) + 1, 0) + ends

    def recording_interval(
        self, total: int, *, longest: int, per_minimum: int, divides: int | None = None
    ) -> int:
        """The longest recording interval, at most ``longest``, that leaves ``per_minimum``
        times :attr:`min_samples` samples in the window of a ``total``-step fit (a divisor of
        ``divides`` when given, so that embeddings fall on recorded steps)."""
        span = max(total - self.window_start(total) + 1, 1)
        every = min(longest, max(1, span // (per_minimum * self.min_samples)))
        if divides is not None:
            every = max(d for d in range(1, every + 1) if divides % d == 0)
        return every

    def cost(self, n: int, *, max_points: int | None = None, nystrom: bool = True) -> float:
        """Relative cost of embedding ``n`` samples on m = min(n, ``max_points``) landmarks
        (default: :attr:`max_points`): m² for the landmarks' map, (n − m)·m for the Nyström
        placement of the others, and :data:`SAMPLE_UNITS` per sample; landmarks only
        (``nystrom=False``): m² + ``SAMPLE_UNITS``·m. Increasing in ``n`` and ``max_points``
        (up to ``n``), and never less with ``nystrom``."""
        _check_int("n", n, 0)
        if max_points is not None:
            _check_int("max_points", max_points, 1)
        m = min(n, self.max_points if max_points is None else max_points)
        rows = n if nystrom else m
        return float(m * m + (rows - m) * m + SAMPLE_UNITS * rows)

    def landmarks(self, n: int, *, max_points: int | None = None) -> np.ndarray:
        """Indices of the rows of an ``n``-row :meth:`fit` (same ``max_points``) that its map
        is fitted on; fitting on these rows alone is the landmarks-only embedding."""
        return select_landmarks(n, self.max_points if max_points is None else max_points)

    def fit(self, X: Any, *, max_points: int | None = None) -> tuple[np.ndarray, DiffusionMap]:
        """The map of at most ``max_points`` (default :attr:`max_points`, for this call only)
        evenly spaced rows of ``X`` (:meth:`landmarks`), the other rows placed by Nyström
        extension: ``(coordinates of every row, the map of the landmarks)``.

        Raises:
            ValueError: If ``max_points`` is not an integer >= 1.
            FloatingPointError: If an eigenvalue is not finite.
            DisconnectedGraphError: With ``disconnected="raise"`` on a disconnected graph.
        """
        X = np.asarray(X)
        n = X.shape[0]
        landmarks = self.landmarks(n, max_points=max_points)
        result = diffusion_map(
            X[landmarks],
            n_components=self.n_components,
            n_neighbors=min(self.n_neighbors, n),
            alpha=self.alpha,
            epsilon=self.epsilon,
            t=self.t,
            seed=self.seed,
            **self.diffusion_kwargs,
        )
        if not np.all(np.isfinite(result.eigenvalues)):
            raise FloatingPointError("non-finite diffusion eigenvalue")
        return landmark_coordinates(result, X, landmarks), result

    def align(self, coordinates: np.ndarray, steps: Any, eigenvalues: Any) -> np.ndarray:
        """Rotate ``coordinates`` onto :attr:`previous` on their common steps (unchanged when
        fewer than ``n_components + 1`` are common), and keep the result as :attr:`previous`."""
        steps = np.asarray(steps)
        if self.previous is not None:
            aligned = align_to_previous(
                coordinates,
                steps,
                self.previous[1],
                self.previous[0],
                eigenvalues=eigenvalues,
                min_common=self.n_components + 1,
            )
            if aligned is not None:
                coordinates = aligned.coordinates
        self.previous = (steps, coordinates)
        return coordinates

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :attr:`previous` to ``path`` (``.npz``; nothing when there is none).

        Raises:
            OSError: If the file cannot be written.
        """
        if self.previous is not None:
            np.savez(path, steps=self.previous[0], coords=self.previous[1])

    def load(self, path: str | os.PathLike[str], *, until_step: int) -> None:
        """Set :attr:`previous` from ``path`` (None if it does not exist), keeping the samples
        taken at ``until_step`` or earlier (those that survive a resume from there)."""
        self.previous = None
        if not os.path.exists(path):
            return
        with np.load(path) as f:
            steps, coords = f["steps"], f["coords"]
        keep = steps <= until_step
        if keep.any():
            self.previous = (steps[keep], coords[keep])


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _check_positive(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"{name} must be a positive integer{' or None' if allow_none else ''}; got {value!r}"
        )


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _check_map(
    n_components: Any, n_neighbors: Any, alpha: Any, epsilon: Any, t: Any, options: dict[str, Any]
) -> None:
    _check_positive("n_components", n_components)
    _check_int("n_neighbors", n_neighbors, 2)
    if not (_is_number(alpha) and 0 <= alpha <= 1):
        raise ValueError(f"alpha must be a number in [0, 1]; got {alpha!r}")
    if epsilon not in ("auto", "variable", "median", "local") and not (
        _is_number(epsilon) and epsilon > 0
    ):
        raise ValueError(
            "epsilon must be 'auto', 'median', 'local' or a positive number, or 'variable'; "
            f"got {epsilon!r}"
        )
    if not (_is_number(t) and t >= 0):
        raise ValueError(f"t must be a number >= 0; got {t!r}")
    forward_options(diffusion_map, options, owner="the diffusion map", exclude=_SET_HERE)
