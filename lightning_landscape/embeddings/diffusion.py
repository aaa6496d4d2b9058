r"""Diffusion maps (Coifman & Lafon 2006) of point clouds such as SGD trajectories.

Applied to the parameter vectors sampled along training (Fjellström & Nyström 2022, "Deep
learning, stochastic gradient descent and diffusion maps"), the diffusion map reveals the
low-dimensional manifold on which SGD moves.

Construction, for points :math:`x_1, \dots, x_n`:

1. the symmetric k-nearest-neighbour graph (``i ~ j`` if either is among the other's
   ``n_neighbors`` nearest, self included), exact up to ``exact_max_n`` points or in up to 16
   dimensions, pynndescent otherwise;
2. the Gaussian kernel :math:`W_{ij} = \exp(-\|x_i - x_j\|^2 / \varepsilon s_i s_j)` on its
   edges. **Bandwidth** (``epsilon="auto"``, the default): first one global bandwidth
   (:math:`s \equiv 1`) chosen by the method of Berry, Giannakis & Harlim (2015),
   :math:`\varepsilon` maximising :math:`d \log T / d \log \varepsilon` for
   :math:`T(\varepsilon) = \sum_{ij} W_{ij}(\varepsilon)`; it is kept when it serves every
   point: on the worst 1% of the points, the mean kernel weight of the ``d`` nearest neighbours
   is at least 0.2 (else the sparse points decouple from the graph) and the weight at the
   ``k``-th neighbour at most 0.3 (else the kNN truncation cuts the kernel). Otherwise (density
   ratios of about 10 and more, as along a training trajectory whose steps shrink) the
   **variable bandwidth** of Berry & Harlim (2016, "Variable bandwidth diffusion kernels"):
   :math:`s_i = \rho_i`, the root-mean-square distance to the ``2d + 2`` nearest neighbours
   (:math:`\rho \propto q^{-1/d}` for a sampling density ``q`` on a d-manifold), with a
   dimensionless :math:`\varepsilon` chosen by BGH on the rescaled distances;
   ``epsilon="variable"`` forces it. Other choices: ``"median"`` (the median squared neighbour
   distance), a number, or ``"local"``: the self-tuning kernel
   :math:`\exp(-\|x_i - x_j\|^2 / \sigma_i \sigma_j)` of Zelnik-Manor & Perona (2004), which
   follows the density but gives a :math:`\sigma^2`-weighted operator, not Laplace–Beltrami
   (its eigenvalue ratios are right on curves only, its eigenfunctions nowhere: on a circle
   they are :math:`\cos 2\pi F(\theta)` for the sampling CDF ``F``);
3. the :math:`\alpha`-normalisation :math:`W^{(\alpha)} = Q^{-\alpha} W Q^{-\alpha}` with
   :math:`Q = \operatorname{diag}(W \mathbf 1)`; :math:`\alpha = 1` removes the sampling density, so
   the Markov operator approximates the heat kernel of the Laplace–Beltrami operator whatever the
   density (:math:`\alpha = 1/2`: Fokker–Planck, :math:`\alpha = 0`: graph Laplacian).
   With the variable bandwidth the normalisation uses :math:`Q = W\mathbf 1 / \rho^d` and the
   exponent :math:`a = \alpha - 1/2 - 1/d` (Berry–Harlim's drift coefficient
   :math:`2 - 2a + (d+2)\beta` with :math:`\beta = -1/d` equals the global kernel's
   :math:`2 - 2\alpha`), ``d`` the intrinsic dimension rounded;
4. the Markov matrix :math:`P = D^{-1} W^{(\alpha)}`, :math:`D = \operatorname{diag}(W^{(\alpha)}
   \mathbf 1)`, diagonalised through its symmetric conjugate :math:`S = D^{-1/2} W^{(\alpha)}
   D^{-1/2}` (dense ``eigh`` up to :data:`DENSE_MAX_N` points, ARPACK ``eigsh`` above, its
   products through torch's multithreaded sparse kernel; a single-vector Krylov method finds
   one vector per eigenspace, so ``eigsh`` is followed by a search on the deflated operator that
   recovers the partners of repeated eigenvalues);
5. right eigenvectors :math:`\psi_k = D^{-1/2} \phi_k`, normalised so that
   :math:`\sum_i \pi_i \psi_k(i)^2 = 1` with the stationary law :math:`\pi = D\mathbf 1 / \sum D`
   (so the trivial :math:`\psi_0 \equiv 1`), and diffusion coordinates at diffusion time ``t``:
   :math:`\Psi_t(x_i) = (\lambda_1^t \psi_1(i), \dots, \lambda_k^t \psi_k(i))` (diffusion
   time ``t = 1`` by default: distances between coordinates are diffusion distances after one
   step of the chain; ``t = 0`` gives the eigenvectors themselves). The trivial
   eigenvalue 1 is excluded. Signs are deterministic: the entry of largest magnitude of each
   :math:`\psi_k` is positive.

   With the variable bandwidth, the chain's speed varies like :math:`\rho^2`; the time change
   :math:`(I - P)\psi = \kappa\,\sigma^2\psi` (:math:`\sigma = \rho/\operatorname{median}\rho`)
   makes it uniform, solved as the lazy chain :math:`I - c\,\sigma^{-2}(I - P)`,
   :math:`c = \min\sigma^2`, through its symmetric conjugate; the reported eigenvalues are
   :math:`\lambda = e^{-\kappa}` (the semigroup :math:`e^{-t\kappa}` at unit time) and
   :math:`\pi \propto D\sigma^2`.

For a manifold sampled densely enough, :math:`-\log \lambda_k \approx \varepsilon \mu_k / 4`
with :math:`\mu_k` the Laplace–Beltrami eigenvalues (unit circle: 1, 1, 4, 4, 9, 9, …).

**Intrinsic dimension.** Levina & Bickel's (2005) maximum-likelihood estimate from the kNN
distances, in its unbiased form (``m - 2``) and pooled over the points as MacKay & Ghahramani
(2005) advise (:func:`intrinsic_dimension`). It needs no bandwidth, so the kNN truncation of
the kernel (which biases bandwidth-sweep estimates low) does not enter: at defaults on uniform
random samples it reads 1.00 (circle),
2.01 (torus), 2.00 (sphere), 2.99 (3-sphere). It is exact for a locally uniform Poisson sample;
noise at the neighbour scale raises it towards the ambient dimension, curvature at that scale
lowers it, and on quasi-regular lattices it reads up to 12% high (1.07 on an equispaced circle,
2.2 on a Fibonacci sphere).

**Disconnected graphs.** If the kNN graph has several connected components, the eigenvalue 1 is
repeated and the eigenvectors mix components. ``disconnected="largest"`` (default) embeds the
largest component and gives NaN coordinates to the other points (``in_support`` marks the
embedded ones, ``num_components`` counts the components); ``"raise"`` raises
:class:`DisconnectedGraphError`.

**Nyström extension.** :meth:`DiffusionMap.extend` places new points by
:math:`\psi_k(y) = \lambda_k^{-1} \sum_j p(y, x_j) \psi_k(x_j)` with the same kernel,
:math:`\varepsilon` and :math:`\alpha`; it is accurate inside the sampled support only (far from it
the kernel weights are all but zero and the result says nothing), so recompute the map from time
to time.

**Alignment.** Eigenvectors of repeated eigenvalues (a circle has pairs) are defined only up to a
rotation in their eigenspace, so "the k-th coordinate" is not stable between two computations.
:func:`align_to` rotates a new embedding onto a previous one on their common points (orthogonal
Procrustes, optionally only within groups of near-equal eigenvalues).

**Window / burn-in, landmarks.** This function embeds the points it is given; the early
transient of a trajectory (which makes any trajectory look one-dimensional) and a sliding window
are selected by :class:`~lightning_landscape.embeddings.trajectory.TrajectoryEmbedder`
(``burn_in_steps``, ``window_steps``) before calling it, which also fits large trajectories on
:func:`select_landmarks` and places the rest by :func:`landmark_coordinates`.

Costs, for n points in d dimensions and k = ``n_neighbors``: exact neighbours by a k-d tree for
d ≤ 16, else O(n² d) flops in row blocks of 64 MiB; pynndescent above ``exact_max_n``; the graph
O(n k) memory; the eigensolver O(n k) per iteration (``eigh``: O(n³) for n ≤
:data:`DENSE_MAX_N`). Measured: 8,000 points in 3-D in about 0.2 s, 60,000 points in 64-D in
about 1 minute on 2 cores including pynndescent's compilation (``benchmarks/diffusion.py``). The
result keeps the n × d data for the extension.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from scipy.sparse.csgraph import connected_components
from scipy.special import logsumexp

from ._neighbors import EXACT_MAX_N, exact_knn, knn

__all__ = [
    "Alignment",
    "DiffusionMap",
    "DisconnectedGraphError",
    "align_to",
    "align_to_previous",
    "diffusion_map",
    "intrinsic_dimension",
    "landmark_coordinates",
    "landmark_cost",
    "nystrom_extend",
    "select_landmarks",
]

#: Up to this many points (in the embedded component) the eigenproblem is solved densely.
DENSE_MAX_N = 1500

# Bandwidth grid of the BGH search, in log2 steps around the median squared neighbour distance.
_BGH_STEP = 0.125
_BGH_RANGE = 30.0
_BGH_QUANTILES = 4096


class DisconnectedGraphError(ValueError):
    """The kNN graph has several connected components (with ``disconnected="raise"``)."""


@dataclass(frozen=True, eq=False)
class DiffusionMap:
    """Result of :func:`diffusion_map`.

    Attributes:
        eigenvalues: (k,) non-trivial eigenvalues of the Markov operator, descending (the trivial
            eigenvalue 1 excluded); with the variable bandwidth :math:`e^{-\\kappa}` of the
            time-changed chain (module docstring).
        coordinates: (n, k) diffusion coordinates :math:`\\lambda^t \\psi`; NaN rows for points
            outside the embedded component.
        eigenvectors: (n, k) right eigenvectors :math:`\\psi` (``coordinates`` at ``t = 0``).
        epsilon: kernel bandwidth :math:`\\varepsilon` of
            :math:`\\exp(-\\|x - y\\|^2/\\varepsilon s_x s_y)` (dimensionless with the
            variable bandwidth, whose ``scales`` are lengths).
        intrinsic_dim: Levina–Bickel estimate of the intrinsic dimension.
        alpha: the density normalisation used.
        t: the diffusion time of ``coordinates``.
        n_neighbors: neighbours per point in the kNN graph.
        num_components: connected components of the kNN graph.
        in_support: (n,) bool, the points that were embedded (the largest component).
        data: (n_support, d) the embedded points, kept for :meth:`extend`.
        kernel_sums: (n_support,) row sums :math:`Q` of the kernel, kept for :meth:`extend`.
        scales: (n_support,) per-point bandwidth factors :math:`s_i` of the kernel
            :math:`\\exp(-d_{ij}^2/(\\varepsilon s_i s_j))`: ones for a global bandwidth,
            :math:`\\sigma_i/\\operatorname{median}\\sigma` for ``"local"``, :math:`\\rho_i` for
            the variable bandwidth.
        local: whether the bandwidth varies from point to point (``"local"`` or variable).
        kernel: ``"global"``, ``"local"`` (self-tuning) or ``"variable"`` (Berry–Harlim).
    """

    eigenvalues: np.ndarray
    coordinates: np.ndarray
    eigenvectors: np.ndarray
    epsilon: float
    intrinsic_dim: float
    alpha: float
    t: float
    n_neighbors: int
    num_components: int
    in_support: np.ndarray
    data: np.ndarray
    kernel_sums: np.ndarray
    scales: np.ndarray
    local: bool
    kernel: str = "global"

    def extend(self, X_new: Any) -> np.ndarray:
        """Nyström extension: diffusion coordinates of new points (m × k), at time ``t``.

        Cost O(m n d) for the neighbour search among the n embedded points. Accurate only for
        points inside the sampled support; see the module docstring.

        Args:
            X_new: (m, d) new points (numpy array or tensor), same d as the data.

        Raises:
            ValueError: If ``X_new`` is not a finite (m, d) array.
        """
        return nystrom_extend(self, X_new)


@dataclass(frozen=True, eq=False)
class Alignment:
    """Result of :func:`align_to`.

    Attributes:
        coordinates: (n, k) the coordinates after the rotation.
        rotation: (k, k) orthogonal matrix, ``coordinates = input @ rotation``; block diagonal
            over the eigenvalue groups when eigenvalues were given.
        rmsd: root-mean-square distance to the reference on the common rows after alignment.
    """

    coordinates: np.ndarray
    rotation: np.ndarray
    rmsd: float


def _as_points(name: str, X: Any) -> np.ndarray:
    if hasattr(X, "detach"):
        X = X.detach().cpu().numpy()
    try:
        arr = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a 2-D array of numbers; got {type(X).__name__}") from None
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n points × d dims); got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite; got {int((~np.isfinite(arr)).sum())} NaN/inf")
    return arr


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


class DiffusionOptions(TypedDict, total=False):
    """The options of :func:`diffusion_map` that :class:`~.trajectory.TrajectoryEmbedder` and
    ``DiffusionMapMonitor`` forward (typed for LightningCLI; a test keeps them equal to the
    keyword options the embedder does not set itself)."""

    neighbors: Literal["auto", "exact", "pynndescent"]
    exact_max_n: int
    disconnected: Literal["largest", "raise"]
    tol: float


def diffusion_map(
    X: Any,
    *,
    n_components: int = 10,
    n_neighbors: int = 32,
    alpha: float = 1.0,
    epsilon: float | Literal["auto", "median", "local", "variable"] = "auto",
    t: float = 1.0,
    seed: int = 0,
    neighbors: Literal["auto", "exact", "pynndescent"] = "auto",
    exact_max_n: int = EXACT_MAX_N,
    disconnected: Literal["largest", "raise"] = "largest",
    tol: float = 1e-10,
) -> DiffusionMap:
    """Diffusion map of the rows of ``X`` (see the module docstring for the construction).

    Args:
        X: (n, d) points, numpy array or tensor; n >= n_components + 2.
        n_components: non-trivial eigenpairs (coordinates) to return.
        n_neighbors: neighbours per point (self included) in the kNN graph; clipped to n.
        alpha: density normalisation in [0, 1]; 1 removes the sampling density.
        epsilon: kernel bandwidth. ``"auto"`` (default): one global bandwidth chosen by
            Berry–Giannakis–Harlim when it fits the whole sample, else the variable bandwidth
            (module docstring, "Bandwidth"); both give the Laplace–Beltrami operator at
            ``alpha=1`` whatever the sampling density. ``"variable"`` forces the variable
            bandwidth of Berry & Harlim (2016). ``"median"``: the median squared distance
            between neighbours. ``"local"``: the self-tuning kernel of Zelnik-Manor & Perona
            (2004), :math:`\\exp(-d_{ij}^2 / \\sigma_i \\sigma_j)` with :math:`\\sigma_i` the
            distance from point i to its ``n_neighbors // 2``-th neighbour (``epsilon`` is then
            the median :math:`\\sigma^2`); it follows a density that varies by orders of
            magnitude, but its operator is :math:`\\sigma^2`-weighted, not the
            Laplace–Beltrami operator (right eigenvalue ratios on curves only). A number: that
            global bandwidth.
        t: diffusion time of the coordinates (``λ^t ψ``), >= 0.
        seed: seeds pynndescent and the eigensolver's start vector.
        neighbors: ``"exact"`` (a k-d tree in up to 16 dimensions, else a blockwise torch
            scan, O(n² d)), ``"pynndescent"``, or ``"auto"``: exact up to ``exact_max_n``
            points or in up to 16 dimensions, pynndescent otherwise. pynndescent compiles numba
            code on its first call in a process (40–60 s); that call is announced with a
            warning.
        exact_max_n: threshold of ``neighbors="auto"``.
        disconnected: ``"largest"`` embeds the largest connected component (NaN elsewhere),
            ``"raise"`` raises :class:`DisconnectedGraphError`.
        tol: relative tolerance of the sparse eigensolver.

    Returns:
        A :class:`DiffusionMap` (its ``kernel`` says which bandwidth was used).

    Raises:
        ValueError: On bad input (naming the argument, the rule and the value).
        DisconnectedGraphError: With ``disconnected="raise"`` and a disconnected graph.
        numpy.linalg.LinAlgError: If the eigensolver does not converge.
    """
    X = _as_points("X", X)
    n = X.shape[0]
    n_components, n_neighbors, exact_max_n, seed = _check_options(
        n,
        n_components=n_components,
        n_neighbors=n_neighbors,
        exact_max_n=exact_max_n,
        seed=seed,
        alpha=alpha,
        t=t,
        epsilon=epsilon,
        neighbors=neighbors,
        disconnected=disconnected,
        tol=tol,
    )
    k = min(n_neighbors, n)
    ind, d2 = knn(X, k, method=neighbors, exact_max_n=exact_max_n, seed=seed)
    dim = intrinsic_dimension(d2)
    kern = _choose_kernel(ind, d2, epsilon, dim)
    W = _kernel_matrix(ind, d2, kern)
    ncomp, support, W = _largest_component(W, k, disconnected, n_components)
    scales = kern.scales[support]
    lam, psi, q = _markov_eigenpairs(W, kern.kind, scales, alpha, dim, n_components, seed, tol)
    full_psi = np.full((n, n_components), np.nan)
    full_psi[support] = psi
    return DiffusionMap(
        eigenvalues=lam,
        coordinates=full_psi * _power(lam, t)[None, :],
        eigenvectors=full_psi,
        epsilon=float(kern.epsilon),
        intrinsic_dim=float(dim),
        alpha=float(alpha),
        t=float(t),
        n_neighbors=k,
        num_components=int(ncomp),
        in_support=support,
        data=X[support],
        kernel_sums=q,
        scales=scales,
        local=kern.kind != "global",
        kernel=kern.kind,
    )


def _check_options(n: int, **o: Any) -> tuple[int, int, int, int]:
    """Validate the options of :func:`diffusion_map`; the integers come back as ``int``."""
    n_components = _check_int("n_components", o["n_components"], 1)
    n_neighbors = _check_int("n_neighbors", o["n_neighbors"], 2)
    exact_max_n = _check_int("exact_max_n", o["exact_max_n"], 1)
    seed = _check_int("seed", o["seed"], 0)
    if n < n_components + 2:
        raise ValueError(
            f"X must have at least n_components + 2 = {n_components + 2} rows; got {n}"
        )
    alpha, t, epsilon, tol = o["alpha"], o["t"], o["epsilon"], o["tol"]
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1]; got {alpha!r}")
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not t >= 0:
        raise ValueError(f"t must be a number >= 0; got {t!r}")
    if epsilon not in _EPSILON_MODES and (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, numbers.Real)
        or not np.isfinite(epsilon)
        or epsilon <= 0
    ):
        raise ValueError(
            "epsilon must be 'auto', 'median', 'local' or a positive number, or 'variable'; "
            f"got {epsilon!r}"
        )
    if o["neighbors"] not in ("auto", "exact", "pynndescent"):
        raise ValueError(
            f"neighbors must be 'auto', 'exact' or 'pynndescent'; got {o['neighbors']!r}"
        )
    if o["disconnected"] not in ("largest", "raise"):
        raise ValueError(f"disconnected must be 'largest' or 'raise'; got {o['disconnected']!r}")
    if not (isinstance(tol, numbers.Real) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0; got {tol!r}")
    return n_components, n_neighbors, exact_max_n, seed


_EPSILON_MODES = ("auto", "median", "local", "variable")


@dataclass(frozen=True)
class _Kernel:
    """Bandwidth of :math:`\\exp(-d_{ij}^2/(\\varepsilon s_i s_j))` and its kind."""

    epsilon: float
    scales: np.ndarray
    kind: str  # "global", "local" (self-tuning) or "variable" (Berry–Harlim)


def _choose_kernel(ind: np.ndarray, d2: np.ndarray, epsilon: Any, dim: float) -> _Kernel:
    """The bandwidth that ``epsilon`` asks for; ``"auto"`` checks the global one fits first."""
    n, k = ind.shape
    ones = np.ones(n)
    if epsilon == "local":
        # Self-tuning kernel: exp(-d² / (σ_i σ_j)) with σ_i the distance to the m-th neighbour,
        # written as ε s_i s_j with ε = median σ² and s = σ / median σ.
        sigma = np.sqrt(d2[:, _local_rank(k)])
        med = float(np.median(sigma))
        med = med if med > 0 else 1.0
        return _Kernel(med * med, np.maximum(sigma / med, 1e-6), "local")
    if epsilon == "variable":
        return _variable_kernel(ind, d2, dim)
    if epsilon not in _EPSILON_MODES:
        return _Kernel(float(epsilon), ones, "global")
    offdiag = d2[ind != np.arange(n)[:, None]]
    if epsilon == "median":
        positive = offdiag[offdiag > 0]
        return _Kernel(float(np.median(positive)) if positive.size else 1.0, ones, "global")
    eps = _bgh_choice(*_bgh_curve(offdiag, n))[0]
    if _global_bandwidth_fits(d2, eps, dim):
        return _Kernel(eps, ones, "global")
    return _variable_kernel(ind, d2, dim)


def _global_bandwidth_fits(d2: np.ndarray, eps: float, dim: float) -> bool:
    """Whether one bandwidth ``eps`` serves every point of the kNN graph.

    It does not when the sampling density varies too much for it (measured: a density ratio of
    about 10 on circles, spheres and tori): in sparse regions a point's nearest neighbours
    carry almost no kernel weight, so the point decouples from the graph and the
    α-normalisation no longer removes the density; or the kernel is still wide at the
    ``k``-th neighbour, so the kNN truncation cuts it. Both are read off the kNN distances at
    the chosen bandwidth, on the worst 1% of the points.
    """
    if d2.shape[1] < 3:
        return True
    far = np.exp(-d2[:, -1] / eps)
    near = np.exp(-d2[:, 1 : 1 + _kernel_dim(dim)] / eps).mean(axis=1)
    truncated = np.quantile(far, 0.99) > _TRUNCATION_MAX
    return not truncated and bool(np.quantile(near, 0.01) >= _COUPLING_MIN)


#: Largest kernel weight at the k-th neighbour (99th percentile of the points) for one bandwidth.
_TRUNCATION_MAX = 0.3
#: Smallest mean kernel weight of the d nearest neighbours (1st percentile) for one bandwidth:
#: 0.3-0.9 measured where one bandwidth is right (density ratio 3), 0.07-0.11 where it is not.
_COUPLING_MIN = 0.2


def _variable_kernel(ind: np.ndarray, d2: np.ndarray, dim: float) -> _Kernel:
    """Berry–Harlim variable bandwidth: ε ρ_i ρ_j with ρ the RMS distance to a few neighbours.

    ρ ∝ q^{-1/d} follows the sampling density q; ε is chosen by Berry–Giannakis–Harlim on the
    kernel sum of the rescaled distances d²/(ρ_i ρ_j), so it is dimensionless and the scales
    are lengths.
    """
    n = ind.shape[0]
    rho = _variable_rho(d2[:, 1:], _kernel_dim(dim))
    scaled = d2 / (rho[:, None] * rho[ind])
    offdiag = scaled[ind != np.arange(n)[:, None]]
    eps = _bgh_choice(*_bgh_curve(offdiag, n))[0]
    return _Kernel(eps, rho, "variable")


def _variable_rho(d2_others: np.ndarray, d: int) -> np.ndarray:
    """ρ from the squared distances to the nearest other points (rows sorted, self excluded).

    The ``2d + 2`` nearest: few enough that ρ stays local where the density changes fast (more
    neighbours bias the spectrum at a 100x density ratio), enough to be stable on random samples.
    """
    r = max(1, min(2 * d + 2, d2_others.shape[1]))
    rho = np.sqrt(d2_others[:, :r].mean(axis=1))
    positive = rho[rho > 0]
    floor = 1e-6 * float(np.median(positive)) if positive.size else 1.0
    return np.maximum(rho, floor)


def _kernel_dim(dim: float) -> int:
    """Manifold dimension used by the variable bandwidth's normalisation (at least 1)."""
    return max(1, round(float(dim))) if np.isfinite(dim) else 1


