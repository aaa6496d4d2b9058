"""Lanczos iteration with full reorthogonalisation (Lanczos 1950; Golub & Van Loan, ch. 10).

Several independent Lanczos processes can run in lockstep so that each step costs one batched
operator product (``operator.matmat`` on a block of vectors) instead of one product per process:
the eigenvalue run and the stochastic Lanczos quadrature probes share every call.

Each Ritz pair :math:`(\\theta_i, y_i)` of the tridiagonal :math:`T_m = S \\Theta S^\\top` has the
residual :math:`\\|H y_i - \\theta_i y_i\\| = |\\beta_m s_{m,i}|` in exact arithmetic, and some
eigenvalue of :math:`H` lies within that distance of :math:`\\theta_i`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

__all__ = ["LanczosResult", "lanczos"]

Which = Literal["LA", "SA"]


@dataclass(frozen=True, eq=False)
class LanczosResult:
    """Ritz approximations of the wanted end of the spectrum.

    Attributes:
        eigenvalues: the ``k`` wanted Ritz values; descending for ``"LA"``, ascending for ``"SA"``.
        residuals: ``||H y_i - theta_i y_i||`` for each Ritz pair, an error bound on each value.
            Measured with explicit products when ``explicit_residuals`` is on (includes the
            rounding of the products themselves), else the Lanczos estimate ``|beta_m s_mi|``.
        eigenvectors: Ritz vectors as rows, shape ``(k, D)``, or None unless requested.
        alphas: diagonal of the tridiagonal matrix.
        betas: off-diagonal of the tridiagonal matrix (a zero marks a restart after breakdown).
        num_matvecs: operator products spent.
        converged: whether every wanted eigenvalue met the tolerance (by its error bound).
    """

    eigenvalues: np.ndarray
    residuals: np.ndarray
    eigenvectors: Tensor | None
    alphas: np.ndarray
    betas: np.ndarray
    num_matvecs: int
    converged: bool


def rademacher(num: int, dim: int, *, seed: int, dtype: torch.dtype, device: Any) -> Tensor:
    """``num`` Rademacher vectors (rows) from a seeded generator on the CPU (device-independent)."""
    gen = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (num, dim), generator=gen, dtype=torch.int8)
    return (2 * signs - 1).to(dtype=dtype, device=device)


def _ritz(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the tridiagonal matrix."""
    a = np.asarray(alphas, dtype=np.float64)
    if len(a) == 1:
        return a.copy(), np.ones((1, 1))
    b = np.asarray(betas[: len(a) - 1], dtype=np.float64)
    return scipy.linalg.eigh_tridiagonal(a, b)


class _Process:
    """State of one Lanczos process: basis, coefficients, stopping rule."""

    def __init__(
        self,
        v0: Tensor,
        max_steps: int,
        basis_dtype: torch.dtype,
        restart: bool,
        seed: int,
        device: torch.device | None = None,
    ) -> None:
        dim = v0.shape[0]
        device = v0.device if device is None else device
        self.max_steps = max_steps
        self.Q = torch.empty(max_steps + 1, dim, dtype=basis_dtype, device=device)
        # The eigenvalue run keeps the products H q_j: then H y = (HQ) s for every Ritz vector
        # y = Q s, so residuals are measured on the products actually computed, at no extra cost.
        self.W = torch.empty(max_steps, dim, dtype=basis_dtype, device=device) if restart else None
        v0 = v0.to(device=device, dtype=basis_dtype)
        self.Q[0] = v0 / torch.linalg.vector_norm(v0)
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.done = False
        self.restart = restart
        self.seed = seed
        self.anorm = 0.0
        self.block_start = 0  # first step of the current Krylov block (after the last restart)

    @property
    def steps(self) -> int:
        return len(self.alphas)

    def step(self, w: Tensor) -> None:
        j = self.steps
        q = self.Q[j]
        w = w.to(device=self.Q.device, dtype=self.Q.dtype)
        if self.W is not None:
            self.W[j] = w
        alpha = float(torch.dot(q, w))
        w = w - alpha * q
        if j > 0:
            w = w - self.betas[-1] * self.Q[j - 1]
        basis = self.Q[: j + 1]
        # Classical Gram-Schmidt with the DGKS test: a second pass only when the first removed
        # a large share of w (then rounding may have left components along the basis). After
        # the three-term recurrence w is nearly orthogonal already, so one pass usually keeps
        # it orthogonal to working precision, at half the memory traffic of always two.
        before = float(torch.linalg.vector_norm(w))
        for _ in range(2):
            w = w - (basis @ w) @ basis
            beta = float(torch.linalg.vector_norm(w))
            if beta > DGKS_ETA * before:
                break
            before = beta
        self.alphas.append(alpha)
        self.anorm = max(self.anorm, abs(alpha) + beta + (self.betas[-1] if j > 0 else 0.0))
        dim = self.Q.shape[1]
        if j + 1 >= dim:
            self.betas.append(0.0)
            self.done = True
            return
        tiny = 100 * torch.finfo(self.Q.dtype).eps * max(self.anorm, 1e-300)
        if beta <= tiny:
            # Invariant subspace found. The eigenvalue run restarts from a random vector
            # orthogonal to the basis (beta = 0 splits T into blocks) so that repeated eigenvalues
            # are found too; quadrature probes stop (their quadrature is exact).
            self.betas.append(0.0)
            if not self.restart or j + 1 >= self.max_steps:
                self.done = True
                return
            gen = torch.Generator().manual_seed(self.seed + 7919 * (j + 1))
            w = torch.randn(dim, generator=gen, dtype=self.Q.dtype).to(self.Q.device)
            for _ in range(2):
                w = w - (basis @ w) @ basis
            w = w / torch.linalg.vector_norm(w)
            self.Q[j + 1] = w
            self.block_start = j + 1
        else:
            self.betas.append(beta)
            self.Q[j + 1] = w / beta
        if self.steps >= self.max_steps:
            self.done = True


