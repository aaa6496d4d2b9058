"""What a measurement costs: adaptive density and trace, warm starts, memory that follows use.

Every accuracy check is against an exact reference (a known spectrum, or the dense float64
Hessian of the same weights); every cost check counts Hessian-vector products, never time.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lightning_landscape.linalg import (
    HessianOperator,
    HessianSpectrum,
    MatrixOperator,
    hessian_spectrum,
    hutchpp_trace,
    lanczos,
    lanczos_memory,
    slq,
)
from lightning_landscape.linalg.lanczos import (
    BOUNDED_EXTRA_ROWS,
    CHUNK_ROWS,
    Rows,
    dot,
    eigen_run,
    matmul_sum,
    plan_storage,
    run_lanczos,
    warm_run,
)
from lightning_landscape.linalg.spectrum import MAX_TRACE_PROBES, MIN_SLQ_STEPS, MIN_TRACE_PROBES
from tests._reference import (
    Quadratic,
    cross_entropy_loss,
    dense_hessian,
    digits_batches,
    grid_measure,
    matrix_with_spectrum,
    quadratic_loss,
    trained_mlp,
    wasserstein1,
)
from tests._tolerances import tolerances

F32, F64 = torch.float32, torch.float64
TOL = tolerances(F64)
TOP_K_RTOL = 1e-4
W1_TARGET = 0.02
TRACE_TARGET = 0.05
PROBE_SIZES = [160, 128, 128, 96]
BATCH = [(torch.zeros(1),)]


def _quadratic(lam: np.ndarray, seed: int = 0) -> Quadratic:
    A = matrix_with_spectrum(lam, seed=seed)
    return Quadratic(A, theta=torch.full((len(lam),), 0.1, dtype=F64))


def _w1(res: HessianSpectrum, lam: np.ndarray) -> tuple[float, float]:
    span = lam.max() - lam.min()
    nodes = wasserstein1(res.ritz_nodes, res.ritz_weights, lam) / span
    grid = wasserstein1(*grid_measure(res.density_grid, res.density), lam) / span
    return nodes, grid


# --------------------------------------------------------------------------------------------
# Adaptive density and trace
# --------------------------------------------------------------------------------------------


def test_a_flat_spectrum_gets_more_probes() -> None:
    """D = 1000, eigenvalues spread evenly: one probe's weights fluctuate by ~1/sqrt(D), so the
    sampling part of the error bound asks for more probes until W1 meets its target."""
    lam = np.linspace(-1.0, 2.0, 1000)
    res = hessian_spectrum(_quadratic(lam), quadratic_loss, BATCH, top_k=3)
    assert res.ritz_nodes is not None and res.ritz_nodes.shape[0] > 1  # probes were added
    assert res.density_error is not None and res.density_error <= 0.015
    w1_nodes, w1_grid = _w1(res, lam)
    assert w1_nodes <= res.density_error  # the bound is honest here
    assert w1_grid <= W1_TARGET
    np.testing.assert_allclose(res.eigenvalues, lam[::-1][:3], rtol=TOP_K_RTOL)
    err = abs(res.trace - lam.sum()) / np.abs(lam).sum()
    assert err <= TRACE_TARGET and abs(res.trace - lam.sum()) <= 4 * res.trace_stderr


def test_outliers_over_a_narrow_bulk_need_one_probe() -> None:
    """A few outliers over a narrow bulk in D = 2000: the eigenvalue run alone is a good enough
    quadrature, so the density costs no product beyond the run's own steps."""
    rng = np.random.default_rng(0)
    lam = np.concatenate([[9.0, 7.0, 6.0, 4.5, 3.0], rng.normal(0.0, 0.05, 1995)])
    model = _quadratic(lam, seed=1)
    res = hessian_spectrum(model, quadratic_loss, BATCH, top_k=5)
    eig = hessian_spectrum(model, quadratic_loss, BATCH, top_k=5, density=False, trace=False)
    assert res.ritz_nodes is not None and res.ritz_nodes.shape[0] == 1
    assert _w1(res, lam)[1] <= W1_TARGET
    # No product beyond the run's own steps (at least MIN_SLQ_STEPS) and the minimal batch of
    # trace probes.
    assert res.num_hvps <= max(eig.num_hvps, MIN_SLQ_STEPS) + MIN_TRACE_PROBES
    assert abs(res.trace - lam.sum()) / np.abs(lam).sum() <= TRACE_TARGET


