"""diffusion_map at its defaults on samples whose density varies up to a hundredfold, against the
analytic Laplace–Beltrami spectra, and the intrinsic-dimension estimate on curves, surfaces and a
3-manifold.

Samples with a varying density are quasi-uniform in the density's quantiles (inverse-CDF
transformed lattices and Fibonacci spirals): the density is real, the sampling noise that would
blur the comparison is not. Ratios of -log λ are compared with the Laplace–Beltrami eigenvalue
ratios: circle 1,1,4,4,9,9; unit sphere 2,2,2,6,6,6,6,6 (ratios 1,1,1,3,...); flat torus with
radii R = 1 and r = 1/2: m²/R² + l²/r² = 1,1,4,4,4,4,5,5.
"""

from __future__ import annotations

import numpy as np
import pytest

from lightning_landscape.embeddings.diffusion import align_to, diffusion_map, intrinsic_dimension

GOLDEN = 0.6180339887498949
CIRCLE = np.array([1.0, 1.0, 4.0, 4.0, 9.0, 9.0])
SPHERE = np.array([1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0, 3.0])
TORUS = np.array([1.0, 1.0, 4.0, 4.0, 4.0, 4.0, 5.0, 5.0])


def _inverse_cdf(u: np.ndarray, ratio: float) -> np.ndarray:
    """Angles with density ∝ exp(a cos θ), max/min = ``ratio``, at quantiles ``u``."""
    a = np.log(ratio) / 2
    grid = np.linspace(0.0, 2 * np.pi, 400_001)
    cdf = np.cumsum(np.exp(a * np.cos(grid)))
    cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    return np.interp(u, cdf, grid)


def _circle(n: int, ratio: float) -> np.ndarray:
    th = _inverse_cdf((np.arange(n) + 0.5) / n, ratio)
    return np.c_[np.cos(th), np.sin(th)]


def _sphere(n: int, ratio: float) -> np.ndarray:
    """Density ∝ exp(c z) on the unit sphere (max/min = ratio), Fibonacci spiral in azimuth."""
    c = np.log(ratio) / 2
    i = np.arange(n)
    u = (i + 0.5) / n
    z = np.log(np.exp(-c) + u * (np.exp(c) - np.exp(-c))) / c
    phi = 2 * np.pi * i * GOLDEN
    s = np.sqrt(1 - z * z)
    return np.c_[s * np.cos(phi), s * np.sin(phi), z]


def _torus(n: int, ratio: float, R: float = 1.0, r: float = 0.5) -> np.ndarray:
    """Flat torus in R⁴, density ∝ exp(c cos a) in the first angle."""
    i = np.arange(n)
    a = _inverse_cdf((i + 0.5) / n, ratio)
    b = 2 * np.pi * ((i * GOLDEN) % 1.0)
    return np.c_[R * np.cos(a), R * np.sin(a), r * np.cos(b), r * np.sin(b)]


def _ratios(eigenvalues: np.ndarray) -> np.ndarray:
    nu = -np.log(eigenvalues)
    return nu / nu[0]


def test_circle_with_a_hundredfold_density_gives_the_laplace_beltrami_eigenpairs():
    X = _circle(1500, 100.0)
    result = diffusion_map(X, n_components=6)
    assert result.kernel == "variable"
    np.testing.assert_allclose(_ratios(result.eigenvalues), CIRCLE, rtol=0.05)
    # The eigenfunctions are cos θ, sin θ (a density-following kernel gives cos 2πF(θ)).
    th = np.arctan2(X[:, 1], X[:, 0])
    assert (
        align_to(result.eigenvectors[:, :2], np.sqrt(2) * np.c_[np.cos(th), np.sin(th)]).rmsd < 0.05
    )
    local = diffusion_map(X, n_components=6, epsilon="local")
    assert (
        align_to(local.eigenvectors[:, :2], np.sqrt(2) * np.c_[np.cos(th), np.sin(th)]).rmsd > 0.5
    )
    # One global bandwidth fails here: the sparse points decouple.
    glob = diffusion_map(
        X, n_components=6, epsilon=float(np.median(np.sum(np.diff(X, axis=0) ** 2, 1))) * 4
    )
    assert np.max(np.abs(_ratios(glob.eigenvalues) / CIRCLE - 1)) > 0.1