#: Reorthogonalise again while a pass leaves less than this share of the vector's norm
#: (Daniel, Gragg, Kaufman & Stewart 1976; 1/sqrt(2), as in ARPACK).
DGKS_ETA = 0.7071067811865476

#: Share of an accelerator's free memory the Lanczos bases may take before going to host memory.
DEVICE_BASIS_SHARE = 0.5


def basis_device_for(device: torch.device, nbytes: int) -> torch.device:
    """Where ``nbytes`` of Lanczos bases go: ``device``, or the host if it is an accelerator
    whose free memory is less than ``nbytes / DEVICE_BASIS_SHARE``.

    Full reorthogonalisation keeps every basis vector (``m D`` numbers per process). In host
    memory each step moves one block of vectors each way and reorthogonalises on the CPU: slower,
    but a large model's measurement runs instead of failing for memory.
    """
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes <= DEVICE_BASIS_SHARE * free else torch.device("cpu")


def _select(theta: np.ndarray, k: int, which: Which) -> np.ndarray:
    """Indices of the wanted Ritz values in output order."""
    order = np.argsort(theta)
    return order[::-1][:k] if which == "LA" else order[:k]


def run_lanczos(
    operator: Any,
    V0: Tensor,
    max_steps: list[int],
    *,
    restart: list[bool],
    stop: Any = None,
    seed: int = 0,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
) -> list[_Process]:
    """Run ``len(V0)`` Lanczos processes in lockstep, one batched product per step.

    Args:
        operator: has ``matmat((B, D)) -> (B, D)``.
        V0: start vectors as rows.
        max_steps: step limit of each process.
        restart: per process, restart after breakdown (eigenvalue runs) or stop (quadrature).
        stop: optional callable ``stop(process) -> bool`` checked after each step of process 0.
        seed: seeds restart vectors.
        basis_dtype: dtype of the stored basis (default: float64 when it fits in 1 GiB).
        basis_device: where the bases live (default :func:`basis_device_for`: the operator's
            device, or host memory when an accelerator has too little free memory).
    """
    dim = V0.shape[1]
    vectors = sum((m + 1) * (2 if r else 1) for m, r in zip(max_steps, restart, strict=True))
    if basis_dtype is None:
        fits = dim * vectors * 8 <= 2**30
        basis_dtype = torch.float64 if fits else V0.dtype
    nbytes = dim * vectors * torch.empty((), dtype=basis_dtype).element_size()
    device = (
        basis_device_for(V0.device, nbytes) if basis_device is None else torch.device(basis_device)
    )
    procs = [
        _Process(V0[i], max_steps[i], basis_dtype, restart[i], seed + 104729 * i, device)
        for i in range(len(max_steps))
    ]
    for p in procs:
        p.done = p.max_steps <= 0
    while True:
        active = [p for p in procs if not p.done]
        if not active:
            return procs
        block = torch.stack([p.Q[p.steps] for p in active])
        W = operator.matmat(block.to(device=V0.device, dtype=operator.dtype))
        if not torch.isfinite(W).all():
            raise FloatingPointError("non-finite operator product inside Lanczos")
        for p, w in zip(active, W, strict=False):
            p.step(w)
        if stop is not None and not procs[0].done and stop(procs[0]):
            procs[0].done = True


def ritz_pairs(
    proc: _Process, k: int, which: Which, *, vectors: bool
) -> tuple[np.ndarray, np.ndarray, Tensor | None]:
    """Wanted Ritz values, their Lanczos residual estimates and (optionally) vectors."""
    theta, res, Y, _ = ritz_vectors(proc, k, which, vectors=vectors)
    return theta, res, Y


