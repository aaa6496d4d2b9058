"""Embeddings of point clouds: diffusion maps of trajectories, InPCA of predictions, and the
trajectory geometry logged beside them.

numpy/scipy/pynndescent/torch only: no Lightning, no TensorBoard. The prediction store moved to
:mod:`lightning_landscape.sampling`; its names still resolve here with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any

from .diffusion import (
    Alignment,
    DiffusionMap,
    DisconnectedGraphError,
    align_to,
    diffusion_map,
    nystrom_extend,
)
from .geometry import (
    GeometryTracker,
    TrajectoryGeometry,
    flat_parameters,
    linear_path_losses,
    loss_at_weights,
    loss_barrier,
    mode_connectivity,
)
from .inpca import (
    InPCA,
    bhattacharyya_distances,
    cross_bhattacharyya_distances,
    inpca,
    progress_coordinate,
)
from .joint import JointInPCA, joint_inpca, resolve_runs
from .prediction_trajectory import (
    PredictionSummary,
    PredictionTrajectory,
    ProbePredictions,
    gather_predictions,
    predict_shard,
)

__all__ = [
    "Alignment",
    "DiffusionMap",
    "DisconnectedGraphError",
    "GeometryTracker",
    "InPCA",
    "JointInPCA",
    "PredictionSummary",
    "PredictionTrajectory",
    "ProbePredictions",
    "TrajectoryGeometry",
    "align_to",
    "bhattacharyya_distances",
    "cross_bhattacharyya_distances",
    "diffusion_map",
    "flat_parameters",
    "gather_predictions",
    "inpca",
    "joint_inpca",
    "linear_path_losses",
    "loss_at_weights",
    "loss_barrier",
    "mode_connectivity",
    "nystrom_extend",
    "predict_shard",
    "progress_coordinate",
    "resolve_runs",
]


def __getattr__(name: str) -> Any:
    # The prediction store's names moved to lightning_landscape.sampling.predictions.
    from ..sampling import predictions

    if name in predictions.__all__:
        warnings.warn(
            f"lightning_landscape.embeddings.{name} moved to "
            f"lightning_landscape.sampling.predictions.{name}; the old path will be removed in a "
            "future release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(predictions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
