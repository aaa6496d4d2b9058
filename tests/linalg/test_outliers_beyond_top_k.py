"""The outlier count when there are more outliers than computed eigenvalues.

Spiked Marchenko–Pastur matrices with 3, 10, 25 and 60 spikes, every one far above the BBP
threshold, so the exact count is the number of spikes (verified on the exact spectrum by
``spiked_matrix``); ``top_k = 10`` throughout. A count capped at ``top_k`` would read 10 for 25
and 60: the density must see the rest.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_landscape.linalg import MatrixOperator, hessian_spectrum, slq, split_outliers
from tests._reference import Quadratic, bbp_threshold, quadratic_loss, spiked_matrix

EDGE_RTOL = 0.05  # as in test_outliers.py


def _spikes(r: int) -> tuple[float, ...]:
    # Well separated (gaps of at least 0.6, far above the bulk width's 5%) and above 2x BBP.
    return tuple(np.linspace(3.0, 12.0 if r <= 25 else 40.0, r))


@pytest.mark.parametrize("r", [3, 10, 25, 60])
def test_count_beyond_top_k_from_the_density(r) -> None:
    S = spiked_matrix(1000, _spikes(r), gamma=0.5, seed=r)
    assert S.n_outliers == r and min(_spikes(r)) > 2 * bbp_threshold(0.5)
    q = slq(MatrixOperator(S.A), seed=0)
    split = split_outliers(S.eigenvalues[:10], q.nodes, q.weights, dim=1000)
    assert split.bulk_edge == pytest.approx(S.eigenvalues[r], rel=EDGE_RTOL)
    assert split.bulk_edge == pytest.approx(S.mp_edge, rel=EDGE_RTOL)
    if r < 10:
        # Counted among the Ritz values: exact, and the density agrees.
        assert split.n_outliers == r and not split.n_outliers_saturated
        assert split.n_outliers_stderr == 0.0
        assert split.n_outliers_density == pytest.approx(r, abs=0.5)
        return
    assert split.n_outliers_saturated
    assert split.n_outliers >= 10
    se = split.n_outliers_stderr
    assert 0 < se < 0.1 * r
    # The density's estimate within three standard errors (plus rounding) of the exact count.
    assert abs(split.n_outliers_density - r) <= 3 * se + 0.5
    assert abs(split.n_outliers - r) <= max(1, 3 * se)
    if r > 10:
        assert split.n_outliers > 10  # not capped at top_k


def test_count_from_one_probe_has_no_stderr() -> None:
    S = spiked_matrix(1000, _spikes(25), gamma=0.5, seed=25)
    q = slq(MatrixOperator(S.A), num_probes=1, seed=0)
    split = split_outliers(S.eigenvalues[:10], q.nodes, q.weights, dim=1000)
    assert split.n_outliers_saturated and np.isnan(split.n_outliers_stderr)
    assert split.n_outliers > 10


@pytest.mark.parametrize("r", [3, 25])
def test_hessian_spectrum_reports_the_count_and_its_flag(r) -> None:
    """Through ``hessian_spectrum`` on the quadratic 1/2 θᵀAθ (Hessian A exactly), D = 600."""
    S = spiked_matrix(600, _spikes(r), gamma=0.5, seed=11 + r)
    model = Quadratic(S.A, theta=torch.full((600,), 0.1, dtype=torch.float64))
    res = hessian_spectrum(model, quadratic_loss, [(torch.zeros(1),)], top_k=10, tol=1e-10)
    np.testing.assert_allclose(res.eigenvalues, S.eigenvalues[:10], rtol=1e-8)
    assert res.bulk_edge == pytest.approx(S.mp_edge, rel=EDGE_RTOL)
    if r == 3:
        assert (res.n_outliers, res.n_outliers_saturated, res.n_outliers_stderr) == (3, False, 0)
    else:
        assert res.n_outliers_saturated and res.n_outliers > 10
        assert abs(res.n_outliers - r) <= max(1, 3 * res.n_outliers_stderr)


def test_fields_are_none_without_the_density() -> None:
    S = spiked_matrix(600, _spikes(3), gamma=0.5, seed=14)
    model = Quadratic(S.A, theta=torch.full((600,), 0.1, dtype=torch.float64))
    res = hessian_spectrum(model, quadratic_loss, [(torch.zeros(1),)], density=False)
    assert res.n_outliers is None
    assert res.n_outliers_stderr is None and res.n_outliers_saturated is None