def test_trace_probes_are_added_until_the_standard_error_meets_its_target() -> None:
    """One outlier over a Gaussian bulk in D = 200: deflating the outlier leaves a complement
    whose Hutchinson samples spread widely (sd ~ 20 against sum |lambda| ~ 170), so many more
    than the first 6 probes are needed for a standard error of 2.5% of sum |lambda|."""
    lam = np.concatenate([[12.0], np.random.default_rng(3).normal(0.0, 1.0, 199)])
    model = _quadratic(lam, seed=2)
    res = hessian_spectrum(model, quadratic_loss, BATCH, top_k=1, density=False)
    eig = hessian_spectrum(model, quadratic_loss, BATCH, top_k=1, density=False, trace=False)
    abs_sum = np.abs(lam).sum()
    assert res.num_hvps - eig.num_hvps > 2 * MIN_TRACE_PROBES  # probes were added
    assert res.num_hvps - eig.num_hvps <= MAX_TRACE_PROBES
    assert abs(res.trace - lam.sum()) / abs_sum <= TRACE_TARGET
    assert abs(res.trace - lam.sum()) <= 4 * res.trace_stderr


def test_fixed_counts_are_honoured() -> None:
    lam = np.linspace(0.0, 1.0, 200)
    res = hessian_spectrum(
        _quadratic(lam), quadratic_loss, BATCH, top_k=2, num_slq_probes=3, slq_steps=25,
        num_trace_probes=5,
    )  # fmt: skip
    assert res.ritz_nodes is not None and res.ritz_nodes.shape == (3, 25)


