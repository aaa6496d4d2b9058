r"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
arXiv 1812.06162), from probe statistics and from the training steps.

For a mini-batch gradient :math:`g_B` of :math:`B` samples drawn from a population with mean
gradient :math:`G` and per-sample covariance :math:`\Sigma`,

.. math::
    E\|g_B\|^2 = \|G\|^2 + \operatorname{tr}\Sigma / B,

so the simple noise scale :math:`B_{\rm simple} = \operatorname{tr}\Sigma / \|G\|^2` can be read
three ways:

* :func:`noise_scale`: from a trace and a squared gradient norm. With the norm of a mean gradient
  over :math:`B` samples the ratio is biased low (the norm carries :math:`\operatorname{tr}\Sigma
  /B`); the unbiased variant removes that term (the probe estimator
  :func:`~lightning_landscape.gradient_covariance` and the training-step tracker share it).
* :func:`two_batch_estimate`: from the squared norms at two batch sizes (McCandlish et al.,
  App. A), which needs no trace: under DDP each rank's gradient before the average is the small
  batch, the averaged one the big batch.
* :class:`GradientNoiseTracker`: the training steps' :math:`\|g_B\|^2` in a bias-corrected
  exponential moving average, buffered on the device so that a step costs one fused reduction
  and no host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GradientNoiseTracker",
    "NoiseScale",
    "TrainingNoise",
    "TwoBatchEstimate",
    "noise_scale",
    "two_batch_estimate",
]

#: Training steps buffered on the device between folds into the moving average.
_NORM_ROWS = 256


@dataclass(frozen=True, eq=False)
class NoiseScale:
    """The simple noise scale and its unbiased variant.

    Attributes:
        simple: :math:`\\operatorname{tr}\\Sigma / \\|g\\|^2`; ``inf`` when the norm is 0.
        unbiased: :math:`\\operatorname{tr}\\Sigma_{\\rm pop} / (\\|g\\|^2 -
            \\operatorname{tr}\\Sigma_{\\rm pop}/B)` with :math:`\\operatorname{tr}\\Sigma_{\\rm
            pop} = \\frac{N}{N-1}\\operatorname{tr}\\Sigma`; NaN when the denominator is not
            positive (the noise swamps the mean), ``N <= 1`` or no batch size is known.
    """

    simple: float
    unbiased: float


def noise_scale(
    trace: float, norm_sq: float, *, num_samples: int | None, inv_batch: float | None
) -> NoiseScale:
    r"""Simple noise scale :math:`\operatorname{tr}\Sigma/\|g\|^2` and its unbiased variant.

    Args:
        trace: :math:`\operatorname{tr}\Sigma` in the ``1/N`` convention over ``num_samples``.
        norm_sq: :math:`\|g\|^2` of a mean gradient over batches of (inverse) size
            ``inv_batch``, biased up by :math:`\operatorname{tr}\Sigma_{\rm pop}` ``* inv_batch``.
        num_samples: ``N`` behind ``trace`` (for :math:`\frac{N}{N-1}`); None: unknown.
        inv_batch: :math:`1/B` (an average of :math:`1/B` for varying batches); for the mean
            gradient of the ``N`` samples of the trace itself, ``1/N``. None: unknown.

    Returns:
        :class:`NoiseScale`. Cost: a few floating-point operations.
    """
    simple = trace / norm_sq if norm_sq > 0 else math.inf
    unbiased = math.nan
    if num_samples is not None and num_samples > 1 and inv_batch is not None:
        trace_pop = num_samples / (num_samples - 1) * trace
        signal = norm_sq - trace_pop * inv_batch
        if signal > 0:
            unbiased = trace_pop / signal
    return NoiseScale(simple=simple, unbiased=unbiased)


@dataclass(frozen=True, eq=False)
class TwoBatchEstimate:
    """Trace and squared gradient norm from the squared gradient norms at two batch sizes.

    Attributes:
        trace: :math:`\\operatorname{tr}\\Sigma` estimate.
        norm_sq: :math:`\\|G\\|^2` estimate.
        noise_scale: their ratio; NaN when ``norm_sq`` is not positive.
    """

    trace: float
    norm_sq: float
    noise_scale: float