def ritz_vectors(
    proc: _Process, k: int, which: Which, *, vectors: bool = True
) -> tuple[np.ndarray, np.ndarray, Tensor | None, Tensor | None]:
    """Wanted Ritz values, residual estimates, vectors ``Y`` and products ``HY`` (as rows).

    ``HY`` comes from the stored products of the eigenvalue run (None for quadrature probes).
    """
    theta, S = _ritz(proc.alphas, proc.betas)
    idx = _select(theta, k, which)
    beta_m = proc.betas[-1] if proc.betas else 0.0
    res = np.abs(beta_m * S[-1, idx])
    Y = HY = None
    if vectors:
        m = proc.steps
        Sk = torch.as_tensor(S[:, idx].T.copy(), dtype=proc.Q.dtype, device=proc.Q.device)
        Y = Sk @ proc.Q[:m]
        if proc.W is not None:
            HY = Sk @ proc.W[:m]
    return theta[idx], res, Y, HY


def _validate(
    k: int, which: str, tol: float, dim: int, max_iter: int | None, name: str = "k"
) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"{name} must be a positive integer; got {k!r}")
    if k > dim:
        raise ValueError(f"{name} must be at most the dimension D={dim}; got {name}={k}")
    if which not in ("LA", "SA"):
        raise ValueError(f"which must be 'LA' (largest) or 'SA' (smallest); got {which!r}")
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive finite number; got {tol!r}")
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < k):
        raise ValueError(f"max_iter must be an integer >= {name}={k}; got {max_iter!r}")


def default_max_iter(k: int, dim: int) -> int:
    """Default step limit: enough for well-separated top eigenvalues of network Hessians."""
    return min(dim, max(4 * k, 120))


def error_bounds(proc: _Process, k: int, which: Which) -> np.ndarray:
    """Error bound of each wanted Ritz value: ``min(r_i, r_i^2 / gap_i)``.

    ``r_i = |beta_m s_mi|`` bounds the distance to the nearest eigenvalue (always valid). When the
    other eigenvalues are at least ``gap_i`` away, the error is at most ``r_i^2 / gap_i``
    (Kato-Temple; Parlett, *The Symmetric Eigenvalue Problem*, 11.7). The gap is estimated from
    the other Ritz values, each moved towards ``theta_i`` by its own residual (an eigenvalue lies
    within ``r_j`` of ``theta_j``); a Ritz value that has not converged thus shrinks the gap and
    the bound falls back to ``r_i``. The estimate misses eigenvalues the Krylov space has not
    found yet, the usual limit of any Lanczos stopping test.
    """
    theta, S = _ritz(proc.alphas, proc.betas)
    idx = _select(theta, k, which)
    beta_m = proc.betas[-1] if proc.betas else 0.0
    res_all = np.abs(beta_m * S[-1, :])
    bounds = res_all[idx].copy()
    if len(theta) < 2:
        return bounds
    dist = np.abs(theta[idx, None] - theta[None, :]) - res_all[None, :]
    dist[np.arange(len(idx)), idx] = np.inf
    gap = dist.min(axis=1)
    quadratic = np.divide(bounds**2, gap, out=np.full_like(bounds, np.inf), where=gap > 0)
    return np.minimum(bounds, quadratic)


def is_converged(
    proc: _Process, k: int, which: Which, tol: float, *, vectors: bool = False
) -> bool:
    """Every wanted Ritz value's error bound (:func:`error_bounds`) is below ``tol * ||T||``.

    With ``vectors`` the residual itself must be below it (the Ritz vectors are then accurate to
    ``tol ||T|| / gap`` in angle, not only the values).
    """
    if vectors:
        _, bounds, _ = ritz_pairs(proc, k, which, vectors=False)
    else:
        bounds = error_bounds(proc, k, which)
    return bool(np.all(bounds <= tol * max(proc.anorm, 1e-300)))


def converged_stop(
    k: int, which: Which, tol: float, min_steps: int = 0, *, vectors: bool = False
) -> Any:
    """Stopping rule: every wanted Ritz value's error bound is below ``tol * ||T||``."""

    def stop(proc: _Process) -> bool:
        if proc.steps < max(k, min_steps) or proc.block_start >= proc.steps:
            return False
        if not is_converged(proc, k, which, tol, vectors=vectors):
            return False
        # After a breakdown the earlier blocks are exact, but the block started from the restart
        # vector explores the rest of the space: only when its own extreme Ritz value has
        # converged (and so is not a wanted one, or is among the converged wanted ones) is
        # nothing left to find there.
        if proc.block_start == 0:
            return True
        start = proc.block_start
        theta, S = _ritz(proc.alphas[start:], proc.betas[start:])
        i = int(np.argmax(theta)) if which == "LA" else int(np.argmin(theta))
        beta_m = proc.betas[-1] if proc.betas else 0.0
        return bool(abs(beta_m * S[-1, i]) <= tol * proc.anorm)

    return stop


