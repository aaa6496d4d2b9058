"""lightning_landscape: watch the loss-landscape geometry of training from PyTorch Lightning.

Every estimator is a plain function on any ``nn.Module``; the callbacks run them periodically
during ``Trainer.fit`` and log to TensorBoard.
"""

from .callbacks import HessianSpectrumMonitor
from .linalg import HessianSpectrum, hessian_spectrum

__version__ = "0.1.0.dev0"

__all__ = ["HessianSpectrum", "HessianSpectrumMonitor", "__version__", "hessian_spectrum"]
