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

**Beyond the top k.** When all ``k`` computed eigenvalues are outliers, the Ritz values alone only
say "at least k". The quadrature sees further: each outlier carries mass :math:`(q^\\top u_i)^2`,
:math:`1/D` on average over probes, so :math:`D` times the quadrature mass above the bulk edge
estimates the count (rounded, never below ``k``; its standard error is the spread of that number
across the probes over :math:`\\sqrt P`). The edge then comes from the quadrature nodes alone:
the Gauss nodes of a continuous bulk are spaced most widely in its middle and ever more closely
towards its ends, so walking up the pooled nodes from the median of the measure, the bulk ends
before the first gap wider than twice every gap seen since its lower quartile (and than
``gap_factor`` times the width so far). The same edge caps the bulk width when outliers are so
many that the upper quantile of step 1 falls among them. ``n_outliers_saturated`` says that the
top k did not reach the bulk; compute more eigenvalues to resolve the outliers individually.
An outlier is an isolated eigenvalue with a quadrature node of its own in every probe: when the
mass above the edge exceeds the number n of nodes there by more than one plus three standard
deviations (:math:`\\sqrt{2n/P}`), what lies above is a continuous part of the spectrum, not
outliers, and the count stays ``k`` (known to be at least that) with a NaN standard error.

Inside a continuous bulk, neighbouring eigenvalues near the edge are a small fraction of the width
apart (for a Marchenko-Pastur bulk, of order :math:`D^{-2/3}W`), so ``gap_factor = 0.05`` separates
outliers that stand at least 5% of the bulk width above it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .slq import pooled_measure

__all__ = ["OutlierSplit", "split_outliers"]


@dataclass(frozen=True, eq=False)
class OutlierSplit:
    """Result of :func:`split_outliers`.

    Attributes:
        n_outliers: number of outliers: counted among the given top eigenvalues when one of them
            lies in the bulk, else (``n_outliers_saturated``) ``D`` times the quadrature mass
            above the bulk edge, rounded, at least ``len(eigenvalues)``.
        bulk_edge: estimated upper edge of the bulk.
        bulk_width: width ``W`` of the bulk used as the gap scale.
        n_outliers_stderr: standard error of the count: 0 when counted from the eigenvalues,
            else the spread of the per-probe estimates over :math:`\\sqrt P` (NaN for one probe
            or when the density shows no isolated outliers below the k-th eigenvalue).
        n_outliers_saturated: every given eigenvalue is an outlier, so the count comes from the
            density (``n_outliers >= len(eigenvalues)``).
        n_outliers_density: ``D`` times the quadrature mass above the bulk edge (unrounded), a
            cross-check of the count in either case.
    """

    n_outliers: int
    bulk_edge: float
    bulk_width: float
    n_outliers_stderr: float = 0.0
    n_outliers_saturated: bool = False
    n_outliers_density: float = float("nan")


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
    q_lo = _quantile(x, w, rho)
    # Many outliers put the upper quantile among them; the node-gap edge then caps it.
    q_hi = min(
        _quantile(x, w, 1 - rho_hi), _edge_from_nodes(x, w, q_lo, gap_factor, below=theta[0])
    )
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
        per_probe = _count_above(nodes, weights, edge + tol, dim)
        return OutlierSplit(n, edge, float(width), 0.0, False, float(per_probe.mean()))
    edge = _edge_from_nodes(x, w, q_lo, gap_factor, below=theta[-1] - gap_factor * width)
    per_probe = _count_above(nodes, weights, edge + tol, dim)
    est = float(per_probe.mean())
    se = float(per_probe.std(ddof=1) / np.sqrt(per_probe.size)) if per_probe.size > 1 else np.nan
    # Each outlier is an isolated eigenvalue with a quadrature node of its own in every probe;
    # more mass than nodes above the edge is a continuous part of the spectrum, not outliers
    # (then only "at least k" is known).
    # (An outlier's D (q.u)^2 varies like chi-squared with one degree of freedom: allow three
    # standard deviations of the mean over the probes.)
    nodes_above = np.median(np.sum((np.atleast_2d(nodes) > edge + tol) & (weights > 0), axis=1))
    if est > nodes_above + 1 + 3 * np.sqrt(2 * nodes_above / per_probe.size):
        return OutlierSplit(k, edge, float(width), float("nan"), True, est)
    # The k Ritz values above the edge are outliers for certain: the density can only add.
    count = max(k, round(est))
    return OutlierSplit(count, edge, float(width), se, True, est)


def _count_above(nodes: np.ndarray, weights: np.ndarray, level: float, dim: int) -> np.ndarray:
    """Per probe, ``D`` times the quadrature mass above ``level`` (outliers carry 1/D each)."""
    nodes, weights = np.atleast_2d(nodes), np.atleast_2d(weights)
    return dim * np.where(nodes > level, weights, 0.0).sum(axis=1)


def _edge_from_nodes(
    x: np.ndarray, w: np.ndarray, q_lo: float, gap_factor: float, *, below: float
) -> float:
    """Top of the bulk from the pooled quadrature nodes alone (module docstring).

    Never above ``below`` (the smallest eigenvalue known to be an outlier).
    """
    keep = w > 0
    xs, ws = x[keep], w[keep]
    start = _quantile(xs, ws, 0.5)
    ref = np.unique(xs[(xs >= _quantile(xs, ws, 0.25)) & (xs <= start)])
    largest = float(np.diff(ref).max()) if ref.size > 1 else 0.0
    up = np.unique(xs[(xs >= start) & (xs < below)])
    if up.size == 0:
        lower = xs[xs < below]
        return float(lower.max()) if lower.size else float(below)
    for lo, hi in itertools.pairwise(up):
        gap = hi - lo
        if gap > 2.0 * largest and gap > gap_factor * (lo - q_lo):
            return float(lo)
        largest = max(largest, gap)
    return float(up[-1])
