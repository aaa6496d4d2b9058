"""Dashboard parts of the gradient-covariance monitor: its custom-scalars layout and figure."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .layout import Layout

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["class_structure_figure", "gradient_layout"]


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
    fig.tight_layout()
    return fig
