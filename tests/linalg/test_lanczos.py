"""Lanczos on dense symmetric matrices with known spectra (float64)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from lightning_landscape.linalg import LanczosResult, MatrixOperator, lanczos
from tests._reference import matrix_with_spectrum, random_orthogonal
from tests._tolerances import tolerances

F64 = torch.float64
TOL = tolerances(F64)
D = 300


def _known_spectrum(dim: int = D) -> np.ndarray:
    """Separated ends (10 positive, 10 negative outliers) around a uniform bulk in [-1, 1]."""
    top = [20.0, 15.0, 12.0, 10.0, 8.0, 7.0, 6.0, 5.5, 5.0, 4.5]
    bottom = [-3.0, -3.5, -4.0, -5.0, -6.0, -8.0, -9.0, -10.0, -12.0, -15.0]
    bulk = np.linspace(-1.0, 1.0, dim - len(top) - len(bottom))
    rng = np.random.default_rng(0)
    return rng.permutation(np.concatenate([top, bulk, bottom]))


SPECTRUM = _known_spectrum()
NORM = float(np.abs(SPECTRUM).max())


@pytest.fixture(scope="module", params=["diagonal", "conjugated"])
def A(request) -> torch.Tensor:
    return matrix_with_spectrum(SPECTRUM, seed=None if request.param == "diagonal" else 7)


def _nearest_error(theta: np.ndarray, exact: np.ndarray) -> np.ndarray:
    return np.abs(theta[:, None] - exact[None, :]).min(axis=1)


@pytest.mark.parametrize("k", [1, 6, 10])
def test_largest_algebraic_descending(A, k) -> None:
    res = lanczos(MatrixOperator(A), top_k=k, which="LA", tol=1e-12)
    assert isinstance(res, LanczosResult)
    exact = np.sort(SPECTRUM)[::-1][:k]
    assert res.eigenvalues.shape == (k,)
    assert np.all(np.diff(res.eigenvalues) <= 0), "LA eigenvalues must be descending"
    rel = np.abs(res.eigenvalues - exact) / np.abs(exact)
    assert rel.max() <= TOL.eig, rel
    assert res.converged


@pytest.mark.parametrize("k", [1, 6, 10])
def test_smallest_algebraic_ascending(A, k) -> None:
    res = lanczos(MatrixOperator(A), top_k=k, which="SA", tol=1e-12)
    exact = np.sort(SPECTRUM)[:k]
    assert res.eigenvalues.shape == (k,)
    assert np.all(np.diff(res.eigenvalues) >= 0), "SA eigenvalues must be ascending"
    rel = np.abs(res.eigenvalues - exact) / np.abs(exact)
    assert rel.max() <= TOL.eig, rel
    assert res.converged


def test_default_tolerance_bounds_the_absolute_error(A) -> None:
    """tol is documented as a bound on the absolute error relative to ||H||."""
    tol = 1e-6
    res = lanczos(MatrixOperator(A), top_k=10, tol=tol)
    exact = np.sort(SPECTRUM)[::-1][:10]
    assert np.abs(res.eigenvalues - exact).max() <= tol * NORM
    assert res.converged


@pytest.mark.parametrize("which", ["LA", "SA"])
@pytest.mark.parametrize("explicit_residuals", [True, False])
def test_residuals_are_honest(A, which, explicit_residuals) -> None:
    """Reported residual >= |theta - nearest eigenvalue| and = ||A v - theta v||."""
    slack = TOL.rounding(D) * NORM
    # Loose tol and few steps: residuals are far from the rounding floor, so the check bites.
    res = lanczos(
        MatrixOperator(A),
        top_k=5,
        which=which,
        tol=1e-3,
        max_iter=25,
        return_eigenvectors=True,
        explicit_residuals=explicit_residuals,
    )
    err = _nearest_error(res.eigenvalues, SPECTRUM)
    assert np.all(err <= res.residuals + slack), (err, res.residuals)
    assert res.residuals.max() > 1e3 * slack  # not converged to the floor: a real test
    V = res.eigenvectors
    assert V is not None and V.shape == (5, D)
    theta = torch.as_tensor(res.eigenvalues, dtype=F64)
    actual = torch.linalg.vector_norm(V.to(F64) @ A - theta[:, None] * V.to(F64), dim=1).numpy()
    np.testing.assert_allclose(res.residuals, actual, rtol=1e-6, atol=slack)


def test_eigenvectors_are_orthonormal_eigenvectors(A) -> None:
    res = lanczos(MatrixOperator(A), top_k=8, which="LA", tol=1e-10, return_eigenvectors=True)
    V = res.eigenvectors
    assert V is not None and V.shape == (8, D)
    V = V.to(F64)
    gram = V @ V.T
    assert (gram - torch.eye(8, dtype=F64)).abs().max().item() <= TOL.ortho
    theta = torch.as_tensor(res.eigenvalues, dtype=F64)
    assert torch.linalg.vector_norm(V @ A - theta[:, None] * V, dim=1).max() <= 1e-9 * NORM
    assert lanczos(MatrixOperator(A), top_k=8).eigenvectors is None


@pytest.mark.parametrize(
    ("which", "exact"), [("LA", [5.0, 3.0, 1.0, 0.0, 0.0]), ("SA", [0.0, 0.0, 0.0, 0.0, 0.0])]
)
def test_breakdown_on_low_rank_matrix_returns_exact_eigenvalues(which, exact) -> None:
    """Rank 3 < k = 5: the Krylov space is invariant after 4 steps (beta = 0).

    "SA" wants five zeros: each restart into the null space finds one more, so a run that stops
    as soon as its k Ritz values have zero residual returns [0, 0, 1, 3, 5] -- exact eigenvalues,
    but not the smallest ones.
    """
    dim = 50
    lam = np.zeros(dim)
    lam[:3] = [5.0, 3.0, 1.0]
    A = matrix_with_spectrum(lam, seed=3)
    res = lanczos(MatrixOperator(A), top_k=5, which=which, tol=1e-10)
    assert np.all(np.isfinite(res.eigenvalues))
    assert np.all(np.isfinite(res.residuals))
    assert res.eigenvalues.shape == (5,)
    np.testing.assert_allclose(res.eigenvalues, exact, rtol=0, atol=TOL.eig * 5.0)


def test_breakdown_with_repeated_eigenvalues_finds_the_copies() -> None:
    """diag with multiplicities: the Krylov space sees each eigenspace once, then breaks down."""
    lam = np.repeat([4.0, 3.0, 2.0, 1.0, 0.5], [3, 2, 4, 5, 6])
    A = matrix_with_spectrum(lam, seed=None)
    res = lanczos(MatrixOperator(A), top_k=6, tol=1e-10, max_iter=20)
    np.testing.assert_allclose(res.eigenvalues, [4, 4, 4, 3, 3, 2], rtol=0, atol=TOL.eig * 4)


def test_full_dimension_gives_every_eigenvalue() -> None:
    lam = np.linspace(-2.0, 3.0, 30) + 0.01 * np.arange(30) ** 1.5
    A = matrix_with_spectrum(lam, seed=11)
    res = lanczos(MatrixOperator(A), top_k=30, max_iter=30, tol=1e-12)
    np.testing.assert_allclose(res.eigenvalues, np.sort(lam)[::-1], rtol=0, atol=TOL.eig * 3.0)


def test_deterministic_for_a_seed(A) -> None:
    a = lanczos(MatrixOperator(A), top_k=5, tol=1e-4, max_iter=40, seed=123)
    b = lanczos(MatrixOperator(A), top_k=5, tol=1e-4, max_iter=40, seed=123)
    np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
    np.testing.assert_array_equal(a.residuals, b.residuals)
    np.testing.assert_array_equal(a.alphas, b.alphas)
    np.testing.assert_array_equal(a.betas, b.betas)
    if not torch.equal(A, torch.diag(torch.diagonal(A))):
        # (On a diagonal matrix every Rademacher start gives the same tridiagonal matrix.)
        c = lanczos(MatrixOperator(A), top_k=5, tol=1e-4, max_iter=40, seed=124)
        assert not np.array_equal(a.alphas, c.alphas)  # the seed is used


def test_start_vector(A) -> None:
    v0 = torch.as_tensor(random_orthogonal(D, seed=5)[0])
    res = lanczos(MatrixOperator(A), top_k=3, tol=1e-10, v0=v0)
    np.testing.assert_allclose(res.eigenvalues, [20.0, 15.0, 12.0], rtol=TOL.eig, atol=0)


def test_num_hvps_counts_operator_products(A) -> None:
    op = MatrixOperator(A)
    op.matvec(torch.ones(D, dtype=F64))  # products before the call are not counted
    res = lanczos(op, top_k=4, tol=1e-8, max_iter=60)
    assert res.num_hvps == op.num_hvps - 1
    assert 4 <= res.num_hvps <= 60 + 4
    assert len(res.alphas) <= 60
    # Tridiagonal: one alpha per step; one beta per step (the last one is beta_m).
    assert len(res.betas) in (len(res.alphas), len(res.alphas) - 1)


def test_max_iter_caps_the_work_and_reports_non_convergence(A) -> None:
    op = MatrixOperator(A)
    res = lanczos(op, top_k=10, tol=1e-12, max_iter=12)
    assert len(res.alphas) == 12
    assert not res.converged
    # Unconverged values still obey their error bounds.
    err = _nearest_error(res.eigenvalues, SPECTRUM)
    assert np.all(err <= res.residuals + TOL.rounding(D) * NORM)


def test_argument_errors(A) -> None:
    op = MatrixOperator(A)
    for k in (0, -1):
        with pytest.raises(ValueError, match=r"\btop_k\b.*positive"):
            lanczos(op, top_k=k)
    with pytest.raises(ValueError, match=r"\btop_k\b"):
        lanczos(op, top_k=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\btop_k\b.*at most"):
        lanczos(op, top_k=D + 1)
    with pytest.raises(ValueError, match="which"):
        lanczos(op, which="LM")  # type: ignore[arg-type]
    for tol in (0.0, -1e-6, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tol"):
            lanczos(op, tol=tol)
    with pytest.raises(ValueError, match="max_iter"):
        lanczos(op, top_k=5, max_iter=4)
    with pytest.raises(ValueError, match="v0"):
        lanczos(op, v0=torch.zeros(D, dtype=F64))
    with pytest.raises(ValueError, match="v0"):
        lanczos(op, v0=torch.ones(D + 1, dtype=F64))


def test_non_finite_products_raise() -> None:
    # Caught by each step's first inner product: any inf or nan entry of a product.
    for bad in (float("nan"), float("inf"), -float("inf")):
        A = torch.eye(20, dtype=F64)
        A[3, 3] = bad
        with pytest.raises(FloatingPointError, match="non-finite"):
            lanczos(MatrixOperator(A), top_k=2)


def test_an_operator_that_returns_its_input_leaves_the_basis_intact() -> None:
    """Steps work in place on the product; a product that is the basis row itself (an identity
    operator returning its argument) must not be overwritten: the Ritz vector is the start."""

    class Identity:
        dim, dtype, device = 12, F64, torch.device("cpu")

        def matmat(self, X: torch.Tensor) -> torch.Tensor:
            return X

    v0 = torch.arange(1.0, 13.0, dtype=F64)
    res = lanczos(Identity(), top_k=1, v0=v0, max_iter=1, return_eigenvectors=True)
    assert res.eigenvalues[0] == pytest.approx(1.0, abs=1e-14)
    assert res.eigenvectors is not None
    torch.testing.assert_close(res.eigenvectors[0].abs(), v0 / v0.norm(), atol=1e-14, rtol=0)


def test_value_rule_saves_products_and_keeps_its_bound(A) -> None:
    """Values alone stop on min(r, r^2/gap) <= tol ||T||: fewer products, same value guarantee.

    With eigenvectors requested the residual itself must meet the tolerance (vectors accurate).
    """
    tol = 1e-8
    exact = np.sort(SPECTRUM)[::-1][:10]
    values = lanczos(MatrixOperator(A), top_k=10, tol=tol)
    vectors = lanczos(MatrixOperator(A), top_k=10, tol=tol, return_eigenvectors=True)
    assert values.converged and vectors.converged
    assert values.num_hvps < vectors.num_hvps
    assert np.abs(values.eigenvalues - exact).max() <= tol * NORM
    assert np.abs(vectors.eigenvalues - exact).max() <= tol * NORM
    # The residual rule held for the vectors (||T|| <= 3 ||H|| by Gershgorin on T); only the
    # quadratic bound held for the values, whose residuals stay far above the tolerance.
    assert vectors.residuals.max() <= 3 * tol * NORM
    assert values.residuals.max() > 100 * tol * NORM


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_basis_stays_orthonormal_through_convergence(A, dtype) -> None:
    """Full reorthogonalisation (one Gram-Schmidt pass, a second on the DGKS test) keeps the
    whole basis orthonormal to working precision over 150 steps, long after the top Ritz values
    have converged: the regime where plain Lanczos loses orthogonality and finds ghosts."""
    from lightning_landscape.linalg.lanczos import run_lanczos

    op = MatrixOperator(A.to(dtype))
    v0 = torch.as_tensor(random_orthogonal(D, seed=3)[:1], dtype=dtype)
    (proc,) = run_lanczos(op, v0, [150], restart=[True], basis_dtype=dtype)
    Q = proc.Q[: proc.steps].to(F64)
    gram = Q @ Q.T
    eps = torch.finfo(dtype).eps
    assert (gram - torch.eye(proc.steps, dtype=F64)).abs().max().item() <= 100 * eps
    # The Ritz values of the 150-step basis include every wanted eigenvalue exactly once.
    theta = np.sort(np.linalg.eigvalsh(Q @ A.to(F64) @ Q.T))[::-1][:5]
    np.testing.assert_allclose(theta, np.sort(SPECTRUM)[::-1][:5], rtol=1e4 * eps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_combine_over_chunks_and_column_blocks_equals_the_stacked_product(monkeypatch, dtype):
    # Rows of 3 a chunk and output blocks of 4,096 columns: a 7-row basis of 10,001 columns
    # spans three chunks (the last partly filled) and three column blocks (the last short).
    # the module (the package's `lanczos` attribute is the function of that name)
    lz = importlib.import_module("lightning_landscape.linalg.lanczos")

    dim = 10_001
    monkeypatch.setattr(lz, "CHUNK_BYTES", 3 * dim * torch.empty((), dtype=dtype).element_size())
    monkeypatch.setattr(lz, "COMBINE_BLOCK_BYTES", 1)
    rows = lz.Rows(dim, dtype, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(7, dim, generator=g, dtype=torch.float64)
    for r in dense:
        rows.append(r.to(dtype))
    assert rows.chunk == 3 and len(rows.chunks) == 3
    stored = dense.to(dtype).double()
    block = torch.randn(4, 5, generator=g, dtype=torch.float64)
    vector = torch.randn(7, generator=g, dtype=torch.float64)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    # Only the first n rows take part; a vector and a block of coefficients alike.
    torch.testing.assert_close(
        rows.combine(block.to(dtype)).double(), block @ stored[:5], rtol=tol, atol=tol
    )
    torch.testing.assert_close(
        rows.combine(vector.to(dtype)).double(), vector @ stored, rtol=tol, atol=tol
    )
    # rounded_to: the rows as an operator in that dtype saw them.
    rounded = dense.to(dtype).to(torch.bfloat16).double()
    torch.testing.assert_close(
        rows.combine(block.to(dtype), rounded_to=torch.bfloat16).double(),
        block @ rounded[:5],
        rtol=tol,
        atol=tol,
    )


@pytest.mark.parametrize("dim", [70_000, 2**17])
def test_batched_chunk_products_equal_the_chunk_loop(dim):
    # The accelerator path of the chunked float64-summed products (one batched product for the
    # whole chunks, one for the rest) against float64, on rows that are a slice of a larger
    # storage chunk (not contiguous as a block), for a vector and a block of columns.
    lz = importlib.import_module("lightning_landscape.linalg.lanczos")
    g = torch.Generator().manual_seed(1)
    V = torch.randn(16, dim, generator=g)[2:5]
    for w in (torch.randn(dim, generator=g), torch.randn(dim, 4, generator=g)):
        batched = lz._batched_chunks(V, w, 2**16)
        loop = lz._chunked_matmul(V, w, 2**16)
        exact = V.double() @ w.double()
        assert batched.dtype == torch.float64 and batched.shape == exact.shape
        torch.testing.assert_close(batched, exact, rtol=0, atol=2e-7 * dim)
        torch.testing.assert_close(batched, loop, rtol=0, atol=2e-7 * dim)


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (None, True),
        (float("nan"), False),
        (float("inf"), False),
        (-float("inf"), False),
        ("both infinities", False),
        ("overflowing sum", True),
    ],
)
def test_all_finite_reads_every_entry_not_only_the_sum(bad, expected):
    """The fast path (a finite float32 sum) and the exact fallback (a sum that overflowed from
    finite entries, or cancelling infinities) agree with an entry-by-entry check."""
    all_finite = importlib.import_module("lightning_landscape.linalg.lanczos").all_finite
    x = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0))
    if bad == "both infinities":
        x[0, 7], x[2, 11] = float("inf"), -float("inf")
    elif bad == "overflowing sum":
        x[:] = 3e38  # finite entries whose float32 sum is inf
    elif bad is not None:
        x[1, 4999] = bad
    assert bool(torch.isfinite(x).all()) is expected
    assert all_finite(x, chunk=4096) is expected


@pytest.mark.parametrize("accepts_out", [False, True])
def test_thick_restart_on_a_long_operator_finds_known_eigenvalues(accepts_out):
    """Thick restart on an operator longer than one dot chunk (several short dots summed in
    float64) and a small cap (several restarts) finds the known top eigenvalues, with
    orthonormal Ritz vectors."""
    mod = importlib.import_module("lightning_landscape.linalg.lanczos")
    dim, k = 2 * 2**16 + 17, 3
    gen = torch.Generator().manual_seed(2)
    U = torch.linalg.qr(torch.randn(dim, 8, generator=gen, dtype=torch.float64)).Q
    top = torch.tensor([9.0, 7.0, 5.0, 3.0, 2.5, 2.0, 1.5, 1.0], dtype=torch.float64)

    class LowRank:
        dtype, device = torch.float64, torch.device("cpu")
        calls_with_out = 0

        def matmat(self, V, out=None):
            if out is not None:  # products into the rows a restart let go
                LowRank.calls_with_out += 1
                return torch.matmul((V @ U) * top, U.T, out=out)
            return ((V @ U) * top) @ U.T

    LowRank.accepts_out = accepts_out

    run = mod.thick_restart_lanczos(
        LowRank(), torch.randn(dim, generator=gen, dtype=torch.float64), k=k, which="LA",
        tol=1e-10, cap=k + 3, max_hvps=200, generator=gen, dtype=torch.float64,
        device=torch.device("cpu"), vectors=True,
    )  # fmt: skip
    assert np.allclose(np.sort(run.theta)[::-1], top[:k].numpy(), rtol=1e-8)
    gram = run.Y @ run.Y.T
    assert torch.allclose(gram, torch.eye(k, dtype=torch.float64), atol=1e-10)
    assert (LowRank.calls_with_out > k) is accepts_out  # restarts happened and rows were reused
