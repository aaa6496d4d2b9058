"""ParameterSketch: exact below the threshold, a linear map equal to its explicit matrix above,
and squared distances preserved with the documented distortion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_landscape.sampling import sketch as sketch_module
from lightning_landscape.sampling.sketch import ParameterSketch, sketch_distortion_bound


def _tensors(sizes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in sizes]


def test_small_models_are_kept_exactly():
    tensors = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    sketch = ParameterSketch([12, 5], exact_max_params=100)
    assert sketch.exact and sketch.output_dim == 17
    expected = np.concatenate([t.reshape(-1).numpy() for t in tensors])
    np.testing.assert_array_equal(sketch(tensors), expected)


def _reference_matrix(sketch: ParameterSketch) -> np.ndarray:
    """The map's matrix from its definition, in exact Python integers (no int64 overflow)."""
    p, width = (1 << 31) - 1, sketch.dim // sketch.nnz
    M = np.zeros((sketch.dim, sketch.num_params))
    for r, (a, b, c3, c2, c1, c0) in enumerate(sketch.coefficients):
        for i in range(sketch.num_params):
            bucket = r * width + ((a * i + b) % p) % width
            sign = 1 - 2 * ((((c3 * i + c2) % p * i + c1) % p * i + c0) % p % 2)
            M[bucket, i] += sign / np.sqrt(sketch.nnz)
    return M


@pytest.mark.parametrize("cache_max_entries", [10**6, 0])  # hashes kept, or recomputed
@pytest.mark.parametrize("nnz", [1, 4])
def test_blockwise_sketch_equals_its_explicit_matrix(monkeypatch, nnz, cache_max_entries):
    # Small chunks: a tensor is hashed in several pieces, as for big models.
    monkeypatch.setattr(sketch_module, "CHUNK", 64)
    sizes = [300, 1, 77]
    sketch = ParameterSketch(
        sizes, dim=64, nnz=nnz, seed=3, exact_max_params=0, cache_max_entries=cache_max_entries
    )
    assert sketch.cache == (cache_max_entries > 0)
    M = _reference_matrix(sketch)
    # Every column has nnz entries ±1/√nnz, one in each block of dim/nnz rows.
    assert np.all((M != 0).sum(0) == nnz)
    for seed in (0, 1, 2):  # the first call fills the cache, the later ones read it
        tensors = _tensors(sizes, dtype=torch.float64, seed=seed)
        x = np.concatenate([t.numpy() for t in tensors])
        np.testing.assert_allclose(sketch(tensors), M @ x, rtol=1e-12, atol=1e-12)
    assert len(sketch._hash_cache) == (1 if sketch.cache else 0)


def test_hashes_of_large_indices_do_not_overflow():
    sketch = ParameterSketch([10], dim=256, nnz=2, seed=5, exact_max_params=0)
    index = torch.tensor([0, 1, 2**31 - 2, 2**30 + 12345], dtype=torch.int64)
    buckets, signs = sketch.hashes(index)
    p, width = (1 << 31) - 1, 128
    for r, (a, b, c3, c2, c1, c0) in enumerate(sketch.coefficients):
        for col, i in enumerate(index.tolist()):
            assert buckets[r, col] == r * width + ((a * i + b) % p) % width
            sign = 1 - 2 * ((((c3 * i + c2) % p * i + c1) % p * i + c0) % p % 2)
            assert signs[r, col] == sign


def test_same_seed_same_map_other_seed_other_map():
    sizes = [5000]
    t = _tensors(sizes)
    a = ParameterSketch(sizes, dim=256, seed=1, exact_max_params=0)(t)
    b = ParameterSketch(sizes, dim=256, seed=1, exact_max_params=0)(t)
    c = ParameterSketch(sizes, dim=256, seed=2, exact_max_params=0)(t)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("nnz", [1, 4])
def test_squared_distance_distortion_within_the_documented_bound(nnz):
    """Relative errors of squared distances over 780 pairs of 40 dense 'trajectory' samples
    (a random walk, as SGD iterates): their standard deviation is at most sqrt(2/dim), and every
    one is within 5 of it."""
    dim, n, D = 1024, 40, 60_000
    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.standard_normal((n, D)), axis=0) * 1e-2 + 1.0
    sizes = [50_000, 10_000]
    sketch = ParameterSketch(sizes, dim=dim, nnz=nnz, seed=0, exact_max_params=0)
    Y = np.stack(
        [sketch([torch.from_numpy(w[:50_000]), torch.from_numpy(w[50_000:])]) for w in walk]
    )
    i, j = np.triu_indices(n, 1)
    exact = ((walk[i] - walk[j]) ** 2).sum(1)  # float64 reference
    sketched = ((Y[i] - Y[j]) ** 2).sum(1)
    rel = sketched / exact - 1
    bound = sketch_distortion_bound(dim)
    assert np.std(rel) <= 1.2 * bound  # 1.2: the sample std of 780 correlated pairs
    assert np.max(np.abs(rel)) <= 5 * bound
    assert abs(np.mean(rel)) <= 5 * bound / np.sqrt(n)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 0}, "dim must be an integer >= 1"),
        ({"nnz": 0}, "nnz must be an integer >= 1"),
        ({"dim": 10, "nnz": 4}, "dim must be a multiple of nnz"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"exact_max_params": -1}, "exact_max_params must be an integer >= 0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParameterSketch([10], **kwargs)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="sizes must be a non-empty list"):
        ParameterSketch([])
    sketch = ParameterSketch([4, 4], exact_max_params=0, dim=8)
    with pytest.raises(ValueError, match=r"tensors must have sizes \[4, 4\]"):
        sketch([torch.zeros(4)])
