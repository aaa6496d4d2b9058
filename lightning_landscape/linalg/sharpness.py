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
- Adam (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"): the
  preconditioned sharpness :math:`\lambda_{max}(P^{-1}H)` with
  :math:`P = \operatorname{diag}((\sqrt{\hat v_t}+\epsilon)/\eta)` from Adam's state, against
  :math:`(2+2\beta_1)/(1-\beta_1)` (38 for :math:`\beta_1 = 0.9`). :math:`P^{-1}H` is similar to
  the symmetric :math:`P^{-1/2}HP^{-1/2}`, whose top eigenvalue Lanczos finds
  (:func:`preconditioned_sharpness`).

Nothing here modifies an optimizer: its hyper-parameters and state are only read.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .lanczos import lanczos

__all__ = [
    "Stability",
    "adam_preconditioner",
    "adam_stability",
    "adam_threshold",
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


def adam_threshold(beta1: float) -> float:
    """``(2 + 2β₁)/(1 - β₁)``: the line of the preconditioned sharpness for Adam (38 at 0.9).

    Raises:
        ValueError: ``beta1`` outside [0, 1).
    """
    b = _unit("beta1", beta1)
    return (2.0 + 2.0 * b) / (1.0 - b)


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


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]
) -> Tensor | None:
    """Flat diagonal ``(sqrt(v̂_t) + ε)/η`` of Adam's preconditioner over ``params``, in order.

    ``v̂_t = exp_avg_sq / (1 - β₂^t)`` (bias-corrected, as the step uses it). None when a
    parameter has no Adam state yet (before the first step) or its group is not Adam-like.
    Read-only: the state tensors are copied, never changed.
    """
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    for p in params:
        g, st = where.get(id(p)), optimizer.state.get(p, {})
        if g is None or "exp_avg_sq" not in st or "betas" not in g or "step" not in st:
            return None
        step = float(st["step"])
        v = st["exp_avg_sq"].detach().to(torch.float64)
        v_hat = v / (1.0 - g["betas"][1] ** step) if step > 0 else v
        parts.append(((v_hat.sqrt() + g["eps"]) / g["lr"]).reshape(-1))
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
    res = lanczos(wrapped, k=1, tol=tol, max_iter=max_iter, seed=seed)
    value = float(res.eigenvalues[0])
    if not math.isfinite(value):
        raise FloatingPointError("the preconditioned sharpness is not finite")
    return value, wrapped.num_hvps - start


def adam_stability(sharpness: float, beta1: float) -> Stability:
    """Stability of Adam from its preconditioned sharpness λ_max(P⁻¹H)."""
    thr = adam_threshold(beta1)
    return Stability(sharpness=float(sharpness), threshold=thr, ratio=sharpness / thr, kind="adam")
