"""Numerical core: operators, Lanczos, quadrature, trace, outlier split, per-sample gradients and
their covariance, class structure. No Lightning imports."""

from .class_structure import (
    ClassStructure,
    GaussNewtonOperator,
    class_structure,
    gradient_overlap,
    principal_angles,
)
from .covariance import (
    CovarianceOperator,
    GradientCovariance,
    gradient_covariance,
    per_sample_gradients,
)
from .lanczos import LanczosResult, lanczos, lanczos_memory
from .operators import HessianOperator, HVPFailedError, MatrixOperator
from .outliers import OutlierSplit, split_outliers
from .slq import QuadratureResult, slq, spectral_density
from .spectrum import HessianSpectrum, hessian_spectrum, parameter_groups
from .trace import TraceEstimate, hutchinson_trace, hutchpp_trace

__all__ = [
    "ClassStructure",
    "CovarianceOperator",
    "GaussNewtonOperator",
    "GradientCovariance",
    "HVPFailedError",
    "HessianOperator",
    "HessianSpectrum",
    "LanczosResult",
    "MatrixOperator",
    "OutlierSplit",
    "QuadratureResult",
    "TraceEstimate",
    "class_structure",
    "gradient_covariance",
    "gradient_overlap",
    "hessian_spectrum",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "lanczos_memory",
    "parameter_groups",
    "per_sample_gradients",
    "principal_angles",
    "slq",
    "spectral_density",
    "split_outliers",
]
