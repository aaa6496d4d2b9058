r"""InPCA of prediction trajectories (Mao et al., PNAS 2024).

Mao, Griniasty, Teoh, Ramesh, Yang, Transtrum, Sethna, Chaudhari, "The training process of many
deep networks explores the same low-dimensional manifold", PNAS 121 (2024). Each checkpoint of a
classifier is represented by its predicted probabilities on a fixed probe set; two checkpoints
:math:`u, v` are compared by the per-sample Bhattacharyya distance

.. math::

    d(u, v) = -\frac{1}{N} \sum_{n=1}^{N} \log \sum_{c} \sqrt{p_u^n(c)\, p_v^n(c)},

and the distance matrix is embedded by intensive PCA: :math:`W = -\tfrac12 L D L` with
:math:`L = I - \mathbf{1}\mathbf{1}^\top / n` (``D`` not squared), eigenvectors sorted by
:math:`|\lambda|`, coordinates :math:`v \sqrt{|\lambda|}`; negative eigenvalues are "imaginary"
directions (distances along them count negatively).

Also here: the progress coordinate along the geodesic from the initial predictions to the truth.
(:func:`mode_connectivity` lives in :mod:`lightning_landscape.embeddings.geometry` with the rest
of the trajectory geometry; it is re-exported here.) numpy and torch only: no Lightning, no
TensorBoard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from .geometry import mode_connectivity

__all__ = [
    "InPCA",
    "bhattacharyya_distances",
    "cross_bhattacharyya_distances",
    "inpca",
    "mode_connectivity",
    "progress_coordinate",
]

#: Elements of one (samples × models × models) work block: 2**24 (64 MiB in float32, 128 MiB
#: in float64), reused for every chunk; large enough to amortise the per-chunk calls, small
#: enough to stay in cache-friendly pieces (``benchmarks/inpca.py``).
_BLOCK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------
# Bhattacharyya distances
# ---------------------------------------------------------------------------------------------


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach()
    else:
        t = torch.as_tensor(np.asarray(value))
    if not (t.is_floating_point()):
        t = t.to(torch.float64)
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    return t


def _check_predictions(name: str, t: torch.Tensor, *, log: bool) -> None:
    if t.ndim != 3 or 0 in t.shape:
        raise ValueError(
            f"{name} must have shape (n_models, n_samples, n_classes) with no empty axis; got "
            f"shape {tuple(t.shape)}"
        )
    # Checked in slices of models, so that no full-size temporary is made.
    step = max(1, _BLOCK_ELEMENTS // max(1, t.shape[1] * t.shape[2]))
    worst = 0.0
    for start in range(0, t.shape[0], step):
        x = t[start : start + step]
        if log:
            if torch.isnan(x).any() or torch.isposinf(x).any():
                raise ValueError(
                    f"{name} (log-probabilities) must be finite or -inf; got NaN or +inf"
                )
            total = torch.logsumexp(x.to(torch.float64), dim=-1)
        else:
            if not torch.isfinite(x).all():
                raise ValueError(f"{name} (probabilities) must be finite; got NaN or inf")
            if (x < 0).any():
                raise ValueError(f"{name} (probabilities) must be >= 0; got {float(x.min())}")
            total = x.to(torch.float64).sum(dim=-1).log()
        worst = max(worst, float(total.abs().max()))
    # float16/32 softmax outputs sum to 1 within ~1e-6; a wrong axis or logits are far off.
    if not worst <= 1e-3:
        raise ValueError(
            f"{name} must hold normalised distributions over the last axis (classes); the worst "
            f"|log sum_c p| is {worst:.3g} (did you pass logits? use log_softmax and log=True)"
        )


class _Prepared:
    """√p rescaled per (model, sample) so that its largest entry is 1, and the log of the scale.

    ``s = exp(½ (log p − m))`` with ``m = max_c log p``, so ``Σ_c √(p q) =
    exp(½ (m_p + m_q)) · Σ_c s_p · s_q`` and nothing underflows unless the two distributions put
    their mass on different classes by hundreds of orders of magnitude; those entries are
    recomputed in log space (logsumexp) from the input. ``s`` is kept sample-major,
    (n_samples, n_models, n_classes), so that a chunk of samples is contiguous.
    """

    def __init__(self, t: torch.Tensor, *, log: bool, dtype: torch.dtype) -> None:
        self.source, self.log = t, log
        x = t.transpose(0, 1)  # (samples, models, classes), a view
        # Written straight into a sample-major buffer: no second full-size temporary.
        s = torch.empty(x.shape, dtype=dtype, device=t.device)
        if log:
            m = x.amax(dim=-1, keepdim=True).to(dtype)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            torch.sub(x, m, out=s)
            s.mul_(0.5).exp_()
        else:
            pmax = x.amax(dim=-1, keepdim=True).to(dtype)
            pmax = torch.where(pmax > 0, pmax, torch.ones_like(pmax))
            torch.div(x, pmax, out=s)
            s.sqrt_()
            m = torch.log(pmax)
        self.s = s
        self.half_m = (0.5 * m[..., 0]).to(torch.float64)  # (samples, models)
        # Σ_c s_p s_q ≥ min_c s_p, since s_q is 1 at its largest class: a cheap underflow test.
        self.s_min = self.s.amin(dim=-1)  # (samples, models)

    @property
    def n_models(self) -> int:
        return int(self.s.shape[1])

    def logp(self, n_idx: torch.Tensor, i_idx: torch.Tensor) -> torch.Tensor:
        """float64 log-probabilities of (sample, model) pairs (the exact path)."""
        v = self.source[i_idx, n_idx].to(torch.float64)
        return v if self.log else torch.log(v)


def _block_distances(
    a: _Prepared,
    b: _Prepared,
    ia: slice,
    ib: slice,
    sample_chunk: int,
    tiny: float,
) -> torch.Tensor:
    """Mean over samples of −log Σ_c √(p q) for models ``ia`` of ``a`` × models ``ib`` of ``b``."""
    n_samples = a.s.shape[0]
    shape = (ia.stop - ia.start, ib.stop - ib.start)
    acc = torch.zeros(shape, dtype=torch.float64, device=a.s.device)
    # One work buffer for all chunks: a fresh large tensor per chunk costs page faults.
    buf = torch.empty((sample_chunk, *shape), dtype=a.s.dtype, device=a.s.device)
    ones = torch.ones(sample_chunk, dtype=a.s.dtype, device=a.s.device)
    for start in range(0, n_samples, sample_chunk):
        chunk = slice(start, min(start + sample_chunk, n_samples))
        xa = a.s[chunk, ia]  # (n, models_a, C)
        xb = b.s[chunk, ib].transpose(1, 2)  # (n, C, models_b)
        inner = buf[: chunk.stop - chunk.start]
        torch.bmm(xa, xb, out=inner)  # (n, models_a, models_b)
        n = chunk.stop - chunk.start
        if (
            float(a.s_min[chunk, ia].amin()) > tiny
            or float(b.s_min[chunk, ib].amin()) > tiny
            or float(inner.amin()) > tiny
        ):  # the common case: no underflow anywhere in the chunk
            # Sum over the chunk's samples as a matrix-vector product (a strided reduction over
            # the first axis is ~40x slower on CPU), in the work dtype, then into float64.
            logs = inner.log_().view(n, -1)
            acc -= torch.mv(logs.T, ones[:n]).view(shape)
            continue
        # Underflow (or disjoint supports): exact log-space values for those entries only.
        n_idx, i_idx, j_idx = (inner <= tiny).nonzero(as_tuple=True)
        logs = inner.to(torch.float64).log_()
        n_abs = n_idx + start
        la = a.logp(n_abs, i_idx + ia.start)
        lb = b.logp(n_abs, j_idx + ib.start)
        exact = torch.logsumexp(0.5 * (la + lb), dim=-1)
        ma = a.half_m[n_abs, i_idx + ia.start]
        mb = b.half_m[n_abs, j_idx + ib.start]
        logs[n_idx, i_idx, j_idx] = exact - ma - mb
        acc -= logs.sum(dim=0)
    acc -= a.half_m[:, ia].sum(dim=0)[:, None] + b.half_m[:, ib].sum(dim=0)[None, :]
    return acc / n_samples


def _sample_chunk(n_a: int, n_b: int, n_samples: int) -> int:
    return max(1, min(n_samples, _BLOCK_ELEMENTS // max(1, n_a * n_b)))


def _check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer; got {block_size!r}")
    return block_size


def _work_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype!r}")
        return dtype
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def bhattacharyya_distances(
    P: ArrayLike | torch.Tensor,
    *,
    log: bool = False,
    block_size: int = 256,
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    r"""Per-sample mean Bhattacharyya distances between the predictions of several models.

    .. math::

        D_{uv} = -\frac{1}{N} \sum_{n=1}^{N} \log \sum_{c=1}^{C} \sqrt{p_u^n(c)\, p_v^n(c)}

    Computed blockwise: ``block_size`` models against ``block_size`` models, over chunks of
    samples sized so that one work block holds at most 2**24 numbers, only for the upper triangle
    of blocks. The √p are rescaled per (model, sample) to a largest entry of 1 and the scales
    carried in log space, so probabilities that underflow do not matter; entries whose rescaled
    sum still underflows (the two models put their mass on different classes) are recomputed
    exactly with a logsumexp over classes. Works on the device of ``P`` when it is a tensor.

    Cost: ``n_models² · n_samples · n_classes / 2`` multiply-adds and ``n_models² · n_samples / 2``
    logarithms. Memory: besides ``P``, one rescaled copy of it in the work dtype, the per-(model,
    sample) scales in float64 (``n_models · n_samples · 8`` bytes) and a work block of 2**24
    numbers. For 2,000 checkpoints × 10,000 samples × 10 classes in float32: 0.8 GB for ``P``,
    0.8 GB for the copy, 0.16 GB of scales (see ``benchmarks/inpca.py`` for the measured peak).

    Args:
        P: Probabilities (``log=False``) or log-probabilities (``log=True``, ``-inf`` allowed), of
            shape (n_models, n_samples, n_classes), normalised over the last axis; a numpy array
            or a torch tensor.
        log: Whether ``P`` holds log-probabilities (e.g. ``log_softmax`` outputs; preferred when
            probabilities can underflow).
        block_size: Models per block.
        dtype: Work dtype, float32 or float64; default float64 for float64 input, else float32.
            Sums over samples are accumulated in float64 either way.

    Returns:
        The symmetric (n_models, n_models) float64 distance matrix, zero on the diagonal. Models
        whose supports are disjoint on some sample are at distance ``inf``.

    Raises:
        ValueError: If ``P`` is not 3-D, not normalised, negative or NaN, or ``block_size`` is not a
            positive integer.
    """
    block = _check_block_size(block_size)
    t = _as_tensor("P", P)
    _check_predictions("P", t, log=log)
    work = _work_dtype(t, dtype)
    prep = _Prepared(t, log=log, dtype=work)
    n_models, n_samples = int(t.shape[0]), int(t.shape[1])
    tiny = _tiny(work)
    D = torch.zeros(n_models, n_models, dtype=torch.float64, device=t.device)
    for i0 in range(0, n_models, block):
        ia = slice(i0, min(i0 + block, n_models))
        for j0 in range(i0, n_models, block):
            ib = slice(j0, min(j0 + block, n_models))
            chunk = _sample_chunk(ia.stop - ia.start, ib.stop - ib.start, n_samples)
            D[ia, ib] = _block_distances(prep, prep, ia, ib, chunk, tiny)
    D = torch.triu(D)
    D = D + torch.triu(D, diagonal=1).T
    D.fill_diagonal_(0.0)
    return D.cpu().numpy()


def cross_bhattacharyya_distances(
    P: ArrayLike | torch.Tensor,
    Q: ArrayLike | torch.Tensor,
    *,
    log: bool = False,
    block_size: int = 256,
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Bhattacharyya distances between every model of ``P`` and every model of ``Q``.

    The rectangular counterpart of :func:`bhattacharyya_distances` (same formula, same numerics),
    used to place new checkpoints into an existing embedding (:meth:`InPCA.transform`) or to
    extend a distance matrix by one row as training goes on. Cost: ``n_p · n_q · n_samples ·
    n_classes`` multiply-adds.

    Args:
        P: Shape (n_p, n_samples, n_classes).
        Q: Shape (n_q, n_samples, n_classes), the same samples and classes as ``P``.
        log: Whether both hold log-probabilities.
        block_size: Models per block.
        dtype: Work dtype (see :func:`bhattacharyya_distances`).

    Returns:
        The (n_p, n_q) float64 distance matrix.

    Raises:
        ValueError: On malformed input or when the sample and class axes of ``P`` and ``Q`` differ.
    """
    block = _check_block_size(block_size)
    tp, tq = _as_tensor("P", P), _as_tensor("Q", Q)
    _check_predictions("P", tp, log=log)
    _check_predictions("Q", tq, log=log)
    if tp.shape[1:] != tq.shape[1:]:
        raise ValueError(
            "P and Q must have the same (n_samples, n_classes); got "
            f"{tuple(tp.shape[1:])} and {tuple(tq.shape[1:])}"
        )
    work = _work_dtype(tp if tp.dtype == torch.float64 else tq, dtype)
    tq = tq.to(tp.device)
    a, b = _Prepared(tp, log=log, dtype=work), _Prepared(tq, log=log, dtype=work)
    n_samples = int(tp.shape[1])
    tiny = _tiny(work)
    D = torch.zeros(a.n_models, b.n_models, dtype=torch.float64, device=tp.device)
    for i0 in range(0, a.n_models, block):
        ia = slice(i0, min(i0 + block, a.n_models))
        for j0 in range(0, b.n_models, block):
            ib = slice(j0, min(j0 + block, b.n_models))
            chunk = _sample_chunk(ia.stop - ia.start, ib.stop - ib.start, n_samples)
            D[ia, ib] = _block_distances(a, b, ia, ib, chunk, tiny)
    return D.cpu().numpy()


