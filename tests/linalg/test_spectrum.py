"""hessian_spectrum at its defaults against the dense float64 Hessian of the same weights."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lightning_landscape
from lightning_landscape.linalg import HessianOperator, HessianSpectrum, hessian_spectrum
from tests._reference import (
    block_index,
    cross_entropy_loss,
    dense_hessian,
    digits_batches,
    digits_data,
    grid_measure,
    mse_sum_outputs_loss,
    reference_hvp,
    spectral_norm,
    trained_mlp,
    wasserstein1,
)
from tests._tolerances import tolerances

F32, F64 = torch.float32, torch.float64
# Acceptance targets at defaults (docs/science.md, "Acceptance definitions").
TOP_K_RTOL = 1e-4
W1_TARGET = 0.02
TRACE_TARGET = 0.05
PROBE_SIZES = [160, 128, 128, 96]  # four probe batches, unequal


@pytest.fixture(scope="module")
def case() -> dict:
    model = trained_mlp(seed=0, steps=200)  # float32 weights
    batches = digits_batches(PROBE_SIZES)
    H = dense_hessian(model, cross_entropy_loss, batches)  # float64, the same float32 weights
    lam = np.linalg.eigvalsh(H.numpy())[::-1].copy()  # descending
    result = hessian_spectrum(model, cross_entropy_loss, batches)  # defaults
    return {"model": model, "batches": batches, "H": H, "lam": lam, "result": result}


def _operator_rounding(case: dict) -> float:
    """||H_32 v - H v|| over unit vectors: how far rounding moves the float32 operator."""
    op = HessianOperator(case["model"], cross_entropy_loss, case["batches"])
    V = torch.randn(4, op.dim, generator=torch.Generator().manual_seed(0), dtype=F64)
    V = V / torch.linalg.vector_norm(V, dim=1, keepdim=True)
    err = torch.linalg.vector_norm(op.matmat(V.float()).double() - V @ case["H"], dim=1)
    return float(err.max())


def test_top_eigenvalues_at_defaults(case) -> None:
    res, lam = case["result"], case["lam"]
    assert isinstance(res, HessianSpectrum)
    assert res.eigenvalues.shape == (10,)
    assert np.all(np.diff(res.eigenvalues) <= 0)
    rel = np.abs(res.eigenvalues - lam[:10]) / np.abs(lam[:10])
    assert rel.max() <= TOP_K_RTOL, rel
    assert res.converged
    assert res.num_params == case["H"].shape[0]


def test_residuals_bound_the_actual_errors(case) -> None:
    res, lam = case["result"], case["lam"]
    assert res.residuals.shape == (10,)
    assert np.all(res.residuals >= 0)
    err = np.abs(res.eigenvalues[:, None] - lam[None, :]).min(axis=1)
    # Weyl: |theta - lambda(H)| <= ||H_32 y - theta y|| + ||H_32 - H||; the second term is the
    # float32 rounding of the operator, measured on random vectors (x4 for the worst direction).
    slack = 4 * _operator_rounding(case)
    assert slack <= tolerances(F32).rounding(len(lam)) * lam[0]  # the operator is float32-exact
    assert np.all(err <= res.residuals + slack), (err, res.residuals, slack)


def test_density_wasserstein_at_defaults(case) -> None:
    res, lam = case["result"], case["lam"]
    span = lam.max() - lam.min()
    assert res.ritz_nodes is not None and res.ritz_weights is not None
    np.testing.assert_allclose(res.ritz_weights.sum(axis=1), 1.0, atol=1e-10)
    assert wasserstein1(res.ritz_nodes, res.ritz_weights, lam) / span <= W1_TARGET
    assert res.density_grid is not None and res.density is not None
    assert np.trapezoid(res.density, res.density_grid) == pytest.approx(1.0, abs=1e-10)
    assert np.all(res.density >= 0)
    assert wasserstein1(*grid_measure(res.density_grid, res.density), lam) / span <= W1_TARGET
    assert res.lambda_min is not None
    assert abs(res.lambda_min - lam.min()) <= 0.02 * span


def test_trace_at_defaults(case) -> None:
    res, lam = case["result"], case["lam"]
    assert res.trace is not None and res.trace_stderr is not None
    assert abs(res.trace - lam.sum()) / np.abs(lam).sum() <= TRACE_TARGET
    assert 0 < res.trace_stderr
    assert abs(res.trace - lam.sum()) <= 4 * res.trace_stderr  # the stderr is honest


def test_outlier_split_on_the_mlp(case) -> None:
    res, lam = case["result"], case["lam"]
    assert res.n_outliers is not None and 0 <= res.n_outliers <= 10
    assert res.bulk_edge is not None
    # The edge is an eigenvalue of H below every outlier (or a quadrature node below them).
    if res.n_outliers:
        assert res.bulk_edge < res.eigenvalues[res.n_outliers - 1]
    assert lam.min() - 1e-6 <= res.bulk_edge <= lam.max() + 1e-6


def test_density_and_trace_can_be_skipped(case) -> None:
    lam = case["lam"]
    res = hessian_spectrum(
        case["model"], cross_entropy_loss, case["batches"], density=False, trace=False
    )
    for field in ("trace", "trace_stderr", "density_grid", "density", "ritz_nodes", "ritz_weights"):
        assert getattr(res, field) is None, field
    rel = np.abs(res.eigenvalues - lam[:10]) / np.abs(lam[:10])
    assert rel.max() <= TOP_K_RTOL
    full = case["result"]
    assert 0 < res.num_hvps < full.num_hvps
    only_trace = hessian_spectrum(case["model"], cross_entropy_loss, case["batches"], density=False)
    assert only_trace.density is None and only_trace.trace is not None
    only_density = hessian_spectrum(case["model"], cross_entropy_loss, case["batches"], trace=False)
    assert only_density.trace is None and only_density.density is not None


def test_num_hvps_is_consistent(case) -> None:
    res = case["result"]
    assert isinstance(res.num_hvps, int)
    again = hessian_spectrum(case["model"], cross_entropy_loss, case["batches"])
    assert again.num_hvps == res.num_hvps
    np.testing.assert_array_equal(again.eigenvalues, res.eigenvalues)  # deterministic for a seed
    assert again.trace == res.trace
    eig_only = hessian_spectrum(
        case["model"], cross_entropy_loss, case["batches"], density=False, trace=False
    )
    # Lanczos steps only (at least k, at most the default max_iter).
    assert 10 <= eig_only.num_hvps <= 120
    # Adaptive defaults: the eigenvalue run is the first quadrature probe and deflates the
    # trace, so density and trace cost at most as much again as the eigenvalues.
    assert eig_only.num_hvps < res.num_hvps <= 2 * eig_only.num_hvps
    # Fixed settings are honoured: 4 SLQ probes of 80 steps each and 16 trace probes; the
    # residuals come from the products the eigenvalue run stored, so they cost none.
    fixed = hessian_spectrum(
        case["model"],
        cross_entropy_loss,
        case["batches"],
        num_slq_probes=4,
        slq_steps=80,
        num_trace_probes=16,
    )
    assert fixed.ritz_nodes is not None and fixed.ritz_nodes.shape == (4, 80)
    assert fixed.num_hvps == 4 * 80 + 16


def test_result_is_a_frozen_dataclass(case) -> None:
    res = case["result"]
    assert dataclasses.is_dataclass(res)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.eigenvalues = np.zeros(10)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.trace = 0.0  # type: ignore[misc]
    assert isinstance(res.eigenvalues, np.ndarray)
    assert isinstance(res.trace, float) and isinstance(res.seconds, float)
    assert res.eigenvectors is None
    assert lightning_landscape.hessian_spectrum is hessian_spectrum
    assert lightning_landscape.HessianSpectrum is HessianSpectrum


def test_smallest_algebraic_finds_negative_curvature(case) -> None:
    lam = case["lam"]
    assert lam[-1] < 0  # the trained MLP has negative curvature to find
    res = hessian_spectrum(
        case["model"], cross_entropy_loss, case["batches"], which="SA", top_k=3, trace=False
    )
    exact = lam[::-1][:3]  # ascending
    assert np.all(np.diff(res.eigenvalues) >= 0)
    assert np.all(res.eigenvalues < 0)
    rel = np.abs(res.eigenvalues - exact) / np.abs(exact)
    assert rel.max() <= TOP_K_RTOL, (res.eigenvalues, exact)


def test_model_and_training_state_are_untouched(case) -> None:
    model = case["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    hessian_spectrum(model, cross_entropy_loss, case["batches"], density=False, trace=False)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    model.eval()


def test_eigenvectors(case) -> None:
    H, lam = case["H"], case["lam"]
    res = hessian_spectrum(
        case["model"], cross_entropy_loss, case["batches"], top_k=4, return_eigenvectors=True
    )
    V = res.eigenvectors
    assert V is not None and V.shape == (4, H.shape[0])
    V = V.double()
    np.testing.assert_allclose((V @ V.T).numpy(), np.eye(4), atol=1e-5)
    rayleigh = torch.einsum("kd,de,ke->k", V, H, V).numpy()
    np.testing.assert_allclose(rayleigh, lam[:4], rtol=TOP_K_RTOL)


@pytest.mark.parametrize("groups", ["layer", {"hidden": ["0"], "readout": ["2.weight", "2.bias"]}])
def test_groups_match_the_dense_diagonal_blocks(case, groups) -> None:
    model, H = case["model"], case["H"]
    res = hessian_spectrum(model, cross_entropy_loss, case["batches"], groups=groups)  # defaults
    assert res.groups is not None
    members = (
        {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
        if groups == "layer"
        else {"hidden": ["0.weight", "0.bias"], "readout": ["2.weight", "2.bias"]}
    )
    assert set(res.groups) == set(members)
    for name, names in members.items():
        idx = block_index(model, names)
        lam_g = np.linalg.eigvalsh(H[idx][:, idx].numpy())[::-1]
        sub = res.groups[name]
        assert isinstance(sub, HessianSpectrum)
        assert sub.num_params == len(idx)
        rel = np.abs(sub.eigenvalues - lam_g[:10]) / np.abs(lam_g[:10])
        assert rel.max() <= TOP_K_RTOL, (name, sub.eigenvalues, lam_g[:10])
        assert abs(sub.trace - lam_g.sum()) / np.abs(lam_g).sum() <= TRACE_TARGET
        assert sub.num_hvps > 0
    # The full-model result is unchanged by asking for groups, and counts every product.
    np.testing.assert_array_equal(res.eigenvalues, case["result"].eigenvalues)
    assert res.num_hvps > sum(g.num_hvps for g in res.groups.values())


# --------------------------------------------------------------------------------------------
# Linear regression: H = 2 I_c ⊗ X^T X / N exactly
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def regression() -> dict:
    X, _ = digits_data(F64)
    X = X[:300]
    N, d, c = X.shape[0], X.shape[1], 3
    Y = torch.randn(N, c, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.manual_seed(0)
    model = nn.Linear(d, c, bias=False).double()
    G = X.T @ X / N
    # nn.Linear.weight is (c, d), flattened row-major: output i owns entries i*d ... i*d+d-1.
    H = 2 * torch.kron(torch.eye(c, dtype=F64), G)
    return {"model": model, "batches": [(X[:120], Y[:120]), (X[120:], Y[120:])], "G": G, "H": H}


def test_regression_reference_matches_the_closed_form(regression) -> None:
    H_ref = dense_hessian(regression["model"], mse_sum_outputs_loss, regression["batches"])
    scale = spectral_norm(regression["H"])
    assert (H_ref - regression["H"]).abs().max().item() <= tolerances(F64).matvec * scale


def test_regression_operator_layout(regression) -> None:
    op = HessianOperator(regression["model"], mse_sum_outputs_loss, regression["batches"])
    H = regression["H"]
    V = torch.randn(5, op.dim, generator=torch.Generator().manual_seed(1), dtype=F64)
    err = torch.linalg.vector_norm(op.matmat(V) - V @ H, dim=1).max().item()
    assert err <= tolerances(F64).matvec * spectral_norm(H) * op.dim**0.5


def test_regression_spectrum_is_exact(regression) -> None:
    """Every eigenvalue of G appears c = 3 times in H = 2 I_3 ⊗ G."""
    g = np.linalg.eigvalsh(regression["G"].numpy())[::-1]
    exact = np.repeat(2 * g, 3)
    res = hessian_spectrum(
        regression["model"], mse_sum_outputs_loss, regression["batches"], top_k=6, tol=1e-10
    )
    np.testing.assert_allclose(res.eigenvalues, exact[:6], rtol=1e-8)
    assert res.trace == pytest.approx(2 * 3 * float(np.trace(regression["G"].numpy())), rel=0.05)


def test_regression_distinct_outputs_spectrum_is_exact(regression) -> None:
    """Weights 1, 2, 3 on the outputs make H = 2 diag(1,2,3) ⊗ G: distinct eigenvalues."""
    w = torch.tensor([1.0, 2.0, 3.0], dtype=F64)

    def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
        x, y = batch
        return ((model(x) - y).pow(2) * w).sum(dim=1).mean()

    G = regression["G"]
    H = 2 * torch.kron(torch.diag(w), G)
    exact = np.linalg.eigvalsh(H.numpy())[::-1]
    H_ref = dense_hessian(regression["model"], loss_fn, regression["batches"])
    assert (H_ref - H).abs().max().item() <= tolerances(F64).matvec * spectral_norm(H)
    res = hessian_spectrum(regression["model"], loss_fn, regression["batches"], tol=1e-10)
    np.testing.assert_allclose(res.eigenvalues, exact[:10], rtol=1e-8)


def test_regression_top_eigenvector_layout(regression) -> None:
    """The top eigenspace of 2 I_c ⊗ G is {e ⊗ u_1}: reshaped to (c, d) a Ritz vector is e u_1^T."""
    c, d = 3, 64
    res = hessian_spectrum(
        regression["model"],
        mse_sum_outputs_loss,
        regression["batches"],
        top_k=1,
        tol=1e-10,
        return_eigenvectors=True,
    )
    _, U = torch.linalg.eigh(regression["G"])
    u1 = U[:, -1]
    W = res.eigenvectors[0].double().reshape(c, d)
    assert torch.linalg.vector_norm(W - torch.outer(W @ u1, u1)).item() <= 1e-6


# --------------------------------------------------------------------------------------------
# Options and errors
# --------------------------------------------------------------------------------------------


def test_float64_computation_of_a_float32_model(case) -> None:
    res = hessian_spectrum(
        case["model"], cross_entropy_loss, case["batches"], dtype=F64, tol=1e-10, trace=False
    )
    lam = case["lam"]
    np.testing.assert_allclose(res.eigenvalues, lam[:10], rtol=1e-8)
    assert case["model"][0].weight.dtype == F32  # a temporary copy was cast


def test_reference_hvp_agrees_with_dense(case) -> None:
    """Sanity of the reference itself on this model: products without materialising H."""
    V = torch.randn(2, case["H"].shape[0], generator=torch.Generator().manual_seed(3), dtype=F64)
    HV = reference_hvp(case["model"], cross_entropy_loss, case["batches"], V)
    assert torch.allclose(HV, V @ case["H"], rtol=0, atol=1e-12)


def test_errors(case) -> None:
    model, batches = case["model"], case["batches"]
    for name in ("num_slq_probes", "slq_steps"):
        with pytest.raises(ValueError, match=name):
            hessian_spectrum(model, cross_entropy_loss, batches, **{name: 0})
    with pytest.raises(ValueError, match="num_trace_probes"):
        hessian_spectrum(model, cross_entropy_loss, batches, num_trace_probes=1)
    with pytest.raises(ValueError, match="groups"):
        hessian_spectrum(model, cross_entropy_loss, batches, groups=["0"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="groups"):
        hessian_spectrum(model, cross_entropy_loss, batches, groups={"g": ["nope"]})
    with pytest.raises(ValueError, match="which"):
        hessian_spectrum(model, cross_entropy_loss, batches, which="LM")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tol"):
        hessian_spectrum(model, cross_entropy_loss, batches, tol=0.0)
    # The argument is called top_k here: the message must say so.
    with pytest.raises(ValueError, match="top_k"):
        hessian_spectrum(model, cross_entropy_loss, batches, top_k=0)
    with pytest.raises(FloatingPointError, match="not finite"):
        hessian_spectrum(model, lambda m, b: cross_entropy_loss(m, b) * float("nan"), batches)


def test_import_linalg_leaves_lightning_and_tensorboard_out() -> None:
    code = (
        "import sys\n"
        "import lightning_landscape.linalg\n"
        "heavy = {'lightning', 'pytorch_lightning', 'lightning_fabric', 'tensorboard',"
        " 'tensorboardX'}\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & heavy)\n"
        "assert not loaded, loaded\n"
    )
    root = Path(lightning_landscape.__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
