"""Sampling along training and what a run leaves on disk: parameter/gradient sketches, the
parameter trajectory store and the prediction store.

No Lightning, no TensorBoard.
"""

from .predictions import (
    LoadedRuns,
    PredictionRecord,
    PredictionStore,
    ProbeMismatchError,
    find_stores,
    load_runs,
    sample_ids,
)
from .sketch import ParameterSketch, sketch_distortion_bound
from .store import Trajectory, TrajectoryStore

__all__ = [
    "LoadedRuns",
    "ParameterSketch",
    "PredictionRecord",
    "PredictionStore",
    "ProbeMismatchError",
    "Trajectory",
    "TrajectoryStore",
    "find_stores",
    "load_runs",
    "sample_ids",
    "sketch_distortion_bound",
]
