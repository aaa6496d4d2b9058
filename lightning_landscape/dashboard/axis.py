r"""Signed-log axis for eigenvalue spectra.

A Hessian spectrum is a bulk of thousands of eigenvalues within a hair of zero plus a few outliers
orders of magnitude larger, of either sign. On a linear axis the histogram dashboard shows one spike
at zero (``docs/science.md``, "Signed-log axis", shows both side by side). The signed-log map

.. math::

    x = \operatorname{sign}(\lambda)\,\log_{10}\bigl(1 + |\lambda| / \tau\bigr)

is linear (slope :math:`1/(\tau \ln 10)`) for :math:`|\lambda| \ll \tau` and logarithmic beyond,
one unit of :math:`x` per decade, so the bulk, its sign structure and the outliers share one axis.
This is the symmetric-log ("symlog") transform, with a smooth rather than piecewise join.

For the histogram dashboard to compare steps, :math:`\tau` and the bin edges must stay fixed for
the whole run: :class:`SpectrumAxis` holds both and is checkpointed with the callback state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lightning_landscape._checks import check_int, check_positive_float

__all__ = ["SpectrumAxis", "inverse_signed_log", "signed_log"]


def _check_tau(tau: float) -> float:
    return check_positive_float("tau", tau)


def signed_log(x: ArrayLike, tau: float) -> np.ndarray:
    """Map eigenvalues to signed-log units, ``sign(x) * log10(1 + |x| / tau)``.

    Args:
        x: Values (any shape).
        tau: Linear-to-log crossover scale, ``tau > 0``.

    Returns:
        Array of the same shape as ``x`` (float64), odd and strictly increasing in ``x``.

    Raises:
        ValueError: If ``tau`` is not finite and positive.
    """
    tau = _check_tau(tau)
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.log1p(np.abs(x) / tau) / np.log(10.0)


def inverse_signed_log(y: ArrayLike, tau: float) -> np.ndarray:
    """Inverse of :func:`signed_log`, ``sign(y) * tau * (10**|y| - 1)``.

    Args:
        y: Values in signed-log units (any shape).
        tau: The crossover scale used by :func:`signed_log`, ``tau > 0``.

    Returns:
        Array of the same shape as ``y`` (float64).

    Raises:
        ValueError: If ``tau`` is not finite and positive.
    """
    tau = _check_tau(tau)
    y = np.asarray(y, dtype=np.float64)
    return np.sign(y) * tau * np.expm1(np.abs(y) * np.log(10.0))


@dataclass(frozen=True, eq=False)
class SpectrumAxis:
    """Fixed signed-log axis (crossover scale and bin edges) for one run's spectrum histograms.

    Attributes:
        tau: Crossover scale of :func:`signed_log`, in eigenvalue units, ``tau > 0``.
        edges: Bin edges in signed-log units, 1-D, strictly increasing, at least two (read-only).
    """

    tau: float
    edges: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", _check_tau(self.tau))
        edges = np.array(self.edges, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 2:
            raise ValueError(
                f"edges must be a 1-D array of at least 2 bin edges; got shape {edges.shape}"
            )
        if not np.all(np.isfinite(edges)):
            raise ValueError(f"edges must be finite; got {edges.tolist()!r}")
        if not np.all(np.diff(edges) > 0):
            raise ValueError(f"edges must be strictly increasing; got {edges.tolist()!r}")
        edges.setflags(write=False)
        object.__setattr__(self, "edges", edges)

    @classmethod
    def for_spectrum(
        cls,
        lambda_abs_max: float,
        *,
        tau_fraction: float = 1e-3,
        num_bins: int = 321,
        half_width: float = 8.0,
    ) -> SpectrumAxis:
        """Axis for a run whose first measured spectrum reaches ``|λ| = lambda_abs_max``.

        ``tau = tau_fraction * lambda_abs_max``: eigenvalues below ``tau`` in magnitude (the bulk)
        are resolved linearly, the rest one bin row per ``half_width * 2 / num_bins`` decades. The
        edges are ``num_bins`` equal bins over ``[-half_width, half_width]`` signed-log units; with
        the defaults (bin width ≈ 0.05) the axis reaches ``|λ| ≈ 1e8 * tau = 1e5 * lambda_abs_max``,
        room for the top eigenvalue to grow ~10⁴-fold during training. ``num_bins`` is odd by
        default so that one bin is centred on ``λ = 0``, where the bulk peaks.

        Args:
            lambda_abs_max: Largest eigenvalue magnitude of the first spectrum, ``>= 0``. When it
                is 0 (nothing known about the scale), the scale 1 is used: ``tau = tau_fraction``.
            tau_fraction: ``tau`` relative to ``lambda_abs_max``, ``> 0``.
            num_bins: Number of bins, ``>= 1``.
            half_width: Half-width of the axis in signed-log units (decades), ``> 0``.

        Returns:
            The axis; keep it for the whole run (checkpoint it with :meth:`to_dict`).

        Raises:
            ValueError: If an argument is out of range (the message names it and its value).
        """
        try:
            scale = float(lambda_abs_max)
        except (TypeError, ValueError):
            raise ValueError(
                f"lambda_abs_max must be a finite number >= 0; got {lambda_abs_max!r}"
            ) from None
        if not math.isfinite(scale) or scale < 0.0:
            raise ValueError(f"lambda_abs_max must be a finite number >= 0; got {lambda_abs_max!r}")
        fraction = check_positive_float("tau_fraction", tau_fraction)
        num_bins = check_int("num_bins", num_bins, minimum=1)
        width = check_positive_float("half_width", half_width)
        tau = fraction * scale
        if tau <= 0.0 or not math.isfinite(tau):
            # lambda_abs_max == 0 (or an underflow): no scale information, assume unit scale.
            tau = fraction
        return cls(tau=tau, edges=np.linspace(-width, width, int(num_bins) + 1))

    @property
    def lambda_limit(self) -> float:
        """Largest ``|λ|`` inside the axis; beyond it the histogram piles mass into the end bins."""
        return float(inverse_signed_log(min(-self.edges[0], self.edges[-1]), self.tau))

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (floats and lists) for checkpoints; inverse of :meth:`from_dict`."""
        return {"tau": float(self.tau), "edges": [float(e) for e in self.edges]}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> SpectrumAxis:
        """Rebuild an axis saved with :meth:`to_dict`.

        Raises:
            ValueError: If ``state`` lacks ``"tau"`` or ``"edges"`` or they are invalid.
        """
        missing = [key for key in ("tau", "edges") if key not in state]
        if missing:
            raise ValueError(
                f"state must contain the keys 'tau' and 'edges', missing {missing} in {state!r}"
            )
        return cls(tau=state["tau"], edges=np.asarray(state["edges"], dtype=np.float64))