def lanczos(
    operator: Any,
    *,
    k: int = 10,
    which: Which = "LA",
    max_iter: int | None = None,
    tol: float = 1e-6,
    seed: int = 0,
    v0: Tensor | None = None,
    return_eigenvectors: bool = False,
    explicit_residuals: bool = True,
) -> LanczosResult:
    """The ``k`` largest (or smallest) eigenvalues of a symmetric operator.

    Full reorthogonalisation keeps the basis orthogonal, so no spurious copies of converged
    eigenvalues appear and the residual estimates stay meaningful.

    Args:
        operator: symmetric operator with ``dim``, ``dtype``, ``device`` and ``matmat``.
        k: number of wanted eigenvalues.
        which: ``"LA"`` largest algebraic (descending) or ``"SA"`` smallest algebraic (ascending).
        max_iter: maximum Lanczos steps; default ``min(D, max(4k, 120))``.
        tol: stop when each wanted value's error bound ``min(r, r^2 / gap)`` is below
            ``tol * ||T||`` (``r`` its residual, ``gap`` the distance to the other Ritz values
            less their residuals, ``||T||`` an estimate of the spectral radius; see
            :func:`error_bounds`): the absolute error of every value is then below
            ``tol * ||H||``. With ``return_eigenvectors`` the residual ``r`` itself must be
            below ``tol * ||T||``, so that the Ritz vectors' angles to the eigenvectors are
            below ``tol ||H|| / gap`` too (values alone converge with fewer products).
        seed: seeds the Rademacher start vector.
        v0: start vector instead of the random one.
        return_eigenvectors: return the Ritz vectors (rows, in the basis dtype).
        explicit_residuals: measure ``||H y - theta y||`` from the products the run computed
            (``H y = (HQ) s``: honest under rounding of the products, no extra products); else
            the Lanczos estimate ``|beta_m s_m|``.

    Returns:
        :class:`LanczosResult`.

    Cost: at most ``max_iter`` products; memory ``2 (max_iter + 1) D`` numbers for the basis
    and its products (float64 when that fits in 1 GiB), on the operator's device, or in host
    memory when an accelerator has less than twice that free (:func:`basis_device_for`).
    """
    dim = int(operator.dim)
    _validate(k, which, tol, dim, max_iter)
    m = max_iter if max_iter is not None else default_max_iter(k, dim)
    if v0 is None:
        v0 = rademacher(1, dim, seed=seed, dtype=operator.dtype, device=operator.device)[0]
    elif v0.shape != (dim,) or not torch.any(v0 != 0):
        raise ValueError(f"v0 must be a non-zero vector of shape ({dim},); got {tuple(v0.shape)}")
    start = operator.num_hvps if hasattr(operator, "num_hvps") else 0
    (proc,) = run_lanczos(
        operator,
        v0.unsqueeze(0),
        [m],
        restart=[True],
        stop=converged_stop(k, which, tol, vectors=return_eigenvectors),
        seed=seed,
    )
    return finish_eigen_run(
        operator,
        proc,
        k,
        which,
        tol,
        return_eigenvectors=return_eigenvectors,
        explicit_residuals=explicit_residuals,
        start_count=start,
    )


def finish_eigen_run(
    operator: Any,
    proc: _Process,
    k: int,
    which: Which,
    tol: float,
    *,
    return_eigenvectors: bool,
    explicit_residuals: bool,
    start_count: int,
) -> LanczosResult:
    """Ritz pairs of a finished run; explicit residuals from the stored products."""
    k_eff = min(k, proc.steps)
    theta, res_est, Y, HY = ritz_vectors(
        proc, k_eff, which, vectors=return_eigenvectors or explicit_residuals
    )
    converged = is_converged(proc, k_eff, which, tol, vectors=return_eigenvectors) and k_eff == k
    residuals = res_est
    if explicit_residuals and Y is not None and HY is not None:
        theta_t = torch.as_tensor(theta.copy(), dtype=Y.dtype, device=Y.device)
        residuals = torch.linalg.vector_norm(HY - theta_t[:, None] * Y, dim=1).cpu().numpy()
    used = (operator.num_hvps - start_count) if hasattr(operator, "num_hvps") else proc.steps
    return LanczosResult(
        eigenvalues=theta,
        residuals=np.asarray(residuals, dtype=np.float64),
        eigenvectors=Y if return_eigenvectors else None,
        alphas=np.asarray(proc.alphas),
        betas=np.asarray(proc.betas),
        num_matvecs=int(used),
        converged=converged,
    )
