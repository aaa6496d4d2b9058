"""InPCA core against exact references: direct float64 loops, classical MDS = PCA, the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_landscape.embeddings.inpca import (
    bhattacharyya_distances,
    cross_bhattacharyya_distances,
    inpca,
    mode_connectivity,
    progress_coordinate,
)


def _random_probs(rng, n_models, n_samples, n_classes, scale=2.0):
    logits = rng.normal(scale=scale, size=(n_models, n_samples, n_classes))
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def _loop_distances(P):
    m, n, _ = P.shape
    D = np.zeros((m, m))
    for u in range(m):
        for v in range(m):
            total = 0.0
            for s in range(n):
                bc = sum(math.sqrt(P[u, s, c] * P[v, s, c]) for c in range(P.shape[2]))
                total += -math.log(bc)
            D[u, v] = total / n
    return D


def test_bhattacharyya_matches_direct_loop():
    P = _random_probs(np.random.default_rng(0), 6, 9, 4)
    D = bhattacharyya_distances(P)
    ref = _loop_distances(P)
    np.fill_diagonal(ref, 0.0)
    np.testing.assert_allclose(D, ref, rtol=1e-12, atol=1e-14)
    assert np.all(D == D.T)


def test_log_probability_path_equals_probability_path():
    P = _random_probs(np.random.default_rng(1), 5, 7, 3)
    np.testing.assert_allclose(
        bhattacharyya_distances(np.log(P), log=True), bhattacharyya_distances(P), rtol=1e-12
    )
    # torch tensors work too
    np.testing.assert_allclose(
        bhattacharyya_distances(torch.tensor(P)), bhattacharyya_distances(P), rtol=0, atol=0
    )


def test_underflowing_probabilities_are_exact_in_log_space():
    # Two classes, model u puts log p = (0, -2000) and v (-2000, 0) on a sample: the probabilities
    # underflow to 0 in float64, but the distance is finite: -log(2 exp(-1000)) = 1000 - log 2.
    logp = np.array(
        [
            [[0.0, -2000.0], [-0.1, math.log1p(-math.exp(-0.1))]],
            [[-2000.0, 0.0], [-0.1, math.log1p(-math.exp(-0.1))]],
        ]
    )
    D = bhattacharyya_distances(logp, log=True)
    expected = 0.5 * (1000.0 - math.log(2.0))  # the second sample is identical (distance 0)
    np.testing.assert_allclose(D[0, 1], expected, rtol=1e-12)
    # Near-underflow products, float32 work dtype: recomputed exactly in float64.
    logp32 = np.array([[[0.0, -150.0]], [[-150.0, 0.0]]])
    D32 = bhattacharyya_distances(torch.tensor(logp32, dtype=torch.float32), log=True)
    np.testing.assert_allclose(D32[0, 1], 75.0 - math.log(2.0), rtol=1e-6)


def test_blockwise_equals_unblocked():
    P = _random_probs(np.random.default_rng(2), 23, 11, 5)
    full = bhattacharyya_distances(P, block_size=1000)
    for block in (1, 4, 7):
        np.testing.assert_allclose(bhattacharyya_distances(P, block_size=block), full, rtol=1e-13)
    cross = cross_bhattacharyya_distances(P[:5], P, block_size=3)
    np.testing.assert_allclose(cross[:, 5:], full[:5, 5:], rtol=1e-13)


def test_bad_predictions_are_refused():
    with pytest.raises(ValueError, match=r"P must have shape \(n_models, n_samples, n_classes\)"):
        bhattacharyya_distances(np.ones((3, 4)))
    with pytest.raises(ValueError, match="normalised distributions"):
        bhattacharyya_distances(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=">= 0"):
        bhattacharyya_distances(np.array([[[1.5, -0.5]], [[0.5, 0.5]]]))
    with pytest.raises(ValueError, match="block_size must be a positive integer; got 0"):
        bhattacharyya_distances(np.full((2, 3, 2), 0.5), block_size=0)


def _pca_scores(X, k):
    Xc = X - X.mean(axis=0)
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
    return Xc @ Vt[:k].T


def test_inpca_on_squared_euclidean_distances_is_pca():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(30, 4)) * np.array([5.0, 3.0, 1.5, 0.5])
    D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    emb = inpca(D, n_components=3)
    ref = _pca_scores(X, 3)
    for k in range(3):
        sign = np.sign(ref[:, k] @ emb.coordinates[:, k])
        np.testing.assert_allclose(emb.coordinates[:, k], sign * ref[:, k], atol=1e-10)
    assert emb.n_imaginary == 0
    # Eigenvalues of W are the squared singular values; the rest are zero.
    sv = np.linalg.svd(X - X.mean(0), compute_uv=False) ** 2
    np.testing.assert_allclose(emb.eigenvalues[:4], sv, rtol=1e-10)
    assert np.all(np.abs(emb.eigenvalues[4:]) < 1e-9 * sv[0])


def test_explained_stress_formula_and_signed_eigenvalues():
    rng = np.random.default_rng(4)
    P = _random_probs(rng, 12, 20, 3, scale=3.0)
    D = bhattacharyya_distances(P)
    emb = inpca(D, n_components=5)
    n = D.shape[0]
    L = np.eye(n) - np.ones((n, n)) / n
    W = -0.5 * L @ D @ L
    lam = np.linalg.eigvalsh(W)
    lam = lam[np.argsort(-np.abs(lam))]
    np.testing.assert_allclose(emb.eigenvalues, lam, atol=1e-12)
    fro2 = np.sum(W * W)
    for k in range(1, 6):
        expected = 1 - math.sqrt(1 - np.sum(lam[:k] ** 2) / fro2)
        assert emb.explained_stress_cumulative[k - 1] == pytest.approx(expected, rel=1e-10)
    assert emb.explained_stress == emb.explained_stress_cumulative[-1]
    assert emb.n_imaginary == int(np.sum(lam[:5] < 0))
    # A matrix that is not squared-Euclidean (√D breaks the triangle inequality) has an
    # imaginary direction, sorted among the others by |λ|.
    bad = inpca(bad_D(), n_components=2)
    Wb = -0.5 * (np.eye(3) - 1 / 3) @ bad_D() @ (np.eye(3) - 1 / 3)
    lam_b = np.linalg.eigvalsh(Wb)
    lam_b = lam_b[np.argsort(-np.abs(lam_b))]
    np.testing.assert_allclose(bad.eigenvalues, lam_b, atol=1e-12)
    assert bad.n_imaginary == int(np.sum(lam_b[:2] < 0)) == 1
    assert bool(bad.imaginary[1]) and not bool(bad.imaginary[0])
    # Coordinates reproduce W restricted to the returned dims: v sqrt|λ|.
    V = emb.coordinates / np.sqrt(np.abs(lam[:5]))
    np.testing.assert_allclose(W @ V, V * lam[:5], atol=1e-10)


def bad_D():
    return np.array([[0.0, 1.0, 10.0], [1.0, 0.0, 1.0], [10.0, 1.0, 0.0]])


def test_out_of_sample_placement_matches_full_recomputation():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(25, 3)) * np.array([4.0, 2.0, 1.0])
    new = rng.normal(size=(4, 3))

    def sqdist(A, B):
        return ((A[:, None, :] - B[None, :, :]) ** 2).sum(-1)

    emb = inpca(sqdist(X, X), n_components=3)
    placed = emb.transform(sqdist(new, X))
    # Embedded points are placed where they are.
    np.testing.assert_allclose(emb.transform(sqdist(X, X)), emb.coordinates, atol=1e-10)
    # Full recomputation with the new points, aligned by translation + orthogonal Procrustes.
    full = inpca(sqdist(np.vstack([X, new]), np.vstack([X, new])), n_components=3).coordinates
    ours = np.vstack([emb.coordinates, placed])
    a, b = full - full.mean(0), ours - ours.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    np.testing.assert_allclose(a @ (u @ vt), b, atol=1e-9)
    with pytest.raises(ValueError, match=r"distances must have shape \(m, 25\)"):
        emb.transform(np.zeros((2, 3)))


def test_out_of_sample_of_a_checkpoint_close_to_an_embedded_one():
    P = _random_probs(np.random.default_rng(6), 10, 40, 4)
    emb = inpca(bhattacharyya_distances(P), n_components=2)
    y = emb.transform(cross_bhattacharyya_distances(P[3:4], P))
    np.testing.assert_allclose(y[0], emb.coordinates[3], atol=1e-10)


def test_inpca_refuses_bad_input():
    with pytest.raises(ValueError, match="D must be a square distance matrix"):
        inpca(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="D must be symmetric"):
        inpca(np.array([[0.0, 1.0], [2.0, 0.0]]))
    with pytest.raises(ValueError, match=r"n_components must be an integer in \[1, n=2\]; got 3"):
        inpca(np.array([[0.0, 1.0], [1.0, 0.0]]), n_components=3)


def _progress_loop(P, P0, y):
    vals = []
    for n in range(P.shape[0]):
        a = np.sqrt(P0[n])
        b = np.zeros_like(a)
        b[y[n]] = 1.0
        theta = math.acos(float(a @ b))
        e2 = b - (a @ b) * a
        e2 /= np.linalg.norm(e2)
        u = np.sqrt(P[n])
        vals.append(math.atan2(u @ e2, u @ a) / theta)
    return float(np.mean(vals))


def test_progress_coordinate_endpoints_and_loop():
    rng = np.random.default_rng(7)
    P0 = _random_probs(rng, 1, 8, 3)[0]
    y = rng.integers(0, 3, size=8)
    onehot = np.eye(3)[y]
    assert progress_coordinate(P0, P0, y) == pytest.approx(0.0, abs=1e-12)
    assert progress_coordinate(onehot, P0, y) == pytest.approx(1.0, abs=1e-12)
    P = _random_probs(rng, 3, 8, 3)
    got = progress_coordinate(P, P0, y)
    np.testing.assert_allclose(got, [_progress_loop(p, P0, y) for p in P], rtol=1e-12)
    np.testing.assert_allclose(progress_coordinate(np.log(P), np.log(P0), y, log=True), got)
    # A point half way along the great circle has progress 1/2.
    a, b = np.sqrt(P0[0]), onehot[0]
    theta = math.acos(a @ b)
    e2 = (b - (a @ b) * a) / np.linalg.norm(b - (a @ b) * a)
    mid = (math.cos(theta / 2) * a + math.sin(theta / 2) * e2) ** 2
    assert progress_coordinate(mid[None], P0[:1], y[:1]) == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match=r"targets must be labels in \[0, 3\)"):
        progress_coordinate(P0, P0, np.full(8, 5))


def test_mode_connectivity():
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert mode_connectivity([1.0, 1.5, 3.0, 1.5, 1.0], ts) == pytest.approx(-2.0)
    assert mode_connectivity([2.0, 0.5, 1.0, 1.2, 1.0], ts) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ts must increase from 0 to 1"):
        mode_connectivity([1.0, 2.0], [0.0, 1.0])
