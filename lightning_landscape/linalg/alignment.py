r"""How the gradient statistics sit in the top Hessian subspace.

Gur-Ari, Roberts & Dyer (2018, "Gradient Descent Happens in a Tiny Subspace", arXiv 1812.04754)
find that the gradient lies mostly in the span of the top Hessian eigenvectors; Sagun et al.
(2017) link the Hessian outliers to the gradient covariance. :func:`hessian_alignment` measures
both for a :func:`~lightning_landscape.gradient_covariance` result: the share of
:math:`\|\bar g\|^2` in the top-k Hessian span and the principal angles between the top
covariance and Hessian subspaces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from .class_structure import gradient_overlap, principal_angles
from .covariance import GradientCovariance

__all__ = ["HessianAlignment", "hessian_alignment"]


@dataclass(frozen=True, eq=False)
class HessianAlignment:
    """How the gradient statistics sit in the top Hessian subspace.

    Attributes:
        overlap: cumulative shares of :math:`\\|\\bar g\\|^2` in the span of the first
            ``1, ..., k`` Hessian eigenvectors (Gur-Ari et al. 2018), in [0, 1].
        principal_angles: principal angles in degrees, ascending, between the covariance's
            top eigenvectors of non-zero eigenvalue and the Hessian's; None when Σ is 0.
    """

    overlap: np.ndarray
    principal_angles: np.ndarray | None


def hessian_alignment(covariance: GradientCovariance, eigenvectors: Tensor) -> HessianAlignment:
    """Compare a :func:`gradient_covariance` result with top Hessian eigenvectors.

    Args:
        covariance: a result with ``return_eigenvectors=True`` (it needs :math:`\\bar g` and
            the covariance eigenvectors).
        eigenvectors: ``(k, D)`` orthonormal Hessian eigenvectors as rows.

    Returns:
        :class:`HessianAlignment`. Cost: ``O((k + top_k)^2 D)``, no gradient evaluation.

    Raises:
        ValueError: if ``covariance`` holds no eigenvectors or gradient.
    """
    if covariance.gradient is None or covariance.eigenvectors is None:
        raise ValueError(
            "covariance must come from gradient_covariance(..., return_eigenvectors=True); "
            "got a result without eigenvectors or gradient"
        )
    V = eigenvectors.to(device=covariance.gradient.device)
    overlap = gradient_overlap(V, covariance.gradient, cumulative=True)
    nonzero = covariance.eigenvectors[covariance.eigenvalues > 0]
    angles = None
    if nonzero.shape[0] > 0:
        angles = np.degrees(principal_angles(nonzero, V))
    return HessianAlignment(overlap=np.asarray(overlap), principal_angles=angles)
