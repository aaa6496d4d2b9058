"""Lanczos iteration with full reorthogonalisation (Lanczos 1950; Golub & Van Loan, ch. 10).

Several independent Lanczos processes can run in lockstep so that each step costs one batched
operator product (``operator.matmat`` on a block of vectors) instead of one product per process:
the eigenvalue run and the stochastic Lanczos quadrature probes share every call.

Each Ritz pair :math:`(\\theta_i, y_i)` of the tridiagonal :math:`T_m = S \\Theta S^\\top` has the
residual :math:`\\|H y_i - \\theta_i y_i\\| = |\\beta_m s_{m,i}|` in exact arithmetic, and some
eigenvalue of :math:`H` lies within that distance of :math:`\\theta_i`.

Memory follows the steps taken: bases grow in chunks (:class:`Rows`), never reserved for
``max_iter`` up front. When even the worst case of a full basis exceeds a memory budget, the
eigenvalue run switches to thick-restart Lanczos (Wu & Simon 2000) on a basis of bounded size
(:func:`thick_restart_lanczos`); :func:`lanczos_memory` is the memory model in bytes. A warm
start multiplies the previous measurement's top vectors and expands their Rayleigh-Ritz pairs
one vector at a time (:func:`warm_run`), or, far from them, runs Lanczos from their sum
(:func:`warm_start_vector`); a bounded run always takes the latter.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

__all__ = ["LanczosResult", "lanczos", "lanczos_memory"]

Which = Literal["LA", "SA"]


@dataclass(frozen=True, eq=False)
class LanczosResult:
    """Ritz approximations of the wanted end of the spectrum.

    Attributes:
        eigenvalues: the ``top_k`` wanted Ritz values; descending for ``"LA"``, ascending for
            ``"SA"``.
        residuals: ``||H y_i - theta_i y_i||`` for each Ritz pair, an error bound on each value.
            Measured with explicit products when ``explicit_residuals`` is on (includes the
            rounding of the products themselves), else the Lanczos estimate ``|beta_m s_mi|``.
        eigenvectors: Ritz vectors as rows, shape ``(top_k, D)``, or None unless requested.
        alphas: diagonal of the tridiagonal matrix (empty after a thick restart).
        betas: off-diagonal of the tridiagonal matrix (a zero marks a restart after breakdown).
        num_hvps: operator products spent.
        converged: whether every wanted eigenvalue met the tolerance (by its error bound).
        basis_rows: basis vectors (and stored products) the run allocated, the memory it used.
    """

    eigenvalues: np.ndarray
    residuals: np.ndarray
    eigenvectors: Tensor | None
    alphas: np.ndarray
    betas: np.ndarray
    num_hvps: int
    converged: bool
    basis_rows: int = 0

    @property
    def num_matvecs(self) -> int:
        """Deprecated name of :attr:`num_hvps`."""
        warnings.warn(
            "LanczosResult.num_matvecs is deprecated; use num_hvps", DeprecationWarning, 2
        )
        return self.num_hvps


def rademacher(
    num: int,
    dim: int,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    dtype: torch.dtype,
    device: Any,
) -> Tensor:
    """``num`` Rademacher vectors (rows) drawn on the CPU (device-independent results).

    One ``generator`` threaded through a measurement keeps every draw deterministic for a seed;
    ``seed`` makes a fresh generator (for standalone calls).
    """
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed or 0))
    signs = torch.randint(0, 2, (num, dim), generator=generator, dtype=torch.int8)
    return (2 * signs - 1).to(dtype=dtype, device=device)


def _ritz(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the tridiagonal matrix."""
    a = np.asarray(alphas, dtype=np.float64)
    if len(a) == 1:
        return a.copy(), np.ones((1, 1))
    b = np.asarray(betas[: len(a) - 1], dtype=np.float64)
    return scipy.linalg.eigh_tridiagonal(a, b)


#: Bytes of one storage chunk: the basis grows by this much at a time (at least one row).
CHUNK_BYTES = 32 * 2**20
#: Rows of one chunk at most (small models: few, cheap allocations).
CHUNK_ROWS = 16