def test_sphere_with_a_hundredfold_density():
    result = diffusion_map(_sphere(1400, 100.0), n_components=8)
    assert result.kernel == "variable"
    np.testing.assert_allclose(_ratios(result.eigenvalues), SPHERE, rtol=0.1)
    local = diffusion_map(_sphere(1400, 100.0), n_components=8, epsilon="local")
    assert np.max(np.abs(_ratios(local.eigenvalues) / SPHERE - 1)) > 0.25


@pytest.mark.parametrize(("ratio", "rtol"), [(10.0, 0.05), (100.0, 0.2)])
def test_flat_torus_with_a_varying_density(ratio, rtol):
    X = _torus(1400, ratio)
    result = diffusion_map(X, n_components=8)
    assert result.kernel == "variable"
    np.testing.assert_allclose(_ratios(result.eigenvalues), TORUS, rtol=rtol)
    local = diffusion_map(X, n_components=8, epsilon="local")
    assert np.max(np.abs(_ratios(local.eigenvalues) / TORUS - 1)) > 0.25


@pytest.mark.parametrize("ratio", [1.0, 3.0])
def test_auto_keeps_one_global_bandwidth_where_it_fits(ratio):
    for X in (_circle(1200, ratio), _sphere(1200, ratio) if ratio > 1 else _sphere(1200, 1.001)):
        assert diffusion_map(X, n_components=4).kernel == "global"


def test_nystrom_extension_with_the_variable_bandwidth():
    """Held-out points against a recomputation with them (the bar of the global-bandwidth test),
    and the sampled points reproduced by their own extension."""
    X = _circle(1000, 10.0)
    held = np.arange(5, 1000, 10)
    kept = np.setdiff1d(np.arange(1000), held)
    fit = diffusion_map(X[kept], n_components=4)
    full = diffusion_map(X, n_components=4)
    assert fit.kernel == full.kernel == "variable"
    aligned = align_to(full.coordinates, fit.coordinates, rows=kept, eigenvalues=full.eigenvalues)
    scale = np.sqrt(np.mean(fit.coordinates**2, axis=0))
    err = np.sqrt(np.mean((aligned.coordinates[held] - fit.extend(X[held])) ** 2, axis=0)) / scale
    assert np.all(err < 0.02), err
    wide = diffusion_map(_circle(1000, 100.0), n_components=4)
    scale = np.sqrt(np.mean(wide.coordinates**2, axis=0))
    err = np.sqrt(np.mean((wide.extend(wide.data) - wide.coordinates) ** 2, axis=0)) / scale
    assert np.all(err < 0.01), err


def _uniform_sphere(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, dim + 1))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("name", "exact"),
    [("circle", 1), ("helix", 1), ("torus", 2), ("sphere", 2), ("swiss roll", 2), ("S3", 3)],
)
def test_intrinsic_dimension_within_ten_percent_at_defaults(name, exact):
    rng = np.random.default_rng(0)
    if name == "circle":
        X = _uniform_sphere(2000, 1, rng)
    elif name == "helix":
        t = rng.uniform(0, 6 * np.pi, 2000)
        X = np.c_[np.cos(t), np.sin(t), 0.2 * t]
    elif name == "torus":
        a, b = rng.uniform(0, 2 * np.pi, (2, 3000))
        X = np.c_[2 * np.cos(a), 2 * np.sin(a), np.cos(b), np.sin(b)]
    elif name == "sphere":
        X = _uniform_sphere(3000, 2, rng)
    elif name == "swiss roll":
        t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=3000))
        h = 21 * rng.uniform(size=3000)
        X = np.c_[t * np.cos(t), h, t * np.sin(t)]
    else:
        X = _uniform_sphere(4000, 3, rng)
    result = diffusion_map(X, n_components=2)
    assert result.intrinsic_dim == pytest.approx(exact, rel=0.1)


def test_intrinsic_dimension_ignores_duplicates_and_needs_three_neighbours():
    rng = np.random.default_rng(1)
    X = _uniform_sphere(1000, 1, rng)
    X = np.vstack([X, X[:200]])  # duplicated points: zero distances are left out
    result = diffusion_map(X, n_components=2)
    assert result.intrinsic_dim == pytest.approx(1.0, rel=0.1)
    assert np.isnan(intrinsic_dimension(np.array([[0.0, 1.0, 2.0]])))


def test_bad_epsilon_names_the_variable_option():
    with pytest.raises(ValueError, match="or 'variable'; got 'adaptive'"):
        diffusion_map(_circle(40, 1.0), epsilon="adaptive")  # type: ignore[arg-type]
