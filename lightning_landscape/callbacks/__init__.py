"""Thin Lightning callbacks: schedule, probe batches, rank handling, state. No mathematics."""

from .diffusion import DiffusionMapMonitor
from .gradient import GradientCovarianceMonitor
from .hessian import HessianSpectrumMonitor
from .inpca import InPCAMonitor

__all__ = [
    "DiffusionMapMonitor",
    "GradientCovarianceMonitor",
    "HessianSpectrumMonitor",
    "InPCAMonitor",
]
