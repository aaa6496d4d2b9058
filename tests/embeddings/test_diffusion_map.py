"""diffusion_map against known answers: Laplace–Beltrami spectra of circles, the swiss roll's roll
parameter, Nyström extension against recomputation, Procrustes alignment, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from lightning_landscape.embeddings import diffusion as dm_module
from lightning_landscape.embeddings.diffusion import (
    DisconnectedGraphError,
    align_to,
    diffusion_map,
    nystrom_extend,
)

CIRCLE_RATIOS = np.array([1.0, 1.0, 4.0, 4.0, 9.0, 9.0])


def _circle(theta: np.ndarray) -> np.ndarray:
    return np.c_[np.cos(theta), np.sin(theta)]


def _uniform_circle(n: int) -> np.ndarray:
    return _circle(2 * np.pi * (np.arange(n) + 0.5) / n)


def _non_uniform_circle(n: int) -> np.ndarray:
    """Quantiles of the density (1 + 0.5 sin θ) / 2π: three times denser at θ = π/2 than at 3π/2."""
    grid = np.linspace(0.0, 2 * np.pi, 400_001)
    cdf = (grid + 0.5 * (1.0 - np.cos(grid))) / (2 * np.pi)
    return _circle(np.interp((np.arange(n) + 0.5) / n, cdf, grid))


def _rate_ratios(eigenvalues: np.ndarray) -> np.ndarray:
    nu = -np.log(eigenvalues[:6])
    return nu / nu[0]


def _swiss_roll(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=n))
    h = 21 * rng.uniform(size=n)
    return np.c_[t * np.cos(t), h, t * np.sin(t)], t


@pytest.mark.parametrize("solver", ["dense", "arpack"])
def test_uniform_circle_laplace_beltrami_ratios(monkeypatch, solver):
    if solver == "arpack":  # the sparse solver, which must find both members of each pair
        monkeypatch.setattr(dm_module, "DENSE_MAX_N", 100)
    result = diffusion_map(_uniform_circle(1200), n_components=6, n_neighbors=32)
    np.testing.assert_allclose(_rate_ratios(result.eigenvalues), CIRCLE_RATIOS, rtol=0.02)
    assert result.eigenvalues.shape == (6,)
    assert np.all(np.diff(result.eigenvalues) <= 0) and result.eigenvalues[0] < 1
    assert result.coordinates.shape == (1200, 6)
    assert 0.8 < result.intrinsic_dim < 1.2


def test_non_uniform_circle_alpha_one_removes_the_density():
    X = _non_uniform_circle(1200)
    result = diffusion_map(X, n_components=6, n_neighbors=32, alpha=1.0)
    np.testing.assert_allclose(_rate_ratios(result.eigenvalues), CIRCLE_RATIOS, rtol=0.02)
    # Without the normalisation the density shows: the test has teeth.
    graph_laplacian = diffusion_map(X, n_components=6, n_neighbors=32, alpha=0.0)
    assert np.max(np.abs(_rate_ratios(graph_laplacian.eigenvalues) / CIRCLE_RATIOS - 1)) > 0.1
    # The first pair of coordinates is (a rotation of) cos θ, sin θ.
    theta = np.arctan2(X[:, 1], X[:, 0])
    psi = result.eigenvectors[:, :2]
    fit = align_to(psi, np.sqrt(2) * np.c_[np.cos(theta), np.sin(theta)])
    assert fit.rmsd < 0.02


def test_local_bandwidth_follows_a_density_that_varies_a_hundredfold():
    """A segment sampled with geometric spacing (like SGD steps that shrink): the Neumann
    Laplacian of a segment has eigenvalue ratios 1, 4, 9, 16. One global bandwidth cannot serve
    both ends; the self-tuning kernel can."""
    x = np.geomspace(1e-2, 1.0, 300)
    X = np.c_[x, np.zeros_like(x)]
    local = diffusion_map(X, n_components=4, n_neighbors=10, epsilon="local")
    nu = -np.log(local.eigenvalues)
    np.testing.assert_allclose(nu / nu[0], [1.0, 4.0, 9.0, 16.0], rtol=0.02)
    assert abs(spearmanr(local.coordinates[:, 0], x).statistic) == pytest.approx(1.0)
    glob = diffusion_map(X, n_components=4, n_neighbors=10, epsilon="median")
    nu = -np.log(glob.eigenvalues)
    assert np.max(np.abs(nu / nu[0] / [1.0, 4.0, 9.0, 16.0] - 1)) > 0.1
    # Uniform density: the local kernel is the global one (same circle spectrum).
    circle = diffusion_map(_uniform_circle(1200), n_components=6, n_neighbors=32, epsilon="local")
    np.testing.assert_allclose(_rate_ratios(circle.eigenvalues), CIRCLE_RATIOS, rtol=0.02)


def test_nystrom_extension_with_the_local_bandwidth():
    x = np.geomspace(1e-2, 1.0, 400)
    X = np.c_[x, np.zeros_like(x)]
    held = np.arange(3, 400, 8)
    kept = np.setdiff1d(np.arange(400), held)
    fit = diffusion_map(X[kept], n_components=3, n_neighbors=10, epsilon="local")
    full = diffusion_map(X, n_components=3, n_neighbors=10, epsilon="local")
    aligned = align_to(full.coordinates, fit.coordinates, rows=kept, eigenvalues=full.eigenvalues)
    scale = np.sqrt(np.mean(fit.coordinates**2, axis=0))
    err = np.sqrt(np.mean((aligned.coordinates[held] - fit.extend(X[held])) ** 2, axis=0)) / scale
    assert np.all(err < 0.02), err


@pytest.mark.parametrize("n_components", [6, 10])
@pytest.mark.parametrize("kind", ["uniform circle", "non-uniform circle", "swiss roll"])
def test_sparse_solver_matches_the_dense_one(monkeypatch, kind, n_components):
    """The sparse path (torch products, ARPACK, the search for partners of repeated
    eigenvalues) against dense eigh of the same operator: whole pairs on the uniform circle."""
    X = {
        "uniform circle": lambda: _uniform_circle(1200),
        "non-uniform circle": lambda: _non_uniform_circle(1200),
        "swiss roll": lambda: _swiss_roll(1200)[0],
    }[kind]()
    monkeypatch.setattr(dm_module, "DENSE_MAX_N", 2000)
    dense = diffusion_map(X, n_components=n_components, n_neighbors=32)
    monkeypatch.setattr(dm_module, "DENSE_MAX_N", 100)
    sparse = diffusion_map(X, n_components=n_components, n_neighbors=32)
    np.testing.assert_allclose(
        -np.log(sparse.eigenvalues), -np.log(dense.eigenvalues), rtol=1e-7, atol=0
    )
    # Same eigenspaces (an even count of eigenvalues = whole pairs on the uniform circle):
    # each sparse ψ lies in the span of the dense ones.
    A, B = dense.eigenvectors, sparse.eigenvectors
    coef, *_ = np.linalg.lstsq(A, B, rcond=None)
    np.testing.assert_allclose(A @ coef, B, atol=1e-6 * np.abs(B).max())


def test_swiss_roll_first_coordinate_is_monotone_in_the_roll_parameter():
    X, t = _swiss_roll(1500)
    result = diffusion_map(X, n_components=4, n_neighbors=32)
    assert abs(spearmanr(result.coordinates[:, 0], t).statistic) >= 0.999
    assert 1.3 < result.intrinsic_dim < 2.5


def test_coordinates_are_eigenvectors_of_the_markov_matrix():
    """Dense float64 reference: P = D⁻¹ Q⁻ᵅ W Q⁻ᵅ from the complete graph, same ε."""
    X, _ = _swiss_roll(150, seed=3)
    result = diffusion_map(X, n_components=5, n_neighbors=150, alpha=0.5, t=2)
    d2 = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    W = np.exp(-d2 / result.epsilon)
    q = W.sum(1)
    Wa = W / np.outer(q, q) ** 0.5
    P = Wa / Wa.sum(1, keepdims=True)
    ref = np.sort(np.linalg.eigvals(P).real)[::-1][1:6]
    np.testing.assert_allclose(result.eigenvalues, ref, rtol=1e-9, atol=1e-12)
    psi = result.eigenvectors
    np.testing.assert_allclose(P @ psi, psi * result.eigenvalues, atol=1e-8)
    np.testing.assert_allclose(result.coordinates, psi * result.eigenvalues**2, atol=1e-12)
    # Normalised in L²(π): Σ π ψ² = 1 with π ∝ the degrees.
    pi = Wa.sum(1) / Wa.sum()
    np.testing.assert_allclose((pi[:, None] * psi**2).sum(0), 1.0, rtol=1e-8)
    # Deterministic signs: the largest entry in magnitude is positive.
    assert np.all(psi[np.argmax(np.abs(psi), 0), np.arange(5)] > 0)


def test_same_input_gives_the_same_result_and_tensors_are_accepted():
    X, _ = _swiss_roll(300)
    a = diffusion_map(X, n_components=3, n_neighbors=16)
    b = diffusion_map(torch.from_numpy(X), n_components=3, n_neighbors=16)
    np.testing.assert_array_equal(a.coordinates, b.coordinates)
    assert a.epsilon == b.epsilon


def test_nystrom_reproduces_training_points_on_the_complete_graph():
    X, _ = _swiss_roll(200, seed=1)
    result = diffusion_map(X, n_components=4, n_neighbors=200)
    np.testing.assert_allclose(result.extend(X), result.coordinates, rtol=1e-8, atol=1e-10)


def test_nystrom_extension_matches_full_recomputation():
    X = _non_uniform_circle(1000)
    held = np.arange(5, 1000, 10)
    kept = np.setdiff1d(np.arange(1000), held)
    fit = diffusion_map(X[kept], n_components=4, n_neighbors=32)
    extended = nystrom_extend(fit, X[held])
    full = diffusion_map(X, n_components=4, n_neighbors=32, epsilon=fit.epsilon)
    aligned = align_to(full.coordinates, fit.coordinates, rows=kept, eigenvalues=full.eigenvalues)
    scale = np.sqrt(np.mean(fit.coordinates**2, axis=0))
    err = np.sqrt(np.mean((aligned.coordinates[held] - extended) ** 2, axis=0)) / scale
    assert np.all(err < 0.02), err


def test_align_to_recovers_a_known_rotation():
    rng = np.random.default_rng(0)
    C = rng.standard_normal((50, 4))
    Q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    out = align_to(C @ Q, C)
    np.testing.assert_allclose(out.coordinates, C, atol=1e-12)
    np.testing.assert_allclose(out.rotation, Q.T, atol=1e-12)
    assert out.rmsd < 1e-12


def test_align_to_rotates_only_within_repeated_eigenvalues():
    rng = np.random.default_rng(1)
    C = rng.standard_normal((60, 3))
    c, s = np.cos(0.7), np.sin(0.7)
    R = np.array([[c, -s, 0], [s, c, 0], [0, 0, -1.0]])  # a rotation of the pair, a flip
    lam = np.array([0.9, 0.9, 0.5])
    out = align_to(C @ R, C, eigenvalues=lam)
    np.testing.assert_allclose(out.coordinates, C, atol=1e-12)
    # Distinct eigenvalues are not mixed even when a free rotation would fit better.
    Q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    out = align_to(C @ Q, C, eigenvalues=np.array([0.9, 0.7, 0.5]))
    assert np.count_nonzero(np.abs(out.rotation) > 1e-12) == 3


def test_align_to_fixes_the_eigenspace_rotation_between_two_computations(monkeypatch):
    monkeypatch.setattr(dm_module, "DENSE_MAX_N", 100)
    X = _uniform_circle(600)
    a = diffusion_map(X, n_components=4, n_neighbors=24, seed=0)
    b = diffusion_map(X, n_components=4, n_neighbors=24, seed=5)
    out = align_to(b.coordinates, a.coordinates, eigenvalues=b.eigenvalues)
    scale = np.abs(a.coordinates).max()
    assert out.rmsd < 1e-6 * scale


def test_disconnected_graph_embeds_the_largest_component():
    big = _uniform_circle(300)
    small = _uniform_circle(100) * 0.5 + 50.0
    X = np.vstack([small, big])
    # 11 = self + 5 pairs: no tie at the k-th neighbour of the equispaced points.
    result = diffusion_map(X, n_components=4, n_neighbors=11)
    assert result.num_components == 2
    np.testing.assert_array_equal(result.in_support, np.r_[np.zeros(100, bool), np.ones(300, bool)])
    assert np.all(np.isnan(result.coordinates[:100]))
    alone = diffusion_map(big, n_components=4, n_neighbors=11, epsilon=result.epsilon)
    np.testing.assert_allclose(result.eigenvalues, alone.eigenvalues, rtol=1e-9)
    with pytest.raises(DisconnectedGraphError, match="2 connected components"):
        diffusion_map(X, n_components=4, n_neighbors=11, disconnected="raise")


@pytest.mark.parametrize(
    ("X", "kwargs", "match"),
    [
        (np.zeros(10), {}, "X must be a 2-D array"),
        (np.full((20, 2), np.nan), {}, "X must be finite"),
        (np.zeros((5, 2)), {"n_components": 4}, "at least n_components"),
        (None, {"n_components": 0}, "n_components must be an integer >= 1"),
        (None, {"n_neighbors": 1}, "n_neighbors must be an integer >= 2"),
        (None, {"alpha": 1.5}, r"alpha must be a number in \[0, 1\]"),
        (None, {"epsilon": -1.0}, "epsilon must be 'auto', 'median', 'local' or a positive"),
        (None, {"epsilon": "bgh"}, "epsilon must be 'auto'"),
        (None, {"t": -1}, "t must be a number >= 0"),
        (None, {"neighbors": "ball_tree"}, "neighbors must be 'auto'"),
        (None, {"disconnected": "ignore"}, "disconnected must be"),
        (None, {"seed": -3}, "seed must be an integer >= 0"),
    ],
)
def test_bad_input_raises(X, kwargs, match):
    data = _uniform_circle(40) if X is None else X
    with pytest.raises(ValueError, match=match):
        diffusion_map(data, **kwargs)


def test_bad_input_to_extension_and_alignment_raises():
    result = diffusion_map(_uniform_circle(40), n_components=2, n_neighbors=8)
    with pytest.raises(ValueError, match="X_new must have 2 columns"):
        result.extend(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="same number of columns"):
        align_to(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="rows is required"):
        align_to(np.zeros((4, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="eigenvalues must have 2 entries"):
        align_to(np.zeros((4, 2)), np.zeros((4, 2)), eigenvalues=[1.0])


@pytest.mark.slow
def test_pynndescent_neighbours_give_the_exact_embedding():
    # The only test that pays pynndescent's numba compilation (40-60 s).
    X, t = _swiss_roll(3000, seed=2)
    with pytest.warns(UserWarning, match="pynndescent"):
        approx = diffusion_map(X, n_components=3, n_neighbors=32, neighbors="pynndescent")
    exact = diffusion_map(X, n_components=3, n_neighbors=32, neighbors="exact")
    assert abs(spearmanr(approx.coordinates[:, 0], t).statistic) >= 0.999
    np.testing.assert_allclose(approx.eigenvalues, exact.eigenvalues, rtol=1e-3)


def test_core_imports_neither_lightning_nor_tensorboard():
    import subprocess
    import sys

    code = (
        "import sys; import lightning_landscape.embeddings.diffusion, "
        "lightning_landscape.sampling.sketch, lightning_landscape.sampling.store; "
        "bad = [m for m in ('lightning', 'tensorboard', 'pynndescent') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_landmarks_are_evenly_spaced_and_keep_both_ends():
    np.testing.assert_array_equal(dm_module.select_landmarks(5, 8), np.arange(5))
    np.testing.assert_array_equal(dm_module.select_landmarks(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(dm_module.select_landmarks(9, 5), [0, 2, 4, 6, 8])
    many = dm_module.select_landmarks(1001, 8)
    assert many.size == 8 and many[0] == 0 and many[-1] == 1000
    assert np.ptp(np.diff(many)) <= 1  # gaps differ by rounding only
    # Cost model: m^2 for the fitted points plus (n - m) m for the placed ones.
    assert dm_module.landmark_cost(5, 8) == 25.0
    assert dm_module.landmark_cost(20, 8) == 64.0 + 12 * 8
    assert dm_module.landmark_cost(0, 8) == 1.0


def test_landmark_coordinates_keep_the_fit_and_place_the_rest_by_nystrom():
    X = _uniform_circle(200)
    landmarks = dm_module.select_landmarks(200, 50)
    fit = diffusion_map(X[landmarks], n_components=2, n_neighbors=12, epsilon="median")
    coords = dm_module.landmark_coordinates(fit, X, landmarks)
    np.testing.assert_array_equal(coords[landmarks], fit.coordinates)
    others = np.setdiff1d(np.arange(200), landmarks)
    np.testing.assert_array_equal(coords[others], nystrom_extend(fit, X[others]))
    # The placed points land on the circle the landmarks span, each between its neighbouring
    # landmarks: the first two coordinates of a circle are r (cos θ, sin θ) up to an orthogonal
    # map, so the angle runs monotonically through the samples in order.
    angle = np.unwrap(np.arctan2(coords[:, 1], coords[:, 0]))
    steps = np.diff(angle) * np.sign(angle[-1] - angle[0])
    assert np.all(steps > 0) and abs(angle[-1] - angle[0]) > 1.9 * np.pi
    radius = np.linalg.norm(fit.coordinates, axis=1).mean()
    np.testing.assert_allclose(np.linalg.norm(coords, axis=1), radius, rtol=0.03)
    # With every point a landmark the fit is returned as it is.
    full = diffusion_map(X[:40], n_components=2, n_neighbors=12, epsilon="median")
    np.testing.assert_array_equal(
        dm_module.landmark_coordinates(full, X[:40], np.arange(40)), full.coordinates
    )


@pytest.mark.parametrize("reflect", [False, True], ids=["rotation", "reflection"])
def test_align_to_previous_recovers_a_known_orthogonal_map(reflect):
    rng = np.random.default_rng(3)
    new = rng.standard_normal((30, 3))
    Q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    if reflect != (np.linalg.det(Q) < 0):
        Q[:, 0] *= -1
    # The previous embedding: rows 10..39 of a longer run, shuffled, in the rotated frame.
    labels = np.arange(100, 130)
    old_rows = rng.permutation(np.arange(10, 30))
    previous = new[old_rows] @ Q
    previous_labels = labels[old_rows]
    aligned = dm_module.align_to_previous(new, labels, previous, previous_labels)
    assert aligned is not None
    tol = 1e3 * np.finfo(np.float64).eps
    np.testing.assert_allclose(aligned.rotation, Q, atol=tol)
    np.testing.assert_allclose(aligned.coordinates, new @ Q, atol=tol)
    assert aligned.rmsd <= tol
    # Too few common labels (k + 1 = 4 needed by default), or other column counts: nothing.
    assert dm_module.align_to_previous(new, labels, previous[:3], previous_labels[:3]) is None
    assert dm_module.align_to_previous(new, labels, previous[:, :2], previous_labels) is None
    assert (
        dm_module.align_to_previous(new, labels, previous, previous_labels, min_common=21) is None
    )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: dm_module.select_landmarks(-1, 8), "n must be an integer >= 0"),
        (lambda: dm_module.select_landmarks(10, 0), "max_points must be an integer >= 1"),
        (lambda: dm_module.landmark_cost(10, True), "max_points must be an integer >= 1"),
        (
            lambda: dm_module.align_to_previous(np.zeros((3, 2)), [0, 1], np.zeros((3, 2)), [0]),
            "one label per row",
        ),
    ],
)
def test_landmark_and_alignment_helpers_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_landmark_coordinates_rejects_landmarks_that_do_not_match_the_fit():
    X = _uniform_circle(30)
    fit = diffusion_map(X[:20], n_components=2, n_neighbors=8, epsilon="median")
    for bad in (np.arange(19), np.r_[np.arange(19), 0], np.arange(11, 31), np.linspace(0, 19, 20)):
        with pytest.raises(ValueError, match="landmarks must be 20 unique row indices of X"):
            dm_module.landmark_coordinates(fit, X, bad)
