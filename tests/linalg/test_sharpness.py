"""Sharpness against the stability threshold: analytic thresholds, the preconditioned sharpness
against dense float64, and gradient descent on a quadratic just above and below the line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_landscape.linalg import MatrixOperator, hessian_spectrum
from lightning_landscape.linalg.sharpness import (
    adam_hyperparameters,
    adam_preconditioner,
    adam_stability,
    adam_threshold,
    batch_sharpness,
    preconditioned_sharpness,
    sgd_threshold,
    stability_from_param_group,
)
from tests._reference import cross_entropy_loss, dense_hessian, digits_batches, make_mlp


def test_sgd_and_momentum_thresholds_analytically() -> None:
    assert sgd_threshold(0.1) == pytest.approx(20.0)
    assert sgd_threshold(0.1, momentum=0.9) == pytest.approx(2 * 1.9 / 0.1)
    assert sgd_threshold(0.1, momentum=0.9, dampening=0.5) == pytest.approx(2 * 1.9 / 0.05)
    assert sgd_threshold(0.1, momentum=0.9, nesterov=True) == pytest.approx(2 * 1.9 / 0.1 / 2.8)
    assert adam_threshold(0.9) == pytest.approx(38.0)
    assert adam_threshold(0.9, lr=1e-3) == pytest.approx(38_000.0)  # Cohen et al.'s 38/η
    s = stability_from_param_group(5.0, {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0})
    assert (s.ratio, s.threshold, s.kind) == (pytest.approx(0.25), pytest.approx(20.0), "sgd")
    s = stability_from_param_group(5.0, {"lr": 0.1, "momentum": 0.5, "weight_decay": 1.0})
    assert s.kind == "momentum" and s.sharpness == 6.0
    assert s.ratio == pytest.approx(6.0 * 0.1 / (2 * 1.5))
    assert adam_stability(19.0, 0.9).ratio == pytest.approx(0.5)
    assert adam_stability(1900.0, 0.9, lr=0.01).threshold == pytest.approx(3800.0)


def _heavy_ball_diverges(lam: float, lr: float, beta: float, steps: int = 400) -> bool:
    """Heavy-ball on 1/2 λ x², exactly PyTorch's SGD update."""
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([x], lr=lr, momentum=beta)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * lam * x * x).sum().backward()
        opt.step()
    return bool(x.abs().item() > 1.0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_the_threshold_is_where_pytorch_sgd_starts_to_diverge(beta) -> None:
    thr = sgd_threshold(0.1, momentum=beta)
    assert _heavy_ball_diverges(1.02 * thr, 0.1, beta)
    assert not _heavy_ball_diverges(0.98 * thr, 0.1, beta)


def test_gradient_descent_slightly_above_two_over_eta_diverges_and_reads_above_one() -> None:
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))
    lam = torch.linspace(0.1, 4.0, 20, dtype=torch.float64)
    A = Q @ torch.diag(lam) @ Q.T
    lr = 1.03 * 2 / 4.0
    theta = torch.nn.Parameter(torch.randn(20, generator=gen, dtype=torch.float64))
    opt = torch.optim.SGD([theta], lr=lr)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = 0.5 * theta @ (A @ theta)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] > 1e3 * losses[0]
    s = stability_from_param_group(float(lam.max()), opt.param_groups[0])
    assert s.ratio == pytest.approx(1.03) and s.ratio > 1


def test_preconditioned_sharpness_against_dense_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    B = torch.randn(60, 60, generator=gen, dtype=torch.float64)
    H = B @ B.T / 60
    p = torch.rand(60, generator=gen, dtype=torch.float64) * 10 + 0.1
    exact = np.max(np.linalg.eigvals((torch.diag(1 / p) @ H).numpy()).real)
    op = MatrixOperator(H)
    value, used = preconditioned_sharpness(op, p, tol=1e-10)
    assert value == pytest.approx(exact, rel=1e-8)
    assert 0 < used == op.num_hvps
    # Without the preconditioner the answer differs: the test has teeth.
    assert abs(float(torch.linalg.eigvalsh(H).max()) - exact) > 0.1 * exact


