"""TensorBoard output of the diffusion-map monitor: its figure, histogram, projector and layout.

Built on ``matplotlib.figure.Figure`` with the Agg canvas (never pyplot); matplotlib is imported
when a figure is made.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from .figures import fixed_margins, write_figure
from .layout import Layout
from .projector import write_projector_embedding
from .writer import missing_tensorboard

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "diffusion_layout",
    "diffusion_scalars",
    "trajectory_figure",
    "write_diffusion_embedding",
]


def diffusion_layout(prefix: str = "landscape/diffusion") -> Layout:
    """Charts for the diffusion monitor's scalars.

    Matches ``<prefix>/eigenvalue_01``…, ``intrinsic_dim``, ``epsilon``, ``num_samples``,
    ``num_components``, ``seconds`` and ``skipped``.

    Raises:
        ValueError: If ``prefix`` is empty.
    """
    if not isinstance(prefix, str) or not prefix.strip("/"):
        raise ValueError(f"prefix must be a non-empty tag prefix, got {prefix!r}")
    prefix = prefix.rstrip("/")
    p = re.escape(prefix)
    charts = {
        "diffusion eigenvalues (Markov operator, trivial 1 excluded)": [rf"{p}/eigenvalue_\d+$"],
        "intrinsic dimension (Berry-Giannakis-Harlim)": [rf"{p}/intrinsic_dim$"],
        "kernel bandwidth ε": [rf"{p}/epsilon$"],
        "samples embedded / graph components": [rf"{p}/num_samples$", rf"{p}/num_components$"],
        "cost: seconds per measurement": [rf"{p}/seconds$"],
        "skipped measurements": [rf"{p}/skipped$"],
    }
    return {prefix.replace("/", ": "): charts}


def trajectory_figure(
    coordinates: ArrayLike,
    steps: ArrayLike,
    eigenvalues: ArrayLike,
    *,
    title: str | None = None,
) -> Figure:
    """Two panels: the first two diffusion coordinates coloured by step, and the spectrum.

    Left: ψ₁ against ψ₂ (ψ₁ against step when there is one coordinate), points joined in step
    order and coloured by step (colour bar). Right: the decay rates −log λₖ of the eigenvalues
    relative to the first, on a log scale, beside the ratios k² of a one-dimensional curve (a flat
    start means repeated eigenvalues: more than one dimension).

    Args:
        coordinates: (n, k) diffusion coordinates, k >= 1; rows with NaN are left out.
        steps: (n,) step of each row.
        eigenvalues: (k,) eigenvalues, descending.
        title: optional figure title.

    Raises:
        ValueError: On mismatched shapes or no finite row.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    C = np.asarray(coordinates, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64).ravel()
    lam = np.asarray(eigenvalues, dtype=np.float64).ravel()
    if C.ndim != 2 or C.shape[0] != s.size or C.shape[1] < 1 or lam.size != C.shape[1]:
        raise ValueError(
            "coordinates must be (n, k) with n = len(steps) and k = len(eigenvalues) >= 1; got "
            f"coordinates {C.shape}, steps {s.shape}, eigenvalues {lam.shape}"
        )
    ok = np.all(np.isfinite(C), axis=1)
    if not ok.any():
        raise ValueError("coordinates must have at least one finite row")
    C, s = C[ok], s[ok]
    order = np.argsort(s, kind="stable")
    C, s = C[order], s[order]

    fig = Figure(figsize=(10.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=[1.3, 1.0])
    x, y = (C[:, 0], C[:, 1]) if C.shape[1] >= 2 else (s, C[:, 0])
    left.plot(x, y, color="0.75", linewidth=0.6, zorder=1)
    points = left.scatter(x, y, c=s, cmap="viridis", s=10, zorder=2)
    fig.colorbar(points, ax=left, label="optimizer step")
    left.set_xlabel("diffusion coordinate 1" if C.shape[1] >= 2 else "step")
    left.set_ylabel("diffusion coordinate 2" if C.shape[1] >= 2 else "diffusion coordinate 1")
    left.set_title("trajectory in diffusion coordinates")
    left.grid(True, alpha=0.3)

    valid = (lam > 0) & (lam < 1)
    index = np.arange(1, lam.size + 1)
    if valid.any():
        rates = -np.log(lam[valid])
        right.semilogy(index[valid], rates / rates[0], "o-", color="tab:blue", label="measured")
        # A one-dimensional curve (segment) has ratios k²: the reference for "SGD moves on a
        # curve"; a flatter spectrum means more dimensions.
        right.semilogy(index, index**2.0, ":", color="0.4", label="k² (a curve)")
        right.legend(loc="upper left", fontsize="small")
        right.set_ylabel("−log λₖ / −log λ₁ (log scale)")
    right.set_xticks(index)
    right.set_xlabel("k")
    right.set_title("diffusion spectrum (decay rates)")
    right.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title)
    fixed_margins(fig, left=0.08, bottom=0.11, wspace=0.22, titled=bool(title))
    return fig


