"""Thin Lightning callbacks: schedule, probe batches, rank handling, state. No mathematics."""

from .hessian import HessianSpectrumMonitor

__all__ = ["HessianSpectrumMonitor"]
