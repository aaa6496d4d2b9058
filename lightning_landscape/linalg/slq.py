"""Stochastic Lanczos quadrature for the spectral density (Golub & Meurant 1994; Ghorbani,
Krishnan & Xiao 2019, "An investigation into neural net optimization via Hessian eigenvalue
density").

For a unit probe :math:`q`, :math:`m` Lanczos steps give a tridiagonal :math:`T_m = S\\Theta
S^\\top`; the nodes :math:`\\theta_j` and weights :math:`s_{1j}^2` form a Gauss quadrature rule
for the spectral measure :math:`\\mu_q = \\sum_i (q^\\top u_i)^2 \\delta_{\\lambda_i}`, whose
expectation over Rademacher probes is the eigenvalue distribution :math:`\\frac1D\\sum_i
\\delta_{\\lambda_i}`. Averaging over probes and broadening each node by a Gaussian gives a density.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .lanczos import _Process, _ritz, rademacher, run_lanczos

__all__ = ["QuadratureResult", "slq", "spectral_density"]


@dataclass(frozen=True, eq=False)
class QuadratureResult:
    """Gauss quadrature rules of several probes.

    Attributes:
        nodes: ``(P, m)`` quadrature nodes (Ritz values) per probe, ascending.
        weights: ``(P, m)`` weights per probe; each row sums to 1 (padding has weight 0).
        num_hvps: operator products spent.
    """

    nodes: np.ndarray
    weights: np.ndarray
    num_hvps: int

    @property
    def num_matvecs(self) -> int:
        """Deprecated name of :attr:`num_hvps`."""
        warnings.warn(
            "QuadratureResult.num_matvecs is deprecated; use num_hvps", DeprecationWarning, 2
        )
        return self.num_hvps


def quadrature_rows(procs: list[_Process], num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights from the first ``num_steps`` steps of each process, padded to a matrix.

    The leading ``m x m`` block of a longer run's tridiagonal matrix is exactly the ``m``-step
    quadrature of its start vector, so an eigenvalue run doubles as a quadrature probe.
    """
    nodes = np.zeros((len(procs), num_steps))
    weights = np.zeros((len(procs), num_steps))
    for i, p in enumerate(procs):
        m = min(num_steps, p.steps)
        theta, S = _ritz(p.alphas[:m], p.betas[:m])
        w = S[0] ** 2
        nodes[i, :m] = theta
        nodes[i, m:] = theta[-1]
        weights[i, :m] = w / w.sum()
    return nodes, weights


def slq(
    operator: Any, *, num_probes: int = 4, num_steps: int = 80, seed: int = 0
) -> QuadratureResult:
    """Quadrature rules of ``num_probes`` Rademacher probes, batched through ``operator.matmat``.

    Args:
        operator: symmetric operator with ``dim``, ``dtype``, ``device`` and ``matmat``.
        num_probes: number of probe vectors (all advanced together, one batched call per step).
        num_steps: Lanczos steps per probe (m); 80-100 is usual.
        seed: seeds the probes.

    Cost: ``num_steps`` batched calls of ``num_probes`` products; memory ``num_probes *
    (num_steps + 1) * D`` numbers (full reorthogonalisation).
    """
    if not isinstance(num_probes, int) or num_probes <= 0:
        raise ValueError(f"num_probes must be a positive integer; got {num_probes!r}")
    if not isinstance(num_steps, int) or num_steps <= 0:
        raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
    steps = min(num_steps, int(operator.dim))
    gen = torch.Generator().manual_seed(int(seed))
    V0 = rademacher(
        num_probes, operator.dim, generator=gen, dtype=operator.dtype, device=operator.device
    )
    start = operator.num_hvps
    procs = run_lanczos(
        operator, V0, [steps] * num_probes, restart=[False] * num_probes, generator=gen
    )
    nodes, weights = quadrature_rows(procs, steps)
    return QuadratureResult(nodes=nodes, weights=weights, num_hvps=operator.num_hvps - start)


def default_sigma(nodes: np.ndarray) -> float:
    """Broadening: 1/200 of the spectral range (adds at most 0.4% of the range to W1)."""
    span = float(np.max(nodes) - np.min(nodes))
    return max(span, 1e-12 * max(1.0, float(np.max(np.abs(nodes))))) / 200.0