def write_diffusion_embedding(
    writer: SummaryWriter | Any | None,
    step: int,
    eigenvalues: ArrayLike,
    coordinates: ArrayLike,
    steps: ArrayLike,
    *,
    prefix: str = "landscape/diffusion",
    histogram: bool = True,
    figure: bool = True,
    projector: Mapping[str, Sequence[Any]] | None = None,
    any_logger: bool = True,
) -> bool:
    """Write one diffusion map of a trajectory: histogram, figure and projector embedding.

    Tags: histogram ``<prefix>/eigenvalues`` (the eigenvalues, automatic bins), image
    ``<prefix>/trajectory`` (:func:`trajectory_figure`) and projector embedding
    ``<prefix>/coordinates``. The projector is files, not events: pass ``projector`` only at
    epoch ends and at the end of fit.

    Args:
        writer: The run's ``SummaryWriter``; None (no TensorBoardLogger) writes nothing and
            warns once if anything was asked for.
        step: Step the embedding describes.
        eigenvalues: (k,) eigenvalues, descending.
        coordinates: (n, k) diffusion coordinates of the samples.
        steps: (n,) step of each sample.
        prefix: Tag prefix.
        histogram: Write the eigenvalue histogram.
        figure: Write the trajectory figure.
        projector: Metadata columns (e.g. step, epoch, loss; one value per sample) to write the
            coordinates to the projector with; None writes no projector embedding.
        any_logger: whether the trainer has any logger (the notice without a writer says
            whether the scalars are recorded at all).

    Returns:
        Whether ``writer`` was there (so what was asked for is written).
    """
    if writer is None:
        if histogram or figure or projector is not None:
            missing_tensorboard(
                "diffusion-no-tensorboard",
                "DiffusionMapMonitor",
                "the histogram, figure and projector embedding",
                any_logger=any_logger,
            )
        return False
    if histogram:
        writer.add_histogram(f"{prefix}/eigenvalues", eigenvalues, global_step=step, bins="auto")
    if figure:
        fig = trajectory_figure(
            coordinates, steps, eigenvalues, title=f"diffusion map at step {step}"
        )
        write_figure(writer, f"{prefix}/trajectory", fig, step)
    if projector is not None:
        write_projector_embedding(
            writer, f"{prefix}/coordinates", coordinates, projector, global_step=step
        )
    return True


def diffusion_scalars(result: Any, num_samples: int) -> dict[str, float]:
    """The scalars of one embedding: ``eigenvalue_NN``, ``intrinsic_dim``, ``epsilon``,
    ``num_samples``, ``num_components`` (a :class:`~lightning_landscape.DiffusionMap`)."""
    values = {f"eigenvalue_{i:02d}": float(v) for i, v in enumerate(result.eigenvalues, 1)}
    values.update(intrinsic_dim=float(result.intrinsic_dim), epsilon=float(result.epsilon))
    values.update(num_samples=float(num_samples), num_components=float(result.num_components))
    return values