def _kernel_matrix(ind: np.ndarray, d2: np.ndarray, kern: _Kernel) -> sp.csr_matrix:
    """Symmetric sparse kernel on the union of the kNN relations, unit diagonal."""
    n, k = ind.shape
    s = kern.scales
    weights = np.exp(-d2 / (kern.epsilon * s[:, None] * s[ind]))
    rows = np.repeat(np.arange(n), k)
    W = sp.csr_matrix((weights.ravel(), (rows, ind.ravel())), shape=(n, n))
    W.sum_duplicates()
    # Union of the kNN relations: the kernel is symmetric, so the maximum fills the missing side.
    W = W.maximum(W.T).tocsr()
    W.setdiag(1.0)
    return W


def _largest_component(
    W: sp.csr_matrix, k: int, disconnected: str, n_components: int
) -> tuple[int, np.ndarray, sp.csr_matrix]:
    """Connected components of the graph; the largest one's mask and kernel."""
    n = W.shape[0]
    ncomp, labels = connected_components(W, directed=False)
    support = np.ones(n, dtype=bool)
    if ncomp > 1:
        if disconnected == "raise":
            raise DisconnectedGraphError(
                f"the {k}-nearest-neighbour graph of X has {ncomp} connected components; "
                "increase n_neighbors or pass disconnected='largest'"
            )
        support = labels == np.argmax(np.bincount(labels))
        W = W[support][:, support].tocsr()
    m = int(support.sum())
    if m < n_components + 2:
        raise DisconnectedGraphError(
            f"the largest connected component of the kNN graph has {m} points, fewer than "
            f"n_components + 2 = {n_components + 2}; increase n_neighbors"
        )
    return ncomp, support, W