def _tiny(dtype: torch.dtype) -> float:
    # Below this a sum of products has lost its relative precision (or is a denormal).
    info = torch.finfo(dtype)
    return float(info.tiny) / float(info.eps)


# ---------------------------------------------------------------------------------------------
# InPCA
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class InPCA:
    r"""Result of :func:`inpca`.

    Attributes:
        coordinates: (n, n_components) embedding, column k = :math:`v_k \sqrt{|\lambda_k|}`.
        eigenvalues: All n eigenvalues of :math:`W`, signed, sorted by :math:`|\lambda|`
            descending.
        explained_stress: Explained stress of the ``n_components`` returned dimensions,
            :math:`1 - \sqrt{1 - \sum_{i \le k} \lambda_i^2 / \|W\|_F^2}`.
        explained_stress_cumulative: The same for k = 1 … n_components.
        n_imaginary: Number of negative eigenvalues among the returned dimensions.
        vectors: (n, n_components) unit eigenvectors (for out-of-sample placement).
        row_means: (n,) row means of the distance matrix (the double centring of new points).
        grand_mean: Mean of the distance matrix.
    """

    coordinates: np.ndarray
    eigenvalues: np.ndarray
    explained_stress: float
    explained_stress_cumulative: np.ndarray
    n_imaginary: int
    vectors: np.ndarray
    row_means: np.ndarray
    grand_mean: float

    @property
    def imaginary(self) -> np.ndarray:
        """Boolean mask of the returned dimensions whose eigenvalue is negative."""
        return self.eigenvalues[: self.coordinates.shape[1]] < 0

    def transform(self, distances: ArrayLike) -> np.ndarray:
        r"""Place new points from their distances to the n embedded points (Gower's formula).

        With :math:`d_x` the (n,) distances of a new point to the embedded ones,
        :math:`w_{x,i} = -\tfrac12 (d_{x,i} - \bar d_x - \bar d_i + \bar d)` and its coordinate
        :math:`y_{x,k} = w_x^\top v_k / (\operatorname{sign}\lambda_k \sqrt{|\lambda_k|})`.
        An embedded point is placed exactly where it is; for Euclidean (squared) distances a new
        point lands on its exact projection onto the principal axes. The embedding itself is not
        recomputed: cost ``n · n_components`` per new point.

        Args:
            distances: (m, n) or (n,) distances from m new points to the embedded points, in the
                order of the embedding (e.g. from :func:`cross_bhattacharyya_distances`).

        Returns:
            (m, n_components) coordinates (or (n_components,) for one point).

        Raises:
            ValueError: If the last axis does not have n entries or values are not finite.
        """
        d = np.asarray(distances, dtype=np.float64)
        one = d.ndim == 1
        d = np.atleast_2d(d)
        n = self.row_means.shape[0]
        if d.ndim != 2 or d.shape[1] != n:
            raise ValueError(
                f"distances must have shape (m, {n}) (one column per embedded point); got "
                f"{np.asarray(distances).shape}"
            )
        if not np.all(np.isfinite(d)):
            raise ValueError("distances must be finite")
        w = -0.5 * (d - d.mean(axis=1, keepdims=True) - self.row_means[None, :] + self.grand_mean)
        lam = self.eigenvalues[: self.vectors.shape[1]]
        scale = np.sign(lam) * np.sqrt(np.abs(lam))
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.where(scale != 0, (w @ self.vectors) / np.where(scale != 0, scale, 1.0), 0.0)
        return y[0] if one else y


