r"""Spectrum histograms for TensorBoard's histogram dashboard, on a fixed signed-log axis.

The input is a stochastic-Lanczos-quadrature (SLQ) estimate of the spectral measure (Golub &
Meurant; Ghorbani, Krishnan & Xiao 2019, arXiv 1901.10159): for each of :math:`P` probes,
:math:`m` nodes :math:`\theta_{pj}` (Ritz values) with weights :math:`w_{pj}` summing to one. The
expected number of eigenvalues in bin :math:`[a_i, a_{i+1})` of the signed-log axis :math:`s` is

.. math::

    n_i = \frac{d}{P} \sum_{p=1}^{P} \sum_{j=1}^{m} w_{pj}\,
          \Bigl[\Phi\Bigl(\frac{a_{i+1} - s(\theta_{pj})}{\sigma}\Bigr)
              - \Phi\Bigl(\frac{a_i - s(\theta_{pj})}{\sigma}\Bigr)\Bigr],

with :math:`d` the dimension and :math:`\Phi` the standard normal CDF: each node is broadened by a
Gaussian of width :math:`\sigma` *in signed-log units*, so the display smoothing is uniform across
the displayed axis, and the bins are integrated exactly. Mass beyond the axis is folded into the two
end bins, so :math:`\sum_i n_i = d`.

The value written for each bucket is :math:`\log_{10}(1 + n_i)`, not :math:`n_i`: the bulk holds
thousands to millions of eigenvalues and an outlier holds one, so on a count scale the outliers
would be invisible beside the bulk. On the log-count scale an isolated eigenvalue (total count 1,
spread by the broadening over about three bins) peaks at :math:`\log_{10}(1 + 0.38) \approx 0.14`
with the defaults (:math:`\sigma` = bin width = 0.05) and at up to
:math:`\log_{10}(1 + 0.79) \approx 0.25` with :math:`\sigma = 0.02`, beside a bulk at 3 to 6.
TensorBoard's *Distributions* tab reads the same buckets as counts and is therefore not
meaningful for these tags.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import ndtr
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.histogram import metadata as _histogram_metadata
from tensorboard.util import tensor_util

from lightning_landscape._checks import check_int, check_nonempty_str, check_positive_float
from lightning_landscape.dashboard.axis import SpectrumAxis, inverse_signed_log, signed_log

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "spectrum_axis_markdown",
    "spectrum_histogram",
    "write_spectrum_histogram",
]

#: Display broadening of the monitors' spectrum histograms, in signed-log decades.
HISTOGRAM_SIGMA = 0.02

# Row sums of SLQ weights are squared first components of an orthonormal eigenvector matrix;
# in float32 they are 1 to ~m * 6e-8. The check catches wrong inputs, not rounding.
_ROW_SUM_ATOL = 1e-4
# Bins at the ends of the axis holding fewer eigenvalues than this are trimmed (Gaussian tails).
_EMPTY_COUNT = 1e-3


def _as_measure(nodes: ArrayLike, weights: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate SLQ nodes and weights and return them as float64 arrays of shape (P, m)."""
    nodes_arr = np.array(nodes, dtype=np.float64)
    weights_arr = np.array(weights, dtype=np.float64)
    if nodes_arr.ndim == 1:
        nodes_arr = nodes_arr[None, :]
    if weights_arr.ndim == 1:
        weights_arr = weights_arr[None, :]
    if nodes_arr.ndim != 2:
        raise ValueError(
            f"nodes must have shape (P, m) (or (m,) for one probe); got shape {nodes_arr.shape}"
        )
    if nodes_arr.shape != weights_arr.shape:
        raise ValueError(
            "nodes and weights must have the same shape (P, m); got nodes "
            f"{nodes_arr.shape} and weights {weights_arr.shape}"
        )
    if nodes_arr.size == 0:
        raise ValueError(f"nodes must hold at least one node; got shape {nodes_arr.shape}")
    if not np.all(np.isfinite(nodes_arr)):
        raise ValueError(f"nodes must be finite; got {nodes_arr.tolist()!r}")
    if not np.all(np.isfinite(weights_arr)) or np.any(weights_arr < 0):
        raise ValueError(f"weights must be finite and >= 0; got {weights_arr.tolist()!r}")
    row_sums = weights_arr.sum(axis=1)
    if np.any(np.abs(row_sums - 1.0) > _ROW_SUM_ATOL):
        raise ValueError(
            f"each row of weights must sum to 1 (|sum - 1| <= {_ROW_SUM_ATOL:g}); "
            f"got row sums {row_sums.tolist()!r}"
        )
    return nodes_arr, weights_arr


