"""What :class:`~lightning_landscape.HessianSpectrumMonitor` logs: scalars, histogram, figure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .axis import SpectrumAxis
from .figures import spectrum_figure, write_figure
from .histogram import HISTOGRAM_SIGMA, spectrum_axis_markdown, write_spectrum_histogram
from .text import write_text
from .writer import missing_tensorboard, tensorboard_writer

if TYPE_CHECKING:
    from ..linalg import HessianSpectrum
    from ..linalg.sharpness import BatchSharpness

__all__ = ["batch_spread_scalars", "hessian_scalars", "log_hessian_spectrum"]


def hessian_scalars(result: HessianSpectrum) -> dict[str, float]:
    """The scalars of one measurement, by tag suffix (see the monitor's "Logged metrics").

    Raises:
        FloatingPointError: a top eigenvalue is not finite (the measurement is then skipped).
    """
    values: dict[str, float] = {"num_hvps": float(result.num_hvps)}
    values.update(_eigen_scalars("", result))
    if result.trace is not None:
        values["trace"] = result.trace
        values["trace_stderr"] = float(result.trace_stderr or 0.0)
    if result.lambda_min is not None:
        values["lambda_min"] = result.lambda_min
    if result.n_outliers is not None and result.bulk_edge is not None:
        values["n_outliers"] = float(result.n_outliers)
        values["bulk_edge"] = result.bulk_edge
        if result.bulk_edge > 0:
            values["ratio_max_over_bulk_edge"] = float(result.eigenvalues[0]) / result.bulk_edge
    if result.eigenvalues[-1] != 0:
        values["ratio_max_over_kth"] = float(result.eigenvalues[0] / result.eigenvalues[-1])
    if result.subspace_overlap is not None:
        values["subspace_overlap"] = float(result.subspace_overlap)
    for g, sub in (result.groups or {}).items():
        values.update(_eigen_scalars(f"{g}/", sub))
    return values


def batch_spread_scalars(spread: BatchSharpness) -> dict[str, float]:
    """The per-batch λ_max spread's scalars, by tag suffix.

    Raises:
        FloatingPointError: a per-batch top eigenvalue is not finite.
    """
    lam = spread.eigenvalues
    if not np.all(np.isfinite(lam)):
        raise FloatingPointError("a per-batch top eigenvalue is not finite")
    return {
        "lambda_max_batch_mean": float(lam.mean()),
        "lambda_max_batch_min": float(lam.min()),
        "lambda_max_batch_max": float(lam.max()),
        "lambda_max_batch_std": float(lam.std(ddof=1)),
        "lambda_max_batch_residual": float(spread.residuals.max()),
    }


def _eigen_scalars(prefix: str, result: HessianSpectrum) -> dict[str, float]:
    if not np.all(np.isfinite(result.eigenvalues)):
        raise FloatingPointError("non-finite eigenvalue")
    out = {}
    for i, (lam, res) in enumerate(zip(result.eigenvalues, result.residuals, strict=True), 1):
        out[f"{prefix}eigenvalue_{i:02d}"] = float(lam)
        out[f"{prefix}residual_{i:02d}"] = float(res)
    return out


def log_hessian_spectrum(
    trainer: Any,
    step: int,
    result: HessianSpectrum,
    *,
    prefix: str = "landscape/hessian",
    axis: SpectrumAxis | None = None,
    log_histogram: bool = True,
    log_figure: bool = True,
    extra: Mapping[str, float] | None = None,
) -> SpectrumAxis | None:
    """Log one measurement: scalars to every logger, histogram and figure to TensorBoard.

    Args:
        trainer: a Lightning ``Trainer`` (``loggers``, ``global_rank``).
        step: the step axis value, ``trainer.global_step``.
        result: the measurement.
        prefix: tag prefix.
        axis: the run's signed-log axis; None: fixed now from this spectrum (and its text card
            written).
        log_histogram: write the spectrum histogram.
        log_figure: write the density figure.
        extra: further scalars (e.g. the sharpness against the stability line).

    Returns:
        The axis to pass next time (None until one was fixed).
    """
    values = {**hessian_scalars(result), **(extra or {})}
    metrics = {f"{prefix}/{k}": float(v) for k, v in values.items()}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    writer = tensorboard_writer(trainer) if (log_histogram or log_figure) else None
    if writer is None:
        if log_histogram or log_figure:
            missing_tensorboard(
                "hessian-no-tensorboard",
                "HessianSpectrumMonitor",
                "the spectrum histogram and figure",
                any_logger=bool(trainer.loggers),
            )
        return axis
    if result.ritz_nodes is None or result.ritz_weights is None:
        return axis
    if axis is None:
        lam = max(abs(float(result.eigenvalues[0])), abs(result.lambda_min or 0.0))
        axis = SpectrumAxis.for_spectrum(lam)
        write_text(writer, f"{prefix}/spectrum_axis", spectrum_axis_markdown(axis))
    if log_histogram:
        write_spectrum_histogram(writer, f"{prefix}/spectrum_signed_log", result.ritz_nodes,
                                 result.ritz_weights, dim=result.num_params, axis=axis,
                                 step=step, sigma=HISTOGRAM_SIGMA)  # fmt: skip
    if log_figure and result.density is not None and result.density_grid is not None:
        fig = spectrum_figure(
            result.density_grid,
            result.density,
            eigenvalues=result.eigenvalues,
            residuals=result.residuals,
            n_outliers=min(result.n_outliers or 0, result.eigenvalues.size),
            bulk_edge=result.bulk_edge,
            title=f"Hessian spectrum at step {step}",
        )
        write_figure(writer, f"{prefix}/density", fig, step)
    return axis