def _check_distance_matrix(D: ArrayLike) -> np.ndarray:
    d = np.array(D, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] < 2:
        raise ValueError(
            f"D must be a square distance matrix with at least 2 points; got shape {d.shape}"
        )
    if not np.all(np.isfinite(d)):
        raise ValueError(
            "D must be finite (models with disjoint supports are at infinite distance)"
        )
    scale = max(float(np.abs(d).max()), 1e-300)
    asym = float(np.abs(d - d.T).max())
    if asym > 1e-8 * scale:
        raise ValueError(f"D must be symmetric; got max |D - D^T| = {asym:.3g}")
    return 0.5 * (d + d.T)


def inpca(D: ArrayLike, *, n_components: int = 3) -> InPCA:
    r"""Intensive PCA of a distance matrix.

    :math:`W = -\tfrac12 L D L` with :math:`L = I - \mathbf{1}\mathbf{1}^\top/n`; its
    eigendecomposition :math:`W = \sum_i \lambda_i v_i v_i^\top`, sorted by :math:`|\lambda_i|`;
    coordinates :math:`v_i \sqrt{|\lambda_i|}`. Explained stress of the top k dimensions
    (docs/science.md):

    .. math::

        1 - \sqrt{1 - \sum_{i \le k} \lambda_i^2 / \|W\|_F^2}.

    With squared Euclidean distances this is classical MDS: the coordinates are the PCA scores.
    Cost: one dense symmetric eigendecomposition, O(n³) time and O(n²) memory (n = 2,000: about
    1 s, 32 MB).

    Args:
        D: (n, n) symmetric distance matrix (e.g. :func:`bhattacharyya_distances`; not squared).
        n_components: Dimensions returned, 1 ≤ n_components ≤ n.

    Returns:
        :class:`InPCA`.

    Raises:
        ValueError: If ``D`` is not a finite symmetric square matrix with n ≥ 2, or
            ``n_components`` is out of range.
    """
    d = _check_distance_matrix(D)
    n = d.shape[0]
    if (
        isinstance(n_components, bool)
        or not isinstance(n_components, int)
        or not (1 <= n_components <= n)
    ):
        raise ValueError(f"n_components must be an integer in [1, n={n}]; got {n_components!r}")
    row = d.mean(axis=1)
    grand = float(row.mean())
    W = -0.5 * (d - row[:, None] - row[None, :] + grand)
    W = 0.5 * (W + W.T)
    lam, vec = np.linalg.eigh(W)
    order = np.argsort(-np.abs(lam), kind="stable")
    lam, vec = lam[order], vec[:, order]
    # Deterministic signs: the largest-magnitude entry of every eigenvector is positive.
    pivot = np.abs(vec).argmax(axis=0)
    signs = np.sign(vec[pivot, np.arange(n)])
    vec = vec * np.where(signs == 0, 1.0, signs)
    k = n_components
    coords = vec[:, :k] * np.sqrt(np.abs(lam[:k]))[None, :]
    total = float(np.sum(lam**2))  # = ||W||_F^2
    if total > 0:
        frac = np.cumsum(lam[:k] ** 2) / total
        cumulative = 1.0 - np.sqrt(np.clip(1.0 - frac, 0.0, 1.0))
    else:
        cumulative = np.zeros(k)
    return InPCA(
        coordinates=coords,
        eigenvalues=lam,
        explained_stress=float(cumulative[-1]),
        explained_stress_cumulative=cumulative,
        n_imaginary=int(np.sum(lam[:k] < 0)),
        vectors=vec[:, :k].copy(),
        row_means=row,
        grand_mean=grand,
    )


