r"""Trajectory geometry of the parameter vector: how far and how straight training goes, and
whether the linear path between two checkpoints crosses a barrier.

Fort & Jastrzebski, "Large scale structure of neural network loss landscapes", NeurIPS 2019
(distance from initialisation, cosine between successive updates); Yang, Hodgkinson, Theisen,
Zou, Gonzalez, Ramchandran, Mahoney, "Taxonomizing local versus global structure in neural
network loss landscapes", NeurIPS 2021 (mode connectivity on the linear path
:math:`\gamma(t) = (1-t) w_1 + t w_2`).

"The parameter vector" is the trainable parameters in ``named_parameters()`` order, flattened.
The path losses are evaluated by writing interpolated weights into the module and restoring them
bitwise. torch and numpy only: no Lightning, no TensorBoard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor, nn

__all__ = [
    "ANCHORS",
    "GeometryTracker",
    "TrajectoryGeometry",
    "flat_parameters",
    "linear_path_losses",
    "loss_at_weights",
    "loss_barrier",
    "mode_connectivity",
]

#: Anchors of the linear paths: the first recorded checkpoint and the last one.
ANCHORS = ("init", "previous")

LossFn = Callable[[nn.Module, Any], Tensor]
ReduceFn = Callable[[Tensor], Tensor]


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_parameters(model: nn.Module) -> Tensor:
    """A detached copy of the trainable parameters, flattened in ``named_parameters()`` order.

    Memory: one parameter vector (D numbers) on the model's device.
    """
    with torch.no_grad():
        return torch.cat([p.detach().reshape(-1) for p in _trainable(model)]).clone()


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the length of the first non-scalar tensor at its top level, else 1."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, Tensor) and item.ndim:
                return int(item.shape[0])
    return 1


def loss_at_weights(
    model: nn.Module,
    w: Tensor,
    batches: Sequence[Any],
    loss_fn: LossFn,
    *,
    reduce_fn: ReduceFn | None = None,
) -> float:
    """Sample-weighted mean loss over ``batches`` (all processes) at the flat weights ``w``.

    ``w`` is written into the module's trainable parameters for the evaluation; they are restored
    bitwise afterwards, also when ``loss_fn`` raises. Cost: one forward pass per batch. Memory:
    one copy of the parameters.

    Args:
        model: The module (its train/eval mode is left to the caller).
        w: Flat weights of :func:`flat_parameters`' layout.
        batches: Probe batches; each weighs by its length (first tensor at its top level).
        loss_fn: ``loss_fn(model, batch) -> scalar``, the mean loss on the batch.
        reduce_fn: Sum-all-reduce of a float64 tensor across processes (None: one process).

    Returns:
        The mean loss.

    Raises:
        FloatingPointError: If the mean loss is not finite.
    """
    params = _trainable(model)
    saved = [p.detach().clone() for p in params]
    total = torch.zeros(2, dtype=torch.float64, device=w.device)
    try:
        with torch.no_grad():
            offset = 0
            for p in params:
                p.copy_(w[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            for batch in batches:
                n = _batch_size(batch)
                total[0] += float(loss_fn(model, batch)) * n
                total[1] += n
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    if reduce_fn is not None:
        total = reduce_fn(total)
    value = float(total[0] / total[1])
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite probe loss on the linear path ({value})")
    return value


def linear_path_losses(
    model: nn.Module,
    w1: Tensor,
    w2: Tensor,
    ts: ArrayLike,
    batches: Sequence[Any],
    loss_fn: LossFn,
    *,
    reduce_fn: ReduceFn | None = None,
) -> np.ndarray:
    r"""Losses :math:`L((1-t) w_1 + t w_2)` at each ``t`` of ``ts``.

    Cost: ``len(ts)`` forward passes over ``batches`` (see :func:`loss_at_weights`).

    Returns:
        (len(ts),) float64 losses.
    """
    t = np.asarray(ts, dtype=np.float64)
    # lerp: one pass and one vector per point (exact at both ends), not three.
    return np.array(
        [
            loss_at_weights(model, torch.lerp(w1, w2, float(ti)), batches, loss_fn,
                            reduce_fn=reduce_fn)
            for ti in t
        ]
    )  # fmt: skip


def _check_path(losses: ArrayLike, ts: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(ts, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    if t.ndim != 1 or t.size < 3 or t[0] != 0.0 or t[-1] != 1.0 or np.any(np.diff(t) <= 0):
        raise ValueError(f"ts must increase from 0 to 1 with at least 3 points; got {t.tolist()}")
    if loss.shape != t.shape:
        raise ValueError(f"losses must have one value per t ({t.size}); got shape {loss.shape}")
    if not np.all(np.isfinite(loss)):
        raise FloatingPointError(f"non-finite loss on the linear path: {loss.tolist()}")
    return loss, t


def mode_connectivity(
    losses: Sequence[float] | ArrayLike, ts: Sequence[float] | ArrayLike
) -> float:
    r"""Mode connectivity of two checkpoints from the losses on the linear path between them.

    Yang et al. (2021): with :math:`\gamma(t) = (1-t) w_1 + t w_2` and :math:`L(\gamma(t))`
    sampled at ``ts`` (0 and 1 included),

    .. math::

        mc = \tfrac12 (L(w_1) + L(w_2)) - L(\gamma(t^*)),\quad
        t^* = \arg\max_t \bigl|\tfrac12 (L(w_1) + L(w_2)) - L(\gamma(t))\bigr|

    over the interior grid points. mc < 0: a barrier (the path goes uphill); mc > 0: the path
    dips below the endpoints' mean (poorly trained ends); mc ≈ 0: connected.

    Args:
        losses: Path losses, one per entry of ``ts``.
        ts: Interpolation parameters, increasing, starting at 0 and ending at 1, at least 3.

    Returns:
        mc.

    Raises:
        ValueError: If the grid is malformed.
        FloatingPointError: If the losses are not finite.
    """
    loss, _ = _check_path(losses, ts)
    mean_end = 0.5 * (loss[0] + loss[-1])
    gaps = mean_end - loss[1:-1]
    return float(gaps[int(np.argmax(np.abs(gaps)))])


def loss_barrier(losses: Sequence[float] | ArrayLike, ts: Sequence[float] | ArrayLike) -> float:
    r"""Height of the loss barrier on the linear path above the chord between its ends.

    .. math::

        \max_t \; L(\gamma(t)) - \bigl((1-t) L(w_1) + t L(w_2)\bigr)

    over the grid ``ts`` (0 when the path stays on or below the chord: the ends count).

    Args:
        losses: Path losses, one per entry of ``ts``.
        ts: Interpolation parameters, increasing from 0 to 1, at least 3.

    Raises:
        ValueError: If the grid is malformed.
        FloatingPointError: If the losses are not finite.
    """
    loss, t = _check_path(losses, ts)
    chord = (1 - t) * loss[0] + t * loss[-1]
    return float(np.max(loss - chord))


@dataclass(frozen=True, eq=False)
class TrajectoryGeometry:
    r"""One measurement of :class:`GeometryTracker`.

    Attributes:
        distance_from_init: :math:`\|w - w_0\|`, w0 the first recorded weights.
        cosine_successive_updates: Cosine between the last two updates (between recorded
            checkpoints); None until two non-zero updates were seen.
        mode_connectivity: ``{anchor: mc}`` of the path from w to each anchor
            (:func:`mode_connectivity`); an anchor equal to w (or not yet set) is left out.
        barrier: ``{anchor: barrier height}`` of the same paths (:func:`loss_barrier`).
    """

    distance_from_init: float
    cosine_successive_updates: float | None = None
    mode_connectivity: dict[str, float] = field(default_factory=dict)
    barrier: dict[str, float] = field(default_factory=dict)


def _check_tracker_args(barrier_grid: Any, anchors: Any) -> tuple[str, ...]:
    if isinstance(barrier_grid, bool) or not isinstance(barrier_grid, int) or barrier_grid <= 0:
        raise ValueError(f"barrier_grid must be a positive integer; got {barrier_grid!r}")
    if barrier_grid < 3:
        raise ValueError(f"barrier_grid must be at least 3 (endpoints + one); got {barrier_grid}")
    names = tuple(anchors)
    if isinstance(anchors, str) or not set(names) <= set(ANCHORS):
        raise ValueError(f"barrier_anchors must be a subset of {ANCHORS}; got {anchors!r}")
    return names


class GeometryTracker:
    """Trajectory geometry along training: the state it needs and one update per checkpoint.

    The state is three parameter vectors kept on the host (the first recorded weights ``w0``,
    the last ``w_prev`` and the last non-zero update ``d_prev``); :meth:`state_dict` holds them
    for a checkpoint, so the anchors survive a resume.

    Args:
        barrier_grid: Points of the linear-path grid, endpoints included (≥ 3).
        barrier_anchors: Anchors of the linear paths, a subset of ``("init", "previous")``.

    Raises:
        ValueError: If ``barrier_grid`` is below 3 or an anchor is unknown.
    """

    def __init__(self, *, barrier_grid: int = 5, barrier_anchors: Sequence[str] = ANCHORS) -> None:
        self.anchors = _check_tracker_args(barrier_grid, barrier_anchors)
        self.barrier_grid = barrier_grid
        self.w0: Tensor | None = None
        self.w_prev: Tensor | None = None
        self.d_prev: Tensor | None = None

    def update(
        self,
        model: nn.Module,
        batches: Sequence[Any],
        loss_fn: LossFn,
        *,
        reduce_fn: ReduceFn | None = None,
    ) -> TrajectoryGeometry:
        """Measure the model's current weights against the state, then move the state on.

        Cost: ``barrier_grid · len(anchors)`` forward passes over ``batches`` (one path per set
        anchor that differs from the weights). Memory: a few parameter vectors on the device.
        The state moves on only when everything succeeded, so a failed update (e.g. a
        non-finite path loss, ``FloatingPointError``) can be skipped and retried.
        """
        w = flat_parameters(model)
        w0 = self.w0.to(w) if self.w0 is not None else w
        delta = w - self.w_prev.to(w) if self.w_prev is not None else None
        cosine = None
        if delta is not None and self.d_prev is not None:
            prev = self.d_prev.to(w)
            denom = float(torch.linalg.vector_norm(delta) * torch.linalg.vector_norm(prev))
            if denom > 0:
                cosine = float(delta @ prev) / denom
        mc, barrier = {}, {}
        ts = np.linspace(0.0, 1.0, self.barrier_grid)
        points = {"init": self.w0, "previous": self.w_prev}
        for name in self.anchors:
            anchor = points[name]
            if anchor is None or torch.equal(anchor.to(w), w):
                continue
            losses = linear_path_losses(
                model, w, anchor.to(w), ts, batches, loss_fn, reduce_fn=reduce_fn
            )
            mc[name] = mode_connectivity(losses, ts)
            barrier[name] = loss_barrier(losses, ts)
        result = TrajectoryGeometry(
            distance_from_init=float(torch.linalg.vector_norm(w - w0)),
            cosine_successive_updates=cosine,
            mode_connectivity=mc,
            barrier=barrier,
        )
        if self.w0 is None:
            self.w0 = w.cpu()
        if delta is not None and float(torch.linalg.vector_norm(delta)) > 0:
            self.d_prev = delta.cpu()
        self.w_prev = w.cpu()
        return result

    def state_dict(self) -> dict[str, Tensor | None]:
        """``{"w0", "w_prev", "d_prev"}``: host tensors or None."""
        return {"w0": self.w0, "w_prev": self.w_prev, "d_prev": self.d_prev}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing keys: None)."""
        self.w0 = state.get("w0")
        self.w_prev = state.get("w_prev")
        self.d_prev = state.get("d_prev")
