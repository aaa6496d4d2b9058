"""Class structure of the Gauss–Newton term, gradient overlap and principal angles, against dense
float64 matrices built from per-sample logit Jacobians computed one sample at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_landscape.linalg.class_structure import (
    GaussNewtonOperator,
    class_structure,
    gradient_overlap,
    principal_angles,
)
from tests._reference import cross_entropy_loss, dense_hessian


def _clusters(C: int, n_per: int, spread: float, seed: int = 0):
    """C Gaussian clusters in R^4 around fixed, well separated means."""
    gen = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(C, 4, generator=gen, dtype=torch.float64)
    x = torch.cat([means[c] + spread * torch.randn(n_per, 4, generator=gen, dtype=torch.float64)
                   for c in range(C)])  # fmt: skip
    y = torch.arange(C).repeat_interleave(n_per)
    perm = torch.randperm(len(y), generator=gen)
    x, y = x[perm], y[perm]
    half = len(y) // 2
    return [(x[:half], y[:half]), (x[half:], y[half:])]


def _dense_parts(model: nn.Module, batches):
    """Dense G, between-class B and class level from per-sample Jacobians (python loop)."""
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    xs = torch.cat([b[0] for b in batches])
    ys = torch.cat([b[1] for b in batches])
    N = len(ys)
    C = int(model(xs[:1]).shape[1])
    D = sum(p.numel() for p in params)
    G = torch.zeros(D, D, dtype=torch.float64)
    deltas = torch.zeros(C, C, D, dtype=torch.float64)
    counts = torch.bincount(ys, minlength=C).double()
    for i in range(N):

        def logits(*ps, i=i):
            out = torch.func.functional_call(
                model, dict(zip(names, ps, strict=True)), xs[i : i + 1]
            )
            return out[0]

        J = torch.cat(
            [j.reshape(C, -1) for j in torch.autograd.functional.jacobian(logits, tuple(params))], 1
        )
        p = torch.softmax(logits(*params).detach(), 0)
        G += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J / N
        for c2 in range(C):
            e = torch.zeros(C, dtype=torch.float64)
            e[c2] = 1
            deltas[ys[i], c2] += J.T @ (e - p) * math.sqrt(float(p[c2])) / counts[ys[i]]
    w = (counts / N).sqrt()[:, None, None] * deltas
    flat = w.reshape(C * C, D)
    B = flat.T @ flat
    level = w.mean(1)
    return G, B, level.T @ level


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_matches_dense_references(kind):
    torch.manual_seed(1)
    C = 3
    if kind == "linear":
        model = nn.Linear(4, C).double()
    else:
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).double()
    batches = _clusters(C, 10, spread=0.5)
    G, B, level = _dense_parts(model, batches)
    H = dense_hessian(model, cross_entropy_loss, batches)
    lam_h, V = torch.linalg.eigh(H)
    lam_h, V = lam_h.flip(0)[:4], V.flip(1)[:, :4]
    k = 4
    r = class_structure(model, batches, top_k=k)
    np.testing.assert_allclose(r.hessian_eigenvalues, lam_h.numpy(), rtol=1e-8)
    lam_g = torch.linalg.eigvalsh(G).flip(0)[:k].numpy()
    np.testing.assert_allclose(r.ggn_eigenvalues, lam_g, rtol=1e-7)
    lam_b = torch.linalg.eigvalsh(B).flip(0)[:k].numpy()
    np.testing.assert_allclose(r.between_class_eigenvalues, lam_b, rtol=1e-8, atol=1e-12 * lam_b[0])
    np.testing.assert_allclose(r.between_class_share, lam_b / lam_h.numpy(), rtol=1e-7)
    rayleigh = torch.einsum("dk,de,ek->k", V, B, V).numpy() / lam_h.numpy()
    np.testing.assert_allclose(r.between_class_rayleigh_share, rayleigh, rtol=1e-6)
    lam_c = torch.linalg.eigvalsh(level).flip(0)[:C].numpy()
    np.testing.assert_allclose(r.class_level_eigenvalues, lam_c, rtol=1e-8, atol=1e-12 * lam_c[0])
    assert r.num_classes == C and list(r.class_counts) == [10, 10, 10] and r.num_samples == 30
    if kind == "linear":
        # Logits linear in the parameters: the Hessian is exactly its Gauss-Newton term.
        np.testing.assert_allclose(r.ggn_share, 1.0, rtol=1e-7)


def test_tight_clusters_concentrate_the_outliers_in_the_class_means():
    """Papyan's prediction: with small within-class spread, the between-class part carries the
    top eigenvalue; broad clusters move curvature to the within-class part."""
    torch.manual_seed(2)
    model = nn.Linear(4, 3).double()
    tight = class_structure(model, _clusters(3, 20, spread=0.02), top_k=2)
    broad = class_structure(model, _clusters(3, 20, spread=2.0), top_k=2)
    assert tight.between_class_share[0] > 0.99
    assert tight.between_class_rayleigh_share[0] > 0.99
    assert broad.between_class_share[0] < 0.8 * tight.between_class_share[0]


def test_reuses_given_hessian_pairs_and_gauss_newton_products_match_dense():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    batches = _clusters(3, 8, spread=0.5)
    G, B, _ = _dense_parts(model, batches)
    op = GaussNewtonOperator(model, batches)
    V = torch.randn(3, op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), V @ G, atol=1e-12, rtol=1e-10)
    vals = np.array([2.0, 1.0])
    vecs = torch.linalg.eigh(B)[1].flip(1)[:, :2].T
    r = class_structure(model, batches, hessian_eigenvalues=vals, hessian_eigenvectors=vecs)
    lam_b = torch.linalg.eigvalsh(B).flip(0)[:2].numpy()
    np.testing.assert_allclose(r.between_class_rayleigh_share, lam_b / vals, rtol=1e-8)
    np.testing.assert_allclose(r.hessian_eigenvalues, vals)


def test_many_classes_are_subsampled_with_a_notice():
    torch.manual_seed(4)
    model = nn.Linear(4, 5).double()
    batches = _clusters(5, 4, spread=0.5)
    with pytest.warns(RuntimeWarning, match="random subset of 3"):
        r = class_structure(model, batches, top_k=2, max_classes=3)
    assert len(r.classes) == 3 and r.num_classes == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "top_k must be a positive integer; got 0"),
        ({"max_classes": 1}, "max_classes must be an integer >= 2; got 1"),
        ({"hessian_eigenvalues": [1.0]}, "must be given together"),
    ],
)
def test_bad_options_raise(kwargs, match):
    model = nn.Linear(4, 3).double()
    with pytest.raises(ValueError, match=match):
        class_structure(model, _clusters(3, 4, spread=0.5), **kwargs)


def test_float_targets_raise():
    model = nn.Linear(4, 3).double()
    batches = [(x, y.double()) for x, y in _clusters(3, 4, spread=0.5)]
    with pytest.raises(ValueError, match="integer class targets"):
        class_structure(
            model,
            batches,
            top_k=2,
            hessian_eigenvalues=[1.0],
            hessian_eigenvectors=torch.ones(1, 15, dtype=torch.float64),
        )


def test_gradient_overlap_and_principal_angles_analytic():
    e = torch.eye(4, dtype=torch.float64)
    g = torch.tensor([3.0, 4.0, 0.0, 12.0], dtype=torch.float64)  # |g|^2 = 169
    assert gradient_overlap(e[:2], g) == pytest.approx(25 / 169, rel=1e-14)
    np.testing.assert_allclose(
        gradient_overlap(e[[3, 0, 1]], g, cumulative=True), [144 / 169, 153 / 169, 1.0]
    )
    # A non-orthonormal basis of the same span gives the same share.
    assert gradient_overlap(torch.stack([e[0] + e[1], 2 * e[1]]), g) == pytest.approx(25 / 169)
    assert math.isnan(gradient_overlap(e[:2], torch.zeros(4, dtype=torch.float64)))
    theta = 0.3
    A = e[:2]
    Bm = torch.stack([e[0], math.cos(theta) * e[1] + math.sin(theta) * e[2]])
    np.testing.assert_allclose(principal_angles(A, Bm), [0.0, theta], atol=1e-7)
    np.testing.assert_allclose(principal_angles(A, e[2:]), [math.pi / 2] * 2, atol=1e-12)
    with pytest.raises(ValueError, match="same length"):
        principal_angles(A, torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="length 4 but gradient has length 3"):
        gradient_overlap(A, torch.ones(3, dtype=torch.float64))


def test_cumulative_gradient_overlap_equals_a_projection_per_prefix():
    """One QR serves every prefix: each cumulative share equals the least-squares projection of
    g onto the span of that prefix alone, with a zero row first and a dependent row inside."""
    gen = torch.Generator().manual_seed(3)
    V = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    V[0] = 0.0  # a zero row contributes nothing
    V[3] = 2.0 * V[1] - V[2]  # a dependent row adds nothing to the span
    g = torch.randn(40, generator=gen, dtype=torch.float64)
    expected = []
    for j in range(1, 7):
        A = V[:j].T
        coef = torch.linalg.lstsq(A, g, driver="gelsd").solution
        expected.append(float((A @ coef) @ (A @ coef)) / float(g @ g))
    got = gradient_overlap(V, g, cumulative=True)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert got[0] == 0.0 and got[3] == pytest.approx(got[2], abs=1e-12)
    assert gradient_overlap(V, g) == pytest.approx(expected[-1], abs=1e-12)


@pytest.mark.parametrize("conditioning", [1.0, 1e5])  # Cholesky QR through the Gram; QR
def test_principal_angles_match_a_numpy_reference(conditioning):
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(5, 60, generator=gen, dtype=torch.float64)
    B = torch.randn(4, 60, generator=gen, dtype=torch.float64)
    A[4] = A[3] + A[4] / conditioning  # a nearly dependent row when conditioning is large
    B[:2] = B[:2] + 3.0 * A[:2]  # and some shared directions
    qa = np.linalg.qr(A.numpy().T)[0]
    qb = np.linalg.qr(B.numpy().T)[0]
    cosines = np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), 0.0, 1.0)
    np.testing.assert_allclose(principal_angles(A, B), np.sort(np.arccos(cosines)), atol=1e-9)
    g = torch.randn(60, generator=gen, dtype=torch.float64)
    share = float(np.sum((qa.T @ g.numpy()) ** 2) / float(g @ g))
    assert gradient_overlap(A, g) == pytest.approx(share, abs=1e-10)