def two_batch_estimate(
    norm_sq_small: float, norm_sq_big: float, *, inv_batch_small: float, inv_batch_big: float
) -> TwoBatchEstimate:
    r"""McCandlish et al.'s two-batch-size estimator (App. A): solve
    :math:`E\|g_B\|^2 = \|G\|^2 + \operatorname{tr}\Sigma/B` at :math:`B_{small}` and
    :math:`B_{big}` for the two unknowns,

    .. math::
        \operatorname{tr}\Sigma = \frac{|g_{small}|^2 - |g_{big}|^2}{1/B_{small} - 1/B_{big}},
        \qquad
        \|G\|^2 = \frac{|g_{big}|^2/B_{small} - |g_{small}|^2/B_{big}}{1/B_{small} - 1/B_{big}}.

    Args:
        norm_sq_small: (an average of) :math:`\|g_{B_{small}}\|^2`.
        norm_sq_big: (an average of) :math:`\|g_{B_{big}}\|^2`.
        inv_batch_small: :math:`1/B_{small}`.
        inv_batch_big: :math:`1/B_{big}`, smaller than ``inv_batch_small``.

    Returns:
        :class:`TwoBatchEstimate`. Cost: a few floating-point operations.

    Raises:
        ValueError: if ``inv_batch_small <= inv_batch_big``.
    """
    gap = inv_batch_small - inv_batch_big
    if not gap > 0:
        raise ValueError(
            "inv_batch_small must be greater than inv_batch_big (the small batch is smaller); "
            f"got inv_batch_small={inv_batch_small!r}, inv_batch_big={inv_batch_big!r}"
        )
    trace = (norm_sq_small - norm_sq_big) / gap
    signal = (inv_batch_small * norm_sq_big - inv_batch_big * norm_sq_small) / gap
    return TwoBatchEstimate(
        trace=trace, norm_sq=signal, noise_scale=trace / signal if signal > 0 else math.nan
    )


@dataclass(frozen=True, eq=False)
class TrainingNoise:
    """What :meth:`GradientNoiseTracker.compute` returns.

    Attributes:
        grad_norm_sq: bias-corrected EMA of :math:`\\|g_B\\|^2` over the finite steps.
        num_nonfinite_steps: steps left out because their gradient was not finite.
        noise_scale: :func:`noise_scale` of the given trace over ``grad_norm_sq`` (None without
            a trace).
        noise_scale_unbiased: its unbiased variant with the EMA of :math:`1/B` (None without a
            trace; NaN when not positive).
        grad_norm_sq_local: the mean over ranks of the EMA of each rank's own
            :math:`\\|g\\|^2` before DDP's average (None without the comm hook).
        trace_two_batch: :func:`two_batch_estimate`'s trace (None without the comm hook).
        noise_scale_two_batch: :func:`two_batch_estimate`'s noise scale (None without it).
    """

    grad_norm_sq: float
    num_nonfinite_steps: int
    noise_scale: float | None = None
    noise_scale_unbiased: float | None = None
    grad_norm_sq_local: float | None = None
    trace_two_batch: float | None = None
    noise_scale_two_batch: float | None = None


class _LocalNorms:
    """State of the DDP comm hook: this rank's squared gradient norm before the average."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sq = torch.zeros((), dtype=torch.float64, device=device)


def _local_norm_hook(state, bucket):  # type: ignore[no-untyped-def]
    """Add the bucket's local squared norm, then DDP's own averaging all-reduce, unchanged.

    Not annotated: DDP checks the annotations at run time, and postponed (string) annotations
    fail its check.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state.sq += bucket.buffer().detach().double().pow(2).sum().to(state.sq.device)
    return allreduce_hook(None, bucket)  # type: ignore[arg-type]