class Rows:
    """Rows of length ``dim`` stored in chunks allocated as rows are appended.

    The storage holds ``len(self)`` rows rounded up to a chunk, never a reserved maximum.
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dim, self.dtype, self.device = dim, dtype, torch.device(device)
        size = torch.empty((), dtype=dtype).element_size()
        self.chunk = max(1, min(CHUNK_ROWS, CHUNK_BYTES // max(1, dim * size)))
        self.chunks: list[Tensor] = []
        self.n = 0

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        """Bytes allocated."""
        return sum(c.numel() * c.element_size() for c in self.chunks)

    @property
    def allocated_rows(self) -> int:
        return len(self.chunks) * self.chunk

    def append(self, v: Tensor) -> None:
        if self.n == self.allocated_rows:
            self.chunks.append(
                torch.empty(self.chunk, self.dim, dtype=self.dtype, device=self.device)
            )
        self.chunks[-1][self.n % self.chunk] = v
        self.n += 1

    def views(self, n: int | None = None) -> Iterator[tuple[int, Tensor]]:
        """``(first row, view)`` of each chunk's filled rows, up to ``n`` rows."""
        n = self.n if n is None else min(n, self.n)
        for i, c in enumerate(self.chunks):
            start = i * self.chunk
            if start >= n:
                return
            yield start, c[: min(self.chunk, n - start)]

    def __getitem__(self, idx: int | slice) -> Tensor:
        if isinstance(idx, slice):
            rows = range(*idx.indices(self.n))
            if not len(rows):
                return torch.empty(0, self.dim, dtype=self.dtype, device=self.device)
            return torch.stack([self[i] for i in rows])
        if idx < 0:
            idx += self.n
        return self.chunks[idx // self.chunk][idx % self.chunk]

    def coeffs(self, w: Tensor, n: int | None = None) -> Tensor:
        """Inner products of the first ``n`` rows with ``w`` (or with the rows of a block)."""
        parts = [matmul_sum(v, w) for _, v in self.views(n)]
        return torch.cat(parts) if parts else w.new_zeros((0, *w.shape[1:]))

    def combine(
        self, c: Tensor, rounded_to: torch.dtype | None = None, out: Tensor | None = None
    ) -> Tensor:
        """``c @ rows[:len(c)]`` for a vector (or a ``(b, n)`` block) of coefficients.

        ``rounded_to``: combine the rows as rounded to that dtype (the vectors an operator in
        that dtype actually multiplied). ``out``: where to write the result (else a new tensor).

        Column block by column block (:func:`combine_columns`): each stored row is read once
        and the output block stays in cache while every chunk adds to it, never an outer
        product per row.
        """
        n = c.shape[-1]
        if out is None:
            out = c.new_empty((*c.shape[:-1], self.dim))
        views = list(self.views(n))
        if not views:
            return out.zero_()
        width = combine_columns(self.dim, out.numel() // self.dim, out.element_size(), out.device)
        if out.dim() == 2 and len(views) > 1 and out.device.type == "cpu":
            # A block from chunks of few rows (wide models: one row each) would be a rank-few
            # update per chunk; the rows' column slices copied into one block make it one
            # product per column block (1.8x faster for 10 Ritz vectors of 21 rows of 4.3M).
            size = max(1, n * out.element_size())
            width = min(GATHER_COLUMNS, max(4096, GATHER_BLOCK_BYTES // size))
            block = c.new_empty((n, min(width, self.dim)))
            for a in range(0, self.dim, width):
                b = block[:, : min(width, self.dim - a)]
                for start, v in views:
                    part = v[:, a : a + width]
                    if rounded_to is not None:
                        part = part.to(rounded_to).to(v.dtype)
                    b[start : start + v.shape[0]] = part
                out[:, a : a + width].addmm_(c, b, beta=0)
            return out
        for a in range(0, self.dim, width):
            o = out[..., a : a + width]
            for i, (start, v) in enumerate(views):
                part = v[:, a : a + width]
                if rounded_to is not None:
                    part = part.to(rounded_to).to(v.dtype)
                cs = c[..., start : start + v.shape[0]]
                beta = 0 if i == 0 else 1  # beta 0: the block's first chunk overwrites it
                if o.dim() == 1:
                    o.addmv_(part.T, cs, beta=beta)
                else:
                    o.addmm_(cs, part, beta=beta)
        return out


#: Bytes of output one column block of :meth:`Rows.combine` holds on a CPU: small enough to stay
#: in cache while every stored chunk adds to it.
COMBINE_BLOCK_BYTES = 2**20


#: Columns, and bytes at most, of the block of rows :meth:`Rows.combine` gathers for a block of
#: coefficients on a CPU (measured best at 65,536 columns for 21 rows of 4.3M: 0.14 s against
#: 0.25 s for a rank-one update per row).
GATHER_COLUMNS = 2**16
GATHER_BLOCK_BYTES = 8 * 2**20


def combine_columns(dim: int, rows: int, size: int, device: torch.device) -> int:
    """Columns per block of :meth:`Rows.combine`: all of them on an accelerator (one kernel per
    chunk), else :data:`COMBINE_BLOCK_BYTES` of output (at least 4,096 columns)."""
    if device.type != "cpu":
        return dim
    return max(4096, COMBINE_BLOCK_BYTES // max(1, rows * size))


def matmul_sum(V: Tensor, w: Tensor, chunk: int = 2**16) -> Tensor:
    """``V @ w`` over a long inner dimension, in ``V``'s dtype, summed in float64 over chunks
    of ``chunk`` entries (:func:`dot`)."""
    return _chunked_matmul(V, w, chunk).to(V.dtype)


def _chunked_matmul(V: Tensor, w: Tensor, chunk: int) -> Tensor:
    """``V @ w`` (rows of ``V``; ``w`` a vector or a block of columns) as float64 sums of
    products over ``chunk`` entries of the inner dimension (one product when it is short or
    already float64). On an accelerator the chunks go in one batched product
    (:func:`_batched_chunks`: one kernel, not one per chunk); on a CPU a loop over them is
    faster (2.9 ms against 5.6 ms for a 4.3M-long row on one core)."""
    D = V.shape[-1]
    if V.dtype == torch.float64 or D <= chunk:
        return (V @ w).double()
    if V.device.type != "cpu":
        return _batched_chunks(V, w, chunk)
    total = None
    for a in range(0, D, chunk):
        part = (V[:, a : a + chunk] @ w[a : a + chunk]).double()
        total = part if total is None else total + part
    assert total is not None
    return total


def _batched_chunks(V: Tensor, w: Tensor, chunk: int) -> Tensor:
    """:func:`_chunked_matmul` with the whole chunks in one batched product, the rest in
    another."""
    D = V.shape[-1]
    n = D - D % chunk
    heads = V[:, :n].reshape(V.shape[0], n // chunk, chunk).transpose(0, 1)  # a view
    ws = w[:n].reshape(n // chunk, chunk, *w.shape[1:])
    parts = torch.bmm(heads, ws if w.dim() > 1 else ws.unsqueeze(-1))
    total = parts.double().sum(dim=0)
    total = total if w.dim() > 1 else total.squeeze(-1)
    if n < D:
        total = total + (V[:, n:] @ w[n:]).double()
    return total


class Ring:
    """The last two rows only: storage of a quadrature probe without full reorthogonalisation.

    Same interface as :class:`Rows` for what a process needs; ``coeffs``/``combine`` act on the
    two kept rows (local reorthogonalisation). Used when the bases must stay bounded: the
    quadrature of a Lanczos run in finite precision stays close to the exact one (Greenbaum
    1989) even though ghost copies of converged Ritz values appear.
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dim, self.dtype, self.device = dim, dtype, torch.device(device)
        self.rows: dict[int, Tensor] = {}
        self.n = 0

    def __len__(self) -> int:
        return self.n

    @property
    def allocated_rows(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.rows.values())

    def append(self, v: Tensor) -> None:
        self.rows[self.n] = v.to(device=self.device, dtype=self.dtype).clone()
        self.n += 1
        self.rows.pop(self.n - 3, None)

    def __getitem__(self, idx: int) -> Tensor:
        return self.rows[idx if idx >= 0 else self.n + idx]

    def _kept(self) -> Tensor:
        return torch.stack([self.rows[i] for i in sorted(self.rows)])

    def coeffs(self, w: Tensor, n: int | None = None) -> Tensor:
        return self._kept() @ w

    def combine(self, c: Tensor, out: Tensor | None = None) -> Tensor:
        return torch.matmul(c, self._kept(), out=out)


def _reorthogonalise(
    basis: Rows, w: Tensor, n: int | None = None, scratch: Tensor | None = None
) -> tuple[Tensor, float]:
    """``w`` minus its part in the first ``n`` rows (classical Gram-Schmidt, DGKS second pass),
    in place.

    After the three-term recurrence ``w`` is nearly orthogonal already, so one pass usually keeps
    it orthogonal to working precision; a second pass runs only when the first removed a large
    share of ``w`` (then rounding may have left components along the basis).
    """
    before = float(torch.linalg.vector_norm(w))
    beta = before
    # One scratch vector for both passes (the caller's, reused step after step: a new one
    # costs page faults on a CPU).
    part = torch.empty_like(w) if scratch is None else scratch
    for _ in range(2):
        w = w.sub_(basis.combine(basis.coeffs(w, n), out=part))
        beta = float(torch.linalg.vector_norm(w))
        if beta > DGKS_ETA * before:
            break
        before = beta
    return w, beta


class _Process:
    """State of one Lanczos process: basis, coefficients, stopping rule."""

    def __init__(
        self,
        v0: Tensor,
        max_steps: int,
        basis_dtype: torch.dtype,
        restart: bool,
        generator: torch.Generator,
        device: torch.device | None = None,
        keep_first_product: bool = False,
        full_reorth: bool = True,
    ) -> None:
        dim = v0.shape[0]
        device = v0.device if device is None else device
        self.max_steps = max_steps
        self.Q: Rows | Ring = (Rows if full_reorth else Ring)(dim, basis_dtype, device)
        # The eigenvalue run keeps the products H q_j: then H y = (HQ) s for every Ritz vector
        # y = Q s, so residuals are measured on the products actually computed, at no extra cost.
        self.W = Rows(dim, basis_dtype, device) if restart else None
        v0 = v0.to(device=device, dtype=basis_dtype)
        self.Q.append(v0 / torch.linalg.vector_norm(v0))
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.done = False
        self.restart = restart
        self.generator = generator
        self.anorm = 0.0
        self.block_start = 0  # first step of the current Krylov block (after the last restart)
        self._scratch: Tensor | None = None  # the reorthogonalisation's, kept between steps
        # H q_0 of a quadrature probe: a free Hutchinson sample of the trace.
        self.first_product: Tensor | None = None
        self.keep_first_product = keep_first_product
        self.product_dtype: torch.dtype | None = None  # the operator's dtype (basis rounded)

    @property
    def steps(self) -> int:
        return len(self.alphas)

    def step(self, w: Tensor) -> None:
        j = self.steps
        q = self.Q[j]
        w = w.to(device=q.device, dtype=q.dtype)
        if w.untyped_storage().data_ptr() == q.untyped_storage().data_ptr():
            w = w.clone()  # an operator that returned its input (a view of the basis row)
        if self.W is not None:
            self.W.append(w)
        if j == 0 and self.keep_first_product:
            self.first_product = w.clone()
            self.start = q.clone()
        alpha = dot(q, w)
        if not math.isfinite(alpha):  # any inf or nan in w makes this float64 sum one
            raise FloatingPointError("non-finite operator product inside Lanczos")
        # In place from here: ``w`` is this step's row of the operator's output (stored above
        # as a copy when kept), and every new vector of length D costs page faults on a CPU.
        w = w.sub_(q, alpha=alpha)
        if j > 0:
            w = w.sub_(self.Q[j - 1], alpha=self.betas[-1])
        if self._scratch is None or self._scratch.shape != w.shape:  # w has q's dtype
            self._scratch = torch.empty_like(w)
        w, beta = _reorthogonalise(self.Q, w, scratch=self._scratch)
        self.alphas.append(alpha)
        self.anorm = max(self.anorm, abs(alpha) + beta + (self.betas[-1] if j > 0 else 0.0))
        if j + 1 >= self.Q.dim:
            self.betas.append(0.0)
            self.done = True
            return
        tiny = 100 * torch.finfo(q.dtype).eps * max(self.anorm, 1e-300)
        if beta <= tiny:
            # Invariant subspace found. The eigenvalue run restarts from a random vector
            # orthogonal to the basis (beta = 0 splits T into blocks) so that repeated eigenvalues
            # are found too; quadrature probes stop (their quadrature is exact).
            self.betas.append(0.0)
            if not self.restart or j + 1 >= self.max_steps:
                self.done = True
                return
            self.Q.append(_random_orthogonal(self.Q, self.generator))
            self.block_start = j + 1
        else:
            self.betas.append(beta)
            self.Q.append(w.div_(beta))
        if self.steps >= self.max_steps:
            self.done = True


def _random_orthogonal(basis: Rows, generator: torch.Generator) -> Tensor:
    """A random unit vector orthogonal to the rows of ``basis`` (Gaussian, drawn on the CPU)."""
    w = torch.randn(basis.dim, generator=generator, dtype=basis.dtype).to(basis.device)
    for _ in range(2):
        w = w - basis.combine(basis.coeffs(w))
    return w / torch.linalg.vector_norm(w)


#: Reorthogonalise again while a pass leaves less than this share of the vector's norm
#: (Daniel, Gragg, Kaufman & Stewart 1976; 1/sqrt(2), as in ARPACK).
DGKS_ETA = 0.7071067811865476

#: Share of an accelerator's free memory the Lanczos bases may take before going to host memory.
DEVICE_BASIS_SHARE = 0.5
#: Share of the host's available memory the bases may take (the default ``max_basis_bytes``).
HOST_BASIS_SHARE = 0.5
#: Bases are kept in float64 while that takes at most this many bytes.
FLOAT64_BASIS_BYTES = 2**30
#: Vectors a bounded (thick-restart) basis holds beyond ``top_k``: few, so that a model too large
#: for a full basis needs little more than its Ritz vectors.
BOUNDED_EXTRA_ROWS = 6


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


def host_available_bytes() -> int:
    """Available host memory (``MemAvailable`` on Linux, else physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 2**34


def default_max_basis_bytes(device: torch.device) -> int:
    """Default memory budget of the bases: half the free memory of the device or the host,
    whichever is larger (the bases go to host memory when the device has too little)."""
    budget = HOST_BASIS_SHARE * host_available_bytes()
    if device.type == "cuda":
        budget = max(budget, DEVICE_BASIS_SHARE * torch.cuda.mem_get_info(device)[0])
    return int(budget)


def lanczos_memory(
    dim: int,
    steps: int,
    *,
    top_k: int = 10,
    probes: int = 0,
    slq_steps: int = 0,
    dtype: torch.dtype = torch.float32,
    max_basis_rows: int | None = None,
    keep_products: bool = True,
) -> int:
    """Bytes of the Lanczos bases of one measurement (the memory model).

    With D parameters, m eigenvalue steps, P extra quadrature probes of s steps each:

    * full basis (default): the eigenvalue run keeps its basis and products, ``2 m + 1`` rows;
      each probe ``s + 1`` rows: ``((2 m + 1) + P (s + 1)) D`` numbers;
    * bounded (``max_basis_rows=c``, thick restart): ``c + 1`` rows during the run (the basis
      and the next vector); after it the ``top_k`` Ritz vectors, their products when
      ``keep_products`` (the trace deflation needs them), and 3 rows per quadrature probe (no
      reorthogonalisation): ``max(c + 1, top_k (1 + keep_products) + 3 P) D`` numbers.

    A warm run (:func:`warm_run`) holds its basis and products, ``2 n`` rows after ``n``
    products: the full-basis count with ``steps = n``.

    Not counted: the operator (model, retained graph) and its working space, which include
    one or two vectors of length D in flight (a product and its flattening; a warm run's first
    products are taken a storage chunk of rows at a time, at most ``CHUNK_BYTES``). A number is 8
    bytes in float64, 4 in float32. A full basis grows in chunks of at most ``CHUNK_ROWS`` rows,
    so it allocates up to one chunk more per process than it uses.
    """
    size = torch.empty((), dtype=dtype).element_size()
    if max_basis_rows is None:
        rows = 2 * steps + 1 + probes * (slq_steps + 1)
    else:
        rows = max(max_basis_rows + 1, top_k * (2 if keep_products else 1) + 3 * probes)
    return int(rows * dim * size)


@dataclass(frozen=True)
class StoragePlan:
    """Where and how the bases of a run are stored."""

    dtype: torch.dtype
    device: torch.device
    max_rows: int | None  # None: full basis; else the thick-restart cap


def bounded_cap(top_k: int, budget_rows: int) -> int:
    """Thick-restart cap for a budget of ``budget_rows`` vectors: :data:`BOUNDED_EXTRA_ROWS`
    beyond ``top_k`` (fewer when the budget is smaller, never under ``top_k + 2``)."""
    return max(top_k + 2, min(top_k + BOUNDED_EXTRA_ROWS, budget_rows - 1))


def plan_storage(
    dim: int,
    rows: int,
    *,
    top_k: int,
    op_dtype: torch.dtype,
    device: torch.device,
    max_basis_bytes: int | None = None,
    keep_products: bool = True,
) -> StoragePlan:
    """Choose dtype, device and basis size for ``rows`` rows of length ``dim`` at most.

    float64 while that takes at most :data:`FLOAT64_BASIS_BYTES` and the budget; else the
    operator's dtype. If even that exceeds ``max_basis_bytes`` (default
    :func:`default_max_basis_bytes`), the basis is bounded: thick restart with the cap of
    :func:`bounded_cap` (memory in :func:`lanczos_memory`).
    """
    budget = default_max_basis_bytes(device) if max_basis_bytes is None else max_basis_bytes
    f64 = rows * dim * 8
    dtype = torch.float64 if f64 <= min(FLOAT64_BASIS_BYTES, budget) else op_dtype
    size = torch.empty((), dtype=dtype).element_size()
    row = dim * size
    if rows * row <= budget:
        return StoragePlan(dtype, basis_device_for(device, rows * row), None)
    cap = bounded_cap(top_k, budget // row)
    need = lanczos_memory(
        dim, 0, top_k=top_k, dtype=dtype, max_basis_rows=cap, keep_products=keep_products
    )
    return StoragePlan(dtype, basis_device_for(device, need), cap)


def _select(theta: np.ndarray, k: int, which: Which) -> np.ndarray:
    """Indices of the wanted Ritz values in output order."""
    order = np.argsort(theta)
    return order[::-1][:k] if which == "LA" else order[:k]


def advance(operator: Any, procs: list[_Process], stop: Any = None) -> None:
    """Step the processes in lockstep, one batched product per step, until all are done.

    ``stop(process) -> bool`` is checked after each step of ``procs[0]``.
    """
    for p in procs:
        p.done = p.done or p.steps >= p.max_steps
    out: Tensor | None = None
    while True:
        active = [p for p in procs if not p.done]
        if not active:
            return
        rows = [p.Q[p.steps] for p in active]
        # One process (the eigenvalue run): its basis row itself, not a copy of length D.
        block = rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)
        for p in active:
            p.product_dtype = operator.dtype
        block = block.to(device=operator.device, dtype=operator.dtype)
        if getattr(operator, "accepts_out", False):
            # The products go into one buffer reused step after step (each step copies what
            # it keeps): a new one per product costs page faults on a CPU.
            if out is None or out.shape[0] < len(active):
                out = torch.empty_like(block)
            W = operator.matmat(block, out=out[: len(active)])
        else:
            W = operator.matmat(block)
        # A non-finite product is caught by each step's first inner product (free), not by a
        # pass of its own over the products.
        for p, w in zip(active, W, strict=False):
            p.step(w)
        if stop is not None and not procs[0].done and stop(procs[0]):
            procs[0].done = True


def extend(operator: Any, procs: list[_Process], steps: int) -> None:
    """Continue the processes to ``steps`` steps each (those that can), in lockstep."""
    live = []
    for p in procs:
        # Exhausted: full dimension, an exact quadrature, or no next vector (a breakdown at
        # the step limit leaves none).
        exhausted = p.steps >= p.Q.dim or len(p.Q) <= p.steps
        exhausted = exhausted or bool(p.betas and p.betas[-1] == 0.0 and not p.restart)
        if p.steps < steps and not exhausted:
            p.max_steps, p.done = steps, False
            live.append(p)
    advance(operator, live)


def run_lanczos(
    operator: Any,
    V0: Tensor,
    max_steps: list[int],
    *,
    restart: list[bool],
    stop: Any = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    keep_first_product: bool = False,
) -> list[_Process]:
    """Run ``len(V0)`` Lanczos processes in lockstep, one batched product per step.

    Args:
        operator: has ``matmat((B, D)) -> (B, D)``, ``dtype`` and ``device``.
        V0: start vectors as rows.
        max_steps: step limit of each process.
        restart: per process, restart after breakdown (eigenvalue runs) or stop (quadrature).
        stop: optional callable ``stop(process) -> bool`` checked after each step of process 0.
        seed: seeds restart vectors when no ``generator`` is given.
        generator: draws the restart vectors (one generator per measurement).
        basis_dtype: dtype of the stored basis (default: float64 when the worst case fits in
            1 GiB).
        basis_device: where the bases live (default :func:`basis_device_for`: the operator's
            device, or host memory when an accelerator has too little free memory).
        keep_first_product: keep ``H q_0`` of each process (free trace samples).
    """
    dim = V0.shape[1]
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    if basis_dtype is None or basis_device is None:
        rows = sum((m + 1) * (2 if r else 1) for m, r in zip(max_steps, restart, strict=True))
        plan = plan_storage(dim, rows, top_k=1, op_dtype=V0.dtype, device=V0.device)
        basis_dtype = plan.dtype if basis_dtype is None else basis_dtype
        basis_device = plan.device if basis_device is None else basis_device
    device = torch.device(basis_device)
    procs = [
        _Process(
            V0[i], max_steps[i], basis_dtype, restart[i], generator, device, keep_first_product
        )
        for i in range(len(max_steps))
    ]
    advance(operator, procs, stop)
    return procs


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
        Sk = torch.as_tensor(S[:, idx].T.copy(), dtype=proc.Q.dtype, device=proc.Q.device)
        Y = proc.Q.combine(Sk)
        if proc.W is not None:
            HY = proc.W.combine(Sk)
    return theta[idx], res, Y, HY


def _validate(
    k: int, which: str, tol: float, dim: int, max_iter: int | None, name: str = "top_k"
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


def value_bounds(theta: np.ndarray, res_all: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Error bound of each wanted Ritz value ``theta[idx]``: ``min(r_i, r_i^2 / gap_i)``.

    ``res_all`` are the residuals of all Ritz values (``inf`` where unknown). ``r_i`` bounds the
    distance to the nearest eigenvalue (always valid). When the other eigenvalues are at least
    ``gap_i`` away, the error is at most ``r_i^2 / gap_i`` (Kato-Temple; Parlett, *The Symmetric
    Eigenvalue Problem*, 11.7). The gap is estimated from the other Ritz values, each moved
    towards ``theta_i`` by its own residual (an eigenvalue lies within ``r_j`` of ``theta_j``); a
    Ritz value that has not converged thus shrinks the gap and the bound falls back to ``r_i``.
    The estimate misses eigenvalues the Krylov space has not found yet, the usual limit of any
    Lanczos stopping test.
    """
    bounds = res_all[idx].copy()
    if len(theta) < 2:
        return bounds
    dist = np.abs(theta[idx, None] - theta[None, :]) - res_all[None, :]
    dist[np.arange(len(idx)), idx] = np.inf
    gap = dist.min(axis=1)
    quadratic = np.divide(bounds**2, gap, out=np.full_like(bounds, np.inf), where=gap > 0)
    return np.minimum(bounds, quadratic)


def error_bounds(proc: _Process, k: int, which: Which) -> np.ndarray:
    """:func:`value_bounds` of the wanted Ritz values of a Lanczos process."""
    theta, S = _ritz(proc.alphas, proc.betas)
    beta_m = proc.betas[-1] if proc.betas else 0.0
    return value_bounds(theta, np.abs(beta_m * S[-1, :]), _select(theta, k, which))


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
) -> Callable[[_Process], bool]:
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


@dataclass(frozen=True, eq=False)
class EigenRun:
    """What an eigenvalue run leaves for the rest of a measurement.

    ``Q``/``W``: an orthonormal basis and its products (``W = QH``, as rows) to deflate the
    trace with; ``proc``: the Lanczos process when its tridiagonal matrix is a quadrature rule
    of its start vector (plain single-vector run), else None.
    """

    theta: np.ndarray
    residuals: np.ndarray
    Y: Tensor
    HY: Tensor
    converged: bool
    Q: Rows | Tensor
    W: Rows | Tensor
    proc: _Process | None
    basis_rows: int
    estimates: np.ndarray | None = None
    bounded: bool = False


def _products(
    operator: Any, V: Tensor, *, rows_per_call: int | None = None, out: Tensor | None = None
) -> Tensor:
    """``V H`` for rows ``V`` (in ``V``'s dtype and device), checked finite; written into
    ``out`` (rows like ``V``) when the operator can and one call takes every row."""
    n = V.shape[0] if rows_per_call is None else rows_per_call
    if out is not None and (n < V.shape[0] or not getattr(operator, "accepts_out", False)):
        out = None
    parts = []
    for a in range(0, V.shape[0], max(1, n)):
        block = V[a : a + max(1, n)].to(device=operator.device, dtype=operator.dtype)
        res = operator.matmat(block) if out is None else operator.matmat(block, out=out)
        parts.append(res.to(device=V.device, dtype=V.dtype))
    products = (parts[0] if len(parts) == 1 else torch.cat(parts)) if parts else V.clone()
    if not all_finite(products):
        raise FloatingPointError("non-finite operator product inside Lanczos")
    return products


def all_finite(x: Tensor, chunk: int = 2**22) -> bool:
    """Whether every entry is finite.

    A finite sum proves it (an inf or nan entry makes the sum inf or nan): one pass with no
    temporary, 3 ms for 2e7 float32 entries on one core against 100 ms for the mask. Only a
    sum that is not finite (maybe an overflow of finite entries) is checked entry by entry,
    in chunks (no mask the size of ``x``).
    """
    flat = x.reshape(-1)
    if bool(torch.isfinite(flat.sum())):
        return True
    return all(bool(torch.isfinite(c).all()) for c in flat.split(chunk))


def dot(a: Tensor, b: Tensor, chunk: int = 2**16) -> float:
    """``a . b`` as a float64 sum of short float32 dots: one BLAS float32 dot accumulates in
    float32, off by ~5e-4 relative at 2e7 entries and ~1e-2 at 1e8 (far above the eigenvalue
    tolerance); chunks of 65k entries stay near 1e-9, at about 1.5x the time."""
    return float(_chunked_matmul(a[None], b, chunk)[0])


def _orthogonalise_rows(B: list[Tensor], w: Tensor) -> tuple[Tensor, np.ndarray, float]:
    """``w`` minus its part in the rows ``B`` (classical Gram-Schmidt, DGKS second pass), in
    place: one row at a time, so no copy of the basis or of ``w`` is made. Returns ``w``, the
    coefficients and the rest's norm."""
    total = np.zeros(len(B))
    before = beta = float(torch.linalg.vector_norm(w))
    for _ in range(2):
        c = [dot(q, w) for q in B]
        for q, ci in zip(B, c, strict=True):
            w.add_(q, alpha=-ci)
        total += c
        beta = float(torch.linalg.vector_norm(w))
        if beta > DGKS_ETA * before:
            break
        before = beta
    return w, total, beta


#: Entries of the block of rows :func:`_rotate` gathers at a time (in cache: 0.27 s for 12 rows
#: of 2e7 on one core, against 0.31 s for 2**22).
ROTATE_BLOCK_ELEMENTS = 2**20


def _rotate(Q: list[Tensor], S: np.ndarray) -> None:
    """``Q[:r] = S^T Q[:n]`` in place (``S`` is ``n x r``), in column blocks of a few MB: no
    ``r x D`` copy."""
    n, r = S.shape
    St = torch.as_tensor(S.T.copy(), dtype=Q[0].dtype, device=Q[0].device)
    width = max(1, ROTATE_BLOCK_ELEMENTS // max(n, 1))
    for a in range(0, Q[0].shape[0], width):
        new = St @ torch.stack([q[a : a + width] for q in Q[:n]])
        for i in range(r):
            Q[i][a : a + width] = new[i]


def thick_restart_lanczos(
    operator: Any,
    v0: Tensor,
    *,
    k: int,
    which: Which,
    tol: float,
    cap: int,
    max_hvps: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    vectors: bool = False,
    products: bool = True,
    keep_products: bool = True,
) -> EigenRun:
    """Thick-restart Lanczos (Wu & Simon 2000) on a basis of at most ``cap`` vectors plus the
    next one. ``v0`` becomes the first basis vector and is overwritten (pass a copy).

    When the basis is full, the ``keep = k + (cap - k) // 2`` wanted Ritz vectors replace it
    (rotated in place), followed by the last Lanczos vector; the projected matrix becomes an
    arrowhead plus a tridiagonal, kept dense (``cap x cap``). Each step orthogonalises against the
    whole basis, so the Ritz residual is ``|beta s_last|`` as in plain Lanczos. With
    ``products`` the ``k`` Ritz vectors' products are computed at the end (``k`` more products,
    one at a time) for explicit residuals; ``keep_products`` keeps them (the trace deflation
    needs them), else each is dropped once its residual is measured.

    Memory (:func:`lanczos_memory`): ``cap + 1`` vectors during the run, grown as used; at the
    end the basis shrinks to the ``k`` Ritz vectors (``2 k`` with kept products). Cost: more
    products than a full basis for the same accuracy (each restart discards part of the Krylov
    space), at most ``max_hvps`` (+ ``k``).
    """
    Q = [v0.to(device=device, dtype=dtype)]  # no copy: the start vector is the first row
    Q[0].div_(torch.linalg.vector_norm(Q[0]))
    T = np.zeros((cap + 1, cap + 1))
    keep = min(cap - 1, k + (cap - k) // 2)
    used, anorm = 0, 0.0
    # Rows a restart let go, reused for the next products (a new row costs page faults on a
    # CPU: 45 ms for 2e7 parameters).
    free: list[Tensor] = []
    while True:
        j = len(Q)
        buf = free.pop()[None] if free else None
        w, c, beta = _orthogonalise_rows(Q, _products(operator, Q[-1][None], out=buf)[0])
        used += 1
        T[:j, j - 1] = T[j - 1, :j] = c
        anorm = max(anorm, float(np.abs(c).sum()) + beta)
        theta, S = np.linalg.eigh(T[:j, :j])
        idx = _select(theta, min(k, j), which)
        res_all = np.abs(beta * S[-1])
        bounds = res_all[idx] if vectors else value_bounds(theta, res_all, idx)
        converged = len(idx) == k and bool(np.all(bounds <= tol * anorm))
        if converged or used >= max_hvps or j >= v0.shape[0]:
            break
        tiny = 100 * torch.finfo(dtype).eps * max(anorm, 1e-300)
        q = w.div_(beta) if beta > tiny else _random_orthogonal_rows(Q, generator)
        del w
        if j == cap:  # restart: keep the wanted Ritz vectors, then continue from q
            order = _select(theta, keep, which)
            _rotate(Q, S[:, order])
            free += Q[keep:]
            del Q[keep:]
            T[:] = 0.0
            T[np.arange(keep), np.arange(keep)] = theta[order]
        Q.append(q)
    del w
    free.clear()
    _rotate(Q, S[:, idx])
    del Q[len(idx) :]
    Y = _stack_moving(Q)
    residuals, HY = _ritz_residuals(operator, Y, theta[idx], keep_products) if products else (
        res_all[idx], None)  # fmt: skip
    rows = max(cap + 1, len(idx) * (2 if HY is not None else 1))
    run = EigenRun(
        theta=theta[idx].copy(), residuals=np.asarray(residuals, dtype=np.float64), Y=Y,
        HY=HY, converged=converged, Q=Y, W=HY, proc=None, basis_rows=rows,  # type: ignore[arg-type]
        estimates=res_all[idx].copy(), bounded=True,
    )  # fmt: skip
    return run


def _stack_moving(rows: list[Tensor]) -> Tensor:
    """The rows as one tensor, each freed once copied (one row of overhead, not a full copy)."""
    out = torch.empty(len(rows), rows[0].shape[0], dtype=rows[0].dtype, device=rows[0].device)
    for i in range(len(rows)):
        out[i] = rows[i]
        rows[i] = None  # type: ignore[call-overload]
    rows.clear()
    return out


def _ritz_residuals(
    operator: Any, Y: Tensor, theta: np.ndarray, keep: bool
) -> tuple[np.ndarray, Tensor | None]:
    """``||H y - theta y|| / ||y||`` for each row ``y`` (one product at a time, measured on ``y``
    as the operator's dtype rounds it), and the products when ``keep``."""
    HY = torch.empty_like(Y) if keep else None
    residuals = np.empty(len(theta))
    scratch = torch.empty_like(Y[:1]) if len(Y) else None  # every product's, in turn
    for i, y in enumerate(Y):
        h = _products(operator, y[None], out=scratch)[0]
        if HY is not None:
            HY[i] = h
        if operator.dtype != Y.dtype:
            y = y.to(operator.dtype).to(Y.dtype)
        residuals[i] = float(torch.linalg.vector_norm(h.add_(y, alpha=-float(theta[i]))))
        residuals[i] /= float(torch.linalg.vector_norm(y))
    return residuals, HY


def _random_orthogonal_rows(B: list[Tensor], generator: torch.Generator) -> Tensor:
    w = torch.randn(B[0].shape[0], generator=generator, dtype=B[0].dtype).to(B[0].device)
    for _ in range(2):
        w = _orthogonalise_rows(B, w)[0]
    return w.div_(torch.linalg.vector_norm(w))


def _finish(
    theta: np.ndarray,
    estimates: np.ndarray,
    Y: Tensor,
    HY: Tensor | None,
    converged: bool,
    Q: Rows | Tensor,
    W: Rows | Tensor | None,
    proc: _Process | None,
    basis_rows: int,
    multiplied: Tensor | None = None,
) -> EigenRun:
    """Package a run; residuals measured on the products when there are any.

    ``multiplied``: the vectors whose products ``HY`` are (``Y`` as the operator saw it), for
    the residual ``||HY - theta Y|| / ||Y||``.
    """
    residuals = np.asarray(estimates, dtype=np.float64)
    if HY is not None:
        V = Y if multiplied is None else multiplied
        residuals = np.empty(len(theta))
        scratch = torch.empty_like(HY[0]) if len(theta) else None  # one row, not k (wide models)
        for i in range(len(theta)):
            r = torch.sub(HY[i], V[i], alpha=float(theta[i]), out=scratch)
            residuals[i] = float(torch.linalg.vector_norm(r) / torch.linalg.vector_norm(V[i]))
    return EigenRun(
        theta=np.asarray(theta, dtype=np.float64),
        residuals=np.asarray(residuals, dtype=np.float64),
        Y=Y,
        HY=HY,  # type: ignore[arg-type]
        converged=converged,
        Q=Q,
        W=W,  # type: ignore[arg-type]
        proc=proc,
        basis_rows=basis_rows,
        estimates=np.asarray(estimates, dtype=np.float64),
    )


#: Share of a random direction in a warm start vector (insurance for eigenvectors the previous
#: subspace missed; small, so the previous subspace dominates the Krylov space's first steps).
WARM_NOISE = 0.05


def warm_start_vector(previous: Tensor, generator: torch.Generator) -> Tensor:
    """Start vector from a previous top subspace (rows): the sum of an orthonormal basis of it
    (equal weight on every previous direction) plus :data:`WARM_NOISE` of a random unit vector.

    When the operator changed little, the first ``l`` Lanczos steps nearly span the new top
    subspace, so the run converges in a few more steps instead of finding it from scratch.
    """
    P = torch.linalg.qr(previous.double().T).Q.T
    v = P.sum(dim=0) / math.sqrt(P.shape[0])
    z = torch.randn(P.shape[1], generator=generator, dtype=torch.float64).to(v.device)
    return v + WARM_NOISE * z / torch.linalg.vector_norm(z)


#: A warm start falls back to a Lanczos run from :func:`warm_start_vector` when, after the
#: Rayleigh-Ritz step on the previous vectors, the expansion is expected to need more than this
#: many products per wanted eigenvalue (:func:`_expected_expansions`). Each expansion mostly
#: serves one wanted pair (a block method's Krylov direction), while a Lanczos run refines all
#: of them with each product: far from the wanted subspace, or asked for many more digits,
#: Lanczos is cheaper (measured: 45 products from 10 random vectors against 21-24 cold on the
#: digits models; 37 against 22 cold for top 5 vectors at 1e-8 on a matrix changed by 1e-3).
WARM_EXPANSIONS_PER_VALUE = 3.0
#: A Gram residual ``sqrt(||H y||^2 - theta^2)`` below this share of ``||H||`` has lost digits
#: to cancellation: such wanted residuals are measured on the vectors themselves.
GRAM_RESIDUAL_FLOOR = 1e-6


def _gram_column(rows: Rows, w: Tensor, n: int | None = None) -> np.ndarray:
    """Inner products of the first ``n`` rows with ``w`` in float64: float32 rows are upcast a
    slice at a time (exact products, float64 sums), since residual norms come from differences
    of these numbers."""
    parts = []
    for _, v in rows.views(n):
        if v.dtype == torch.float64 and w.dtype == torch.float64:
            parts.append(v @ w)
            continue
        acc = torch.zeros(v.shape[0], dtype=torch.float64, device=v.device)
        for a in range(0, v.shape[1], 2**18):
            acc += v[:, a : a + 2**18].double() @ w[a : a + 2**18].double()
        parts.append(acc)
    return torch.cat(parts).cpu().numpy() if parts else np.zeros(0)


class _Subspace:
    """An orthonormal basis ``V`` (rows) with its products ``W = V H`` and the Gram matrices
    ``G = V W^T`` (the projected operator) and ``M = W W^T`` (residual norms without forming
    the residuals), grown a vector at a time: ``2 n`` rows for ``n`` products, as the basis and
    products of a Lanczos run of ``n`` steps."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.V = Rows(dim, dtype, device)
        self.W = Rows(dim, dtype, device)
        self.G = np.zeros((0, 0))
        self.M = np.zeros((0, 0))
        self.product_dtype: torch.dtype | None = None

    def __len__(self) -> int:
        return len(self.V)

    def add(self, v: Tensor) -> bool:
        """Append ``v`` orthonormalised against the basis; False when it lies in the basis."""
        v = v.to(device=self.V.device, dtype=self.V.dtype)
        norm = float(torch.linalg.vector_norm(v))
        if not math.isfinite(norm) or norm == 0.0 or len(self) >= self.V.dim:
            return False
        v, beta = _reorthogonalise(self.V, v / norm)
        if beta <= 100 * torch.finfo(self.V.dtype).eps:
            return False
        self.V.append(v / beta)
        return True

    def multiply(self, operator: Any) -> None:
        """Products of the basis vectors added since the last call (one storage chunk of rows
        per operator call at most), and the new rows and columns of ``G`` and ``M``."""
        start, n = len(self.W), len(self.V)
        for a in range(start, n, self.V.chunk):
            for w in _products(operator, self.V[a : min(n, a + self.V.chunk)]):
                self.W.append(w)
        self.product_dtype = operator.dtype
        G, M = np.zeros((n, n)), np.zeros((n, n))
        G[:start, :start], M[:start, :start] = self.G, self.M
        for j in range(start, n):
            G[:, j] = _gram_column(self.V, self.W[j])
            G[j, :start] = _gram_column(self.W, self.V[j], start)
            M[:, j] = M[j, :] = _gram_column(self.W, self.W[j])
        self.G, self.M = G, M


@dataclass(frozen=True, eq=False)
class _WarmState:
    """Rayleigh-Ritz on a :class:`_Subspace`: every Ritz pair's value, coordinates and residual
    norm, the wanted ones (``idx``, output order), their error bounds and the norm estimate."""

    theta: np.ndarray
    S: np.ndarray
    res: np.ndarray
    idx: np.ndarray
    bounds: np.ndarray
    anorm: float
    tol: float

    @property
    def converged(self) -> bool:
        return bool(np.all(self.bounds <= self.tol * self.anorm))

    @property
    def unconverged(self) -> np.ndarray:
        return self.idx[self.bounds > self.tol * self.anorm]


def _warm_state(sub: _Subspace, k: int, which: Which, tol: float, vectors: bool) -> _WarmState:
    """Ritz pairs of the basis and the stopping rule of a cold run, on an explicit basis.

    Residuals: ``||H y||^2 - theta^2`` from the Gram matrices (``y`` a unit Ritz vector of an
    orthonormal basis), the wanted ones measured on the vectors when that difference cancels.
    Norm: ``||H|| >= max ||H x||`` over unit ``x`` in the basis, ``sqrt(lambda_max(M))``.
    Bounds: the residual ``r`` while the basis has no Ritz value beside the wanted ones (no
    estimate of the gap to the rest of the spectrum), then :func:`value_bounds` as in a cold
    run (``min(r, r^2 / gap)``); with ``vectors`` the residual itself. Fewer than ``k`` Ritz
    pairs never count as converged (their bounds are infinite).
    """
    theta, S = np.linalg.eigh((sub.G + sub.G.T) / 2)
    hy2 = np.einsum("ij,ik,kj->j", S, sub.M, S)
    res = np.sqrt(np.maximum(hy2 - theta**2, 0.0))
    anorm = max(math.sqrt(max(float(np.linalg.eigvalsh(sub.M)[-1]), 0.0)), 1e-300)
    idx = _select(theta, min(k, len(theta)), which)
    for j in idx:
        if res[j] < GRAM_RESIDUAL_FLOOR * anorm:
            s = torch.as_tensor(S[:, j].copy(), dtype=sub.V.dtype, device=sub.V.device)
            r = sub.W.combine(s) - float(theta[j]) * sub.V.combine(s)
            res[j] = float(torch.linalg.vector_norm(r))
    if vectors or len(theta) <= k:
        bounds = res[idx].copy()
    else:
        bounds = value_bounds(theta, res, idx)
    if len(idx) < k:
        bounds = np.full(k, np.inf)
    return _WarmState(theta, S, res, idx, bounds, anorm, tol)


def _expansion(sub: _Subspace, state: _WarmState) -> Tensor | None:
    """The next basis vector: the dominant direction of the unconverged wanted residuals, each
    normalised (the top left singular vector of the block ``[r_i / ||r_i||]``, from the Gram
    matrices; one vector of length D formed). None when there is no such residual."""
    bad = state.unconverged
    bad = bad[state.res[bad] > 0]
    if not len(bad):
        return None
    Sb = state.S[:, bad] / state.res[bad]
    theta = state.theta[bad]
    C = Sb.T @ sub.M @ Sb - np.diag((theta / state.res[bad]) ** 2)  # Gram of the r_i/||r_i||
    u = np.linalg.eigh((C + C.T) / 2)[1][:, -1]
    c = torch.as_tensor(Sb @ u, dtype=sub.V.dtype, device=sub.V.device)
    d = torch.as_tensor(Sb @ (theta * u), dtype=sub.V.dtype, device=sub.V.device)
    return sub.W.combine(c) - sub.V.combine(d)


def _expected_expansions(state: _WarmState, vectors: bool) -> float:
    """Expansions the basis is expected to need: one per decade by which a wanted value's bound
    ``min(r, r^2 / gap)`` exceeds ``tol ||H||`` (the rate measured on the digits models and on
    matrices with known spectra), two per decade of the residual itself with ``vectors``. The
    bounds are :func:`value_bounds` even before the basis has grown, with the gaps between the
    wanted Ritz values alone: an estimate for this choice, never a stopping test."""
    r = state.res[state.idx]
    bounds = r if vectors else value_bounds(state.theta, state.res, state.idx)
    decades = np.log10(np.maximum(bounds / (state.tol * state.anorm), 1.0))
    return float((2.0 if vectors else 1.0) * np.sum(decades))


def _turned(sub: _Subspace, tol: float) -> bool:
    """Whether the first previous vector (the extreme one), multiplied alone, shows the operator
    changed too much for a Rayleigh-Ritz step on the previous vectors to pay: its relative
    residual ``||H v - (v^T H v) v|| / ||H v||`` above ``sqrt(tol)``, so that its bound
    ``r^2 / gap`` with a gap of order ``||H||`` exceeds ``tol ||H||`` and every wanted pair
    needs expansions. Measured on the models of ``benchmarks/hvp_counts.py`` (tol 1e-5, top 10):
    below it the Rayleigh-Ritz start took 11-40 products against 13-46 from the vectors' sum;
    above it (larger noise, SGD steps) 20-69 against 14-56."""
    v, w = sub.V[0], sub.W[0]
    theta = float(sub.G[0, 0])
    r = float(torch.linalg.vector_norm(w - theta * v))
    return r > math.sqrt(tol) * float(torch.linalg.vector_norm(w))


def warm_run(
    operator: Any,
    previous: Tensor,
    *,
    k: int,
    which: Which,
    tol: float,
    max_hvps: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    vectors: bool = False,
    products: bool = True,
) -> tuple[EigenRun | None, int]:
    """Warm-started eigenvalue run: Rayleigh-Ritz on the previous vectors, then expanded one
    vector at a time (Davidson without a preconditioner, Morgan & Scott 1986).

    The first previous row is multiplied alone: when its residual shows the operator moved
    away (:func:`_turned`), the run gives up at once, one product spent. Otherwise all rows are
    orthonormalised into the basis and multiplied (one product each); while a wanted Ritz
    value's error bound (:func:`_warm_state`, the cold run's rule on an explicit basis) exceeds
    ``tol ||H||``, the dominant direction of the unconverged residuals (:func:`_expansion`)
    joins the basis, one product at a time. When the operator did not
    change, the first step already meets the bound: ``len(previous)`` products.

    Returns the run and the products spent, or None and the products spent when the caller
    should fall back to a Lanczos run from :func:`warm_start_vector` (with the rest of the
    budget): with fewer than ``k`` previous vectors (before any product), after the first
    product when the first row turned (:func:`_turned`), or when the expansion
    is expected to cost more than a Lanczos run (:data:`WARM_EXPANSIONS_PER_VALUE`) and the
    budget leaves that run ``k`` steps. A single previous vector is never given up: expanding
    it is a Lanczos run from it. :func:`eigen_run` calls it for values only (``vectors``
    off): to converge the residuals themselves, a Lanczos run from the previous vectors' sum
    took 15-22 products on the digits models, this run 25-32 (a Rayleigh-Ritz step and then
    that fallback) and 30-43 without the fallback.

    Memory: the basis and its products, ``2 n`` rows after ``n`` products (at most
    ``2 max_hvps``), as :func:`lanczos_memory` counts a run of ``n`` steps; products are taken
    one storage chunk of rows at a time. Cost: at most ``max_hvps`` products.
    """
    sub = _Subspace(int(operator.dim), dtype, device)
    if min(len(previous), max_hvps) < k:
        return None, 0  # the previous vectors cannot span the wanted subspace
    if not sub.add(previous[0]):
        return None, 0
    sub.multiply(operator)
    if len(previous) > 1 and max_hvps - 1 >= k and _turned(sub, tol):
        return None, 1
    for v in previous[1:max_hvps]:
        sub.add(v)
    if len(sub) < k:
        return None, 1  # the previous vectors are not independent
    sub.multiply(operator)
    state = _warm_state(sub, k, which, tol, vectors)
    costly = _expected_expansions(state, vectors) > WARM_EXPANSIONS_PER_VALUE * k
    if costly and len(sub) > 1 and max_hvps - len(sub) >= k:
        return None, len(sub)
    while not state.converged and len(sub) < max_hvps:
        t = _expansion(sub, state)
        if (t is None or not sub.add(t)) and not sub.add(_random_orthogonal(sub.V, generator)):
            break  # the basis spans the whole space
        sub.multiply(operator)
        state = _warm_state(sub, k, which, tol, vectors)
    return _warm_result(sub, state, products), len(sub)


def _warm_result(sub: _Subspace, state: _WarmState, products: bool) -> EigenRun:
    """The wanted Ritz vectors and their products (``k`` rows each, as a cold run forms them);
    residuals measured on those products when ``products``."""
    Sk = torch.as_tensor(state.S[:, state.idx].T.copy(), dtype=sub.V.dtype, device=sub.V.device)
    Y, HY = sub.V.combine(Sk), sub.W.combine(Sk)
    multiplied = None
    if products and sub.product_dtype not in (None, sub.V.dtype):
        multiplied = sub.V.combine(Sk, rounded_to=sub.product_dtype)
    rows = sub.V.allocated_rows + sub.W.allocated_rows
    return _finish(
        state.theta[state.idx], state.res[state.idx], Y, HY if products else None,
        state.converged, sub.V, sub.W, None, rows, multiplied=multiplied,
    )  # fmt: skip


#: Step limit of a bounded (thick-restart) run, as a multiple of ``max_iter``: restarts discard
#: part of the Krylov space, so the same accuracy takes more products.
BOUNDED_STEP_FACTOR = 4


def eigen_run(
    operator: Any,
    *,
    k: int,
    which: Which,
    tol: float,
    max_iter: int | None,
    generator: torch.Generator,
    vectors: bool = False,
    products: bool = True,
    v0: Tensor | None = None,
    warm_start: Tensor | None = None,
    min_steps: int = 0,
    max_basis_bytes: int | None = None,
    keep_products: bool = True,
) -> EigenRun:
    """The eigenvalue run of a measurement: plain Lanczos on a growing basis, or thick restart
    when the worst case of that basis exceeds ``max_basis_bytes``; from ``v0``, from the
    :func:`warm_start_vector` of ``warm_start`` (rows), or from a Rademacher vector. See
    :func:`lanczos` for the arguments; ``keep_products``: a bounded run keeps the Ritz vectors'
    products (``HY``, for the trace deflation), else it drops each once its residual is known.
    ``proc`` is set only when the run is a quadrature probe (plain run from a Rademacher start):
    its tridiagonal matrix is then that probe's Gauss rule.
    """
    dim = int(operator.dim)
    m = min(dim, max(max_iter or default_max_iter(k, dim), min_steps))
    plan = plan_storage(
        dim, 2 * m + 1, top_k=k, op_dtype=operator.dtype, device=operator.device,
        max_basis_bytes=max_basis_bytes, keep_products=keep_products,
    )  # fmt: skip
    common = dict(k=k, which=which, tol=tol, generator=generator, dtype=plan.dtype)
    probe = v0 is None and warm_start is None
    if warm_start is not None and plan.max_rows is None and not vectors:
        run, spent = warm_run(
            operator, warm_start, k=k, which=which, tol=tol, max_hvps=m, generator=generator,
            dtype=plan.dtype, device=plan.device, vectors=vectors, products=products,
        )  # fmt: skip
        if run is not None:
            return run
        m -= spent  # the fallback's budget: what the Rayleigh-Ritz step left
    if warm_start is not None:
        v0 = warm_start_vector(warm_start, generator)
    if v0 is None:
        v0 = rademacher(1, dim, generator=generator, dtype=operator.dtype, device=operator.device)
        v0 = v0[0]
    v0 = v0.to(device=operator.device, dtype=operator.dtype)
    if plan.max_rows is not None:
        # Normalised into a new tensor that becomes the first basis vector (the start vector
        # drawn above is freed; no row is held twice during the run).
        v0 = v0.to(device=plan.device, dtype=plan.dtype) / torch.linalg.vector_norm(v0)
        return thick_restart_lanczos(
            operator, v0, cap=plan.max_rows, max_hvps=BOUNDED_STEP_FACTOR * m,
            device=plan.device, vectors=vectors, products=products,
            keep_products=keep_products, **common,
        )  # fmt: skip
    (proc,) = run_lanczos(
        operator, v0.unsqueeze(0), [m], restart=[True],
        stop=converged_stop(k, which, tol, min_steps, vectors=vectors),
        generator=generator, basis_dtype=plan.dtype, basis_device=plan.device,
    )  # fmt: skip
    run = ritz_run(proc, k=k, which=which, tol=tol, vectors=vectors, products=products)
    return run if probe else dataclasses.replace(run, proc=None)


def ritz_run(
    proc: _Process, *, k: int, which: Which, tol: float, vectors: bool, products: bool = True
) -> EigenRun:
    """The eigenvalue run's result from its Lanczos process (again after it was extended)."""
    k_eff = min(k, proc.steps)
    theta, est, Y, HY = ritz_vectors(proc, k_eff, which)
    assert Y is not None and proc.W is not None
    converged = is_converged(proc, k_eff, which, tol, vectors=vectors) and k_eff == k
    rows = proc.Q.allocated_rows + proc.W.allocated_rows
    multiplied = None
    if products and proc.product_dtype not in (None, proc.Q.dtype):
        # The operator multiplied the basis rounded to its dtype: measure the residual on
        # those vectors, so that it bounds the distance to the operator's eigenvalues honestly.
        Sk = torch.as_tensor(_ritz_columns(proc, k_eff, which), dtype=Y.dtype, device=Y.device)
        multiplied = proc.Q.combine(Sk, rounded_to=proc.product_dtype)
    return _finish(
        theta, est, Y, HY if products else None, converged, proc.Q, proc.W, proc, rows,
        multiplied=multiplied,
    )  # fmt: skip


def _ritz_columns(proc: _Process, k: int, which: Which) -> np.ndarray:
    """``S[:, wanted]^T``: the wanted Ritz vectors' coordinates in the Lanczos basis."""
    theta, S = _ritz(proc.alphas, proc.betas)
    return S[:, _select(theta, k, which)].T.copy()


def _deprecated_alias(new: Any, old: Any, new_name: str, old_name: str) -> Any:
    """The value of a renamed keyword: the old name still works, with a DeprecationWarning."""
    if old is None:
        return new
    warnings.warn(f"{old_name}= is deprecated; use {new_name}=", DeprecationWarning, stacklevel=3)
    return old


def lanczos(
    operator: Any,
    *,
    top_k: int = 10,
    which: Which = "LA",
    max_iter: int | None = None,
    tol: float = 1e-6,
    seed: int = 0,
    v0: Tensor | None = None,
    return_eigenvectors: bool = False,
    explicit_residuals: bool = True,
    max_basis_bytes: int | None = None,
    k: int | None = None,
) -> LanczosResult:
    """The ``top_k`` largest (or smallest) eigenvalues of a symmetric operator.

    Full reorthogonalisation keeps the basis orthogonal, so no spurious copies of converged
    eigenvalues appear and the residual estimates stay meaningful.

    Args:
        operator: symmetric operator with ``dim``, ``dtype``, ``device`` and ``matmat``
            (which must not modify its argument: it may be a row of the stored basis).
        top_k: number of wanted eigenvalues.
        which: ``"LA"`` largest algebraic (descending) or ``"SA"`` smallest algebraic (ascending).
        max_iter: maximum Lanczos steps; default ``min(D, max(4 top_k, 120))`` (a bounded run
            takes up to ``4 max_iter``).
        tol: stop when each wanted value's error bound ``min(r, r^2 / gap)`` is below
            ``tol * ||T||`` (``r`` its residual, ``gap`` the distance to the other Ritz values
            less their residuals, ``||T||`` an estimate of the spectral radius; see
            :func:`value_bounds`): the absolute error of every value is then below
            ``tol * ||H||`` (relative error ``tol ||H|| / |lambda|``). With
            ``return_eigenvectors`` the residual ``r`` itself must be below ``tol * ||T||``, so
            that the Ritz vectors' angles to the eigenvectors are below ``tol ||H|| / gap`` too.
        seed: seeds the Rademacher start vector (and restart vectors).
        v0: start vector instead of the random one.
        return_eigenvectors: return the Ritz vectors (rows, in the basis dtype).
        explicit_residuals: measure ``||H y - theta y||`` from the products the run computed
            (``H y = (HQ) s``: honest under rounding of the products, no extra products); else
            the Lanczos estimate ``|beta_m s_m|``.
        max_basis_bytes: memory budget of the basis; default half the free memory
            (:func:`default_max_basis_bytes`). When the worst case ``(2 max_iter + 1) D``
            numbers exceeds it, thick restart with a bounded basis is used.
        k: deprecated name of ``top_k``.

    Returns:
        :class:`LanczosResult`.

    Cost: at most ``max_iter`` products. Memory (:func:`lanczos_memory`): ``(2 m + 1) D``
    numbers for the basis and its products after ``m`` steps, allocated as the run goes
    (float64 when the worst case fits in 1 GiB), on the operator's device, or in host memory
    when an accelerator has less than twice that free (:func:`basis_device_for`); over budget,
    ``(c + 1) D`` with a thick-restart cap ``c = max(top_k + 2, min(top_k + 6, budget / D - 1))``
    (:func:`bounded_cap`), which costs ``top_k`` more products for the residuals at the end.
    """
    name = "top_k" if k is None else "k"
    top_k = _deprecated_alias(top_k, k, "top_k", "k")
    dim = int(operator.dim)
    _validate(top_k, which, tol, dim, max_iter, name=name)
    if v0 is not None and (v0.shape != (dim,) or not torch.any(v0 != 0)):
        raise ValueError(f"v0 must be a non-zero vector of shape ({dim},); got {tuple(v0.shape)}")
    start = operator.num_hvps if hasattr(operator, "num_hvps") else 0
    run = eigen_run(
        operator, k=top_k, which=which, tol=tol, max_iter=max_iter,
        generator=torch.Generator().manual_seed(int(seed)), vectors=return_eigenvectors,
        products=explicit_residuals, v0=v0, max_basis_bytes=max_basis_bytes,
        keep_products=False,
    )  # fmt: skip
    proc = run.proc
    used = (
        (operator.num_hvps - start)
        if hasattr(operator, "num_hvps")
        else (proc.steps if proc else 0)
    )
    return LanczosResult(
        eigenvalues=run.theta,
        residuals=run.residuals if explicit_residuals else run.estimates,  # type: ignore[arg-type]
        eigenvectors=run.Y if return_eigenvectors else None,
        alphas=np.asarray(proc.alphas if proc else []),
        betas=np.asarray(proc.betas if proc else []),
        num_hvps=int(used),
        converged=run.converged,
        basis_rows=run.basis_rows,
    )


def reorthogonalisation_seconds(device: torch.device, dim: int) -> float:
    """Seconds of one Gram-Schmidt pass ``w - (B @ w) @ B`` per float64 basis row of ``dim``
    numbers on ``device``: timed on at most 8 × 2^19 numbers and scaled (memory-bound). Timed
    once per device and length in a process (a cost guess; each timing draws 4M numbers)."""
    key = (str(torch.device(device)), int(dim))
    if key not in _REORTH_SECONDS:
        _REORTH_SECONDS[key] = _time_reorthogonalisation(torch.device(device), int(dim))
    return _REORTH_SECONDS[key]


_REORTH_SECONDS: dict[tuple[str, int], float] = {}


def _time_reorthogonalisation(device: torch.device, dim: int) -> float:
    n, rows = max(1, min(dim, 1 << 19)), 8
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(rows, n, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        w = w - (B @ w) @ B
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best / rows * (dim / n)
