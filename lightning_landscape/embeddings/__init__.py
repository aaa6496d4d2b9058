"""Embeddings of point clouds: diffusion maps of trajectories, InPCA of predictions.

numpy/scipy/pynndescent only: no Lightning, no TensorBoard.
"""

from .diffusion import (
    Alignment,
    DiffusionMap,
    DisconnectedGraphError,
    align_to,
    diffusion_map,
    nystrom_extend,
)
from .inpca import (
    InPCA,
    bhattacharyya_distances,
    cross_bhattacharyya_distances,
    inpca,
    mode_connectivity,
    progress_coordinate,
)
from .joint import JointInPCA, joint_inpca, resolve_runs
from .predictions import (
    FORMAT,
    FORMAT_VERSION,
    LoadedRuns,
    PredictionRecord,
    PredictionStore,
    ProbeMismatchError,
    find_stores,
    load_runs,
    sample_ids,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Alignment",
    "DiffusionMap",
    "DisconnectedGraphError",
    "InPCA",
    "JointInPCA",
    "LoadedRuns",
    "PredictionRecord",
    "PredictionStore",
    "ProbeMismatchError",
    "align_to",
    "bhattacharyya_distances",
    "cross_bhattacharyya_distances",
    "diffusion_map",
    "find_stores",
    "inpca",
    "joint_inpca",
    "load_runs",
    "mode_connectivity",
    "nystrom_extend",
    "progress_coordinate",
    "resolve_runs",
    "sample_ids",
]
