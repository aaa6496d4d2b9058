r"""Geometry of a training trajectory in parameter space, and loss barriers on linear paths.

For parameter vectors :math:`w_0, w_1, \dots` recorded along training (Fort & Jastrzebski 2019,
"Large scale structure of neural network loss landscapes"; Yang et al. 2021, "Taxonomizing
local versus global structure in neural network loss landscapes"):

- the distance from initialisation :math:`\|w_i - w_0\|` and the distance travelled
  :math:`\sum_{j \le i} \|w_j - w_{j-1}\|` (their ratio tells a straight run from a wandering
  one);
- the cosine between successive updates :math:`u_i = w_i - w_{i-1}`: near 1 the optimiser keeps
  its direction, near 0 or below it turns or oscillates;
- the loss on the linear path :math:`\gamma(t) = (1 - t) w_a + t w_b` between two checkpoints
  and its barrier :math:`\max_t L(\gamma(t)) - ((1 - t) L(w_a) + t L(w_b))`, the height above
  the chord (0 for a convex loss; see
  :func:`~lightning_landscape.embeddings.inpca.mode_connectivity` for the signed variant).

numpy and torch only: no Lightning. The loss is a callable of the parameter vector, so the
caller decides how a vector becomes a model (and restores the weights afterwards).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

__all__ = [
    "LinearPath",
    "TrajectoryGeometry",
    "linear_path",
    "loss_barrier",
    "trajectory_geometry",
    "update_cosine",
]


@dataclass(frozen=True, eq=False)
class TrajectoryGeometry:
    """Result of :func:`trajectory_geometry`, one entry per point of the trajectory.

    Attributes:
        distance_from_init: (n,) :math:`\\|w_i - w_0\\|`.
        distance_travelled: (n,) path length :math:`\\sum_{j \\le i} \\|w_j - w_{j-1}\\|`.
        cosine_successive_updates: (n,) cosine between the update into point i and the latest
            non-zero update before it; NaN where either is missing or zero (always at i < 2).
    """

    distance_from_init: np.ndarray
    distance_travelled: np.ndarray
    cosine_successive_updates: np.ndarray


@dataclass(frozen=True, eq=False)
class LinearPath:
    """Result of :func:`linear_path`.

    Attributes:
        ts: (m,) interpolation parameters, 0 to 1.
        losses: (m,) :math:`L((1 - t) w_a + t w_b)` at each ``ts``.
        barrier: :func:`loss_barrier` of the losses.
    """

    ts: np.ndarray
    losses: np.ndarray
    barrier: float


def trajectory_geometry(points: Any) -> TrajectoryGeometry:
    """Distances and update cosines along a trajectory of parameter vectors.

    Cost O(n D) for n points of D numbers, in float64.

    Args:
        points: (n, D) parameter vectors in training order (numpy array or tensor), n >= 1.

    Raises:
        ValueError: If ``points`` is not a non-empty finite 2-D array.
    """
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().numpy()
    W = np.asarray(points, dtype=np.float64)
    if W.ndim != 2 or W.shape[0] == 0:
        raise ValueError(f"points must be a non-empty (n, D) array; got shape {W.shape}")
    if not np.all(np.isfinite(W)):
        raise ValueError(f"points must be finite; got {int((~np.isfinite(W)).sum())} NaN/inf")
    steps = np.diff(W, axis=0)
    lengths = np.linalg.norm(steps, axis=1)
    cosines = np.full(W.shape[0], np.nan)
    previous = None
    for i, update in enumerate(steps, 1):
        if previous is not None:
            c = update_cosine(update, previous)
            cosines[i] = np.nan if c is None else c
        if lengths[i - 1] > 0:
            previous = update
    return TrajectoryGeometry(
        distance_from_init=np.linalg.norm(W - W[0], axis=1),
        distance_travelled=np.concatenate([[0.0], np.cumsum(lengths)]),
        cosine_successive_updates=cosines,
    )


def update_cosine(update: Any, previous: Any) -> float | None:
    """Cosine between two updates (flat vectors, both numpy or both tensors); None if either
    is zero. Cost O(D)."""
    if isinstance(update, torch.Tensor):
        prev = previous.to(update)
        denom = float(torch.linalg.vector_norm(update) * torch.linalg.vector_norm(prev))
        return float(update @ prev) / denom if denom > 0 else None
    u, p = np.asarray(update, dtype=np.float64), np.asarray(previous, dtype=np.float64)
    denom = float(np.linalg.norm(u) * np.linalg.norm(p))
    return float(u @ p) / denom if denom > 0 else None


def loss_barrier(losses: Sequence[float] | ArrayLike, ts: Sequence[float] | ArrayLike) -> float:
    """Height of the loss above the chord on a linear path: :math:`\\max_t L(\\gamma(t)) -
    ((1 - t) L(\\gamma(0)) + t L(\\gamma(1)))` over the grid ``ts`` (>= 0; 0 when the path
    never rises above the chord, e.g. for a convex loss).

    Args:
        losses: path losses, one per entry of ``ts``.
        ts: interpolation parameters, increasing from 0 to 1, at least 3.

    Raises:
        ValueError: If the grid is malformed or the losses do not match it.
        FloatingPointError: If a loss is not finite.
    """
    t = np.asarray(ts, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    if t.ndim != 1 or t.size < 3 or t[0] != 0.0 or t[-1] != 1.0 or np.any(np.diff(t) <= 0):
        raise ValueError(f"ts must increase from 0 to 1 with at least 3 points; got {t.tolist()}")
    if loss.shape != t.shape:
        raise ValueError(f"losses must have one value per t ({t.size}); got shape {loss.shape}")
    if not np.all(np.isfinite(loss)):
        raise FloatingPointError(f"non-finite loss on the linear path: {loss.tolist()}")
    chord = (1 - t) * loss[0] + t * loss[-1]
    return float(np.max(loss - chord))


def linear_path(
    loss_at: Callable[[Any], float],
    start: Any,
    end: Any,
    *,
    num_points: int = 5,
) -> LinearPath:
    """Losses on the linear path from ``start`` to ``end`` and its :func:`loss_barrier`.

    Cost: ``num_points`` calls of ``loss_at`` (endpoints included), each on a new D-vector.

    Args:
        loss_at: the loss at a parameter vector (of the type of ``start``).
        start: (D,) parameter vector :math:`w_a` (numpy array or tensor).
        end: (D,) parameter vector :math:`w_b`, same type and shape.
        num_points: grid points, endpoints included, >= 3.

    Raises:
        ValueError: If ``num_points`` is not an integer >= 3 or the shapes differ.
        FloatingPointError: If a loss is not finite.
    """
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 3:
        raise ValueError(f"num_points must be an integer >= 3; got {num_points!r}")
    if tuple(start.shape) != tuple(end.shape):
        raise ValueError(
            f"start and end must have the same shape; got {tuple(start.shape)} and "
            f"{tuple(end.shape)}"
        )
    ts = np.linspace(0.0, 1.0, num_points)
    losses = np.asarray([float(loss_at((1 - t) * start + t * end)) for t in ts])
    return LinearPath(ts=ts, losses=losses, barrier=loss_barrier(losses, ts))