def spectral_density(
    nodes: np.ndarray,
    weights: np.ndarray,
    *,
    grid: np.ndarray | None = None,
    num_points: int = 1024,
    sigma: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-broadened density of the averaged quadrature measure.

    Args:
        nodes: ``(P, m)`` nodes.
        weights: ``(P, m)`` weights, rows summing to 1.
        grid: evaluation points; default ``num_points`` points spanning the nodes +- 5 sigma.
        num_points: size of the default grid.
        sigma: Gaussian width; default :func:`default_sigma`.

    Returns:
        ``(grid, density)``; the density is normalised to integrate to 1 on the grid
        (trapezoid rule).
    """
    nodes = np.atleast_2d(np.asarray(nodes, dtype=np.float64))
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if nodes.shape != weights.shape:
        raise ValueError(
            f"nodes and weights must have the same shape; got {nodes.shape} and {weights.shape}"
        )
    s = default_sigma(nodes) if sigma is None else float(sigma)
    if not s > 0:
        raise ValueError(f"sigma must be > 0; got {sigma!r}")
    if grid is None:
        if num_points < 2:
            raise ValueError(f"num_points must be >= 2; got {num_points}")
        grid = np.linspace(nodes.min() - 5 * s, nodes.max() + 5 * s, num_points)
    grid = np.asarray(grid, dtype=np.float64)
    x, w = nodes.ravel(), weights.ravel() / nodes.shape[0]
    keep = w > 0
    x, w = x[keep], w[keep]
    density = np.zeros_like(grid)
    for start in range(0, len(x), 256):  # bounded memory: grid x 256 at a time
        z = (grid[:, None] - x[None, start : start + 256]) / s
        density += np.exp(-0.5 * z * z) @ w[start : start + 256]
    density /= s * np.sqrt(2 * np.pi)
    total = np.trapezoid(density, grid)
    if total > 0:
        density /= total
    return grid, density


def pooled_measure(nodes: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The probe-averaged quadrature as one discrete measure (sorted nodes, weights sum to 1)."""
    x = np.asarray(nodes, dtype=np.float64).ravel()
    w = np.asarray(weights, dtype=np.float64).ravel() / np.atleast_2d(nodes).shape[0]
    order = np.argsort(x)
    return x[order], w[order]


def quadrature_error(nodes: np.ndarray, weights: np.ndarray) -> float:
    """Bound on the Wasserstein-1 distance between the quadrature rules and the probes' measures.

    Chebyshev-Markov-Stieltjes: the distribution function of a probe's spectral measure passes
    through every step of its Gauss rule, so between nodes ``x_j`` and ``x_{j+1}`` the two
    distribution functions differ by at most ``max(w_j, w_{j+1})``; integrating gives
    ``sum_j (x_{j+1} - x_j) max(w_j, w_{j+1})`` plus the two ends (to the extreme nodes of all
    probes, estimates of the spectrum's ends). Averaged over the probes (W1 is convex).
    """
    nodes = np.atleast_2d(np.asarray(nodes, dtype=np.float64))
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    lo, hi = float(nodes.min()), float(nodes.max())
    total = 0.0
    for x, w in zip(nodes, weights, strict=True):
        keep = w > 0
        x, w = x[keep], w[keep]
        order = np.argsort(x)
        x, w = x[order], w[order]
        inner = np.sum(np.diff(x) * np.maximum(w[:-1], w[1:])) if len(x) > 1 else 0.0
        total += inner + (x[0] - lo) * w[0] + (hi - x[-1]) * w[-1]
    return total / nodes.shape[0]


def sampling_error(nodes: np.ndarray, weights: np.ndarray, dim: int) -> float:
    """Expected Wasserstein-1 error of averaging ``P`` Rademacher probes' measures.

    For a Rademacher probe ``z`` (``||z||^2 = D``) the weight below ``x`` is ``z^T P_x z / D``
    with ``P_x`` the spectral projector; its variance is at most ``2 min(F, 1 - F) / D``
    (``F(x) = rank(P_x) / D``). By Jensen the expected W1 of the average of ``P`` probes is at
    most ``int sqrt(2 min(F, 1 - F) / (D P)) dx``, evaluated on the pooled quadrature's ``F``.
    """
    x, w = pooled_measure(nodes, weights)
    F = np.cumsum(w)[:-1]
    var = 2.0 * np.minimum(F, 1.0 - F).clip(min=0.0) / (dim * np.atleast_2d(nodes).shape[0])
    return float(np.sum(np.diff(x) * np.sqrt(var)))


def density_error(nodes: np.ndarray, weights: np.ndarray, dim: int) -> tuple[float, float, float]:
    """``(quadrature error, sampling error, spectral range)`` of SLQ rules, in eigenvalue units
    (:func:`quadrature_error`, :func:`sampling_error`, extreme nodes' distance)."""
    span = float(np.max(nodes) - np.min(nodes))
    return quadrature_error(nodes, weights), sampling_error(nodes, weights, dim), span
