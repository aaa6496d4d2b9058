r"""Sharpness against the optimizer's stability threshold ("edge of stability").

Gradient descent with step size :math:`\eta` on a quadratic is stable only while
:math:`\lambda_{max}(H) < 2/\eta`; Cohen et al. (2021, "Gradient descent on neural networks
typically occurs at the edge of stability") found that full-batch training drives
:math:`\lambda_{max}` up to that line and hovers there. The convention here: **ratio =
sharpness / threshold**, so 1 is the edge of stability and above 1 the quadratic model of the
loss diverges along the top eigenvector.

- SGD: threshold :math:`2/\eta`, i.e. ratio :math:`\lambda_{max}\eta/2`.
- Heavy-ball momentum :math:`\beta` (PyTorch's ``SGD(momentum=β, dampening=δ)``, whose step is
  :math:`\theta_{t+1}-\theta_t = \beta(\theta_t-\theta_{t-1}) - \eta(1-\delta)g_t`):
  :math:`2(1+\beta)/(\eta(1-\delta))`; Nesterov: :math:`2(1+\beta)/(\eta(1-\delta)(1+2\beta))`.
  Coupled weight decay :math:`w` adds :math:`w` to every eigenvalue of the step's Hessian, so
  the sharpness compared is :math:`\lambda_{max} + w`.
- Adam (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"): Adam's step
  is :math:`\theta_{t+1}-\theta_t = -\eta P_t^{-1} m_{t+1}` with the first moment
  :math:`m_{t+1} = \beta_1 m_t + (1-\beta_1) g` and
  :math:`P_t = (1-\beta_1^{t+1})\operatorname{diag}(\sqrt{\hat v_t}+\epsilon)` (the first
  moment's bias correction of the next step folded in; it tends to 1 after a few dozen steps).
  With P frozen this is EMA-momentum gradient descent on the preconditioned quadratic, stable
  while the preconditioned sharpness :math:`\lambda_{max}(P^{-1}H)` stays below
  :math:`(2+2\beta_1)/((1-\beta_1)\eta)` (38/η for :math:`\beta_1 = 0.9`).
  :math:`P^{-1}H` is similar to the symmetric :math:`P^{-1/2}HP^{-1/2}`, whose top eigenvalue
  Lanczos finds (:func:`preconditioned_sharpness`). :math:`\hat v_t` is the current state (the
  next step's is not known yet). AdamW's decoupled weight decay (a factor
  :math:`1-\eta w` outside the preconditioner) is not folded in: it moves the line by
  :math:`\eta w`, negligible at usual settings.
- Per batch (:func:`batch_sharpness`): the top eigenvalue of each probe batch's own Hessian, the
  spread SGD's minibatch steps see.

Nothing here modifies an optimizer: its hyper-parameters and state are only read.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._checks import check_int
from .lanczos import eigen_run, lanczos
from .operators import HessianOperator, LossFn

#: Hyper-parameters of SGD-like optimizers that set the stability line; all groups must agree.
SGD_LINE_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay")

__all__ = [
    "BatchSharpness",
    "OptimizerSharpness",
    "Stability",
    "StabilityWatch",
    "adam_hyperparameters",
    "adam_preconditioner",
    "adam_stability",
    "adam_threshold",
    "batch_sharpness",
    "optimizer_sharpness",
    "preconditioned_sharpness",
    "sgd_threshold",
    "stability_from_param_group",
]


@dataclass(frozen=True, eq=False)
class Stability:
    """Sharpness against the stability threshold.

    Attributes:
        sharpness: the sharpness compared (λ_max, plus coupled weight decay for SGD; λ_max of
            the preconditioned Hessian for Adam).
        threshold: the optimizer's stability threshold for that sharpness.
        ratio: ``sharpness / threshold``; 1 is the edge of stability.
        kind: ``"sgd"``, ``"momentum"``, ``"nesterov"`` or ``"adam"``.
    """

    sharpness: float
    threshold: float
    ratio: float
    kind: str


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number; got {value!r}")
    return float(value)


def _unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1); got {value!r}")
    return float(value)


def sgd_threshold(
    lr: float, *, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False
) -> float:
    """Largest stable top eigenvalue for (heavy-ball or Nesterov) SGD on a quadratic.

    ``2(1+β)/(η(1-δ))``, divided by ``1+2β`` for Nesterov; ``2/η`` without momentum.

    Raises:
        ValueError: ``lr <= 0``, ``momentum`` or ``dampening`` outside [0, 1).
    """
    eta = _positive("lr", lr)
    beta = _unit("momentum", momentum)
    damp = _unit("dampening", dampening) if beta > 0 else 0.0
    thr = 2.0 * (1.0 + beta) / (eta * (1.0 - damp))
    return thr / (1.0 + 2.0 * beta) if nesterov and beta > 0 else thr


def adam_threshold(beta1: float, lr: float = 1.0) -> float:
    """``(2 + 2β₁)/((1 - β₁)η)``: the line of Adam's preconditioned sharpness (38/η at 0.9).

    Raises:
        ValueError: ``beta1`` outside [0, 1), ``lr <= 0``.
    """
    b = _unit("beta1", beta1)
    return (2.0 + 2.0 * b) / ((1.0 - b) * _positive("lr", lr))


def stability_from_param_group(lambda_max: float, group: Mapping[str, Any]) -> Stability:
    """Stability of SGD-like training from a ``param_groups`` entry (``lr``, ``momentum``...).

    Reads ``lr``, ``momentum``, ``dampening``, ``nesterov`` and ``weight_decay`` (absent keys
    count as 0/False); ``lambda_max`` is the Hessian's top eigenvalue.
    """
    beta = float(group.get("momentum", 0.0) or 0.0)
    nesterov = bool(group.get("nesterov", False)) and beta > 0
    thr = sgd_threshold(
        group["lr"],
        momentum=beta,
        dampening=float(group.get("dampening", 0.0) or 0.0),
        nesterov=nesterov,
    )
    sharp = float(lambda_max) + float(group.get("weight_decay", 0.0) or 0.0)
    kind = "nesterov" if nesterov else ("momentum" if beta > 0 else "sgd")
    return Stability(sharpness=sharp, threshold=thr, ratio=sharp / thr, kind=kind)


def adam_hyperparameters(optimizer: torch.optim.Optimizer) -> tuple[float, float] | None:
    """``(lr, β₁)`` of an Adam-like optimizer (``betas``, ``eps`` in its groups), when every
    group shares them; None otherwise (not Adam-like, or groups with different values: then
    no single line exists)."""
    groups = optimizer.param_groups
    if not groups or any("betas" not in g or "eps" not in g for g in groups):
        return None
    first = (groups[0]["lr"], groups[0]["betas"][0])
    if any((g["lr"], g["betas"][0]) != first for g in groups):
        return None
    return float(first[0]), float(first[1])


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]
) -> Tensor | None:
    """Flat diagonal ``(1 - β₁^{t+1})(sqrt(v̂_t) + ε)`` of Adam's preconditioner over ``params``.

    ``v̂_t = exp_avg_sq / (1 - β₂^t)`` (bias-corrected, as the step uses it; ``max_exp_avg_sq``
    with ``amsgrad``), ``t`` the steps taken. The learning rate is not in ``P``: compare
    λ_max(P⁻¹H) with :func:`adam_threshold` ``(β₁, lr)``. None when a parameter has no Adam
    state yet (before the first step) or its group is not Adam-like. Read-only: the state
    tensors are copied, never changed.
    """
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    for p in params:
        g, st = where.get(id(p)), optimizer.state.get(p, {})
        if g is None or "exp_avg_sq" not in st or "betas" not in g or "step" not in st:
            return None
        step = float(st["step"])
        beta1, beta2 = g["betas"]
        v = st["max_exp_avg_sq" if g.get("amsgrad") else "exp_avg_sq"]
        v = v.detach().to(torch.float64)
        v_hat = v / (1.0 - beta2**step) if step > 0 else v
        parts.append(((1.0 - beta1 ** (step + 1)) * (v_hat.sqrt() + g["eps"])).reshape(-1))
    return torch.cat(parts) if parts else None


class _Preconditioned:
    """``x -> P^{-1/2} H P^{-1/2} x`` for a diagonal ``P`` (symmetric, similar to P⁻¹H)."""

    def __init__(self, operator: Any, p_diag: Tensor) -> None:
        self.op = operator
        self.dim, self.dtype, self.device = operator.dim, operator.dtype, operator.device
        self.scale = p_diag.to(device=self.device, dtype=self.dtype).rsqrt()

    @property
    def num_hvps(self) -> int:
        return int(getattr(self.op, "num_hvps", 0))

    def matmat(self, V: Tensor) -> Tensor:
        return self.op.matmat(V * self.scale) * self.scale


def preconditioned_sharpness(
    operator: Any, p_diag: Tensor, *, tol: float = 1e-4, max_iter: int | None = None, seed: int = 0
) -> tuple[float, int]:
    """Top eigenvalue of ``P⁻¹H`` for a positive diagonal ``P``, by Lanczos on P^{-1/2}HP^{-1/2}.

    Args:
        operator: the Hessian (``dim``, ``dtype``, ``device``, ``matmat``), e.g. a
            :class:`~lightning_landscape.linalg.HessianOperator`.
        p_diag: (D,) positive diagonal of ``P``.
        tol: Lanczos tolerance, relative to the spectral radius.
        max_iter: Lanczos step limit (default of :func:`~lightning_landscape.linalg.lanczos`).
        seed: seeds the start vector.

    Returns:
        ``(λ_max(P⁻¹H), products spent)``. Cost: one Lanczos run for k = 1 (typically 20-60
        Hessian-vector products); memory as :func:`~lightning_landscape.linalg.lanczos`.

    Raises:
        ValueError: ``p_diag`` of the wrong shape or not positive and finite.
    """
    if p_diag.shape != (int(operator.dim),):
        raise ValueError(f"p_diag must have shape ({operator.dim},); got {tuple(p_diag.shape)}")
    if not bool(torch.isfinite(p_diag).all()) or not bool((p_diag > 0).all()):
        raise ValueError("p_diag must be positive and finite everywhere")
    wrapped = _Preconditioned(operator, p_diag)
    start = wrapped.num_hvps
    res = lanczos(wrapped, top_k=1, tol=tol, max_iter=max_iter, seed=seed)
    value = float(res.eigenvalues[0])
    if not math.isfinite(value):
        raise FloatingPointError("the preconditioned sharpness is not finite")
    return value, wrapped.num_hvps - start


def adam_stability(sharpness: float, beta1: float, lr: float = 1.0) -> Stability:
    """Stability of Adam from its preconditioned sharpness λ_max(P⁻¹H), ``P`` as in
    :func:`adam_preconditioner` (``lr`` not in ``P``)."""
    thr = adam_threshold(beta1, lr)
    return Stability(sharpness=float(sharpness), threshold=thr, ratio=sharpness / thr, kind="adam")


@dataclass(frozen=True, eq=False)
class BatchSharpness:
    """The top eigenvalue of each batch's own Hessian (:func:`batch_sharpness`).

    Attributes:
        eigenvalues: (B,) λ_max of each batch's mean loss, in batch order.
        residuals: (B,) their residuals ``||Hv - θv||``: a Ritz value never exceeds λ_max
            and lies within its residual of an eigenvalue (the top one when the start is close
            to its eigenvector), so a run stopped by the cap reads low.
        num_hvps: Hessian-vector products spent, all batches together (each on one batch).
    """

    eigenvalues: np.ndarray
    residuals: np.ndarray
    num_hvps: int


def batch_sharpness(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    start: Tensor | None = None,
    max_hvps: int = 16,
    tol: float = 1e-4,
    seed: int = 0,
    **operator_options: Any,
) -> BatchSharpness:
    """λ_max of the Hessian of each batch's loss separately: the spread behind the probe set's
    mean Hessian.

    A short Lanczos run per batch, started from ``start`` (e.g. the top eigenvector of the
    whole probe set's Hessian, plus a little noise), which is usually close to each batch's top
    eigenvector, so a few products suffice; each run stops at ``tol`` (relative to its spectral
    radius) or after ``max_hvps`` products.

    Args:
        model: the network (put it in eval mode first for a deterministic result).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss on a batch.
        batches: the batches.
        start: (D,) or (k, D) start direction(s); None: a Rademacher vector.
        max_hvps: product cap per batch (at least 2).
        tol: Lanczos tolerance.
        seed: seeds the start noise.
        **operator_options: options of :class:`~lightning_landscape.linalg.HessianOperator`
            (``reduce_fn``: batch ``b`` is then the union of every process's batch ``b``).

    Returns:
        :class:`BatchSharpness`. Cost: at most ``max_hvps`` products per batch, each a backward
        through one batch's graph, plus one graph build per batch.

    Raises:
        ValueError: ``max_hvps`` below 2, no batches.
    """
    check_int("max_hvps", max_hvps, minimum=2)
    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one batch; got none")
    gen = torch.Generator().manual_seed(int(seed))
    warm = None if start is None else start.detach().reshape(-1, start.shape[-1])
    values, residuals, used = [], [], 0
    for batch in batches:
        op = HessianOperator(model, loss_fn, [batch], **operator_options)
        try:
            run = eigen_run(
                op, k=1, which="LA", tol=tol, max_iter=max_hvps, generator=gen, warm_start=warm
            )
            used += op.num_hvps
        finally:
            op.release()
        values.append(float(run.theta[0]))
        residuals.append(float(run.residuals[0]))
    return BatchSharpness(np.asarray(values), np.asarray(residuals), used)


@dataclass(frozen=True, eq=False)
class OptimizerSharpness:
    """The sharpness a given optimizer's stability line concerns (:func:`optimizer_sharpness`).

    Attributes:
        stability: the sharpness against the line; None when there is none to draw (no
            optimizer step yet for Adam, or an optimizer this module has no line for).
        num_hvps: Hessian-vector products spent (Adam's Lanczos run; 0 for SGD-like).
        unsupported: why no line can be drawn for this optimizer, a sentence for a one-time
            notice; None when it was measured or will be once the optimizer has state.
    """

    stability: Stability | None
    num_hvps: int = 0
    unsupported: str | None = None


def optimizer_sharpness(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    optimizer: torch.optim.Optimizer,
    *,
    lambda_max: float,
    tol: float = 1e-5,
    seed: int = 0,
    **operator_options: Any,
) -> OptimizerSharpness:
    """The sharpness against ``optimizer``'s stability line, whatever the optimizer.

    SGD-like (no ``betas``): ``lambda_max`` against :func:`stability_from_param_group`, no
    products. Adam-like: λ_max(P⁻¹H) by :func:`preconditioned_sharpness` with Adam's own state
    (:func:`adam_preconditioner`), against :func:`adam_threshold`. The optimizer is only read.

    Args:
        model: the network the optimizer trains (its trainable parameters, in order).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss on a batch.
        batches: the probe batches.
        optimizer: the optimizer whose line is wanted.
        lambda_max: the Hessian's top eigenvalue on ``batches`` (measured already).
        tol: Lanczos tolerance of Adam's run.
        seed: seeds Adam's run.
        **operator_options: options of :class:`~lightning_landscape.linalg.HessianOperator`.
    """
    groups = optimizer.param_groups
    if "betas" not in groups[0]:
        first = tuple(groups[0].get(k) for k in SGD_LINE_KEYS)
        if any(tuple(g.get(k) for k in SGD_LINE_KEYS) != first for g in groups):
            return OptimizerSharpness(
                None, unsupported="parameter groups with different SGD hyper-parameters"
            )
        return OptimizerSharpness(stability_from_param_group(lambda_max, groups[0]))
    hyper = adam_hyperparameters(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    p_diag = adam_preconditioner(optimizer, params) if hyper is not None else None
    if p_diag is None:
        if hyper is None or optimizer.state:
            return OptimizerSharpness(
                None,
                unsupported="Adam's preconditioned sharpness needs one lr and β₁ for all "
                "parameter groups and Adam state for every trainable parameter",
            )
        return OptimizerSharpness(None)  # before the first step: no second moment yet
    op = HessianOperator(model, loss_fn, batches, **operator_options)
    try:
        value, used = preconditioned_sharpness(op, p_diag, tol=tol, seed=seed)
    finally:
        op.release()
    return OptimizerSharpness(adam_stability(value, hyper[1], hyper[0]), used)


class StabilityWatch:
    """Says once when training has sat above the stability line for ``patience`` consecutive
    measurements: at the edge of stability the ratio hovers around 1 (Cohen et al. 2021,
    2022), so a single reading above it is expected.

    Args:
        patience: consecutive measurements above the line before :meth:`update` says so.
    """

    def __init__(self, patience: int = 3) -> None:
        self.patience = check_int("patience", patience, minimum=1)
        self.above = 0
        self.fired = False

    def update(self, stability: Stability) -> bool:
        """Count one measurement; True exactly once, at the first ``patience``-th in a row
        above the line."""
        self.above = self.above + 1 if stability.ratio > 1 else 0
        if self.fired or self.above < self.patience:
            return False
        self.fired = True
        return True
