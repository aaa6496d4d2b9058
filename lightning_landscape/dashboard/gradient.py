"""Dashboard parts of the gradient-covariance monitor: everything it logs
(:func:`log_gradient_covariance`), its custom-scalars layout and its class-structure figure."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .axis import SpectrumAxis
from .figures import fixed_margins, write_figure
from .histogram import HISTOGRAM_SIGMA, spectrum_axis_markdown, write_spectrum_histogram
from .layout import Layout
from .text import write_text
from .writer import missing_tensorboard, tensorboard_writer

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..linalg import ClassStructure, GradientCovariance, HessianAlignment, TrainingNoise

__all__ = ["class_structure_figure", "gradient_layout", "log_gradient_covariance"]


def log_gradient_covariance(
    trainer: Any,
    step: int,
    *,
    covariance: GradientCovariance | None = None,
    alignment: HessianAlignment | None = None,
    class_structure: ClassStructure | None = None,
    training_noise: TrainingNoise | None = None,
    prefix: str = "landscape/gradient",
    axis: SpectrumAxis | None = None,
    log_histogram: bool = True,
) -> SpectrumAxis | None:
    """Log what :class:`~lightning_landscape.GradientCovarianceMonitor` measured at ``step``.

    Scalars (see the monitor's "Logged metrics") go to every logger in ``trainer.loggers``; the
    spectrum histogram, its axis card and the class-structure figure to the first
    ``TensorBoardLogger`` only (one warning when there is none).

    Args:
        trainer: a Lightning ``Trainer`` (``loggers``, ``global_rank``).
        step: the step axis value, ``trainer.global_step``.
        covariance: a probe measurement.
        alignment: its comparison with the Hessian's top eigenvectors.
        class_structure: the class structure measured with it.
        training_noise: the training-step signal.
        prefix: tag prefix.
        axis: the signed-log axis of earlier histograms; None: fixed now from the top
            eigenvalue (and its text card written).
        log_histogram: write the spectrum histogram.

    Returns:
        The axis to pass next time (None until a histogram was written).
    """
    values = _scalars(covariance, alignment, class_structure, training_noise)
    metrics = {f"{prefix}/{k}": float(v) for k, v in values.items()}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    if covariance is None or not (log_histogram or class_structure is not None):
        return axis
    writer = tensorboard_writer(trainer)
    if writer is None:
        missing_tensorboard(
            "gradient-no-tensorboard",
            "GradientCovarianceMonitor",
            "the spectrum histogram and figure",
            any_logger=bool(trainer.loggers),
        )
        return axis
    if class_structure is not None:
        fig = class_structure_figure(
            class_structure.hessian_eigenvalues,
            class_structure.ggn_eigenvalues,
            class_structure.between_class_eigenvalues,
            title=f"Hessian outliers and class structure at step {step}",
        )
        write_figure(writer, f"{prefix}/class_structure", fig, step)
    if log_histogram:
        axis = _write_spectrum(writer, prefix, covariance, axis, step)
    return axis


def _scalars(
    cov: GradientCovariance | None,
    alignment: HessianAlignment | None,
    cs: ClassStructure | None,
    noise: TrainingNoise | None,
) -> dict[str, float]:
    """The scalars of one call of :func:`log_gradient_covariance`, by tag suffix."""
    values: dict[str, float] = {}
    if cov is not None:
        values["trace"] = cov.trace
        values["mean_gradient_norm"] = cov.mean_gradient_norm
        values["noise_scale"] = cov.noise_scale
        values["noise_scale_unbiased"] = cov.noise_scale_unbiased
        values["num_samples"] = float(cov.num_samples)
        for i, lam in enumerate(cov.eigenvalues, 1):
            values[f"eigenvalue_{i:02d}"] = float(lam)
    if alignment is not None and len(alignment.overlap):
        values["hessian_overlap"] = float(alignment.overlap[-1])
        values["hessian_overlap_01"] = float(alignment.overlap[0])
    if alignment is not None and alignment.principal_angles is not None:
        for i, a in enumerate(alignment.principal_angles, 1):
            values[f"principal_angle_{i:02d}"] = float(a)
    if cs is not None:
        for i in range(len(cs.hessian_eigenvalues)):
            values[f"ggn_eigenvalue_{i + 1:02d}"] = float(cs.ggn_eigenvalues[i])
            values[f"between_class_share_{i + 1:02d}"] = float(cs.between_class_share[i])
            values[f"between_class_rayleigh_share_{i + 1:02d}"] = float(
                cs.between_class_rayleigh_share[i]
            )
    if noise is not None:
        values["train_grad_norm_sq"] = noise.grad_norm_sq
        values["train_nonfinite_steps"] = float(noise.num_nonfinite_steps)
        for name in (
            "grad_norm_sq_local",
            "trace_two_batch",
            "noise_scale_two_batch",
            "noise_scale",
            "noise_scale_unbiased",
        ):
            if getattr(noise, name) is not None:
                values[f"train_{name}"] = getattr(noise, name)
    return values


def _write_spectrum(
    writer: Any, prefix: str, cov: GradientCovariance, axis: SpectrumAxis | None, step: int
) -> SpectrumAxis:
    """The top-k eigenvalues (each of weight 1/D) and the other D - k lumped at 0, on the
    signed-log axis (fixed, with its text card, at the first call)."""
    lam = np.clip(cov.eigenvalues, 0.0, None)
    if axis is None:
        axis = SpectrumAxis.for_spectrum(float(lam[0]))
        write_text(writer, f"{prefix}/spectrum_axis", spectrum_axis_markdown(axis))
    D = cov.num_params
    k = len(lam)
    nodes = np.concatenate([lam, [0.0]])
    weights = np.concatenate([np.full(k, 1.0 / D), [max(0.0, 1.0 - k / D)]])
    weights = weights / weights.sum()
    write_spectrum_histogram(
        writer,
        f"{prefix}/spectrum_signed_log",
        nodes,
        weights,
        dim=D,
        axis=axis,
        step=step,
        sigma=HISTOGRAM_SIGMA,
    )
    return axis


def gradient_layout(prefix: str = "landscape/gradient") -> Layout:
    """Charts for :class:`~lightning_landscape.GradientCovarianceMonitor`'s scalars.

    Matches ``<prefix>/eigenvalue_01``…, ``trace``, ``mean_gradient_norm``, ``noise_scale``,
    ``noise_scale_unbiased``, ``train_noise_scale``, ``train_noise_scale_unbiased``,
    ``train_grad_norm_sq``, ``hessian_overlap``…, ``principal_angle_01``…, ``ggn_eigenvalue_01``…,
    ``between_class_share_01``…, ``between_class_rayleigh_share_01``…, ``num_samples``,
    ``seconds``, ``skipped``, ``train_nonfinite_steps``.

    Args:
        prefix: Tag prefix of the monitor.

    Returns:
        ``{"landscape: gradient": {chart_title: [tag_regex, ...]}}``.

    Raises:
        ValueError: If ``prefix`` is empty.
    """
    if not isinstance(prefix, str) or not prefix.strip("/"):
        raise ValueError(f"prefix must be a non-empty tag prefix, got {prefix!r}")
    prefix = prefix.rstrip("/")
    p = re.escape(prefix)
    charts: dict[str, list[str]] = {
        "covariance: top eigenvalues": [rf"{p}/eigenvalue_\d+$"],
        "covariance: trace": [rf"{p}/trace$"],
        "noise scale B = tr Σ / |g|² (probe set, training steps)": [
            rf"{p}/noise_scale$",
            rf"{p}/noise_scale_unbiased$",
            rf"{p}/train_noise_scale$",
            rf"{p}/train_noise_scale_unbiased$",
            rf"{p}/train_noise_scale_two_batch$",
        ],
        "training-step gradient noise: tr Σ from two batch sizes (DDP)": [
            rf"{p}/train_trace_two_batch$"
        ],
        "gradient norm: |mean probe gradient|, EMA of |training gradient|²": [
            rf"{p}/mean_gradient_norm$",
            rf"{p}/train_grad_norm_sq$",
            rf"{p}/train_grad_norm_sq_local$",
        ],
        "gradient share in the top Hessian subspace": [rf"{p}/hessian_overlap(_\d+)?$"],
        "principal angles: covariance vs Hessian top subspaces (degrees)": [
            rf"{p}/principal_angle_\d+$"
        ],
        "GGN top eigenvalues": [rf"{p}/ggn_eigenvalue_\d+$"],
        "between-class share of Hessian eigenvalues": [
            rf"{p}/between_class_share_\d+$",
            rf"{p}/between_class_rayleigh_share_\d+$",
        ],
        "probe samples N": [rf"{p}/num_samples$"],
        "cost: seconds per measurement": [rf"{p}/seconds$"],
        "skipped measurements, non-finite training steps": [
            rf"{p}/skipped$",
            rf"{p}/train_nonfinite_steps$",
        ],
    }
    return {prefix.replace("/", ": "): charts}


def class_structure_figure(
    hessian: Sequence[float] | np.ndarray,
    ggn: Sequence[float] | np.ndarray,
    between_class: Sequence[float] | np.ndarray,
    *,
    title: str | None = None,
) -> Figure:
    """Top eigenvalues of the Hessian, the Gauss–Newton term and its between-class part.

    One panel, eigenvalue index on x, eigenvalue on a log y-scale (non-positive values are left
    out): how much of each Hessian outlier the GGN and the class means explain.

    Args:
        hessian: top Hessian eigenvalues, descending.
        ggn: top GGN eigenvalues, descending.
        between_class: top eigenvalues of the between-class part, descending.
        title: optional figure title.

    Returns:
        A ``matplotlib.figure.Figure`` (Agg canvas, not registered with pyplot).

    Raises:
        ValueError: If an input is empty or not finite.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = {}
    for name, values in (("hessian", hessian), ("ggn", ggn), ("between_class", between_class)):
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if arr.size == 0 or not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be a non-empty finite 1-D array; got {arr!r}")
        series[name] = arr
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = {
        "hessian": ("Hessian", "o-", "C3"),
        "ggn": ("Gauss–Newton G", "s--", "C0"),
        "between_class": ("between-class part of G", "^:", "C2"),
    }
    for name, arr in series.items():
        label, fmt, color = styles[name]
        idx = np.arange(1, arr.size + 1)
        keep = arr > 0
        ax.plot(idx[keep], arr[keep], fmt, color=color, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("index k")
    ax.set_ylabel("eigenvalue λ_k")
    ax.legend(loc="upper right", fontsize="small")
    if title:
        ax.set_title(title)
    fixed_margins(fig, left=0.13, bottom=0.12, wspace=0.2, titled=False, right=0.97)
    return fig
