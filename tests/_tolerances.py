"""The one place where numerical tolerances come from (docs/design.md, "Tests").

Everything is a multiple of ``torch.finfo(dtype).eps`` so the same test reads the same in float32
and float64. Tolerances are relative: multiply by the natural scale (``||A||``, ``||A|| ||v||``).
Statistical targets (the acceptance numbers of docs/science.md, such as W1/range <= 0.02) are
not rounding tolerances and live in the tests that check them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerances:
    eps: float
    matvec: float  # ||H v - H_ref v|| / (||H_ref|| ||v||): products built in a different order
    eig: float  # |theta - lambda| / |lambda| for a converged Ritz value
    ortho: float  # max |V V^T - I| for returned Ritz vectors
    slack: float  # per sqrt(dim): rounding of one operator application, relative to ||H||

    def rounding(self, dim: int) -> float:
        """Relative perturbation of the operator by rounding (||E|| / ||H||) in this dtype."""
        return self.slack * math.sqrt(dim)


def tolerances(dtype: torch.dtype) -> Tolerances:
    eps = torch.finfo(dtype).eps
    return Tolerances(
        eps=eps,
        matvec=2.0e5 * eps,  # float64: 4.4e-11
        eig=5.0e5 * eps,  # float64: 1.1e-10
        ortho=1.0e4 * eps,  # float64: 2.2e-12
        slack=16.0 * eps,  # float32: ~1.9e-6 per sqrt(dim)
    )
