"""Stochastic trace estimators: Hutchinson (1989) and Hutch++ (Meyer, Musco, Musco & Woodruff
2021, "Hutch++: optimal stochastic trace estimation").

Hutchinson's estimator :math:`\\frac1s\\sum_i z_i^\\top H z_i` (Rademacher :math:`z_i`) has
variance :math:`\\frac2s(\\|H\\|_F^2 - \\sum_i H_{ii}^2)`, large when a few eigenvalues dominate,
as in network Hessians. Hutch++ first captures the dominant subspace :math:`Q` exactly and applies
Hutchinson to the deflated rest :math:`(I-QQ^\\top)H(I-QQ^\\top)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .lanczos import rademacher

__all__ = ["TraceEstimate", "deflated_trace", "hutchinson_trace", "hutchpp_trace"]


@dataclass(frozen=True, eq=False)
class TraceEstimate:
    """A trace estimate.

    Attributes:
        trace: the estimate.
        stderr: its standard error (sample standard deviation of the probe terms over sqrt(s)).
        num_matvecs: operator products spent.
    """

    trace: float
    stderr: float
    num_matvecs: int


def _check_count(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _mean_stderr(samples: Tensor) -> tuple[float, float]:
    s = samples.double()
    n = s.numel()
    std = float(s.std(unbiased=True)) if n > 1 else math.inf
    return float(s.mean()), std / math.sqrt(n)


def hutchinson_trace(operator: Any, *, num_probes: int = 16, seed: int = 0) -> TraceEstimate:
    """Hutchinson's estimator with Rademacher probes, all in one batched call.

    Cost: ``num_probes`` products (one ``matmat`` call).
    """
    _check_count("num_probes", num_probes, 2)
    Z = rademacher(
        num_probes, operator.dim, seed=seed, dtype=operator.dtype, device=operator.device
    )
    HZ = operator.matmat(Z)
    mean, se = _mean_stderr((Z.double() * HZ.double()).sum(dim=1))
    return TraceEstimate(trace=mean, stderr=se, num_matvecs=num_probes)


def deflated_trace(Y: Tensor, HY: Tensor, Z: Tensor, HZ: Tensor) -> TraceEstimate:
    """Trace from an orthonormal block ``Y`` (rows) and Hutchinson on its complement.

    :math:`\\operatorname{tr} H = \\operatorname{tr}(Y H Y^\\top) + E[z^\\top P H P z]` with
    :math:`P = I - Y^\\top Y`, where the rows of ``Z`` must already be projected (``Z = z P``) and
    ``HZ = Z H``. Unbiased for any orthonormal ``Y``; the variance is that of Hutchinson on the
    deflated operator.
    """
    exact = float((Y.double() * HY.double()).sum())
    mean, se = _mean_stderr((Z.double() * HZ.double()).sum(dim=1))
    return TraceEstimate(trace=exact + mean, stderr=se, num_matvecs=Y.shape[0] + Z.shape[0])


def project_out(Z: Tensor, Y: Tensor) -> Tensor:
    """Rows of ``Z`` minus their part in the span of the orthonormal rows of ``Y`` (twice)."""
    for _ in range(2):
        Z = Z - (Z @ Y.T) @ Y
    return Z


def hutchpp_trace(operator: Any, *, num_matvecs: int = 48, seed: int = 0) -> TraceEstimate:
    """Hutch++: a third of the products sketch the range, the rest deflate and estimate.

    Cost: ``num_matvecs`` products in two batched calls (``s`` then ``2s``, ``s = num_matvecs //
    3``).
    """
    _check_count("num_matvecs", num_matvecs, 6)
    s = num_matvecs // 3
    dim, dt, dev = operator.dim, operator.dtype, operator.device
    S = rademacher(s, dim, seed=seed, dtype=dt, device=dev)
    G = rademacher(num_matvecs - 2 * s, dim, seed=seed + 1, dtype=dt, device=dev)
    HS = operator.matmat(S).double()
    Q = torch.linalg.qr(HS.T).Q.T  # orthonormal rows spanning the sketch of the range
    Gp = project_out(G.double(), Q)
    out = operator.matmat(torch.cat([Q, Gp]).to(dt)).double()
    est = deflated_trace(Q, out[: Q.shape[0]], Gp, out[Q.shape[0] :])
    return TraceEstimate(trace=est.trace, stderr=est.stderr, num_matvecs=num_matvecs)