def _normalisation(kind: str, alpha: float, dim: float) -> tuple[float, int]:
    """Exponent applied to the kernel sums, and the dimension d in ``Q = W1 / ρ^d``.

    A global bandwidth: ``alpha`` itself (d = 0). The variable bandwidth ρ ∝ q^{-1/d}: Berry &
    Harlim's drift coefficient ``2 - 2a + (d + 2)β`` with β = -1/d equals the global kernel's
    ``2 - 2 alpha`` for ``a = alpha - 1/2 - 1/d``.
    """
    if kind != "variable":
        return float(alpha), 0
    d = _kernel_dim(dim)
    return float(alpha) - 0.5 - 1.0 / d, d


def _markov_eigenpairs(
    W: sp.csr_matrix,
    kind: str,
    scales: np.ndarray,
    alpha: float,
    dim: float,
    n_components: int,
    seed: int,
    tol: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-trivial eigenvalues, right eigenvectors (L²(π)-normalised) and kernel sums ``Q``.

    Global bandwidth: the Markov matrix ``P = D⁻¹ Qᵃ W Qᵃ`` through its symmetric conjugate.
    Variable bandwidth: the generator ``(I - P) ψ = κ σ² ψ`` (σ = ρ / median ρ, the time change
    that makes the chain's speed uniform), as the lazy chain ``I - c σ⁻² (I - P)`` with
    ``c = min σ²`` (a Markov matrix again), reported as ``λ = exp(-κ)``.
    """
    a, d = _normalisation(kind, alpha, dim)
    q = np.asarray(W.sum(axis=1)).ravel() / scales**d
    qa = q**-a
    Wa = sp.diags(qa) @ W @ sp.diags(qa)
    deg = np.asarray(Wa.sum(axis=1)).ravel()
    if kind == "variable":
        sigma2 = (scales / np.median(scales)) ** 2
        c = float(sigma2.min())
        b = deg * sigma2
        dm = 1.0 / np.sqrt(b)
        S = (c * (sp.diags(dm) @ Wa @ sp.diags(dm)) + sp.diags(1.0 - c / sigma2)).tocsr()
    else:
        b = deg
        dm = 1.0 / np.sqrt(deg)
        S = (sp.diags(dm) @ Wa @ sp.diags(dm)).tocsr()
    S = (S + S.T) * 0.5  # exact symmetry against rounding
    vals, vecs = _top_eigenpairs(S, n_components + 1, seed=seed, tol=tol)
    # Right eigenvectors, normalised in L²(π), π ∝ b, so that ψ₀ ≡ 1.
    psi = (vecs * dm[:, None] * np.sqrt(b.sum()))[:, 1:]
    lam = vals[1:] if kind != "variable" else np.exp(-(1.0 - vals[1:]) / c)
    big = np.argmax(np.abs(psi), axis=0)
    psi = psi * np.sign(psi[big, np.arange(psi.shape[1])])[None, :]
    return lam, psi, q


def intrinsic_dimension(d2: np.ndarray) -> float:
    """Levina–Bickel maximum-likelihood intrinsic dimension from kNN distances.

    For each point, with :math:`T_1 \\le \\dots \\le T_m` the distances to its ``m`` nearest
    other points, :math:`\\hat m^{-1} = \\frac{1}{m-2}\\sum_{j<m} \\log(T_m/T_j)` is unbiased
    for a locally uniform (Poisson) sample (Levina & Bickel 2005, with the ``m - 2`` of their
    unbiased form); the points are pooled by averaging :math:`\\hat m^{-1}` (MacKay &
    Ghahramani 2005), which is less biased than averaging :math:`\\hat m`. Zero distances
    (duplicate points) are left out. NaN when no point has three distinct neighbours.

    Args:
        d2: (n, k) squared distances to the k nearest neighbours, sorted, self first.
    """
    r = np.sqrt(np.maximum(np.asarray(d2, dtype=np.float64)[:, 1:], 0.0))
    if r.shape[1] < 3:
        return float("nan")
    far = r[:, -1:]
    inner = r[:, :-1]
    ok = inner > 0
    logs = np.where(ok, np.log(np.where(ok, far / np.where(ok, inner, 1.0), 1.0)), 0.0)
    count = ok.sum(axis=1)
    total = logs.sum(axis=1)
    use = (count >= 2) & (total > 0)
    if not use.any():
        return float("nan")
    return float(np.sum(count[use] - 1) / np.sum(total[use]))


def _local_rank(k: int) -> int:
    """Rank (0 = self) of the neighbour whose distance sets the local bandwidth."""
    return max(1, min(k - 1, k // 2))


def _power(lam: np.ndarray, t: float) -> np.ndarray:
    if t == 0:
        return np.ones_like(lam)
    if float(t).is_integer():
        return lam ** int(t)
    return np.sign(lam) * np.abs(lam) ** t


def _top_eigenpairs(S: sp.csr_matrix, k: int, *, seed: int, tol: float) -> tuple[Any, Any]:
    """Largest ``k`` eigenpairs of the symmetric ``S``, descending."""
    n = S.shape[0]
    if n <= DENSE_MAX_N or k >= n - 1:
        vals, vecs = scipy.linalg.eigh(S.toarray(), subset_by_index=[n - k, n - 1])
    else:
        with _single_threaded_blas():
            vals, vecs = _top_eigenpairs_sparse(_sparse_matmul(S), n, k, seed=seed, tol=tol)
    order = np.argsort(-vals, kind="stable")
    return vals[order], vecs[:, order]


def _top_eigenpairs_sparse(
    S_mul: Callable[[np.ndarray], np.ndarray], n: int, k: int, *, seed: int, tol: float
) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    vals, vecs = _eigsh(spla.LinearOperator((n, n), matvec=S_mul, dtype=np.float64), k, rng, tol)
    # A single-vector Krylov method sees one direction per eigenspace: a repeated eigenvalue
    # (a circle has pairs) is found once. Search again on S with the found pairs deflated
    # (moved to 0, below the wanted eigenvalues near 1) until nothing new comes above the
    # k-th; each round costs one more eigsh.
    for _ in range(k):
        found = vecs * vals[None, :]

        def deflated(x: np.ndarray, V: np.ndarray = vecs, F: np.ndarray = found) -> Any:
            return S_mul(x) - F @ (V.T @ x)

        op = spla.LinearOperator((n, n), matvec=deflated, matmat=deflated, dtype=np.float64)
        gap = max(1e3 * tol, 1e-12) * max(1.0, abs(vals.min()))
        # A cheap look first: the top of the deflated operator, loosely converged (a Ritz
        # value is a lower bound of the top eigenvalue, so what it shows is there). Its
        # tolerance is a tenth of the spread of the wanted eigenvalues (at most 1e-4), so a
        # missed partner of any of them, which lies at or above the k-th, stands out from
        # what is below.
        spread = float(vals.max() - vals.min()) / max(1.0, float(np.abs(vals).max()))
        look_tol = min(1e-4, max(tol, 0.1 * spread))
        top_val, _ = _eigsh(op, 1, rng, look_tol, ncv=20)
        if top_val.max() <= vals.min() + gap:
            break
        more_vals, more_vecs = _eigsh(op, k, rng, tol)
        new = more_vals > vals.min() + gap
        if not new.any():
            break
        # Orthogonalise the newcomers against the found ones (rounding), then keep the top k.
        add = more_vecs[:, new]
        add -= vecs @ (vecs.T @ add)
        add, _ = np.linalg.qr(add)
        basis = np.hstack([vecs, add])
        T = basis.T @ S_mul(basis)
        theta, Y = np.linalg.eigh(0.5 * (T + T.T))
        top = np.argsort(-theta, kind="stable")[:k]
        vals, vecs = theta[top], basis @ Y[:, top]
    return vals, vecs


def _sparse_matmul(S: sp.csr_matrix) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> S @ x`` (vector or block) through torch's multithreaded CSR kernel.

    scipy's ``csr_matvec`` runs on one core; torch's with 32-bit indices is about 3x faster on
    2 cores (8,000 points, 32 neighbours: 41 µs against 134 µs a product). scipy above 32-bit
    index range.
    """
    if S.nnz >= 2**31 - 1 or S.shape[0] >= 2**31 - 1:
        return lambda x: np.asarray(S @ x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        T = torch.sparse_csr_tensor(
            torch.from_numpy(S.indptr.astype(np.int32)),
            torch.from_numpy(S.indices.astype(np.int32)),
            torch.from_numpy(np.ascontiguousarray(S.data, dtype=np.float64)),
            size=S.shape,
            check_invariants=False,
        )

    def matmul(x: np.ndarray) -> np.ndarray:
        return (T @ torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))).numpy()

    return matmul


def _single_threaded_blas() -> contextlib.AbstractContextManager[Any]:
    """numpy/scipy BLAS on one thread while torch's threads run the sparse products.

    ARPACK's own work is small dense products; with BLAS threads of their own they fight
    torch's idle-spinning OpenMP threads for the cores (measured: 2-4x slower on 2 cores).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency of scikit-learn, itself of pynndescent
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _eigsh(op: Any, k: int, rng: np.random.Generator, tol: float, ncv: int = 30) -> tuple[Any, Any]:
    n = op.shape[0]
    try:
        return spla.eigsh(
            op,
            k=k,
            which="LA",
            v0=rng.standard_normal(n),
            tol=tol,
            ncv=min(n, max(2 * k + 1, ncv)),
            maxiter=20 * n,
        )
    except spla.ArpackNoConvergence as err:
        raise np.linalg.LinAlgError(
            f"diffusion_map: the eigensolver did not converge ({err})"
        ) from err


def _bgh_curve(offdiag_d2: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``log2 ε`` grid and ``log T(ε)`` of the kernel sum over the graph (self-loops included)."""
    positive = np.sort(offdiag_d2[offdiag_d2 > 0])
    scale = float(_sorted_quantile(positive, np.array([0.5]))[0]) if positive.size else 1.0
    grid = np.arange(-_BGH_RANGE, _BGH_RANGE + _BGH_STEP / 2, _BGH_STEP) + np.log2(scale)
    # T(ε) depends on the distances only through their distribution: a fixed set of quantiles
    # (each standing for an equal share of the pairs) gives the curve at O(grid × 4096) cost.
    if positive.size > 4 * _BGH_QUANTILES:
        q = (np.arange(_BGH_QUANTILES) + 0.5) / _BGH_QUANTILES
        sample = _sorted_quantile(positive, q)
        weight = positive.size / _BGH_QUANTILES
    else:
        sample, weight = positive, 1.0
    if sample.size:
        # Far outside the range of the distances the curve is flat (every weight 0, or every
        # weight 1 to within 2⁻⁸): its steepest point, all that is used, lies inside. Skipping
        # the flat ends (most of the ±30 octaves) changes nothing and saves most of the cost.
        inside = (grid >= np.log2(sample[0]) - 8) & (grid <= np.log2(sample[-1]) + 8)
        if inside.sum() >= 2:
            grid = grid[inside]
    eps = 2.0**grid
    log_t = logsumexp(-sample[None, :] / eps[:, None], axis=1) + np.log(weight)
    return grid, np.logaddexp(np.log(n), log_t)


def _sorted_quantile(values: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``np.quantile(values, q)`` (linear interpolation) of already sorted ``values``.

    ``np.quantile`` partitions again for each of 4,096 quantiles (14 ms for 250,000 values,
    against 1 ms for one sort).
    """
    pos = q * (values.size - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, values.size - 1)
    frac = pos - lo
    return values[lo] * (1.0 - frac) + values[hi] * frac


def _bgh_choice(grid: np.ndarray, log_t: np.ndarray) -> tuple[float, float]:
    slope = np.diff(log_t) / (np.diff(grid) * np.log(2.0))
    i = int(np.argmax(slope))
    eps = 2.0 ** (0.5 * (grid[i] + grid[i + 1]))
    return float(eps), float(2.0 * slope[i])


def nystrom_extend(result: DiffusionMap, X_new: Any) -> np.ndarray:
    """Nyström extension of ``result`` to new points: (m, k) coordinates at time ``result.t``.

    With the kernel of ``result`` restricted to the ``n_neighbors`` nearest embedded points,
    :math:`p(y, x_j) \\propto \\exp(-\\|y - x_j\\|^2/\\varepsilon) / Q_j^\\alpha` (the factor of
    ``y`` cancels in the normalisation) and :math:`\\psi_k(y) = \\lambda_k^{-1} \\sum_j p(y, x_j)
    \\psi_k(x_j)`. Computed in log space, so no point gives NaN; points far outside the support
    get a meaningless weighted mean of their nearest neighbours.

    Args:
        result: a :class:`DiffusionMap`.
        X_new: (m, d) points.

    Raises:
        ValueError: If ``X_new`` is not a finite (m, d) array with ``d`` as in the data.
    """
    Y = _as_points("X_new", X_new)
    d = result.data.shape[1]
    if Y.shape[1] != d:
        raise ValueError(f"X_new must have {d} columns like the data; got shape {Y.shape}")
    if Y.shape[0] == 0:
        return np.empty((0, result.eigenvalues.size))
    k = min(result.n_neighbors, result.data.shape[0])
    ind, d2 = exact_knn(result.data, k, queries=Y)
    if result.kernel == "variable":
        return _extend_variable(result, ind, d2)
    scale_y = np.ones(Y.shape[0])
    if result.local:  # the query is not among its own neighbours: one rank lower
        scale_y = np.maximum(np.sqrt(d2[:, _local_rank(k) - 1] / result.epsilon), 1e-6)
    logits = -d2 / (result.epsilon * scale_y[:, None] * result.scales[ind])
    logits -= result.alpha * np.log(result.kernel_sums[ind])
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    psi = result.eigenvectors[result.in_support]
    ext = np.einsum("mk,mkc->mc", p, psi[ind]) / result.eigenvalues[None, :]
    return ext * _power(result.eigenvalues, result.t)[None, :]


def _extend_variable(result: DiffusionMap, ind: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """Nyström for the variable bandwidth: ψ(y) = (Pψ)(y) / (1 - κ σ_y²), κ = -log λ.

    From ``(I - P) ψ = κ σ² ψ`` at the sampled points; the denominator is floored at 0.1 (a
    point whose own time scale is that slow sits outside the resolved support).
    """
    a, d = _normalisation("variable", result.alpha, result.intrinsic_dim)
    rho_y = _variable_rho(d2, d)  # a query is not among its own neighbours: no self column
    logits = -d2 / (result.epsilon * rho_y[:, None] * result.scales[ind])
    logits -= a * np.log(result.kernel_sums[ind])
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    psi = result.eigenvectors[result.in_support]
    sigma2 = (rho_y / np.median(result.scales)) ** 2
    denom = np.maximum(1.0 + np.log(result.eigenvalues)[None, :] * sigma2[:, None], 0.1)
    ext = np.einsum("mk,mkc->mc", p, psi[ind]) / denom
    return ext * _power(result.eigenvalues, result.t)[None, :]


def align_to(
    coordinates: Any,
    reference: Any,
    *,
    rows: Any = None,
    eigenvalues: Any = None,
    rtol: float = 0.1,
) -> Alignment:
    """Rotate ``coordinates`` onto ``reference`` (orthogonal Procrustes on the common rows).

    Finds the orthogonal ``R`` minimising :math:`\\|C_{rows} R - B\\|_F` (SVD of
    :math:`C_{rows}^T B`) and returns :math:`C R` for all rows. With ``eigenvalues`` (of the
    columns of ``coordinates``), ``R`` only mixes columns whose eigenvalues are near-equal (the
    decay rates ``1 - λ`` of neighbours in the sorted list differ by at most ``rtol`` relative):
    a repeated eigenvalue may rotate, distinct ones only flip sign. Rows with NaN in either input
    are left out of the fit.

    Args:
        coordinates: (n, k) new coordinates.
        reference: (r, k) previous coordinates of the same points.
        rows: (r,) indices of the rows of ``coordinates`` that ``reference`` describes, in order;
            None means all (then r must equal n).
        eigenvalues: (k,) eigenvalues of the columns, descending, or None for a free rotation.
        rtol: relative gap of ``1 - λ`` under which eigenvalues are grouped.

    Raises:
        ValueError: On mismatched shapes, bad ``rows`` or ``rtol``.
    """
    C = np.asarray(coordinates, dtype=np.float64)
    B = np.asarray(reference, dtype=np.float64)
    if C.ndim != 2 or B.ndim != 2 or C.shape[1] != B.shape[1]:
        raise ValueError(
            "coordinates and reference must be 2-D with the same number of columns; got shapes "
            f"{C.shape} and {B.shape}"
        )
    if rows is None:
        if C.shape[0] != B.shape[0]:
            raise ValueError(
                f"rows is required when coordinates ({C.shape[0]} rows) and reference "
                f"({B.shape[0]} rows) differ in length"
            )
        idx = np.arange(C.shape[0])
    else:
        idx = np.asarray(rows)
        if idx.shape != (B.shape[0],) or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(
                f"rows must be {B.shape[0]} integer indices (one per reference row); got "
                f"shape {idx.shape}"
            )
        if idx.size and (idx.min() < -C.shape[0] or idx.max() >= C.shape[0]):
            raise ValueError(f"rows must index the {C.shape[0]} rows of coordinates")
    if not (isinstance(rtol, numbers.Real) and rtol >= 0):
        raise ValueError(f"rtol must be a number >= 0; got {rtol!r}")
    k = C.shape[1]
    if eigenvalues is None:
        groups = [np.arange(k)]
    else:
        lam = np.asarray(eigenvalues, dtype=np.float64).ravel()
        if lam.size != k:
            raise ValueError(f"eigenvalues must have {k} entries (one per column); got {lam.size}")
        groups = _eigen_groups(lam, rtol)
    A = C[idx]
    ok = np.all(np.isfinite(A), axis=1) & np.all(np.isfinite(B), axis=1)
    A, Bf = A[ok], B[ok]
    R = np.eye(k)
    for g in groups:
        M = A[:, g].T @ Bf[:, g]
        U, _, Vt = np.linalg.svd(M)
        R[np.ix_(g, g)] = U @ Vt
    out = C @ R
    rmsd = float(np.sqrt(np.mean(np.sum((A @ R - Bf) ** 2, axis=1)))) if A.size else float("nan")
    return Alignment(coordinates=out, rotation=R, rmsd=rmsd)


def _eigen_groups(lam: np.ndarray, rtol: float) -> list[np.ndarray]:
    rate = np.abs(1.0 - lam)
    groups: list[list[int]] = [[0]]
    for i in range(1, lam.size):
        a, b = rate[i - 1], rate[i]
        if abs(b - a) <= rtol * max(a, b):
            groups[-1].append(i)
        else:
            groups.append([i])
    return [np.asarray(g) for g in groups]


def select_landmarks(n: int, max_points: int) -> np.ndarray:
    """Indices of the points a map is fitted on when there are too many: evenly spaced in order.

    A trajectory is sampled in step order, so evenly spaced indices keep its whole extent (the
    first and the last point included) at a uniform density along it; the others are placed by
    :func:`landmark_coordinates`. Cost O(max_points).

    Args:
        n: number of points, >= 0.
        max_points: most points to fit on, >= 1.

    Returns:
        (m,) sorted unique indices, m = min(n, max_points) (all of ``range(n)`` when n <= m).

    Raises:
        ValueError: If ``n`` or ``max_points`` is not an integer in range.
    """
    n = _check_int("n", n, 0)
    max_points = _check_int("max_points", max_points, 1)
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))


def landmark_cost(n: int, max_points: int) -> float:
    """Relative cost of embedding ``n`` points on at most ``max_points`` landmarks: m² for the
    exact neighbours among the m = min(n, max_points) fitted ones and (n − m)·m for the Nyström
    placement of the others (the units cancel in a ratio of two costs).

    Raises:
        ValueError: If ``n`` or ``max_points`` is not an integer in range.
    """
    n = _check_int("n", n, 0)
    m = max(min(n, _check_int("max_points", max_points, 1)), 1)
    return float(m * m + max(n - m, 0) * m)


def landmark_coordinates(result: DiffusionMap, X: Any, landmarks: Any) -> np.ndarray:
    """Coordinates of every row of ``X`` from a map fitted on ``X[landmarks]``.

    The landmarks keep their coordinates in ``result``; the other rows are placed by
    :func:`nystrom_extend` (inside the sampled support only, see the module docstring). Cost
    O((n − m) m d) for n rows, m landmarks, d dimensions.

    Args:
        result: the :class:`DiffusionMap` of ``X[landmarks]``.
        X: (n, d) points.
        landmarks: (m,) unique row indices of ``X``, in the order of ``result``'s rows.

    Returns:
        (n, k) coordinates at time ``result.t``.

    Raises:
        ValueError: If ``landmarks`` are not unique indices of ``X`` matching ``result``'s rows.
    """
    X = np.asarray(X.detach().cpu().numpy() if hasattr(X, "detach") else X)
    idx = np.asarray(landmarks)
    n, m = X.shape[0], result.coordinates.shape[0]
    if (
        idx.shape != (m,)
        or not np.issubdtype(idx.dtype, np.integer)
        or (idx.size and (idx.min() < 0 or idx.max() >= n))
        or np.unique(idx).size != m
    ):
        raise ValueError(
            f"landmarks must be {m} unique row indices of X (one per row of the map) in "
            f"[0, {n}); got shape {idx.shape}"
        )
    coords = np.empty((n, result.coordinates.shape[1]))
    others = np.setdiff1d(np.arange(n), idx)
    coords[idx] = result.coordinates
    coords[others] = result.extend(X[others])
    return coords


def align_to_previous(
    coordinates: Any,
    labels: Any,
    previous: Any,
    previous_labels: Any,
    *,
    eigenvalues: Any = None,
    min_common: int | None = None,
    rtol: float = 0.1,
) -> Alignment | None:
    """Rotate a new embedding onto the previous one on the points both contain.

    Successive embeddings of a growing trajectory share most points (identified by ``labels``,
    e.g. the step of each sample); :func:`align_to` rotates the new one onto the old one on
    them, so that the axes do not jump between two computations. Cost O(n log n + n k²).

    Args:
        coordinates: (n, k) new coordinates.
        labels: (n,) unique label of each new row.
        previous: (r, k') previous coordinates.
        previous_labels: (r,) unique label of each previous row.
        eigenvalues: (k,) eigenvalues of the new columns, descending (rotate only within
            near-equal ones, see :func:`align_to`), or None for a free rotation.
        min_common: fewest common points to align on; default k + 1 (fewer leave the rotation
            underdetermined).
        rtol: relative gap of ``1 - λ`` under which eigenvalues are grouped.

    Returns:
        The :class:`Alignment`, or None (nothing to align to) when there are fewer than
        ``min_common`` common labels or the column counts differ.

    Raises:
        ValueError: If a labels array does not have one entry per row.
    """
    C = np.asarray(coordinates, dtype=np.float64)
    B = np.asarray(previous, dtype=np.float64)
    new, old = np.asarray(labels).ravel(), np.asarray(previous_labels).ravel()
    if C.ndim != 2 or B.ndim != 2 or new.size != C.shape[0] or old.size != B.shape[0]:
        raise ValueError(
            "coordinates and previous must be 2-D with one label per row; got shapes "
            f"{C.shape}, {B.shape} and {new.size}, {old.size} labels"
        )
    k = C.shape[1]
    minimum = k + 1 if min_common is None else min_common
    common, new_idx, old_idx = np.intersect1d(new, old, return_indices=True)
    if common.size < minimum or B.shape[1] != k:
        return None
    return align_to(C, B[old_idx], rows=new_idx, eigenvalues=eigenvalues, rtol=rtol)