# ---------------------------------------------------------------------------------------------
# Progress along the geodesic to the truth
# ---------------------------------------------------------------------------------------------


def _as_probs(name: str, value: Any, *, log: bool) -> np.ndarray:
    a = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    a = a.astype(np.float64)
    if log:
        a = np.exp(a)
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"{name} must hold finite non-negative probabilities")
    return a


def progress_coordinate(
    P: ArrayLike | torch.Tensor,
    P0: ArrayLike | torch.Tensor,
    targets: ArrayLike | torch.Tensor,
    *,
    log: bool = False,
) -> np.ndarray | float:
    r"""Progress along the geodesic from the initial predictions to the truth (Mao et al.).

    Predictions live on the unit sphere as :math:`u = \sqrt{p}` (the Bhattacharyya geometry).
    Per sample n, with :math:`a = \sqrt{p_0^n}` (initial predictions) and
    :math:`b = \sqrt{p_*^n}` (the truth, one-hot for labels), the great circle through a and b
    has the orthonormal basis :math:`e_1 = a`, :math:`e_2 = (b - (a\cdot b) a) / \|b - (a\cdot b)
    a\|`, and a and b are :math:`\theta_* = \arccos(a \cdot b)` apart. The prediction u is
    projected onto that circle, at angle :math:`\varphi = \operatorname{atan2}(u\cdot e_2,
    u\cdot e_1)` from a, and

    .. math::

        \text{progress} = \frac{1}{N'} \sum_n \varphi_n / \theta_{*,n},

    0 at the initial predictions, 1 at the truth, averaged over the N' samples where
    :math:`\theta_* > 0` (samples already predicted perfectly at the start carry no direction).

    Args:
        P: Predictions, (n_samples, n_classes) or (n_models, n_samples, n_classes).
        P0: Initial predictions, (n_samples, n_classes) (or (n_classes,) for all samples).
        targets: Integer labels (n_samples,) or target distributions (n_samples, n_classes).
        log: Whether ``P`` and ``P0`` hold log-probabilities.

    Returns:
        A float for 2-D ``P``, else an (n_models,) array. NaN when no sample has
        :math:`\theta_* > 0`.

    Raises:
        ValueError: On shapes that do not match or labels out of range.
    """
    p = _as_probs("P", P, log=log)
    p0 = _as_probs("P0", P0, log=log)
    single = p.ndim == 2
    if single:
        p = p[None]
    if p.ndim != 3:
        raise ValueError(f"P must be 2-D or 3-D; got shape {p.shape}")
    n, c = p.shape[1:]
    if p0.ndim == 1:
        p0 = np.broadcast_to(p0, (n, c))
    if p0.shape != (n, c):
        raise ValueError(f"P0 must have shape ({n}, {c}) or ({c},); got {p0.shape}")
    t = np.asarray(targets.detach().cpu() if isinstance(targets, torch.Tensor) else targets)
    if t.ndim == 1:
        if not np.issubdtype(t.dtype, np.integer) or t.shape[0] != n:
            raise ValueError(f"targets must be {n} integer labels or an ({n}, {c}) array")
        if t.min() < 0 or t.max() >= c:
            raise ValueError(
                f"targets must be labels in [0, {c}); got range [{t.min()}, {t.max()}]"
            )
        pstar = np.zeros((n, c))
        pstar[np.arange(n), t] = 1.0
    else:
        pstar = t.astype(np.float64)
        if pstar.shape != (n, c):
            raise ValueError(f"targets must have shape ({n}, {c}); got {pstar.shape}")
    a = np.sqrt(p0 / p0.sum(axis=1, keepdims=True))
    b = np.sqrt(pstar / pstar.sum(axis=1, keepdims=True))
    ab = np.clip(np.sum(a * b, axis=1), -1.0, 1.0)
    theta = np.arccos(ab)
    perp = b - ab[:, None] * a
    norm = np.linalg.norm(perp, axis=1)
    ok = (norm > 1e-12) & (theta > 1e-12)
    if not ok.any():
        out = np.full(p.shape[0], np.nan)
        return float(out[0]) if single else out
    e2 = perp[ok] / norm[ok, None]
    e1 = a[ok]
    u = np.sqrt(p[:, ok] / p[:, ok].sum(axis=2, keepdims=True))
    x = np.sum(u * e1[None], axis=2)
    y = np.sum(u * e2[None], axis=2)
    phi = np.arctan2(y, x)
    out = np.mean(phi / theta[ok][None], axis=1)
    return float(out[0]) if single else out