def test_adam_preconditioner_from_the_optimizer_state_read_only() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    b = torch.nn.Parameter(torch.tensor([0.5]))
    opt = torch.optim.Adam([w, b], lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    assert adam_preconditioner(opt, [w, b]) is None  # no state before the first step
    for _ in range(3):
        opt.zero_grad()
        ((w**2).sum() + 3 * b.sum() ** 2).backward()
        opt.step()
    before = {k: v.clone() for k, v in opt.state[w].items() if torch.is_tensor(v)}
    P = adam_preconditioner(opt, [w, b])
    # Bias-corrected v̂ from the recursion v = β2 v + (1-β2) g², recomputed here.
    for p in (w, b):
        st = opt.state[p]
        assert float(st["step"]) == 3.0
    v_hat = torch.cat([opt.state[w]["exp_avg_sq"], opt.state[b]["exp_avg_sq"]]).double()
    v_hat = v_hat / (1 - 0.99**3)
    # The next step's first-moment bias correction 1 - β1^(t+1) is folded in; lr is not.
    torch.testing.assert_close(P, (1 - 0.9**4) * (v_hat.sqrt() + 1e-8))
    for k, v in before.items():
        assert torch.equal(opt.state[w][k], v)
    assert adam_hyperparameters(opt) == (0.01, 0.9)


def test_adam_preconditioner_reads_the_amsgrad_maximum_and_groups_must_agree() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    b = torch.nn.Parameter(torch.tensor([0.5]))
    opt = torch.optim.Adam([w, b], lr=0.1, betas=(0.5, 0.9), amsgrad=True)
    for scale in (3.0, 1.0):  # a smaller second gradient: the maximum differs from v
        opt.zero_grad()
        (scale * (w**2).sum() + scale * b.sum() ** 2).backward()
        opt.step()
    v_max = torch.cat([opt.state[w]["max_exp_avg_sq"], opt.state[b]["max_exp_avg_sq"]]).double()
    v = torch.cat([opt.state[w]["exp_avg_sq"], opt.state[b]["exp_avg_sq"]]).double()
    assert not torch.allclose(v_max, v)
    expected = (1 - 0.5**3) * ((v_max / (1 - 0.9**2)).sqrt() + 1e-8)
    torch.testing.assert_close(adam_preconditioner(opt, [w, b]), expected)
    two = torch.optim.Adam([{"params": [w]}, {"params": [b], "lr": 0.2}], lr=0.1)
    assert adam_hyperparameters(two) is None  # no single line
    assert adam_hyperparameters(torch.optim.SGD([w], lr=0.1)) is None


def test_errors() -> None:
    with pytest.raises(ValueError, match="lr must be a positive number"):
        sgd_threshold(0.0)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\)"):
        sgd_threshold(0.1, momentum=1.0)
    with pytest.raises(ValueError, match=r"dampening must be a number in \[0, 1\)"):
        sgd_threshold(0.1, momentum=0.5, dampening=1.0)
    with pytest.raises(ValueError, match=r"beta1 must be a number in \[0, 1\)"):
        adam_threshold(-0.1)
    op = MatrixOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"p_diag must have shape \(4,\)"):
        preconditioned_sharpness(op, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="p_diag must be positive and finite"):
        preconditioned_sharpness(op, torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64))


def test_batch_sharpness_against_dense_per_batch_hessians() -> None:
    model = make_mlp("tanh", seed=0, hidden=8).double()
    batches = digits_batches([24, 40, 32], dtype=torch.float64)
    exact = [
        float(torch.linalg.eigvalsh(dense_hessian(model, cross_entropy_loss, [b])).max())
        for b in batches
    ]
    whole = torch.linalg.eigh(dense_hessian(model, cross_entropy_loss, batches)).eigenvectors
    res = batch_sharpness(
        model, cross_entropy_loss, batches, start=whole[:, -1], max_hvps=200, tol=1e-10
    )
    np.testing.assert_allclose(res.eigenvalues, exact, rtol=1e-8)
    assert res.residuals.shape == (3,) and res.num_hvps > 0
    # Capped: a Ritz value never exceeds λ_max, and the warm start keeps it close.
    capped = batch_sharpness(model, cross_entropy_loss, batches, start=whole[:, -1], max_hvps=4)
    assert capped.num_hvps <= 3 * 4
    assert np.all(capped.eigenvalues <= np.asarray(exact) * (1 + 1e-12))
    with pytest.raises(ValueError, match="max_hvps must be an integer >= 2; got 1"):
        batch_sharpness(model, cross_entropy_loss, batches, max_hvps=1)


def test_ritz_vectors_cost_nothing_extra_and_lie_near_the_eigenvectors() -> None:
    model = make_mlp("tanh", seed=0, hidden=8).double()
    batches = digits_batches([64, 64], dtype=torch.float64)
    kw = dict(top_k=3, density=False, trace=False)
    plain = hessian_spectrum(model, cross_entropy_loss, batches, **kw)
    ritz = hessian_spectrum(model, cross_entropy_loss, batches, return_eigenvectors="ritz", **kw)
    full = hessian_spectrum(model, cross_entropy_loss, batches, return_eigenvectors=True, **kw)
    assert plain.eigenvectors is None and ritz.eigenvectors is not None
    assert ritz.num_hvps == plain.num_hvps <= full.num_hvps
    U = torch.linalg.eigh(dense_hessian(model, cross_entropy_loss, batches)).eigenvectors
    cos = torch.linalg.svdvals(U[:, -3:].T @ ritz.eigenvectors.T)
    assert float(cos.min()) > 0.99


def _frozen_adam_diverges(sharpness: float, lr: float, beta1: float, steps: int = 2000) -> bool:
    """Adam's update with its preconditioner frozen, x ← x − η m / p, m ← β1 m + (1−β1) g, on
    ½ λ x² with λ/p = ``sharpness`` (the preconditioned sharpness)."""
    p, x, m = 3.0, 1.0, 0.0
    lam = sharpness * p
    for _ in range(steps):
        m = beta1 * m + (1 - beta1) * lam * x
        x -= lr * m / p
    return abs(x) > 1.0


@pytest.mark.parametrize("beta1", [0.0, 0.5, 0.9])
def test_adam_threshold_is_where_frozen_adam_starts_to_diverge(beta1) -> None:
    thr = adam_threshold(beta1, lr=0.01)
    assert _frozen_adam_diverges(1.02 * thr, 0.01, beta1)
    assert not _frozen_adam_diverges(0.98 * thr, 0.01, beta1)


def test_stability_watch_fires_once_after_consecutive_readings_above_the_line():
    from lightning_landscape.linalg.sharpness import Stability, StabilityWatch

    def st(ratio: float) -> Stability:
        return Stability(sharpness=ratio, threshold=1.0, ratio=ratio, kind="sgd")

    watch = StabilityWatch(patience=3)
    # A dip below the line restarts the count; the warning comes once, at the third in a row.
    said = [watch.update(st(r)) for r in (1.2, 1.1, 0.9, 1.3, 1.4, 1.5, 1.6, 0.5, 2, 2, 2)]
    assert said == [False] * 5 + [True] + [False] * 5
    with pytest.raises(ValueError, match="patience"):
        StabilityWatch(patience=0)
