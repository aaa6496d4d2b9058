"""Numerical core: operators, Lanczos, quadrature, trace, outlier split. No Lightning imports."""

from .lanczos import LanczosResult, lanczos
from .operators import HessianOperator, HVPFailedError, MatrixOperator
from .outliers import OutlierSplit, split_outliers
from .slq import QuadratureResult, slq, spectral_density
from .spectrum import HessianSpectrum, hessian_spectrum, parameter_groups
from .trace import TraceEstimate, hutchinson_trace, hutchpp_trace

__all__ = [
    "HVPFailedError",
    "HessianOperator",
    "HessianSpectrum",
    "LanczosResult",
    "MatrixOperator",
    "OutlierSplit",
    "QuadratureResult",
    "TraceEstimate",
    "hessian_spectrum",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "parameter_groups",
    "slq",
    "spectral_density",
    "split_outliers",
]