# --------------------------------------------------------------------------------------------
# Warm start
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moved() -> dict:
    """The trained digits MLP and a copy moved slightly (1e-3 of the mean weight, seeded)."""
    model = trained_mlp(seed=0, steps=200)
    batches = digits_batches(PROBE_SIZES)
    moved = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(1e-3 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    H = dense_hessian(moved, cross_entropy_loss, batches)
    lam = np.linalg.eigvalsh(H.numpy())[::-1].copy()
    return {"model": model, "moved": moved, "batches": batches, "lam": lam}


def test_warm_start_saves_products_and_keeps_accuracy(moved) -> None:
    kw = dict(density=False, trace=False)
    prev = hessian_spectrum(
        moved["model"], cross_entropy_loss, moved["batches"], return_eigenvectors=True, **kw
    )
    cold = hessian_spectrum(moved["moved"], cross_entropy_loss, moved["batches"], **kw)
    warm = hessian_spectrum(
        moved["moved"], cross_entropy_loss, moved["batches"], warm_start=prev, **kw
    )
    lam = moved["lam"][:10]
    for res in (cold, warm):
        assert res.converged
        assert np.max(np.abs(res.eigenvalues - lam) / np.abs(lam)) <= TOP_K_RTOL
    assert warm.num_hvps <= 0.6 * cold.num_hvps, (warm.num_hvps, cold.num_hvps)
    # The top subspace barely moved: overlap near 1, ten small principal angles.
    assert cold.subspace_overlap is None
    assert warm.subspace_overlap is not None and 0.99 <= warm.subspace_overlap <= 1.0
    assert warm.principal_angles is not None and warm.principal_angles.shape == (10,)
    assert np.all(np.diff(warm.principal_angles) >= 0)
    # Vectors work as well as a result; the overlap of a subspace with itself is 1.
    same = hessian_spectrum(
        moved["model"], cross_entropy_loss, moved["batches"], warm_start=prev.eigenvectors,
        return_eigenvectors=True, **kw,
    )  # fmt: skip
    assert same.subspace_overlap == pytest.approx(1.0, abs=1e-6)


def test_warm_start_with_density_and_trace_meets_the_targets(moved) -> None:
    """A warm run is no quadrature probe (its start is not random): the density comes from
    separate probes, still within the target."""
    prev = hessian_spectrum(moved["model"], cross_entropy_loss, moved["batches"],
                            return_eigenvectors=True, density=False, trace=False)  # fmt: skip
    res = hessian_spectrum(moved["moved"], cross_entropy_loss, moved["batches"], warm_start=prev)
    lam = moved["lam"]
    assert np.max(np.abs(res.eigenvalues - lam[:10]) / np.abs(lam[:10])) <= TOP_K_RTOL
    assert max(_w1(res, lam)) <= W1_TARGET
    assert abs(res.trace - lam.sum()) / np.abs(lam).sum() <= TRACE_TARGET


def test_warm_start_errors(moved) -> None:
    model, batches = moved["model"], moved["batches"]
    no_vectors = hessian_spectrum(model, cross_entropy_loss, batches, density=False, trace=False)
    with pytest.raises(ValueError, match=r"warm_start.*return_eigenvectors"):
        hessian_spectrum(model, cross_entropy_loss, batches, warm_start=no_vectors)
    with pytest.raises(ValueError, match=r"warm_start.*length D"):
        hessian_spectrum(model, cross_entropy_loss, batches, warm_start=torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"warm_start.*tensor"):
        hessian_spectrum(model, cross_entropy_loss, batches, warm_start=[1.0])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------

D = 400
SPECTRUM = np.concatenate([[20.0, 15.0, 12.0, 10.0, 9.0], np.linspace(-1.0, 5.0, D - 5)])


@pytest.fixture(scope="module")
def A() -> torch.Tensor:
    return matrix_with_spectrum(SPECTRUM, seed=4)


def test_storage_grows_with_the_steps_taken(A) -> None:
    """A converged run holds about its steps' vectors, not max_iter's."""
    res = lanczos(MatrixOperator(A), top_k=3, tol=1e-8, max_iter=300)
    assert res.converged and res.num_hvps < 100
    steps = len(res.alphas)
    # Basis (steps + 1 rows) and products (steps rows), each rounded up to a chunk.
    assert 2 * steps + 1 <= res.basis_rows <= 2 * steps + 1 + 2 * CHUNK_ROWS
    assert res.basis_rows < 2 * 300
    (proc,) = run_lanczos(MatrixOperator(A), A[:1].clone(), [37], restart=[True])
    assert len(proc.Q) == 38 and proc.Q.nbytes <= (38 + CHUNK_ROWS) * D * 8


def test_memory_model() -> None:
    assert lanczos_memory(1000, 50) == (2 * 50 + 1) * 1000 * 4
    assert lanczos_memory(1000, 50, probes=3, slq_steps=40, dtype=F64) == (101 + 3 * 41) * 8000
    # Bounded: the run's cap + 1 vectors, or afterwards the Ritz vectors (with their products
    # when kept) and 3 rows per quadrature probe, whichever is more.
    bounded = lanczos_memory(1000, 50, top_k=5, probes=2, max_basis_rows=18)
    assert bounded == (18 + 1) * 1000 * 4
    assert lanczos_memory(1000, 50, top_k=5, probes=2, max_basis_rows=7) == (10 + 6) * 4000
    lean = lanczos_memory(1000, 50, top_k=5, max_basis_rows=7, keep_products=False)
    assert lean == (7 + 1) * 4000
    # Over budget the plan bounds the basis; within budget it keeps the full one.
    cpu = torch.device("cpu")
    roomy = plan_storage(1000, 241, top_k=5, op_dtype=F32, device=cpu, max_basis_bytes=10**9)
    assert roomy.max_rows is None and roomy.dtype == F64
    tight = plan_storage(1000, 241, top_k=5, op_dtype=F32, device=cpu, max_basis_bytes=60_000)
    assert tight.dtype == torch.float32 and tight.max_rows == 5 + BOUNDED_EXTRA_ROWS
    # A budget of 9 vectors: the cap leaves one for the next vector; never under top_k + 2.
    nine = plan_storage(1000, 241, top_k=5, op_dtype=F32, device=cpu, max_basis_bytes=36_000)
    assert nine.max_rows == 8
    floor = plan_storage(1000, 241, top_k=5, op_dtype=F32, device=cpu, max_basis_bytes=4_000)
    assert floor.max_rows == 7


def test_rows_storage_matches_dense_algebra() -> None:
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(37, 50, generator=gen, dtype=F64)
    rows = Rows(50, F64, torch.device("cpu"))
    for r in M:
        rows.append(r)
    w = torch.randn(50, generator=gen, dtype=F64)
    c = torch.randn(4, 37, generator=gen, dtype=F64)
    assert torch.allclose(rows.coeffs(w), M @ w)
    assert torch.allclose(rows.combine(c), c @ M)
    assert torch.equal(rows[:], M) and rows.allocated_rows - len(rows) < rows.chunk


def test_long_dot_products_are_summed_in_float64() -> None:
    """Chunked float32 dots summed in float64 match the float64 reference (chunks of 7 entries
    exercise the chunked path on a short vector; ragged last chunk)."""
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(3, 50, generator=gen)
    w = torch.randn(50, generator=gen)
    W = torch.randn(50, 2, generator=gen)
    exact = V.double() @ w.double()
    assert torch.allclose(matmul_sum(V, w, chunk=7).double(), exact, rtol=1e-6, atol=1e-6)
    assert torch.allclose(matmul_sum(V, W, chunk=7).double(), V.double() @ W.double(), atol=1e-5)
    assert abs(dot(V[0], w, chunk=7) - float(exact[0])) <= 1e-5


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_thick_restart_with_a_tiny_cap_matches_the_spectrum(A, which) -> None:
    """A budget of a few vectors forces thick restart (cap top_k + 2): same eigenvalues.
    ("SA" on -A: the same separated end of the spectrum, found from the other side.)"""
    budget = 6 * D * 8
    M = A if which == "LA" else -A
    res = lanczos(MatrixOperator(M), top_k=5, which=which, tol=1e-10, max_basis_bytes=budget,
                  return_eigenvectors=True)  # fmt: skip
    exact = np.sort(SPECTRUM)[::-1][:5] * (1 if which == "LA" else -1)
    # The cap and the next vector; afterwards only the Ritz vectors (products not kept).
    assert res.basis_rows == (5 + 2) + 1
    assert res.converged
    np.testing.assert_allclose(res.eigenvalues, exact, rtol=0, atol=1e-8 * 20.0)
    V = res.eigenvectors.to(F64)
    assert (V @ V.T - torch.eye(5, dtype=F64)).abs().max() <= TOL.ortho
    theta = torch.as_tensor(res.eigenvalues, dtype=F64)
    actual = torch.linalg.vector_norm(V @ M - theta[:, None] * V, dim=1).numpy()
    np.testing.assert_allclose(res.residuals, actual, rtol=1e-6, atol=TOL.rounding(D) * 20.0)


def test_bounded_hessian_spectrum_meets_the_targets_on_the_mlp() -> None:
    """Thick restart (cap top_k + 2) and quadrature probes without full reorthogonalisation,
    against the dense Hessian: the accuracy targets still hold."""
    model = trained_mlp(seed=0, steps=200)
    batches = digits_batches(PROBE_SIZES)
    H = dense_hessian(model, cross_entropy_loss, batches)
    lam = np.linalg.eigvalsh(H.numpy())[::-1].copy()
    res = hessian_spectrum(model, cross_entropy_loss, batches, max_basis_bytes=4 * H.shape[0] * 8)
    assert res.converged
    assert np.max(np.abs(res.eigenvalues - lam[:10]) / np.abs(lam[:10])) <= TOP_K_RTOL
    assert max(_w1(res, lam)) <= W1_TARGET
    assert abs(res.trace - lam.sum()) / np.abs(lam).sum() <= TRACE_TARGET


def test_low_memory_top_k_matches_the_dense_hessian() -> None:
    """A budget of one vector forces the smallest bounded basis (top_k + 2 vectors and the next
    one): the top 5 of a real Hessian still match the dense float64 reference to 1e-4, with
    honest residuals, and the run holds no more than those 8 vectors."""
    model = trained_mlp(seed=0, steps=200)
    batches = digits_batches(PROBE_SIZES)
    H = dense_hessian(model, cross_entropy_loss, batches)
    lam = np.linalg.eigvalsh(H.numpy())[::-1].copy()
    budget = H.shape[0] * 4
    top = dict(top_k=5, density=False, trace=False, max_basis_bytes=budget)
    res = hessian_spectrum(model, cross_entropy_loss, batches, **top, return_eigenvectors=True)
    assert res.converged and res.trace is None
    np.testing.assert_allclose(res.eigenvalues, lam[:5], rtol=TOP_K_RTOL)
    V = res.eigenvectors.to(F64)
    theta = torch.as_tensor(res.eigenvalues, dtype=F64)
    actual = torch.linalg.vector_norm(V @ H - theta[:, None] * V, dim=1)
    actual = (actual / torch.linalg.vector_norm(V, dim=1)).numpy()
    np.testing.assert_allclose(res.residuals, actual, rtol=1e-2, atol=1e-5 * lam[0])
    run = lanczos(HessianOperator(model, cross_entropy_loss, batches), top_k=5, tol=1e-5,
                  max_basis_bytes=budget)  # fmt: skip
    assert run.basis_rows == 5 + 2 + 1
    np.testing.assert_allclose(run.eigenvalues, lam[:5], rtol=TOP_K_RTOL)


# --------------------------------------------------------------------------------------------
# Names: num_hvps everywhere, top_k; the old names still work for one release
# --------------------------------------------------------------------------------------------


def test_deprecated_names_still_work(A) -> None:
    op = MatrixOperator(A)
    with pytest.warns(DeprecationWarning, match="top_k"):
        old = lanczos(op, k=3, tol=1e-8)
    new = lanczos(MatrixOperator(A), top_k=3, tol=1e-8)
    np.testing.assert_array_equal(old.eigenvalues, new.eigenvalues)
    with pytest.warns(DeprecationWarning, match="num_hvps"):
        assert old.num_matvecs == old.num_hvps == op.num_hvps
    with pytest.raises(ValueError, match=r"\bk\b.*positive"):
        with pytest.warns(DeprecationWarning):
            lanczos(op, k=0)
    with pytest.warns(DeprecationWarning, match="num_hvps"):
        est = hutchpp_trace(MatrixOperator(A), num_matvecs=12, seed=1)
    assert est.trace == hutchpp_trace(MatrixOperator(A), num_hvps=12, seed=1).trace
    with pytest.warns(DeprecationWarning, match="num_hvps"):
        assert est.num_matvecs == 12
    q = slq(MatrixOperator(A), num_probes=2, num_steps=10)
    with pytest.warns(DeprecationWarning, match="num_hvps"):
        assert q.num_matvecs == q.num_hvps == 20


def test_one_generator_per_measurement_is_deterministic() -> None:
    lam = np.concatenate([[5.0, 4.0, 3.0], np.linspace(-0.5, 0.5, 297)])
    runs = [
        hessian_spectrum(_quadratic(lam), quadratic_loss, BATCH, top_k=3, seed=s) for s in (7, 7, 8)
    ]
    a, b, c = runs
    assert a.trace == b.trace and a.num_hvps == b.num_hvps
    np.testing.assert_array_equal(a.ritz_nodes, b.ritz_nodes)
    assert a.trace != c.trace


# --------------------------------------------------------------------------------------------
# Warm start: the Rayleigh-Ritz step on the previous vectors, its expansion, its fallback
# --------------------------------------------------------------------------------------------


def test_warm_start_from_the_exact_eigenvectors_stops_after_the_rayleigh_ritz_step(moved) -> None:
    """The operator did not change: the previous vectors' Rayleigh-Ritz step already meets the
    bound, so the run costs their top_k products (at most two more), float64 and float32."""
    A = matrix_with_spectrum(SPECTRUM, seed=4)
    quad = Quadratic(A, theta=torch.full((D,), 0.1, dtype=F64))
    kw = dict(top_k=5, density=False, trace=False)
    prev = hessian_spectrum(quad, quadratic_loss, BATCH, return_eigenvectors=True, **kw)
    warm = hessian_spectrum(quad, quadratic_loss, BATCH, warm_start=prev, **kw)
    assert warm.converged and warm.num_hvps <= 5 + 2, warm.num_hvps
    np.testing.assert_allclose(warm.eigenvalues, SPECTRUM[:5], rtol=0, atol=1e-5 * 20.0)
    model, batches = moved["model"], moved["batches"]
    kw = dict(density=False, trace=False)
    prev = hessian_spectrum(model, cross_entropy_loss, batches, return_eigenvectors=True, **kw)
    again = hessian_spectrum(model, cross_entropy_loss, batches, warm_start=prev, **kw)
    assert again.converged and again.num_hvps <= 10 + 2, again.num_hvps
    np.testing.assert_allclose(again.eigenvalues, prev.eigenvalues, rtol=TOP_K_RTOL)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_warm_start_on_a_changed_matrix_matches_the_dense_spectrum(which) -> None:
    """Previous eigenvectors of A, operator A + E (a small symmetric change): the warm run
    finds eigh(A + E)'s end of the spectrum to the cold run's tolerance with fewer products;
    with return_eigenvectors (Lanczos from the vectors' sum) the eigenvectors too."""
    A = matrix_with_spectrum(SPECTRUM, seed=4)
    gen = torch.Generator().manual_seed(7)
    E = torch.randn(D, D, generator=gen, dtype=F64) * 1e-4
    sign = 1.0 if which == "LA" else -1.0
    B = sign * (A + (E + E.T) / 2)
    kw = dict(top_k=5, which=which, density=False, trace=False, tol=1e-8)
    prev = hessian_spectrum(Quadratic(sign * A), quadratic_loss, BATCH, return_eigenvectors=True,
                            **kw)  # fmt: skip
    lam, U = torch.linalg.eigh(B)
    order = torch.argsort(lam, descending=which == "LA")[:5]
    for vectors in (False, True):
        cold = hessian_spectrum(Quadratic(B), quadratic_loss, BATCH,
                                return_eigenvectors=vectors, **kw)  # fmt: skip
        warm = hessian_spectrum(Quadratic(B), quadratic_loss, BATCH, warm_start=prev,
                                return_eigenvectors=vectors, **kw)  # fmt: skip
        for res in (cold, warm):
            assert res.converged
            np.testing.assert_allclose(res.eigenvalues, lam[order].numpy(), rtol=0, atol=2e-7)
        assert warm.num_hvps <= (0.9 if vectors else 0.6) * cold.num_hvps, (
            vectors, warm.num_hvps, cold.num_hvps)  # fmt: skip
    # tol times the run's norm estimate (row sums of T: above ||H|| = 20, below 1.5 ||H||)
    assert np.all(warm.residuals <= 1e-8 * 30.0)
    cos = torch.linalg.svdvals(warm.eigenvectors.to(F64) @ U[:, order])
    assert float(cos.min()) >= 1 - 1e-12  # angles below r / gap (gap >= 1)


def test_warm_start_from_an_unrelated_subspace_still_converges(moved) -> None:
    """Random previous vectors: the first one's residual shows them far from the top subspace
    and the run falls back to Lanczos from their sum; same accuracy as cold, at most the one
    wasted product (and a few) more."""
    kw = dict(density=False, trace=False)
    Z = torch.randn(10, moved["lam"].size, generator=torch.Generator().manual_seed(3))
    cold = hessian_spectrum(moved["moved"], cross_entropy_loss, moved["batches"], **kw)
    warm = hessian_spectrum(moved["moved"], cross_entropy_loss, moved["batches"], warm_start=Z,
                            **kw)  # fmt: skip
    lam = moved["lam"][:10]
    assert warm.converged
    assert np.max(np.abs(warm.eigenvalues - lam) / np.abs(lam)) <= TOP_K_RTOL
    assert warm.num_hvps <= cold.num_hvps + 1 + 5, (warm.num_hvps, cold.num_hvps)
    assert warm.subspace_overlap is not None and warm.subspace_overlap < 0.1


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_the_warm_start_probes_the_first_vector_before_the_rayleigh_ritz_step(scale) -> None:
    """Previous vectors: A's top 5 eigenvectors, the first turned by an angle phi towards the
    sixth. Its exact relative residual under A, |l1 - l6| cos(phi) sin(phi) / ||A v||, is set
    to ``scale`` sqrt(tol): below sqrt(tol) the run keeps the previous vectors (5 products and
    its expansions), above it gives up after that one product (the caller then runs Lanczos
    from the vectors' sum)."""
    A = matrix_with_spectrum(SPECTRUM, seed=4)
    lam, U = torch.linalg.eigh(A)
    lam, U = lam.flip(0), U.flip(1)
    tol = 1e-6
    # relative residual of cos(phi) u1 + sin(phi) u6 as a function of phi, solved on a grid
    phis = np.linspace(0, 0.2, 200_001)
    l1, l6 = float(lam[0]), float(lam[5])
    c, s = np.cos(phis), np.sin(phis)
    rel = abs(l1 - l6) * c * s / np.hypot(c * l1, s * l6)
    phi = float(phis[np.searchsorted(rel, scale * np.sqrt(tol))])
    prev = U[:, :5].T.clone()
    prev[0] = np.cos(phi) * U[:, 0] + np.sin(phi) * U[:, 5]
    op = MatrixOperator(A)
    run, spent = warm_run(
        op, prev, k=5, which="LA", tol=tol, max_hvps=60, generator=torch.Generator(),
        dtype=F64, device=torch.device("cpu"),
    )  # fmt: skip
    if scale > 1:
        assert run is None and spent == 1 and op.num_hvps == 1
    else:
        assert run is not None and run.converged and spent >= 5 and op.num_hvps == spent
        np.testing.assert_allclose(run.theta, lam[:5].numpy(), rtol=0, atol=tol * 20.0)


def test_warm_start_from_fewer_vectors_than_top_k() -> None:
    """Two previous vectors for a top 5: the basis grows past them and finds the other three."""
    A = matrix_with_spectrum(SPECTRUM, seed=4)
    quad = Quadratic(A, theta=torch.full((D,), 0.1, dtype=F64))
    kw = dict(density=False, trace=False, tol=1e-8)
    prev = hessian_spectrum(quad, quadratic_loss, BATCH, top_k=2, return_eigenvectors=True, **kw)
    warm = hessian_spectrum(quad, quadratic_loss, BATCH, top_k=5, warm_start=prev, **kw)
    assert warm.converged
    np.testing.assert_allclose(warm.eigenvalues, SPECTRUM[:5], rtol=0, atol=1e-8 * 20.0)


def test_warm_start_memory_follows_the_model(A) -> None:
    """A full warm run holds its basis and products (2 rows a product, rounded up to chunks),
    as lanczos_memory counts a run of that many steps; over budget it is thick restart from
    the previous vectors' sum, with the bounded basis (cap + 1 rows)."""
    gen = torch.Generator().manual_seed(7)
    E = torch.randn(D, D, generator=gen, dtype=F64) * 1e-4
    op = MatrixOperator(A + (E + E.T) / 2)
    prev = torch.linalg.eigh(A).eigenvectors[:, -5:].T
    exact = np.sort(np.linalg.eigvalsh(op.A.numpy()))[::-1][:5]
    kw = dict(k=5, which="LA", tol=1e-6, max_iter=None, warm_start=prev)
    run = eigen_run(op, generator=torch.Generator().manual_seed(0), **kw)
    hvps = op.num_hvps
    assert run.converged and not run.bounded and hvps < 10  # expanded, no fallback
    assert 2 * hvps <= run.basis_rows <= 2 * hvps + 2 * CHUNK_ROWS
    assert 2 * hvps * D * 8 <= lanczos_memory(D, hvps, dtype=F64)
    np.testing.assert_allclose(run.theta, exact, rtol=0, atol=1e-6 * 20.0)
    op.num_hvps = 0
    budget = 6 * D * 8
    bounded = eigen_run(op, generator=torch.Generator().manual_seed(0), max_basis_bytes=budget,
                        keep_products=False, **kw)  # fmt: skip
    rows = lanczos_memory(D, 0, top_k=5, dtype=F64, max_basis_rows=7, keep_products=False)
    assert bounded.bounded and bounded.converged
    assert bounded.basis_rows * D * 8 == rows
    np.testing.assert_allclose(bounded.theta, exact, rtol=0, atol=1e-6 * 20.0)


def test_warm_start_with_a_float32_basis(A) -> None:
    """A budget between the float32 and the float64 size of a full basis keeps a full float32
    basis: the Gram residuals (products of float32 rows summed in float64) still stop the
    expansion at the tolerance, and the values match the float64 spectrum."""
    gen = torch.Generator().manual_seed(7)
    E = torch.randn(D, D, generator=gen, dtype=F64) * 1e-4
    B = A + (E + E.T) / 2
    rows = 2 * 120 + 1  # the default step limit's worst case
    budget = rows * D * 6  # float32 fits, float64 does not
    op = MatrixOperator(B.float())
    prev = torch.linalg.eigh(A).eigenvectors[:, -5:].T.float()
    kw = dict(k=5, which="LA", tol=1e-5, max_iter=None, max_basis_bytes=budget)
    run = eigen_run(op, generator=torch.Generator().manual_seed(0), warm_start=prev, **kw)
    assert run.Y.dtype == F32 and not run.bounded and run.converged
    warm = op.num_hvps
    op.num_hvps = 0
    eigen_run(op, generator=torch.Generator().manual_seed(0), **kw)
    assert warm < op.num_hvps, (warm, op.num_hvps)
    exact = np.sort(np.linalg.eigvalsh(B.numpy()))[::-1][:5]
    np.testing.assert_allclose(run.theta, exact, rtol=0, atol=1e-5 * 20.0)
