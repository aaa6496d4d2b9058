"""hessian_alignment against a dense float64 Hessian and per-sample gradients by a loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lightning_landscape.linalg import gradient_covariance, hessian_alignment
from tests._reference import cross_entropy_loss, dense_hessian, digits_batches, make_mlp


def test_overlap_and_angles_match_dense_references():
    model = make_mlp(hidden=6, seed=2).double().eval()
    batches = digits_batches([12, 9], torch.float64)
    params = list(model.parameters())
    rows = []
    for x, y in batches:
        for i in range(len(x)):
            loss = cross_entropy_loss(model, (x[i : i + 1], y[i : i + 1]))
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    G = torch.stack(rows)
    gbar = G.mean(0)
    Gc = G - gbar
    _, cvecs = torch.linalg.eigh(Gc.T @ Gc / len(G))
    H = dense_hessian(model, cross_entropy_loss, batches)
    _, hvecs = torch.linalg.eigh(H)
    VH = hvecs.flip(1)[:, :3].T  # top-3 Hessian eigenvectors as rows

    cov = gradient_covariance(model, cross_entropy_loss, batches, top_k=4, return_eigenvectors=True)
    got = hessian_alignment(cov, VH)
    g2 = float(gbar @ gbar)
    shares = [float((VH[:j] @ gbar).pow(2).sum()) / g2 for j in range(1, 4)]
    np.testing.assert_allclose(got.overlap, shares, rtol=1e-9, atol=1e-12)
    cos = torch.linalg.svdvals(cvecs.flip(1)[:, :4].T @ VH.T).clamp(max=1.0).numpy()
    assert got.principal_angles is not None
    np.testing.assert_allclose(got.principal_angles, np.sort(np.degrees(np.arccos(cos))), atol=1e-6)


def test_zero_covariance_has_no_angles_and_a_result_without_vectors_raises():
    D = 5
    base = gradient_covariance(
        make_mlp(hidden=2, seed=0).double(),
        cross_entropy_loss,
        digits_batches([4], torch.float64),
        top_k=2,
        return_eigenvectors=True,
    )
    g = torch.zeros(base.num_params, dtype=torch.float64)
    g[0] = 2.0
    flat = dataclasses.replace(
        base, eigenvalues=np.zeros(2), eigenvectors=torch.zeros(2, base.num_params), gradient=g
    )
    V = torch.eye(base.num_params, dtype=torch.float64)[:D]
    got = hessian_alignment(flat, V)
    np.testing.assert_allclose(got.overlap, np.ones(D))  # g lies along the first vector
    assert got.principal_angles is None
    bare = dataclasses.replace(base, eigenvectors=None, gradient=None)
    with pytest.raises(ValueError, match="return_eigenvectors=True"):
        hessian_alignment(bare, V)