def _check_dim(dim: int) -> int:
    return check_int("dim", dim, minimum=1, what="1 (the matrix dimension)")


def _check_sigma(sigma: float) -> float:
    return check_positive_float("sigma", sigma)


def _check_axis(axis: SpectrumAxis) -> SpectrumAxis:
    if not isinstance(axis, SpectrumAxis):
        raise TypeError(f"axis must be a SpectrumAxis; got {type(axis).__name__}")
    return axis


def _bin_counts(
    nodes: np.ndarray, weights: np.ndarray, *, dim: int, axis: SpectrumAxis, sigma: float
) -> np.ndarray:
    """Expected eigenvalue count per bin of ``axis`` (all bins, end bins take the tails)."""
    positions = signed_log(nodes, axis.tau)  # (P, m)
    inner = axis.edges[1:-1]
    cdf = ndtr((inner[None, None, :] - positions[:, :, None]) / sigma)  # (P, m, B - 1)
    shape = (*positions.shape, 1)
    cdf = np.concatenate([np.zeros(shape), cdf, np.ones(shape)], axis=2)
    mass = np.diff(cdf, axis=2)  # (P, m, B)
    return dim * np.einsum("pm,pmb->b", weights, mass) / positions.shape[0]


def spectrum_histogram(
    nodes: ArrayLike,
    weights: ArrayLike,
    *,
    dim: int,
    axis: SpectrumAxis,
    sigma: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-count histogram of an SLQ spectral measure on the run's fixed signed-log axis.

    See the module docstring for the formula. Costs :math:`O(P m B)` for :math:`B` bins; no
    matrix products.

    Args:
        nodes: Ritz values, shape ``(P, m)`` (``P`` probes, ``m`` Lanczos steps) or ``(m,)``.
        weights: Quadrature weights of the same shape, each row non-negative and summing to 1.
        dim: Matrix dimension (number of eigenvalues), ``>= 1``; the counts sum to ``dim``.
        axis: The run's fixed axis (``tau`` and bin edges).
        sigma: Gaussian broadening in signed-log units, ``> 0``.

    Returns:
        ``(edges, values)``: a contiguous slice of ``axis.edges`` (``n + 1`` edges) and the ``n``
        bucket values ``log10(1 + count)``. Empty bins (count below 1e-3) at the two ends are
        dropped so that TensorBoard does not stretch its axis over them; inner empty bins stay.

    Raises:
        ValueError: If the shapes differ, a weight row does not sum to 1, a value is not finite,
            ``dim < 1`` or ``sigma <= 0``.
        TypeError: If ``axis`` is not a :class:`SpectrumAxis`.
    """
    nodes_arr, weights_arr = _as_measure(nodes, weights)
    dim = _check_dim(dim)
    axis = _check_axis(axis)
    sigma = _check_sigma(sigma)
    counts = _bin_counts(nodes_arr, weights_arr, dim=dim, axis=axis, sigma=sigma)
    occupied = np.flatnonzero(counts >= _EMPTY_COUNT)
    # The counts sum to dim >= 1, so at least one of at most B bins holds >= 1/B > _EMPTY_COUNT
    # unless B > 1000; fall back to the fullest bin then.
    first, last = (occupied[0], occupied[-1]) if occupied.size else (np.argmax(counts),) * 2
    edges = axis.edges[first : last + 2].copy()
    values = np.log1p(counts[first : last + 1]) / np.log(10.0)
    return edges, values


def _format_lambda(value: float) -> str:
    return f"{value:.3g}"


def spectrum_axis_markdown(axis: SpectrumAxis) -> str:
    """Markdown card that explains the signed-log axis of the spectrum histograms.

    Meant for :func:`~lightning_landscape.dashboard.write_text`, once per run: the formula, the
    inverse and a table translating axis ticks into eigenvalues.

    Args:
        axis: The run's fixed axis.

    Returns:
        Markdown text.
    """
    axis = _check_axis(axis)
    top = math.floor(float(min(-axis.edges[0], axis.edges[-1])))
    ticks = list(range(top + 1))
    lambdas = inverse_signed_log(np.asarray(ticks, dtype=np.float64), axis.tau)
    rows = "\n".join(
        f"| ±{tick} | ±{_format_lambda(lam)} |" for tick, lam in zip(ticks, lambdas, strict=True)
    )
    return (
        "### Spectrum histograms: how to read the axes\n\n"
        f"**x (signed-log eigenvalue)**: x = sign(λ)·log10(1 + |λ|/τ) with τ = "
        f"{axis.tau:.4g}, fixed for the run. Linear for |λ| below τ (the bulk), one unit per "
        "decade above it (the outliers); negative eigenvalues to the left. "
        "Inverse: λ = sign(x)·τ·(10^|x| − 1).\n\n"
        "**y (log count)**: log10(1 + estimated number of eigenvalues in the bin), a stochastic "
        "Lanczos quadrature estimate. y ≈ 0.1–0.3 is a single eigenvalue; y = 3 is ~1000.\n\n"
        f"| x | λ |\n|---|---|\n{rows}\n\n"
        f"Eigenvalues beyond |λ| = {_format_lambda(axis.lambda_limit)} are piled into the end "
        "bins."
    )


def _histogram_description(axis: SpectrumAxis, *, dim: int, num_probes: int, sigma: float) -> str:
    ticks = inverse_signed_log(np.arange(1.0, 5.0), axis.tau)
    tick_text = ", ".join(_format_lambda(t) for t in ticks)
    return (
        f"x: sign(λ)·log10(1+|λ|/τ), τ = {axis.tau:.4g} (linear below τ, one unit per decade "
        f"above; x = ±1, ±2, ±3, ±4 ↔ λ = ±{tick_text}; λ = sign(x)·τ·(10^|x| − 1)). "
        "y: log10(1 + number of eigenvalues in the bin), so a single outlier (y ≈ 0.1–0.3) "
        f"stays visible beside the bulk. SLQ estimate: dim = {dim}, {num_probes} probe(s), "
        f"Gaussian broadening σ = {sigma:g} in x units."
    )


def write_spectrum_histogram(
    writer: SummaryWriter | Any,
    tag: str,
    nodes: ArrayLike,
    weights: ArrayLike,
    *,
    dim: int,
    axis: SpectrumAxis,
    step: int,
    sigma: float = 0.05,
) -> None:
    """Write :func:`spectrum_histogram` to the histogram dashboard, with an axis description.

    The summary is a histogram-plugin tensor of shape ``(n, 3)``, rows ``[left edge, right edge,
    log10(1 + count)]`` in float64, with ``SummaryMetadata`` for the ``histograms`` plugin whose
    ``summary_description`` explains both axes (the info tooltip on the card). This is the
    format TensorBoard's own histogram summaries use today; it is chosen over the legacy
    ``HistogramProto`` of ``SummaryWriter.add_histogram_raw`` because TensorBoard's default
    (Rust, ``--load_fast``) loader drops the description of legacy histograms, while both
    loaders keep it here, and the edges arrive exactly. A writer without ``_get_file_writer``
    gets ``add_histogram_raw`` instead (same buckets, no description).

    Args:
        writer: A ``torch.utils.tensorboard.SummaryWriter`` (or an object with its methods).
        tag: Summary tag, e.g. ``"landscape/hessian/spectrum"``.
        nodes: Ritz values, shape ``(P, m)`` or ``(m,)``.
        weights: Quadrature weights, same shape, rows summing to 1.
        dim: Matrix dimension, ``>= 1``.
        axis: The run's fixed axis; pass the same one at every step.
        step: Global step.
        sigma: Gaussian broadening in signed-log units, ``> 0``.

    Raises:
        ValueError: As :func:`spectrum_histogram`, or if ``tag`` is empty.
    """
    check_nonempty_str("tag", tag)
    edges, values = spectrum_histogram(nodes, weights, dim=dim, axis=axis, sigma=sigma)
    step = int(step)
    if not hasattr(writer, "_get_file_writer"):
        centres = 0.5 * (edges[:-1] + edges[1:])
        writer.add_histogram_raw(
            tag,
            min=float(edges[0]),
            max=float(edges[-1]),
            num=float(values.sum()),
            sum=float(values @ centres),
            sum_squares=float(values @ centres**2),
            bucket_limits=edges[1:].tolist(),
            bucket_counts=values.tolist(),
            global_step=step,
        )
        return
    num_probes = np.atleast_2d(np.asarray(nodes)).shape[0]
    metadata = _histogram_metadata.create_summary_metadata(
        display_name=tag,
        description=_histogram_description(axis, dim=dim, num_probes=num_probes, sigma=sigma),
    )
    buckets = np.stack([edges[:-1], edges[1:], values], axis=1)
    tensor = tensor_util.make_tensor_proto(buckets)
    summary = Summary(value=[Summary.Value(tag=tag, tensor=tensor, metadata=metadata)])
    writer._get_file_writer().add_summary(summary, step)
