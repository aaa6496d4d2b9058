"""Outlier/bulk split on spiked random matrices with a known number of outliers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_landscape.linalg import (
    MatrixOperator,
    OutlierSplit,
    hessian_spectrum,
    slq,
    split_outliers,
)
from tests._reference import Quadratic, quadratic_loss, spiked_matrix

SPIKES = {1: (5.0,), 3: (4.0, 6.0, 9.0), 5: (3.0, 4.0, 5.0, 7.0, 9.0)}
EDGE_RTOL = 0.05  # "within a few %" of the Marchenko–Pastur edge


@pytest.mark.parametrize("r", [1, 3, 5])
@pytest.mark.parametrize("top_k", [10, 20])
def test_spiked_matrix_outlier_count_and_bulk_edge(r, top_k) -> None:
    S = spiked_matrix(1000, SPIKES[r], gamma=0.5, seed=r)
    assert S.n_outliers == r
    q = slq(MatrixOperator(S.A), seed=0)
    split = split_outliers(S.eigenvalues[:top_k], q.nodes, q.weights, dim=1000)
    assert isinstance(split, OutlierSplit)
    assert split.n_outliers == r
    assert split.bulk_edge == pytest.approx(S.mp_edge, rel=EDGE_RTOL)
    # Finite-size edge: the largest bulk eigenvalue.
    assert split.bulk_edge == pytest.approx(S.eigenvalues[r], rel=EDGE_RTOL)


def test_input_order_does_not_matter() -> None:
    S = spiked_matrix(1000, SPIKES[3], seed=3)
    q = slq(MatrixOperator(S.A), seed=0)
    a = split_outliers(S.eigenvalues[:10], q.nodes, q.weights, dim=1000)
    b = split_outliers(S.eigenvalues[:10][::-1], q.nodes, q.weights, dim=1000)
    assert (a.n_outliers, a.bulk_edge) == (b.n_outliers, b.bulk_edge)


def test_no_outliers_in_a_pure_bulk() -> None:
    """Marchenko–Pastur alone: nothing stands out."""
    gen = torch.Generator().manual_seed(9)
    Z = torch.randn(800, 1600, generator=gen, dtype=torch.float64)
    A = Z @ Z.T / 1600
    lam = np.linalg.eigvalsh(A.numpy())[::-1]
    q = slq(MatrixOperator(A), seed=0)
    split = split_outliers(lam[:10], q.nodes, q.weights, dim=800)
    assert split.n_outliers == 0
    assert split.bulk_edge == pytest.approx((1 + 0.5**0.5) ** 2, rel=EDGE_RTOL)


def test_all_computed_eigenvalues_are_outliers() -> None:
    """k = r: the count is k and the edge comes from the quadrature below the outliers."""
    S = spiked_matrix(1000, SPIKES[5], seed=5)
    q = slq(MatrixOperator(S.A), seed=0)
    split = split_outliers(S.eigenvalues[:5], q.nodes, q.weights, dim=1000)
    assert split.n_outliers == 5
    assert split.bulk_edge == pytest.approx(S.mp_edge, rel=EDGE_RTOL)


def test_quadratic_loss_through_hessian_spectrum() -> None:
    """1/2 theta^T A theta has Hessian A exactly: 4 spikes above an MP bulk (D = 600)."""
    S = spiked_matrix(600, (3.0, 5.0, 7.0, 10.0), gamma=0.5, seed=11)
    assert S.n_outliers == 4
    model = Quadratic(S.A, theta=torch.full((600,), 0.1, dtype=torch.float64))
    res = hessian_spectrum(model, quadratic_loss, [(torch.zeros(1),)], tol=1e-10)
    assert res.n_outliers == 4
    assert res.bulk_edge == pytest.approx(S.mp_edge, rel=EDGE_RTOL)
    np.testing.assert_allclose(res.eigenvalues, S.eigenvalues[:10], rtol=1e-8)
    assert res.num_params == 600


def test_errors() -> None:
    nodes, weights = np.linspace(0, 1, 10)[None, :], np.full((1, 10), 0.1)
    theta = np.array([3.0, 2.0])
    with pytest.raises(ValueError, match="eigenvalues"):
        split_outliers(np.array([]), nodes, weights, dim=10)
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="gap_factor"):
            split_outliers(theta, nodes, weights, dim=10, gap_factor=bad)
    for bad in (0.0, 0.5, -0.1):
        with pytest.raises(ValueError, match="rho"):
            split_outliers(theta, nodes, weights, dim=10, rho=bad)
    for bad in (1, 1.5):
        with pytest.raises(ValueError, match="dim"):
            split_outliers(theta, nodes, weights, dim=bad)  # type: ignore[arg-type]
