"""Thin Lightning callbacks: schedule, probe batches, rank handling, state. No mathematics."""

from .gradient import GradientCovarianceMonitor
from .hessian import HessianSpectrumMonitor
from .inpca import InPCAMonitor

__all__ = ["GradientCovarianceMonitor", "HessianSpectrumMonitor", "InPCAMonitor"]
