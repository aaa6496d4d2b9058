"""TrajectoryEmbedder without a Trainer: which samples, landmarks, alignment between successive
embeddings, the saved embedding across a resume, bad options."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_landscape.embeddings.diffusion import diffusion_map, select_landmarks
from lightning_landscape.embeddings.trajectory import SAMPLE_UNITS, TrajectoryEmbedder


def _spiral(n: int) -> np.ndarray:
    """A trajectory that winds out in 3-D, one point per step."""
    s = np.linspace(0.0, 3.0 * np.pi, n)
    return np.c_[s * np.cos(s), s * np.sin(s), 0.3 * s]


def test_burn_in_and_window_select_the_samples():
    steps = np.arange(0, 40, 2)
    embedder = TrajectoryEmbedder(burn_in_steps=6, window_steps=10)
    np.testing.assert_array_equal(steps[embedder.select(steps, 30)], [22, 24, 26, 28, 30])
    np.testing.assert_array_equal(steps[embedder.select(steps, 12)], [6, 8, 10, 12])
    np.testing.assert_array_equal(
        steps[TrajectoryEmbedder(burn_in_steps=6).select(steps, 12)], [6, 8, 10, 12]
    )
    assert TrajectoryEmbedder(n_components=3).min_samples == 5


def test_fit_uses_at_most_max_points_landmarks():
    X = _spiral(60)
    embedder = TrajectoryEmbedder(n_components=2, n_neighbors=8, max_points=20)
    coords, result = embedder.fit(X)
    landmarks = select_landmarks(60, 20)
    assert result.data.shape[0] == 20 and coords.shape == (60, 2)
    reference = diffusion_map(X[landmarks], n_components=2, n_neighbors=8)  # same default
    np.testing.assert_allclose(result.eigenvalues, reference.eigenvalues, rtol=1e-12)
    np.testing.assert_allclose(coords[landmarks], reference.coordinates, rtol=1e-9, atol=1e-12)
    assert np.all(np.isfinite(coords))
    assert embedder.cost(60) == 20 * 20 + 40 * 20 + SAMPLE_UNITS * 60


def test_successive_embeddings_are_aligned_on_their_common_steps():
    rng = np.random.default_rng(0)
    embedder = TrajectoryEmbedder(n_components=3)
    first = rng.standard_normal((12, 3))
    assert embedder.align(first, np.arange(12), [0.9, 0.8, 0.7]) is first  # nothing to align to
    # The next embedding sees the same 12 steps plus 4 new ones, with two axes flipped
    # (distinct eigenvalues: sign flips are all that can differ between them).
    flip = np.diag([-1.0, 1.0, -1.0])
    later = np.r_[first, rng.standard_normal((4, 3))] @ flip
    aligned = embedder.align(later, np.arange(16), [0.9, 0.8, 0.7])
    np.testing.assert_allclose(aligned, later @ flip, atol=1e-12)
    np.testing.assert_array_equal(embedder.previous[0], np.arange(16))
    # Three common steps are fewer than n_components + 1: left as it is.
    again = rng.standard_normal((5, 3))
    assert embedder.align(again, np.arange(13, 18), [0.9, 0.8, 0.7]) is again


def test_the_saved_embedding_is_cut_back_to_the_resumed_step(tmp_path):
    embedder = TrajectoryEmbedder()
    path = tmp_path / "last.npz"
    embedder.save(path)  # nothing yet: nothing written
    assert not path.exists()
    coords = np.arange(20.0).reshape(10, 2)
    embedder.previous = (np.arange(0, 20, 2), coords)
    embedder.save(path)
    resumed = TrajectoryEmbedder()
    resumed.load(path, until_step=9)
    np.testing.assert_array_equal(resumed.previous[0], [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(resumed.previous[1], coords[:5])
    resumed.load(path, until_step=-1)
    assert resumed.previous is None
    resumed.load(tmp_path / "missing.npz", until_step=100)
    assert resumed.previous is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_components": 0}, "n_components must be a positive integer"),
        ({"n_neighbors": 1}, "n_neighbors must be an integer >= 2"),
        ({"alpha": 2}, r"alpha must be a number in \[0, 1\]"),
        ({"epsilon": 0}, "epsilon must be 'auto', 'median', 'local' or a positive number"),
        ({"t": -1}, "t must be a number >= 0"),
        ({"burn_in_steps": -1}, "burn_in_steps must be an integer >= 0"),
        ({"window_steps": 0}, "window_steps must be a positive integer or None"),
        ({"max_points": 2}, "max_points must be an integer >= 8"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"bandwidth": 1}, r"unknown option\(s\) \['bandwidth'\]"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrajectoryEmbedder(**kwargs)


def test_the_new_core_modules_import_neither_lightning_nor_tensorboard():
    import subprocess
    import sys

    code = (
        "import sys; import lightning_landscape.embeddings.trajectory, "
        "lightning_landscape.embeddings.geometry; "
        "bad = [m for m in ('lightning', 'tensorboard') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("burn_in, window", [(0, None), (7, None), (0, 25), (12, 30)])
def test_samples_in_window_counts_the_recorded_steps(burn_in, window):
    embedder = TrajectoryEmbedder(burn_in_steps=burn_in, window_steps=window)
    for total in (1, 9, 10, 11, 60, 97):
        for every in (1, 3, 10):
            start = embedder.window_start(total)
            # Brute force: every multiple of the interval from step 0, and the end of fit.
            recorded = set(range(0, total + 1, every)) | {total}
            expected = sum(1 for s in recorded if s >= start)
            assert embedder.samples_in_window(total, every) == expected, (total, every)


def test_recording_interval_leaves_enough_samples_and_divides_the_embedding_schedule():
    embedder = TrajectoryEmbedder(n_components=6)  # 8 samples needed
    for total in (5, 20, 60, 100, 1000):
        every = embedder.recording_interval(total, longest=10, per_minimum=2)
        assert 1 <= every <= 10
        if total >= 2 * 8 * 10:
            assert every == 10  # a long fit keeps the default
        else:
            assert embedder.samples_in_window(total, every) >= min(total + 1, 2 * 8)
    assert 12 % embedder.recording_interval(60, longest=10, per_minimum=2, divides=12) == 0


def _noisy_circle(n: int, dim: int = 50, noise: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points in angle order (one a step) along a unit circle in a random plane of
    ``dim`` dimensions, with isotropic noise; and their angles."""
    rng = np.random.default_rng(0)
    theta = 2.0 * np.pi * np.arange(n) / n
    frame = np.linalg.qr(rng.standard_normal((dim, 2)))[0]
    X = np.c_[np.cos(theta), np.sin(theta)] @ frame.T + noise * rng.standard_normal((n, dim))
    return X, theta


