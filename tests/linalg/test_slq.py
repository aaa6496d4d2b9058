"""Stochastic Lanczos quadrature against exact eigenvalue distributions (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_landscape.linalg import MatrixOperator, QuadratureResult, slq, spectral_density
from tests._reference import (
    cross_entropy_loss,
    dense_hessian,
    digits_batches,
    grid_measure,
    matrix_with_spectrum,
    spiked_matrix,
    trained_mlp,
    wasserstein1,
)
from tests._tolerances import tolerances

F64 = torch.float64
TOL = tolerances(F64)
W1_TARGET = 0.02  # docs/science.md: Wasserstein-1 / spectral range at defaults


@pytest.fixture(scope="module")
def spiked() -> tuple[torch.Tensor, np.ndarray]:
    S = spiked_matrix(1000, (4.0, 6.0, 9.0), seed=0)
    return S.A, S.eigenvalues


@pytest.fixture(scope="module")
def mlp_hessian() -> tuple[torch.Tensor, np.ndarray]:
    model = trained_mlp(seed=0)
    H = dense_hessian(model, cross_entropy_loss, digits_batches([160, 128, 128, 96]))
    return H, np.linalg.eigvalsh(H.numpy())


def _w1_over_range(q: QuadratureResult, lam: np.ndarray) -> float:
    return wasserstein1(q.nodes, q.weights, lam) / (lam.max() - lam.min())


@pytest.mark.parametrize("case", ["spiked", "mlp_hessian"])
def test_quadrature_rules_are_probability_measures_inside_the_spectrum(case, request) -> None:
    A, lam = request.getfixturevalue(case)
    q = slq(MatrixOperator(A))  # defaults: 4 probes, 80 steps
    assert isinstance(q, QuadratureResult)
    assert q.nodes.shape == q.weights.shape == (4, 80)
    assert np.all(q.weights >= 0)
    np.testing.assert_allclose(q.weights.sum(axis=1), 1.0, rtol=0, atol=1e3 * TOL.eps)
    # Ritz values interlace: they never leave [lambda_min, lambda_max].
    slack = TOL.rounding(A.shape[0]) * np.abs(lam).max()
    assert q.nodes.min() >= lam.min() - slack
    assert q.nodes.max() <= lam.max() + slack
    assert q.num_hvps == 4 * 80


@pytest.mark.parametrize("case", ["spiked", "mlp_hessian"])
def test_wasserstein_distance_at_defaults(case, request) -> None:
    A, lam = request.getfixturevalue(case)
    q = slq(MatrixOperator(A), seed=0)
    assert _w1_over_range(q, lam) <= W1_TARGET
    # The broadened density the user sees is held to the same target.
    grid, density = spectral_density(q.nodes, q.weights)
    w1 = wasserstein1(*grid_measure(grid, density), lam) / (lam.max() - lam.min())
    assert w1 <= W1_TARGET


def test_extreme_nodes_converge_to_extreme_eigenvalues(spiked) -> None:
    A, lam = spiked
    q = slq(MatrixOperator(A), seed=0)
    # The largest Ritz value of every probe is the (isolated) top eigenvalue.
    np.testing.assert_allclose(q.nodes.max(axis=1), lam.max(), rtol=1e-8)


def test_more_probes_converge(spiked) -> None:
    A, lam = spiked
    seeds = (0, 1, 2)

    def mean_w1(P: int) -> float:
        return float(
            np.mean(
                [_w1_over_range(slq(MatrixOperator(A), num_probes=P, seed=s), lam) for s in seeds]
            )
        )

    w1 = {P: mean_w1(P) for P in (1, 16, 64)}
    assert w1[16] < 0.6 * w1[1], w1
    assert w1[64] < w1[16], w1


def test_more_steps_converge(spiked) -> None:
    A, lam = spiked
    w_short = _w1_over_range(slq(MatrixOperator(A), num_probes=16, num_steps=10), lam)
    w_long = _w1_over_range(slq(MatrixOperator(A), num_probes=16, num_steps=80), lam)
    assert w_long < 0.5 * w_short, (w_short, w_long)


def test_gauss_quadrature_moments_are_exact_on_a_diagonal_matrix() -> None:
    """m nodes integrate degree <= 2m-1 exactly; for diagonal A and a Rademacher probe
    v^T A^p v / D = tr(A^p) / D, so every probe reproduces the exact moments."""
    rng = np.random.default_rng(0)
    lam = rng.uniform(-1.0, 1.0, 200)
    m = 8
    q = slq(MatrixOperator(matrix_with_spectrum(lam, seed=None)), num_probes=3, num_steps=m)
    for p in range(2 * m):
        exact = np.mean(lam**p)
        got = (q.weights * q.nodes**p).sum(axis=1)
        np.testing.assert_allclose(got, exact, rtol=0, atol=1e3 * TOL.eps)


def test_few_distinct_eigenvalues_give_the_exact_measure() -> None:
    """5 distinct eigenvalues: the quadrature stops at the invariant subspace and is exact."""
    values = np.array([-2.0, 0.0, 1.0, 3.0, 7.0])
    lam = np.repeat(values, [40, 100, 30, 20, 10])
    q = slq(MatrixOperator(matrix_with_spectrum(lam, seed=None)), num_probes=2, num_steps=20)
    assert wasserstein1(q.nodes, q.weights, lam) <= 1e3 * TOL.eps * 9.0
    np.testing.assert_allclose(q.weights.sum(axis=1), 1.0, rtol=0, atol=1e3 * TOL.eps)


def test_deterministic_for_a_seed(spiked) -> None:
    A, _ = spiked
    a = slq(MatrixOperator(A), num_probes=2, num_steps=30, seed=5)
    b = slq(MatrixOperator(A), num_probes=2, num_steps=30, seed=5)
    np.testing.assert_array_equal(a.nodes, b.nodes)
    np.testing.assert_array_equal(a.weights, b.weights)
    c = slq(MatrixOperator(A), num_probes=2, num_steps=30, seed=6)
    assert not np.array_equal(a.weights, c.weights)


def test_density_integrates_to_one(spiked) -> None:
    A, lam = spiked
    q = slq(MatrixOperator(A))
    grid, density = spectral_density(q.nodes, q.weights)
    assert grid.shape == density.shape == (1024,)
    assert np.all(np.diff(grid) > 0)
    assert np.all(density >= 0)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e3 * TOL.eps)
    assert grid[0] <= q.nodes.min() and grid[-1] >= q.nodes.max()
    # A user grid and width.
    user = np.linspace(lam.min() - 1.0, lam.max() + 1.0, 333)
    grid2, density2 = spectral_density(q.nodes, q.weights, grid=user, sigma=0.05)
    np.testing.assert_array_equal(grid2, user)
    assert np.trapezoid(density2, grid2) == pytest.approx(1.0, abs=1e3 * TOL.eps)
    grid3, _ = spectral_density(q.nodes, q.weights, num_points=100)
    assert grid3.shape == (100,)


def test_density_of_a_single_node_is_a_gaussian() -> None:
    grid = np.linspace(-1.0, 1.0, 2001)
    _, density = spectral_density(np.array([[0.25]]), np.array([[1.0]]), grid=grid, sigma=0.1)
    exact = np.exp(-0.5 * ((grid - 0.25) / 0.1) ** 2) / (0.1 * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(density, exact, rtol=1e-6, atol=1e-9)


def test_errors() -> None:
    op = MatrixOperator(torch.eye(10, dtype=F64))
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="num_probes"):
            slq(op, num_probes=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="num_steps"):
            slq(op, num_steps=bad)  # type: ignore[arg-type]
    nodes, weights = np.zeros((2, 5)), np.full((2, 5), 0.2)
    with pytest.raises(ValueError, match="same shape"):
        spectral_density(nodes, weights[:, :4])
    for sigma in (0.0, -1.0):
        with pytest.raises(ValueError, match="sigma"):
            spectral_density(nodes + np.arange(5), weights, sigma=sigma)
    with pytest.raises(ValueError, match="num_points"):
        spectral_density(nodes + np.arange(5), weights, num_points=1)
