"""Sampling along training: parameter/gradient sketches and the on-disk trajectory store.

No Lightning, no TensorBoard.
"""

from .sketch import ParameterSketch, sketch_distortion_bound
from .store import Trajectory, TrajectoryStore

__all__ = ["ParameterSketch", "Trajectory", "TrajectoryStore", "sketch_distortion_bound"]
