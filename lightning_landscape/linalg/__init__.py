"""Numerical core: operators, Lanczos, quadrature, trace, outlier split, per-sample gradients and
their covariance, the gradient noise scale, class structure. No Lightning imports."""

from .alignment import HessianAlignment, hessian_alignment
from .class_structure import (
    ClassStructure,
    GaussNewtonOperator,
    class_structure,
    gradient_overlap,
    principal_angles,
)
from .covariance import CovarianceOperator, GradientCovariance, gradient_covariance
from .lanczos import LanczosResult, lanczos, lanczos_memory
from .noise_scale import (
    GradientNoiseTracker,
    NoiseScale,
    TrainingNoise,
    TwoBatchEstimate,
    noise_scale,
    two_batch_estimate,
)
from .operators import HessianOperator, HVPFailedError, MatrixOperator
from .outliers import OutlierSplit, split_outliers
from .per_sample import per_sample_gradients
from .slq import QuadratureResult, slq, spectral_density
from .spectrum import HessianSpectrum, hessian_spectrum, parameter_groups
from .trace import TraceEstimate, hutchinson_trace, hutchpp_trace

__all__ = [
    "ClassStructure",
    "CovarianceOperator",
    "GaussNewtonOperator",
    "GradientCovariance",
    "GradientNoiseTracker",
    "HVPFailedError",
    "HessianAlignment",
    "HessianOperator",
    "HessianSpectrum",
    "LanczosResult",
    "MatrixOperator",
    "NoiseScale",
    "OutlierSplit",
    "QuadratureResult",
    "TraceEstimate",
    "TrainingNoise",
    "TwoBatchEstimate",
    "class_structure",
    "gradient_covariance",
    "gradient_overlap",
    "hessian_alignment",
    "hessian_spectrum",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "lanczos_memory",
    "noise_scale",
    "parameter_groups",
    "per_sample_gradients",
    "principal_angles",
    "slq",
    "spectral_density",
    "split_outliers",
    "two_batch_estimate",
]
