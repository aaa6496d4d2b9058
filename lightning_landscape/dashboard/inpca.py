"""TensorBoard output of InPCA: everything ``InPCAMonitor`` logs, trajectory figures, the
custom-scalars layout, joint runs.

matplotlib is imported when a figure is made; nothing here imports Lightning at import time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from .figures import fixed_margins, write_figure
from .layout import Layout, write_custom_scalars_layout
from .projector import write_projector_embedding
from .text import write_text
from .writer import missing_tensorboard, tensorboard_writer

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..embeddings.geometry import TrajectoryGeometry
    from ..embeddings.joint import JointInPCA
    from ..embeddings.prediction_trajectory import PredictionSummary

__all__ = ["inpca_layout", "log_inpca", "trajectory_figure", "write_joint_inpca"]


def _trajectory_points(
    coordinates: ArrayLike, groups: ArrayLike | None, steps: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(n, 3)`` coordinates (missing dimensions zero), group index and step of each point."""
    xyz = np.asarray(coordinates, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[0] == 0 or xyz.shape[1] == 0:
        raise ValueError(f"coordinates must be a non-empty (n, k) array; got shape {xyz.shape}")
    n = xyz.shape[0]
    if xyz.shape[1] < 3:
        xyz = np.hstack([xyz, np.zeros((n, 3 - xyz.shape[1]))])
    g = np.zeros(n, dtype=int) if groups is None else np.asarray(groups).astype(int)
    s = np.arange(n) if steps is None else np.asarray(steps)
    if g.shape != (n,) or s.shape != (n,):
        raise ValueError(f"groups and steps must have one entry per point ({n})")
    return xyz, g, s


def trajectory_figure(
    coordinates: ArrayLike,
    *,
    groups: ArrayLike | None = None,
    group_names: Sequence[str] | None = None,
    steps: ArrayLike | None = None,
    eigenvalues: ArrayLike | None = None,
    explained_stress: float | None = None,
    title: str | None = None,
) -> Figure:
    """Trajectories in the top 3 InPCA dimensions: a 3-D view and the (1, 2) and (1, 3) planes.

    Points of one group (run) are joined in step order; the start is a circle, the end a star.
    Axis labels carry the eigenvalue and say "imaginary" for negative ones.

    Args:
        coordinates: (n, k) coordinates, k ≥ 1 (missing dimensions are drawn as zeros).
        groups: (n,) group index of each point (default: one group).
        group_names: Legend label of each group.
        steps: (n,) step of each point (orders the points of a group; default: row order).
        eigenvalues: Signed eigenvalues of the shown dimensions (for the axis labels).
        explained_stress: Shown in the title.
        title: Figure title.

    Returns:
        A ``matplotlib.figure.Figure`` (Agg canvas, not registered with pyplot).

    Raises:
        ValueError: If ``coordinates`` is not a non-empty 2-D array or ``groups``/``steps``
            do not have one entry per point.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xyz, g, s = _trajectory_points(coordinates, groups, steps)
    lam = None if eigenvalues is None else np.asarray(eigenvalues, dtype=np.float64)

    def label(i: int) -> str:
        if lam is None or i >= lam.size:
            return f"InPCA {i + 1}"
        kind = " (imaginary)" if lam[i] < 0 else ""
        return f"InPCA {i + 1}{kind}, λ={lam[i]:.3g}"

    fig = Figure(figsize=(13, 4.2))
    FigureCanvasAgg(fig)
    ax3 = fig.add_subplot(1, 3, 1, projection="3d")
    ax12 = fig.add_subplot(1, 3, 2)
    ax13 = fig.add_subplot(1, 3, 3)
    colors = [f"C{i % 10}" for i in range(int(g.max()) + 1)]
    for k in np.unique(g):
        idx = np.flatnonzero(g == k)
        idx = idx[np.argsort(s[idx], kind="stable")]
        name = group_names[k] if group_names is not None and k < len(group_names) else None
        c = colors[k]
        p = xyz[idx]
        ax3.plot(p[:, 0], p[:, 1], p[:, 2], "-", color=c, linewidth=1, label=name)
        ax3.scatter(p[:1, 0], p[:1, 1], p[:1, 2], color=c, marker="o", s=25)
        ax3.scatter(p[-1:, 0], p[-1:, 1], p[-1:, 2], color=c, marker="*", s=60)
        for ax, j in ((ax12, 1), (ax13, 2)):
            ax.plot(p[:, 0], p[:, j], "-", color=c, linewidth=1, marker=".", markersize=3)
            ax.plot(p[:1, 0], p[:1, j], "o", color=c)
            ax.plot(p[-1:, 0], p[-1:, j], "*", color=c, markersize=10)
    ax3.set_xlabel("1")
    ax3.set_ylabel("2")
    ax3.set_zlabel("3")
    ax12.set_xlabel(label(0))
    ax12.set_ylabel(label(1))
    ax13.set_xlabel(label(0))
    ax13.set_ylabel(label(2))
    if group_names is not None and len(group_names) > 1:
        ax3.legend(loc="upper left", fontsize=7)
    text = title or "InPCA trajectory (top 3 dimensions)"
    if explained_stress is not None:
        text += f" — explained stress {explained_stress:.1%}"
    fig.suptitle(text)
    fixed_margins(fig, left=0.03, bottom=0.12, wspace=0.25, titled=True)
    return fig


def inpca_layout(
    prefix: str = "landscape/inpca", geometry_prefix: str = "landscape/geometry"
) -> Layout:
    """Custom-scalars charts of the InPCA monitor and the trajectory geometry.

    Args:
        prefix: Tag prefix of the InPCA scalars.
        geometry_prefix: Tag prefix of the geometry scalars.

    Returns:
        ``{category: {chart_title: [tag_regex, ...]}}``.
    """
    p, q = re.escape(prefix.rstrip("/")), re.escape(geometry_prefix.rstrip("/"))
    return {
        prefix.rstrip("/").replace("/", ": "): {
            "explained stress of the top k dims": [rf"{p}/explained_stress_top\d+$"],
            "imaginary dimensions among the top k": [rf"{p}/n_imaginary$"],
            "progress to the labels (0 = init, 1 = truth)": [rf"{p}/progress$"],
            "probe loss / accuracy": [rf"{p}/probe_loss$", rf"{p}/probe_accuracy$"],
            "cost: seconds per measurement": [rf"{p}/seconds$"],
            "skipped measurements": [rf"{p}/skipped$"],
        },
        geometry_prefix.rstrip("/").replace("/", ": "): {
            "distance from initialisation": [rf"{q}/distance_from_init$"],
            "cosine between successive updates": [rf"{q}/cosine_successive_updates$"],
            "mode connectivity mc (< 0: barrier)": [rf"{q}/mc_\w+$"],
            "loss barrier on the linear path": [rf"{q}/barrier_\w+$"],
        },
    }


def write_joint_inpca(writer: Any, result: JointInPCA, *, tag: str = "inpca_joint") -> None:
    """Write a joint embedding as a run of its own: scalars, projector, figure, summary card.

    Scalars: ``<tag>/explained_stress_top<k>`` (x axis = k) and ``<tag>/eigenvalue`` (x axis =
    rank, signed); projector ``<tag>/coordinates`` with columns run, step, epoch, loss,
    progress; image ``<tag>/trajectories``; text ``<tag>/summary``.

    Args:
        writer: A ``torch.utils.tensorboard.SummaryWriter`` for the output run.
        result: From :func:`~lightning_landscape.embeddings.joint.joint_inpca`.
        tag: Tag prefix.
    """
    emb = result.embedding
    k = emb.coordinates.shape[1]
    for i, value in enumerate(emb.explained_stress_cumulative, 1):
        writer.add_scalar(f"{tag}/explained_stress", float(value), global_step=i)
    for i, value in enumerate(emb.eigenvalues[: max(k, 10)], 1):
        writer.add_scalar(f"{tag}/eigenvalue", float(value), global_step=i)
    writer.add_scalar(f"{tag}/n_imaginary", float(emb.n_imaginary), global_step=k)
    run_names = [result.names[r] for r in result.run]
    write_projector_embedding(
        writer,
        f"{tag}/coordinates",
        emb.coordinates,
        {
            "run": run_names,
            "step": result.step.tolist(),
            "epoch": result.epoch.tolist(),
            "loss": result.loss.tolist(),
            "progress": result.progress.tolist(),
        },
        global_step=0,
    )
    fig = trajectory_figure(
        emb.coordinates,
        groups=result.run,
        group_names=result.names,
        steps=result.step,
        eigenvalues=emb.eigenvalues[:3],
        explained_stress=float(emb.explained_stress_cumulative[min(3, k) - 1]),
        title=f"Joint InPCA of {len(result.names)} runs",
    )
    write_figure(writer, f"{tag}/trajectories", fig, 0)
    rows = "\n".join(
        f"| {name} | {int(np.sum(result.run == i))} |" for i, name in enumerate(result.names)
    )
    stress = ", ".join(
        f"top {i}: {v:.1%}" for i, v in enumerate(emb.explained_stress_cumulative, 1)
    )
    write_text(
        writer,
        f"{tag}/summary",
        f"Joint InPCA of {len(result.names)} runs, {result.run.size} checkpoints.\n\n"
        f"Explained stress: {stress}. Imaginary dimensions among the top {k}: "
        f"{emb.n_imaginary}.\n\n| run | checkpoints |\n|---|---|\n{rows}\n",
    )
    write_custom_scalars_layout(
        writer,
        {
            tag: {
                "explained stress vs number of dims": [rf"{re.escape(tag)}/explained_stress$"],
                "signed eigenvalues by rank": [rf"{re.escape(tag)}/eigenvalue$"],
            }
        },
    )
    writer.flush()


def _log_metrics(trainer: Any, prefix: str, values: Mapping[str, float], step: int) -> None:
    metrics = {f"{prefix}/{k}": float(v) for k, v in values.items()}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def _geometry_scalars(geometry: TrajectoryGeometry) -> dict[str, float]:
    values = {"distance_from_init": geometry.distance_from_init}
    if geometry.cosine_successive_updates is not None:
        values["cosine_successive_updates"] = geometry.cosine_successive_updates
    for anchor, mc in geometry.mode_connectivity.items():
        values[f"mc_{anchor}"] = mc
        values[f"barrier_{anchor}"] = geometry.barrier[anchor]
    return values


def _prediction_scalars(summary: PredictionSummary) -> dict[str, float]:
    values = {
        "num_checkpoints": float(summary.num_checkpoints),
        "probe_loss": summary.probe_loss,
        "probe_accuracy": summary.probe_accuracy,
        "progress": summary.progress,
    }
    if summary.embedding is not None:
        for i, v in enumerate(summary.embedding.explained_stress_cumulative, 1):
            values[f"explained_stress_top{i}"] = float(v)
        values["n_imaginary"] = float(summary.embedding.n_imaginary)
    return values


def _write_embedding(
    writer: Any, prefix: str, summary: PredictionSummary, step: int, projector: bool, figure: bool
) -> None:
    emb = summary.embedding
    assert emb is not None
    n, k = emb.coordinates.shape
    steps = summary.steps[:n]
    if projector:
        metadata = {
            "step": steps.tolist(),
            "epoch": summary.epochs[:n].tolist(),
            "loss": summary.losses[:n].tolist(),
        }
        write_projector_embedding(
            writer, f"{prefix}/coordinates", emb.coordinates, metadata, global_step=step
        )
    if figure:
        fig = trajectory_figure(
            emb.coordinates,
            steps=steps,
            eigenvalues=emb.eigenvalues[: min(3, k)],
            explained_stress=float(emb.explained_stress_cumulative[min(3, k) - 1]),
            title=f"InPCA trajectory up to step {step}",
        )
        write_figure(writer, f"{prefix}/trajectory", fig, step)


def log_inpca(
    trainer: Any,
    step: int,
    *,
    geometry: TrajectoryGeometry | None = None,
    predictions: PredictionSummary | None = None,
    embedding: PredictionSummary | None = None,
    projector: bool = True,
    figure: bool = True,
    prefix: str = "landscape/inpca",
    geometry_prefix: str = "landscape/geometry",
) -> bool:
    """Everything ``InPCAMonitor`` logs at ``step`` (call on global rank 0).

    Scalars go to every logger in ``trainer.loggers``: ``geometry`` as
    ``<geometry_prefix>/distance_from_init``, ``cosine_successive_updates``, ``mc_<anchor>``,
    ``barrier_<anchor>``; ``predictions`` as ``<prefix>/num_checkpoints``, ``probe_loss``,
    ``probe_accuracy``, ``progress``, ``explained_stress_top<k>``, ``n_imaginary``. The
    ``embedding`` goes to a TensorBoardLogger only (files, not events: pass it at epoch ends and
    at the end of fit): projector ``<prefix>/coordinates`` (columns step, epoch, loss) and image
    ``<prefix>/trajectory`` (top 3 dimensions).

    Args:
        trainer: A Lightning ``Trainer`` (its ``loggers``; its TensorBoard writer).
        step: Step axis value (``trainer.global_step``).
        geometry: Trajectory geometry of this measurement.
        predictions: Prediction trajectory after this measurement.
        embedding: Trajectory whose embedding (not None) is written to the projector and figure.
        projector: Write the projector embedding.
        figure: Write the trajectory figure.
        prefix: Tag prefix of the InPCA scalars.
        geometry_prefix: Tag prefix of the geometry scalars.

    Returns:
        False when an ``embedding`` was to be written and no TensorBoardLogger was found (one
        warning per process), else True.
    """
    if geometry is not None:
        _log_metrics(trainer, geometry_prefix, _geometry_scalars(geometry), step)
    if predictions is not None:
        _log_metrics(trainer, prefix, _prediction_scalars(predictions), step)
    if embedding is None or embedding.embedding is None or not (projector or figure):
        return True
    writer = tensorboard_writer(trainer)
    if writer is None:
        missing_tensorboard(
            "inpca-no-tensorboard",
            "InPCAMonitor",
            "the projector embedding and the trajectory figure",
            any_logger=bool(trainer.loggers),
        )
        return False
    _write_embedding(writer, prefix, embedding, step, projector, figure)
    return True
