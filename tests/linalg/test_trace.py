"""Hutchinson and Hutch++ on matrices with known traces (float64, fixed seeds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_landscape.linalg import (
    MatrixOperator,
    TraceEstimate,
    hutchinson_trace,
    hutchpp_trace,
)
from tests._reference import matrix_with_spectrum
from tests._tolerances import tolerances

F64 = torch.float64
TOL = tolerances(F64)


def _indefinite(dim: int = 200) -> tuple[torch.Tensor, float]:
    """Mixed-sign spectrum, dense eigenvectors (Hutchinson is exact on diagonal matrices)."""
    lam = np.random.default_rng(1).normal(0.3, 1.0, dim)
    return matrix_with_spectrum(lam, seed=2), float(lam.sum())


def _dominated(dim: int = 500) -> tuple[torch.Tensor, float]:
    """A few dominant eigenvalues over a small bulk: the case Hutch++ is built for."""
    lam = np.concatenate(
        [[1000.0, 500.0, 300.0, 200.0, 100.0], np.random.default_rng(3).uniform(0, 1, dim - 5)]
    )
    return matrix_with_spectrum(lam, seed=4), float(lam.sum())


SEEDS = range(200)


@pytest.mark.parametrize(
    ("estimator", "kwargs"),
    [(hutchinson_trace, {"num_probes": 4}), (hutchpp_trace, {"num_hvps": 12})],
    ids=["hutchinson", "hutchpp"],
)
def test_unbiased(estimator, kwargs) -> None:
    A, tr = _indefinite()
    est = np.array([estimator(MatrixOperator(A), seed=s, **kwargs).trace for s in SEEDS])
    stderr_of_mean = est.std(ddof=1) / np.sqrt(len(est))
    assert abs(est.mean() - tr) <= 4 * stderr_of_mean, (est.mean(), tr, stderr_of_mean)
    assert est.std() > 0  # a real random estimator: the test is not vacuous


@pytest.mark.parametrize(
    ("estimator", "arg"), [(hutchinson_trace, "num_probes"), (hutchpp_trace, "num_hvps")]
)
def test_error_falls_with_more_products(estimator, arg) -> None:
    A, tr = _indefinite()

    def mean_abs_error(n: int) -> float:
        errs = [abs(estimator(MatrixOperator(A), seed=s, **{arg: n}).trace - tr) for s in range(30)]
        return float(np.mean(errs))

    # Standard error ~ 1/sqrt(n): 16x the products, about 1/4 of the error.
    assert mean_abs_error(192) < 0.5 * mean_abs_error(12)


def test_hutchpp_beats_hutchinson_on_a_few_dominant_eigenvalues() -> None:
    A, tr = _dominated()
    n = 48
    seeds = range(10)
    err_h = np.mean(
        [abs(hutchinson_trace(MatrixOperator(A), num_probes=n, seed=s).trace - tr) for s in seeds]
    )
    err_pp = np.mean(
        [abs(hutchpp_trace(MatrixOperator(A), num_hvps=n, seed=s).trace - tr) for s in seeds]
    )
    assert err_pp < 0.05 * err_h, (err_pp, err_h)


@pytest.mark.parametrize("matrix", [_indefinite, _dominated])
@pytest.mark.parametrize(
    ("estimator", "kwargs"),
    [(hutchinson_trace, {"num_probes": 32}), (hutchpp_trace, {"num_hvps": 48})],
    ids=["hutchinson", "hutchpp"],
)
def test_stderr_is_honest(matrix, estimator, kwargs) -> None:
    A, tr = matrix()
    for s in range(10):
        est = estimator(MatrixOperator(A), seed=s, **kwargs)
        assert est.stderr > 0
        assert abs(est.trace - tr) <= 4 * est.stderr, (s, est.trace, tr, est.stderr)
    # ... and not absurdly loose either: on average the error is about one stderr.
    ratios = [
        abs(e.trace - tr) / e.stderr
        for e in (estimator(MatrixOperator(A), seed=s, **kwargs) for s in range(10, 40))
    ]
    assert 0.3 < np.mean(ratios) < 2.0, np.mean(ratios)


def test_hutchinson_is_exact_on_a_diagonal_matrix() -> None:
    """Rademacher probes: z^T diag(d) z = sum(d) for every z."""
    lam = np.random.default_rng(5).normal(size=100)
    est = hutchinson_trace(MatrixOperator(matrix_with_spectrum(lam, seed=None)), num_probes=3)
    assert est.trace == pytest.approx(lam.sum(), abs=1e2 * TOL.eps * np.abs(lam).sum())
    assert est.stderr <= 1e2 * TOL.eps * np.abs(lam).sum()


def test_hutchpp_is_exact_when_the_sketch_spans_the_range() -> None:
    """Rank 8 and 16 sketch vectors: the deflated rest is zero, the trace exact."""
    lam = np.zeros(120)
    lam[:8] = [9.0, 7.0, -5.0, 4.0, 3.0, -2.0, 1.5, 1.0]
    est = hutchpp_trace(MatrixOperator(matrix_with_spectrum(lam, seed=6)), num_hvps=48)
    assert est.trace == pytest.approx(lam.sum(), abs=1e3 * TOL.eps * np.abs(lam).sum())


def test_counts_and_determinism() -> None:
    A, _ = _indefinite()
    op = MatrixOperator(A)
    h = hutchinson_trace(op, num_probes=7, seed=3)
    assert isinstance(h, TraceEstimate)
    assert h.num_hvps == 7 == op.num_hvps
    op = MatrixOperator(A)
    p = hutchpp_trace(op, num_hvps=30, seed=3)
    assert p.num_hvps == 30 == op.num_hvps
    assert hutchinson_trace(MatrixOperator(A), num_probes=7, seed=3).trace == h.trace
    assert hutchpp_trace(MatrixOperator(A), num_hvps=30, seed=3).trace == p.trace


def test_errors() -> None:
    op = MatrixOperator(torch.eye(10, dtype=F64))
    for bad in (1, 0, 2.0):
        with pytest.raises(ValueError, match="num_probes"):
            hutchinson_trace(op, num_probes=bad)  # type: ignore[arg-type]
    for bad in (5, 0, 12.0):
        with pytest.raises(ValueError, match="num_hvps"):
            hutchpp_trace(op, num_hvps=bad)  # type: ignore[arg-type]