class GradientNoiseTracker:
    r"""Bias-corrected moving averages of the training steps' squared gradient norm.

    Call :meth:`update` once per optimizer step with the gradients the optimiser is about to use
    (under DDP: already averaged, so :math:`B` is the global batch, per-rank batch × world size
    × accumulation); :meth:`compute` when the result is wanted. A step keeps the per-tensor
    norms of one fused reduction (``torch._foreach_norm``) on the device: one kernel launch, no
    host synchronisation, no copy. They are folded into the averages, in step order, by one
    stack and one host read every ``buffer_rows`` steps and at :meth:`compute` /
    :meth:`state_dict`. Non-finite steps (e.g. skipped
    GradScaler steps) are left out and counted.

    With :meth:`attach_ddp` a communication hook also reads each rank's gradient before DDP's
    average (then runs PyTorch's reference ``allreduce_hook``), for :func:`two_batch_estimate`:
    per-rank batch small, global batch big. :meth:`compute` then all-reduces one scalar and must
    be called on every rank at the same steps.

    Args:
        decay: EMA decay in (0, 1).
        buffer_rows: steps buffered on the device between folds; default 256. Memory:
            ``buffer_rows`` × (number of parameter tensors) 0-d tensors.
    """

    def __init__(self, decay: float = 0.9, *, buffer_rows: int | None = None) -> None:
        if isinstance(decay, bool) or not (isinstance(decay, (int, float)) and 0 < decay < 1):
            raise ValueError(f"decay must be in (0, 1); got {decay!r}")
        rows = _NORM_ROWS if buffer_rows is None else buffer_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0:
            raise ValueError(f"buffer_rows must be a positive integer or None; got {buffer_rows!r}")
        self.decay = float(decay)
        self.buffer_rows = rows
        self._ema: dict[str, float] = dict.fromkeys(
            ("norm_sq", "weight", "nonfinite", "local_norm_sq"), 0.0
        )
        self._inv_batch = 0.0
        self._inv_weight = 0.0
        # Per-fit objects: per-tensor norms of the steps not yet folded (one list a step), this
        # rank's pre-average squared norms of those steps (comm hook), and the hook's state.
        self._norm_rows: list[list[Tensor]] = []
        self._local_rows: list[Tensor] = []
        self._local: _LocalNorms | None = None

    # -- the training steps ------------------------------------------------------------------
    def update(
        self,
        grads: Sequence[Tensor],
        *,
        batch_size: int | None,
        world_size: int = 1,
        accumulation: int = 1,
    ) -> None:
        """Record one optimizer step: its gradients (the tensors that have one) and batch.

        Args:
            grads: the gradient tensors; nothing is recorded when empty.
            batch_size: samples of this rank's (last) micro-batch; None or 0: unknown (the
                EMA of :math:`1/B` is not updated).
            world_size: processes whose gradients were averaged.
            accumulation: micro-batches accumulated into this step.
        """
        if not grads:
            return
        rows = self._norm_rows
        if rows and (len(rows[0]) != len(grads) or len(rows) == self.buffer_rows):
            self._fold()  # full, or another set of tensors has gradients this step
        # Per-tensor norms by one fused reduction, kept as they come (stacked at the fold).
        tensors = grads if isinstance(grads, list) else list(grads)
        self._norm_rows.append(torch._foreach_norm(tensors))
        if self._local is not None:
            # This rank's gradient before DDP's average, summed over buckets by the comm hook.
            self._local_rows.append(self._local.sq.clone())
            self._local.sq.zero_()
        if batch_size:
            beta = self.decay
            inv = 1.0 / (batch_size * max(1, world_size) * max(1, accumulation))
            self._inv_batch = beta * self._inv_batch + (1 - beta) * inv
            self._inv_weight = beta * self._inv_weight + (1 - beta)

    def _fold(self) -> None:
        """Fold the buffered steps into the moving average, in step order (one host read)."""
        rows, local_rows = self._norm_rows, self._local_rows
        self._norm_rows, self._local_rows = [], []
        if not rows:
            return
        norms = torch.stack([x for row in rows for x in row]).view(len(rows), -1)
        norm_sq = norms.double().pow(2).sum(dim=1).cpu().tolist()
        # The comm hook's norms, when it saw every one of these steps.
        full = len(local_rows) == len(rows)
        local = torch.stack(local_rows).cpu().tolist() if full else None
        s, beta = self._ema, self.decay
        for i, sq in enumerate(norm_sq):
            loc = local[i] if local is not None else s["local_norm_sq"]
            if not (math.isfinite(sq) and math.isfinite(loc)):
                s["nonfinite"] += 1.0
                continue
            s["norm_sq"] = beta * s["norm_sq"] + (1 - beta) * sq
            s["weight"] = beta * s["weight"] + (1 - beta)
            s["local_norm_sq"] = beta * s["local_norm_sq"] + (1 - beta) * loc

    @property
    def thinnable(self) -> bool:
        """Whether :meth:`update` may skip steps: not with the comm hook, whose per-rank sums
        run at every step and are read (and reset) by the next update."""
        return self._local is None

    # -- DDP ---------------------------------------------------------------------------------
    def attach_ddp(self, model: Any, device: torch.device) -> None:
        """Register the comm hook on a ``DistributedDataParallel`` model (before its first
        backward); ``device`` holds the collective buffers (NCCL refuses CPU tensors).

        Raises:
            ValueError: ``model`` is not a ``DistributedDataParallel`` over 2 or more processes.
            RuntimeError: from ``register_comm_hook`` (e.g. a hook is already registered).
        """
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel):
            raise ValueError(
                f"model must be a DistributedDataParallel wrapper; got {type(model).__name__}"
            )
        world = torch.distributed.get_world_size()
        if world < 2:
            raise ValueError(f"DDP needs 2 or more processes for two batch sizes; got {world}")
        state = _LocalNorms(device)
        model.register_comm_hook(state, _local_norm_hook)
        self._local = state

    def release(self) -> None:
        """Drop the device buffers (with the steps in them not yet folded) and the comm-hook
        state: a new fit starts from the averages alone."""
        self._norm_rows, self._local_rows, self._local = [], [], None

    # -- result ------------------------------------------------------------------------------
    def compute(
        self, *, trace: float | None = None, num_samples: int | None = None
    ) -> TrainingNoise | None:
        """The averages, and with ``trace`` (:math:`\\operatorname{tr}\\Sigma` over
        ``num_samples`` probe samples, ``1/N`` convention) the noise scales.

        One host read; with the comm hook, one scalar all-reduce (call on every rank).

        Returns:
            :class:`TrainingNoise`, or None before the first finite step.
        """
        self._fold()
        s = self._ema
        local_mean, world = None, 1
        if self._local is not None:
            # Mean over ranks of the per-rank EMAs: one collective, at a step every rank logs.
            world = torch.distributed.get_world_size()
            t = torch.tensor([s["local_norm_sq"]], dtype=torch.float64, device=self._local.device)
            torch.distributed.all_reduce(t)
            local_mean = float(t) / world
        if s["weight"] <= 0:
            return None
        norm_sq = s["norm_sq"] / s["weight"]
        inv_big = self._inv_batch / self._inv_weight if self._inv_weight > 0 else None
        out: dict[str, float | None] = {}
        if local_mean is not None:
            out["grad_norm_sq_local"] = small = local_mean / s["weight"]
            if inv_big is not None and world > 1:
                est = two_batch_estimate(
                    small, norm_sq, inv_batch_small=inv_big * world, inv_batch_big=inv_big
                )
                out["trace_two_batch"] = est.trace
                out["noise_scale_two_batch"] = est.noise_scale
        if trace is not None:
            scale = noise_scale(trace, norm_sq, num_samples=num_samples or 1, inv_batch=inv_big)
            out["noise_scale"], out["noise_scale_unbiased"] = scale.simple, scale.unbiased
        nonfinite = int(s["nonfinite"])
        return TrainingNoise(grad_norm_sq=norm_sq, num_nonfinite_steps=nonfinite, **out)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The averages (buffered steps folded in first: one host read)."""
        self._fold()
        return {
            "ema": dict(self._ema),
            "ema_inv_batch": self._inv_batch,
            "ema_inv_weight": self._inv_weight,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the averages saved by :meth:`state_dict` (missing keys: zero)."""
        ema = state.get("ema")
        if ema:
            self._ema = {k: float(ema.get(k, 0.0)) for k in self._ema}
        self._inv_batch = float(state.get("ema_inv_batch", 0.0))
        self._inv_weight = float(state.get("ema_inv_weight", 0.0))
