"""Split a Hessian spectrum into a bulk near zero and outliers (Sagun et al. 2017).

Criterion ("gap to the bulk"), documented so results can be read and compared:

1. From the probe-averaged quadrature (SLQ) measure take the bulk's extent: its width
   :math:`W = q_{hi} - q_{lo}`, the quantiles at mass :math:`1-\\rho_{hi}` and :math:`\\rho`, with
   :math:`\\rho = 0.01` and :math:`\\rho_{hi} = \\max(\\rho, 2k/D)` (so the upper quantile lies
   below the ``k`` computed eigenvalues; clipped at 0.5 for tiny problems).
2. Walk down the converged top eigenvalues :math:`\\theta_1 \\ge \\dots \\ge \\theta_k`; take
   :math:`\\theta_{k+1}` = the largest quadrature node clearly below :math:`\\theta_k` (extreme
   quadrature nodes converge to the next eigenvalues). The number of outliers is the largest
   :math:`i` whose gap to the next value exceeds ``gap_factor`` times the bulk width,
   :math:`\\theta_i - \\max(\\theta_{i+1}, \\min(q_{hi}, \\theta_{k+1})) > \\gamma W`: everything
   above a clear gap is an outlier, even when outliers are closer to one another than to the bulk.
3. The bulk edge is the largest eigenvalue that is not an outlier, :math:`\\theta_{n+1}`, when
   ``n < k``; when all ``k`` computed eigenvalues are outliers (``n == k``: compute more to know the
   true count), it is the largest quadrature node below :math:`\\theta_k - \\gamma W` (the
   extreme nodes of the quadrature converge to the bulk's largest eigenvalue).

Inside a continuous bulk, neighbouring eigenvalues near the edge are a small fraction of the width
apart (for a Marchenko-Pastur bulk, of order :math:`D^{-2/3}W`), so ``gap_factor = 0.05`` separates
outliers that stand at least 5% of the bulk width above it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .slq import pooled_measure

__all__ = ["OutlierSplit", "split_outliers"]


@dataclass(frozen=True, eq=False)
class OutlierSplit:
    """Result of :func:`split_outliers`.

    Attributes:
        n_outliers: number of outliers among the given top eigenvalues.
        bulk_edge: estimated upper edge of the bulk.
        bulk_width: width ``W`` of the bulk used as the gap scale.
    """

    n_outliers: int
    bulk_edge: float
    bulk_width: float


def _quantile(x: np.ndarray, w: np.ndarray, q: float) -> float:
    cdf = np.cumsum(w)
    idx = int(np.searchsorted(cdf, q * cdf[-1], side="left"))
    return float(x[min(idx, len(x) - 1)])


def split_outliers(
    eigenvalues: np.ndarray,
    nodes: np.ndarray,
    weights: np.ndarray,
    *,
    dim: int,
    gap_factor: float = 0.05,
    rho: float = 0.01,
) -> OutlierSplit:
    """Number of outliers and bulk edge by the gap-to-the-bulk criterion (module docstring).

    Args:
        eigenvalues: the top eigenvalues (any order; sorted descending here).
        nodes: ``(P, m)`` SLQ nodes.
        weights: ``(P, m)`` SLQ weights (rows sum to 1).
        dim: dimension ``D`` of the operator.
        gap_factor: gap, in bulk widths, that separates an outlier from what lies below.
        rho: tail mass excluded when measuring the bulk width.
    """
    theta = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    if theta.size == 0:
        raise ValueError("eigenvalues must not be empty")
    if not gap_factor > 0:
        raise ValueError(f"gap_factor must be > 0; got {gap_factor!r}")
    if not 0 < rho < 0.5:
        raise ValueError(f"rho must be in (0, 0.5); got {rho!r}")
    if not (isinstance(dim, (int, np.integer)) and dim >= theta.size):
        raise ValueError(f"dim must be an integer >= len(eigenvalues)={theta.size}; got {dim!r}")
    x, w = pooled_measure(nodes, weights)
    k = theta.size
    rho_hi = min(max(rho, 2 * k / dim), 0.5)
    q_hi = _quantile(x, w, 1 - rho_hi)
    q_lo = _quantile(x, w, rho)
    width = max(q_hi - q_lo, 1e-12 * max(1.0, abs(theta[0])))
    # What lies just below the k-th value: the largest quadrature node clearly under it (the
    # extreme nodes converge to the next eigenvalues), or the bulk quantile if none is.
    tol = 1e-3 * width
    under = x[(x < theta[-1] - tol) & (w > 0)]
    nxt = float(under.max()) if under.size else q_hi
    below = np.append(theta[1:], nxt)
    gaps = theta - np.maximum(below, min(q_hi, nxt))
    separated = np.nonzero(gaps > gap_factor * width)[0]
    n = int(separated[-1] + 1) if separated.size else 0
    if n < k:
        edge = float(theta[n])
    else:
        lower = x[(x < theta[-1] - gap_factor * width) & (w > 0)]
        edge = float(lower.max()) if lower.size else q_hi
    return OutlierSplit(n_outliers=n, bulk_edge=edge, bulk_width=float(width))
