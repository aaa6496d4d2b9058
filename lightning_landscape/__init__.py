"""lightning_landscape: watch the loss-landscape geometry of training from PyTorch Lightning.

Every estimator is a plain function on any ``nn.Module``; the callbacks run them periodically
during ``Trainer.fit`` and log to TensorBoard. The callbacks (and ``write_joint_inpca``) are
imported lazily, so that ``lightning_landscape.linalg`` works without importing Lightning or
TensorBoard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .embeddings import (
    DiffusionMap,
    InPCA,
    JointInPCA,
    bhattacharyya_distances,
    diffusion_map,
    inpca,
    joint_inpca,
    resolve_runs,
)
from .linalg import (
    ClassStructure,
    GradientCovariance,
    GradientNoiseTracker,
    HessianSpectrum,
    TrainingNoise,
    class_structure,
    gradient_covariance,
    hessian_spectrum,
    per_sample_gradients,
)

if TYPE_CHECKING:
    from .callbacks import (
        DiffusionMapMonitor,
        GradientCovarianceMonitor,
        HessianSpectrumMonitor,
        InPCAMonitor,
    )
    from .dashboard import write_joint_inpca

__version__ = "0.1.0.dev0"

__all__ = [
    "ClassStructure",
    "DiffusionMap",
    "DiffusionMapMonitor",
    "GradientCovariance",
    "GradientCovarianceMonitor",
    "GradientNoiseTracker",
    "HessianSpectrum",
    "HessianSpectrumMonitor",
    "InPCA",
    "InPCAMonitor",
    "JointInPCA",
    "TrainingNoise",
    "__version__",
    "bhattacharyya_distances",
    "class_structure",
    "diffusion_map",
    "gradient_covariance",
    "hessian_spectrum",
    "inpca",
    "joint_inpca",
    "per_sample_gradients",
    "resolve_runs",
    "write_joint_inpca",
]

_LAZY = {
    "DiffusionMapMonitor": ".callbacks",
    "HessianSpectrumMonitor": ".callbacks",
    "GradientCovarianceMonitor": ".callbacks",
    "InPCAMonitor": ".callbacks",
    # Writes TensorBoard files: imported on first use, like the callbacks.
    "write_joint_inpca": ".dashboard",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
