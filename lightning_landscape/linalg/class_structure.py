r"""Class structure of the curvature (Papyan 2019/2020) and the gradient against it.

For cross-entropy with logits :math:`z_i`, probabilities :math:`p_i` and logit Jacobians
:math:`J_i`, the Hessian is :math:`H = G + \text{(second-order term)}` with the Gauss–Newton term

.. math::
    G = \frac1N \sum_i J_i^\top(\operatorname{diag} p_i - p_i p_i^\top)J_i
      = \frac1N \sum_i\sum_{c'} \delta_{i,c'}\delta_{i,c'}^\top, \qquad
    \delta_{i,c'} = J_i^\top(e_{c'} - p_i)\sqrt{p_{i,c'}}.

Papyan ("Measurements of Three-Level Hierarchical Structure in the Outliers in the Spectrum of
Deepnet Hessians", ICML 2019; "Traces of Class/Cross-Class Structure Pervade Deep Learning
Spectra", JMLR 2020) averages :math:`\delta_{i,c'}` over the samples of each true class
:math:`c`: the :math:`C^2` vectors :math:`\delta_{c,c'}`, weighted by :math:`\sqrt{n_c/N}`,
span the between-class part :math:`B = \sum_c \frac{n_c}{N}\sum_{c'}\delta_{c,c'}
\delta_{c,c'}^\top` of :math:`G`; their means over :math:`c'` give the :math:`C` class-level
vectors (his "C outliers"). :func:`class_structure` reports, for each top Hessian eigenvalue,
the share the between-class part explains, both :math:`\lambda_k(B)/\lambda_k(H)` and the
Rayleigh quotient :math:`v_k^\top B v_k/\lambda_k(H)`, and the top eigenvalues of :math:`G`
(Gauss–Newton-vector products: cheaper than Hessian-vector products, and :math:`G` is PSD).

Gur-Ari, Roberts & Dyer (2018, "Gradient Descent Happens in a Tiny Subspace", arXiv 1812.04754)
measure the share of the gradient's squared norm inside the span of the top-:math:`k` Hessian
eigenvectors, :math:`\|V_k^\top g\|^2 / \|g\|^2`; principal angles (Björck & Golub 1973) compare
two subspaces, e.g. the top covariance and top Hessian eigenvectors (Sagun et al. 2017 link the
Hessian outliers to the gradient covariance).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._checks import check_int, check_positive_int
from .covariance import OutputsFn, _batched_grad, _default_outputs, _flat
from .lanczos import lanczos
from .operators import (
    ReduceFn,
    _LinearOperator,
    _resolve_params,
    _working_copy,
    curvature_context,
    default_batch_size,
)
from .spectrum import hessian_spectrum

__all__ = [
    "ClassStructure",
    "GaussNewtonOperator",
    "class_structure",
    "gradient_overlap",
    "principal_angles",
]


#: Smallest eigenvalue of the rows' normalised Gram matrix (condition number of the rows at most
#: 1e3) for which :func:`_span` orthonormalises through it (Cholesky QR: one pass over ``D``,
#: errors about 1e-16 times the condition number squared); below it, Householder QR.
GRAM_MIN_EIGENVALUE = 1e-6


def _span(V: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """The span of the rows of ``V`` as orthonormal rows ``Q = F^-1 R`` (float64; ``F`` lower
    triangular, ``r x r``), and the index of the row of ``V`` each row of ``Q`` came from.

    Row ``i`` of ``Q`` is a combination of the rows of ``V`` up to its source, so the first rows
    of ``Q`` span the first rows of ``V`` (one factorisation serves every prefix); zero rows and
    rows dependent on earlier ones contribute none. Well-conditioned rows (the usual case:
    eigenvectors) are not orthonormalised at all: ``F`` is the Cholesky factor of ``V V^T`` and
    ``R = V``, and callers apply ``F^-1`` to ``k x k`` products only.
    """
    if not isinstance(V, Tensor) or V.dim() != 2 or V.shape[0] == 0:
        raise ValueError(f"{name} must be a 2-D tensor of row vectors (k, D); got {V!r:.80}")
    G = _products(V, V)
    norms = torch.sqrt(torch.diagonal(G))
    nonzero = torch.nonzero(norms > 0).flatten()
    if nonzero.numel() == 0:
        raise ValueError(f"{name} holds only zero rows")
    if nonzero.numel() < V.shape[0]:
        V, G = V[nonzero], G[nonzero][:, nonzero]
    d = norms[nonzero]
    if float(torch.linalg.eigvalsh(G / d[:, None] / d[None, :])[0]) > GRAM_MIN_EIGENVALUE:
        return torch.linalg.cholesky(G), V, nonzero
    V = V.double()
    Q, R = torch.linalg.qr(V.T)
    keep = torch.abs(torch.diagonal(R)) > V.shape[1] * torch.finfo(V.dtype).eps * norms.max()
    if not bool(keep.all()):
        # A dependent row's column of Q is arbitrary, yet later rows have components along it:
        # factor again without the dependent rows.
        V, nonzero = V[keep], nonzero[keep]
        Q = torch.linalg.qr(V.T).Q
    eye = torch.eye(Q.shape[1], dtype=Q.dtype, device=Q.device)
    return eye, Q.T, nonzero


#: Entries of the long dimension :func:`_products` upcasts at a time.
PRODUCT_CHUNK = 2**16


def _products(A: Tensor, B: Tensor) -> Tensor:
    """``A @ B^T`` in float64, exactly as float64 would give it, without a float64 copy of
    ``A`` or ``B``: rows of another dtype are upcast :data:`PRODUCT_CHUNK` entries at a time
    (float32 eigenvectors of 4.3M parameters: 0.16 s against 0.45 s for whole copies)."""
    if A.dtype == B.dtype == torch.float64:
        return A @ B.T
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64, device=A.device)
    for s in range(0, A.shape[1], PRODUCT_CHUNK):
        out += A[:, s : s + PRODUCT_CHUNK].double() @ B[:, s : s + PRODUCT_CHUNK].double().T
    return out


def _coefficients(F: Tensor, R: Tensor, X: Tensor) -> Tensor:
    """``Q X^T`` for ``Q = F^-1 R`` (:func:`_span`)."""
    return torch.linalg.solve_triangular(F, _products(R, X), upper=False)


def gradient_overlap(eigenvectors: Tensor, gradient: Tensor, *, cumulative: bool = False) -> Any:
    """Share of ``||g||^2`` inside the span of the rows of ``eigenvectors``.

    Args:
        eigenvectors: ``(k, D)`` rows spanning the subspace (orthonormalised here).
        gradient: ``(D,)`` vector.
        cumulative: return the shares of the spans of the first 1, 2, …, k rows instead (rows
            taken in the given order, e.g. by eigenvalue).

    Returns:
        A float in [0, 1] (NaN for a zero gradient), or a numpy array of ``k`` shares.

    Raises:
        ValueError: If the shapes do not match.
    """
    if not isinstance(gradient, Tensor) or gradient.dim() != 1:
        raise ValueError(f"gradient must be a 1-D tensor; got {type(gradient).__name__}")
    if not isinstance(eigenvectors, Tensor) or eigenvectors.dim() != 2:
        raise ValueError("eigenvectors must be a 2-D tensor of row vectors (k, D)")
    if eigenvectors.shape[1] != gradient.shape[0]:
        raise ValueError(
            f"eigenvectors rows have length {eigenvectors.shape[1]} but gradient has "
            f"length {gradient.shape[0]}"
        )
    g = gradient.to(eigenvectors.device)
    g2 = float(_products(g[None], g[None]))
    # One factorisation for every prefix: basis row i lies in the span of rows <= its source.
    F, R, source = _span(eigenvectors, "eigenvectors")
    parts = torch.zeros(eigenvectors.shape[0], dtype=torch.float64, device=R.device)
    parts[source] = _coefficients(F, R, g[None])[:, 0].pow(2)
    shares = np.cumsum(parts.cpu().numpy()) / g2 if g2 > 0 else np.full(len(parts), np.nan)
    return shares if cumulative else float(shares[-1])


def principal_angles(A: Tensor, B: Tensor) -> np.ndarray:
    """Principal angles (radians, ascending) between the row spaces of ``A`` and ``B``.

    ``cos θ_i`` are the singular values of ``Q_A Q_B^T`` for orthonormal bases of the two spans;
    there are ``min(rank A, rank B)`` angles. 0 means a shared direction, π/2 orthogonal.

    Raises:
        ValueError: If the row lengths differ.
    """
    if not isinstance(A, Tensor) or not isinstance(B, Tensor) or A.dim() != 2 or B.dim() != 2:
        raise ValueError("A and B must be 2-D tensors of row vectors")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"A and B rows must have the same length; got {A.shape[1]}, {B.shape[1]}")
    FA, RA, _ = _span(A, "A")
    FB, RB, _ = _span(B.to(A.device), "B")
    M = _coefficients(FA, RA, RB)  # Q_A R_B^T; then Q_A Q_B^T = M F_B^-T
    M = torch.linalg.solve_triangular(FB, M.T, upper=False).T
    s = torch.linalg.svdvals(M).clamp(0.0, 1.0).cpu().numpy()
    return np.sort(np.arccos(s))


# -- Gauss-Newton term and its class structure -----------------------------------------------


class GaussNewtonOperator(_LinearOperator):
    r"""The Gauss–Newton term of the mean cross-entropy, :math:`G = \frac1N\sum_i J_i^\top
    (\operatorname{diag}p_i - p_ip_i^\top) J_i`, as a linear operator.

    Each product is a batched Jacobian-vector product of the logits (double-backward trick
    through a retained graph), the softmax curvature applied per sample, and one batched
    vector-Jacobian product: about two backward passes over the probe batches. Memory: the
    retained graph of the logits of all probe batches (about a training step's activations,
    twice).

    Args:
        model: the network.
        batches: probe batches.
        outputs_fn: ``(model, batch) -> (logits, targets)``; default ``(model(batch[0]),
            batch[1])``.
        params: restrict to these parameters.
        reduce_fn: sum-all-reduce across data-parallel processes.
        batch_size_fn: samples per batch; default the length of the first tensor.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        *,
        outputs_fn: OutputsFn | None = None,
        params: Sequence[nn.Parameter] | None = None,
        reduce_fn: ReduceFn | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> None:
        batches = list(batches)
        if not batches:
            raise ValueError("batches must hold at least one batch; got an empty iterable")
        outputs_fn = outputs_fn or _default_outputs
        _, self.params = _resolve_params(model, params)
        if not self.params:
            raise ValueError("params: no trainable parameters (none has requires_grad=True)")
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.num_hvps = 0
        self._reduce = reduce_fn
        self._state: dict[str, bool] = {}
        size_fn = batch_size_fn or default_batch_size
        local = float(sum(int(size_fn(b)) for b in batches))
        total = torch.tensor([local], device=self.device)
        self.num_samples = int((reduce_fn(total) if reduce_fn else total).item())
        self.logits: list[Tensor] = []
        self.targets: list[Tensor] = []
        self.probs: list[Tensor] = []
        self._graphs: list[tuple[Tensor, Tensor, list[Tensor], list[int]]] = []
        with curvature_context(self.device):
            for batch in batches:
                z, y = outputs_fn(model, batch)
                if z.dim() != 2:
                    raise ValueError(
                        f"outputs_fn must return logits of shape (n, C); got {tuple(z.shape)}"
                    )
                u0 = torch.zeros_like(z, requires_grad=True)
                h = torch.autograd.grad(
                    z, self.params, grad_outputs=u0, create_graph=True, allow_unused=True
                )
                keep = [i for i, t in enumerate(h) if t is not None and t.requires_grad]
                self._graphs.append((z, u0, [h[i] for i in keep], keep))
                self.logits.append(z)
                self.targets.append(y)
                self.probs.append(torch.softmax(z.detach(), dim=1))

    def release(self) -> None:
        self._graphs = []

    def jvp(self, V: Tensor, b: int) -> Tensor:
        """``J v`` for the rows of ``V`` on batch ``b``: shape ``(B, n, C)``."""
        z, u0, h, keep = self._graphs[b]
        B = V.shape[0]
        if not h:
            return torch.zeros(B, *z.shape, dtype=V.dtype, device=V.device)
        offsets = np.cumsum([0] + [p.numel() for p in self.params])
        pieces = [V[:, offsets[i] : offsets[i + 1]].reshape(B, *self.params[i].shape) for i in keep]
        (Jv,) = _batched_grad(h, [u0], pieces, self._state)
        assert Jv is not None
        return Jv

    def vjp(self, U: Tensor, b: int) -> Tensor:
        """``J^T u`` for ``U`` of shape ``(B, n, C)`` on batch ``b``: shape ``(B, D)``."""
        z = self._graphs[b][0]
        res = _batched_grad([z], self.params, [U.to(z.dtype)], self._state)
        return _flat(res, self.params, U.shape[0])

    def _matmat(self, V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        with curvature_context(self.device):
            for b, p in enumerate(self.probs):
                Jv = self.jvp(V, b)
                M = p * Jv - p * (p * Jv).sum(dim=-1, keepdim=True)
                out += self.vjp(M, b).to(V.dtype)
        out /= self.num_samples
        return self._reduce(out) if self._reduce is not None else out


@dataclass(frozen=True, eq=False)
class ClassStructure:
    """Between-class part of the Gauss–Newton term against the top Hessian eigenvalues.

    Attributes:
        hessian_eigenvalues: top ``k`` Hessian eigenvalues (descending).
        ggn_eigenvalues: top ``k`` eigenvalues of the Gauss–Newton term ``G``.
        between_class_eigenvalues: top ``k`` eigenvalues of the between-class part ``B``
            (the ``C^2`` class-mean vectors; 0 beyond their rank).
        class_level_eigenvalues: the ``C`` eigenvalues of the class level (means over ``c'``).
        between_class_share: ``λ_k(B) / λ_k(H)`` for each ``k``.
        between_class_rayleigh_share: ``v_k^T B v_k / λ_k(H)`` at the Hessian's eigenvectors.
        ggn_share: ``λ_k(G) / λ_k(H)``.
        num_classes: ``C`` (the logits' width).
        classes: the classes the between-class part was built from (all unless subsampled).
        class_counts: samples per class over the probe set (all processes).
        num_samples: ``N``.
        seconds: wall time.
    """

    hessian_eigenvalues: np.ndarray
    ggn_eigenvalues: np.ndarray
    between_class_eigenvalues: np.ndarray
    class_level_eigenvalues: np.ndarray
    between_class_share: np.ndarray
    between_class_rayleigh_share: np.ndarray
    ggn_share: np.ndarray
    num_classes: int
    classes: np.ndarray
    class_counts: np.ndarray
    num_samples: int
    seconds: float


def class_structure(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    top_k: int = 10,
    outputs_fn: OutputsFn | None = None,
    hessian_eigenvalues: Sequence[float] | np.ndarray | None = None,
    hessian_eigenvectors: Tensor | None = None,
    max_classes: int = 32,
    seed: int = 0,
    tol: float = 1e-8,
    params: Sequence[nn.Parameter] | None = None,
    reduce_fn: ReduceFn | None = None,
    batch_size_fn: Callable[[Any], int] | None = None,
    dtype: torch.dtype | None = None,
) -> ClassStructure:
    """How much of each top Hessian eigenvalue the class means explain (cross-entropy).

    The loss is the mean cross-entropy of ``outputs_fn``'s logits against integer targets.
    Builds the ``C^2`` vectors :math:`\\sqrt{n_c/N}\\,\\delta_{c,c'}` with one batched
    vector-Jacobian product of ``C^2`` cotangents per batch (never a per-sample Jacobian), and
    diagonalises their ``C^2 x C^2`` Gram matrix. Top ``G`` eigenvalues by Lanczos on
    :class:`GaussNewtonOperator`; the Hessian's top eigenpairs are computed with
    :func:`~lightning_landscape.hessian_spectrum` unless given.

    Args:
        model: the network (used as it is: put it in eval mode first).
        batches: probe batches.
        top_k: number of eigenvalues.
        outputs_fn: ``(model, batch) -> (logits (n, C), targets (n,))``.
        hessian_eigenvalues: top Hessian eigenvalues to reuse (with ``hessian_eigenvectors``).
        hessian_eigenvectors: their eigenvectors as rows ``(k, D)``.
        max_classes: with more classes, the between-class part is built from a seeded random
            subset of ``max_classes`` classes (``C^2`` vectors of length ``D`` are kept), and
            the subset is reported in ``classes``; a warning says so.
        seed: seeds the Lanczos runs and the class subset.
        tol: Lanczos tolerance.
        params: restrict to these parameters.
        reduce_fn: sum-all-reduce across data-parallel processes.
        batch_size_fn: samples per batch.
        dtype: compute in this dtype on a temporary copy of the model.

    Returns:
        :class:`ClassStructure`.

    Cost: one Lanczos run on ``H`` (unless given) and one on ``G`` (each product about two
    backward passes over the probe set), and one batched vector-Jacobian product of ``C^2``
    cotangents per batch. Memory: the retained graphs, and ``C^2 D`` numbers for the vectors.

    Raises:
        ValueError: bad options, or targets that are not integer classes.
        FloatingPointError: non-finite logits.
    """
    t0 = time.perf_counter()
    check_positive_int("top_k", top_k)
    check_int("max_classes", max_classes, minimum=2)
    if (hessian_eigenvalues is None) != (hessian_eigenvectors is None):
        raise ValueError("hessian_eigenvalues and hessian_eigenvectors must be given together")
    outputs_fn = outputs_fn or _default_outputs
    model, batches, plist = _working_inputs(model, batches, params, dtype)
    shared = {"params": plist, "reduce_fn": reduce_fn, "batch_size_fn": batch_size_fn}
    # One seed sequence for the measurement; each random stage draws its own child stream.
    hessian_seed, subset_seed, ggn_seed = (
        int(s) for s in np.random.SeedSequence(seed).generate_state(3)
    )
    if hessian_eigenvectors is None:
        h_vals, h_vecs = _hessian_top(
            model, batches, outputs_fn, top_k, hessian_seed, tol, **shared
        )
    else:
        h_vals, h_vecs = _given_eigenpairs(hessian_eigenvalues, hessian_eigenvectors)
    k = len(h_vals)
    op = GaussNewtonOperator(model, batches, outputs_fn=outputs_fn, **shared)
    if h_vecs.shape[1] != op.dim:
        raise ValueError(
            f"hessian_eigenvectors rows must have length D={op.dim}; got {h_vecs.shape[1]}"
        )
    try:
        counts, classes = _class_counts(op, max_classes, subset_seed)
        between, level, rayleigh = _between_class(op, classes, counts, h_vecs, k)
        ggn = lanczos(op, top_k=min(k, op.dim), tol=tol, seed=ggn_seed)
    finally:
        op.release()
    ggn_vals = np.asarray(ggn.eigenvalues, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = [np.where(h_vals != 0, x / h_vals, math.nan) for x in (between, rayleigh, ggn_vals)]
    return ClassStructure(
        hessian_eigenvalues=np.asarray(h_vals, dtype=np.float64),
        ggn_eigenvalues=ggn_vals,
        between_class_eigenvalues=between,
        class_level_eigenvalues=level,
        between_class_share=share[0],
        between_class_rayleigh_share=share[1],
        ggn_share=share[2],
        num_classes=int(op.logits[0].shape[1]),
        classes=np.asarray(classes),
        class_counts=counts.cpu().numpy(),
        num_samples=op.num_samples,
        seconds=time.perf_counter() - t0,
    )


def _working_inputs(
    model: nn.Module,
    batches: Iterable[Any],
    params: Sequence[nn.Parameter] | None,
    dtype: torch.dtype | None,
) -> tuple[nn.Module, list[Any], list[nn.Parameter]]:
    """The model and batches to measure (a copy in ``dtype`` when given) and its parameters
    that correspond to ``params``."""
    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one batch; got an empty iterable")
    names, _ = _resolve_params(model, params)
    model, batches = _working_copy(model, batches, dtype)
    by_name = dict(model.named_parameters())
    return model, batches, [by_name[n] for n in names]


def _hessian_top(
    model: nn.Module,
    batches: list[Any],
    outputs_fn: OutputsFn,
    top_k: int,
    seed: int,
    tol: float,
    **options: Any,
) -> tuple[np.ndarray, Tensor]:
    """Top Hessian eigenpairs of the mean cross-entropy, eigenvectors converged too."""

    def ce_loss(m: nn.Module, batch: Any) -> Tensor:
        z, y = outputs_fn(m, batch)
        return nn.functional.cross_entropy(z, y)

    hs = hessian_spectrum(
        model,
        ce_loss,
        batches,
        top_k=top_k,
        density=False,
        trace=False,
        seed=seed,
        tol=tol,
        return_eigenvectors=True,
        **options,
    )
    assert hs.eigenvectors is not None
    return hs.eigenvalues, hs.eigenvectors


def _given_eigenpairs(
    values: Sequence[float] | np.ndarray | None, vectors: Tensor
) -> tuple[np.ndarray, Tensor]:
    h_vals = np.asarray(values, dtype=np.float64)
    if vectors.dim() != 2 or vectors.shape[0] != len(h_vals):
        raise ValueError(
            "hessian_eigenvectors must have one row per eigenvalue; got shape "
            f"{tuple(vectors.shape)} for {len(h_vals)} eigenvalues"
        )
    return h_vals, vectors


def _class_counts(
    op: GaussNewtonOperator, max_classes: int, seed: int
) -> tuple[Tensor, np.ndarray]:
    """Samples per class over every process, and the classes the between-class part uses (a
    seeded subset of ``max_classes`` when more are present, with a warning)."""
    C = op.logits[0].shape[1]
    for y in op.targets:
        if y.is_floating_point() or y.dim() != 1:
            raise ValueError(
                "class_structure needs integer class targets of shape (n,); got "
                f"{y.dtype} with shape {tuple(y.shape)}"
            )
    for z in op.logits:
        if not bool(torch.isfinite(z).all()):
            raise FloatingPointError("non-finite logits on the probe batches")
    counts = torch.zeros(C, dtype=torch.float64, device=op.device)
    for y in op.targets:
        counts += torch.bincount(y, minlength=C).to(counts)
    counts = op._reduce(counts) if op._reduce is not None else counts
    present = torch.nonzero(counts > 0).flatten().cpu().numpy()
    if len(present) <= max_classes:
        return counts, present
    rng = np.random.default_rng(seed)
    classes = np.sort(rng.choice(present, size=max_classes, replace=False))
    warnings.warn(
        f"class_structure: {len(present)} classes present; the between-class part is "
        f"built from a random subset of {max_classes} (max_classes), so its "
        "eigenvalues and shares are those of that subset (a lower bound).",
        RuntimeWarning,
        stacklevel=3,  # the caller of class_structure
    )
    return counts, classes


def _between_class(
    op: GaussNewtonOperator, classes: np.ndarray, counts: Tensor, h_vecs: Tensor, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top ``k`` eigenvalues of the between-class part ``B``, the class-level eigenvalues, and
    the Rayleigh quotients ``v^T B v`` at the rows of ``h_vecs``, from the Gram matrix of the
    ``C^2`` weighted class-mean vectors (never a ``D x D`` matrix)."""
    C = op.logits[0].shape[1]
    W = _class_mean_vectors(op, classes, counts)  # (Cs, C, D), weighted by sqrt(n_c / N)
    flat = W.reshape(len(classes) * C, -1).double()
    lam_b = torch.linalg.eigvalsh(flat @ flat.T).flip(0).clamp(min=0).cpu().numpy()
    between = np.zeros(k)
    between[: min(k, len(lam_b))] = lam_b[:k]
    level = W.double().mean(dim=1)  # (Cs, D): (1/C) sum_c' of the weighted vectors
    lam_c = torch.linalg.eigvalsh(level @ level.T).flip(0).clamp(min=0).cpu().numpy()
    V = h_vecs.to(device=flat.device, dtype=torch.float64)
    rayleigh = (V @ flat.T).pow(2).sum(dim=1).cpu().numpy()
    return between, lam_c, rayleigh


def _class_mean_vectors(op: GaussNewtonOperator, classes: np.ndarray, counts: Tensor) -> Tensor:
    r"""The vectors :math:`\sqrt{n_c/N}\,\delta_{c,c'}` for ``c`` in ``classes`` and every
    ``c'``: ``(len(classes), C, D)``, one batched vector-Jacobian product per batch."""
    C = op.logits[0].shape[1]
    Cs = len(classes)
    N = op.num_samples
    out = torch.zeros(Cs * C, op.dim, dtype=op.dtype, device=op.device)
    eye = torch.eye(C, dtype=op.dtype, device=op.device)
    for b, (p, y) in enumerate(zip(op.probs, op.targets, strict=True)):
        n = p.shape[0]
        # Cotangent (c, c') on sample i: 1[y_i = c] / n_c * (e_c' - p_i) sqrt(p_i,c').
        diff = eye[None, :, :] - p[:, None, :]  # (n, c', C)
        per = diff * p.sqrt()[:, :, None]  # (n, c', C)
        U = torch.zeros(Cs, C, n, C, dtype=op.dtype, device=op.device)
        for j, c in enumerate(classes):
            mask = (y == int(c)).to(op.dtype)
            weight = math.sqrt(float(counts[int(c)]) / N) / float(counts[int(c)])
            U[j] = (mask[:, None, None] * per).permute(1, 0, 2) * weight
        with curvature_context(op.device):
            out += op.vjp(U.reshape(Cs * C, n, C), b)
    if op._reduce is not None:
        out = op._reduce(out)
    return out.reshape(Cs, C, op.dim)