def _angle_agreement(coords: np.ndarray, theta: np.ndarray) -> float:
    """|mean exp(i(φ ∓ θ))| for φ the angle of the first two coordinates: 1 when φ is θ up to
    a rotation and a reflection, near 0 when they are unrelated."""
    phi = np.arctan2(coords[:, 1], coords[:, 0])
    return max(abs(np.mean(np.exp(1j * (phi - theta)))), abs(np.mean(np.exp(1j * (phi + theta)))))


def test_reduced_fits_still_recover_a_circle():
    X, theta = _noisy_circle(600)
    embedder = TrajectoryEmbedder(n_components=2, n_neighbors=10)
    full, _ = embedder.fit(X)  # all 600 are landmarks (max_points=1000)
    assert _angle_agreement(full, theta) > 0.99
    # 60 landmarks for this call only, the other 540 placed by Nyström.
    placed, result = embedder.fit(X, max_points=60)
    assert embedder.max_points == 1000 and result.data.shape[0] == 60
    assert placed.shape == (600, 2) and _angle_agreement(placed, theta) > 0.99
    # Landmarks only: the map of the rows landmarks() names is the same map, on those rows.
    landmarks = embedder.landmarks(600, max_points=60)
    np.testing.assert_array_equal(landmarks, select_landmarks(600, 60))
    alone, alone_result = embedder.fit(X[landmarks], max_points=60)
    np.testing.assert_allclose(alone_result.eigenvalues, result.eigenvalues, rtol=1e-12)
    np.testing.assert_allclose(alone, placed[landmarks], rtol=1e-9, atol=1e-12)
    assert _angle_agreement(alone, theta[landmarks]) > 0.99
    # The agreement tells rows apart: the same coordinates on shuffled angles do not agree.
    shuffled = np.random.default_rng(1).permutation(landmarks)
    assert _angle_agreement(alone, theta[shuffled]) < 0.5
    with pytest.raises(ValueError, match="max_points must be an integer >= 1"):
        embedder.fit(X, max_points=0)


def test_cost_model_is_the_documented_formula_and_monotone():
    embedder = TrajectoryEmbedder(max_points=50)
    ns, ms = range(0, 200, 7), (8, 20, 50, 80)
    for n in ns:
        for m in ms:
            k = min(n, m)  # landmarks fitted
            placed = (n - k) * k + SAMPLE_UNITS * n
            assert embedder.cost(n, max_points=m) == k * k + placed
            assert embedder.cost(n, max_points=m, nystrom=False) == k * k + SAMPLE_UNITS * k
        assert embedder.cost(n) == embedder.cost(n, max_points=50)
        np.testing.assert_array_equal(embedder.landmarks(n), select_landmarks(n, 50))
    for nystrom in (True, False):
        grid = np.array([[embedder.cost(n, max_points=m, nystrom=nystrom) for m in ms] for n in ns])
        assert np.all(np.diff(grid, axis=0) >= 0) and np.all(np.diff(grid, axis=1) >= 0)
    assert all(embedder.cost(n, nystrom=False) <= embedder.cost(n) for n in ns)
    with pytest.raises(ValueError, match="max_points must be an integer >= 1"):
        embedder.cost(10, max_points=0)
