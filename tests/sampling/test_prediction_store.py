"""The on-disk prediction store: versioned, atomic records, resumable, refuses other probe sets."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lightning_landscape.sampling.predictions import (
    FORMAT_VERSION,
    PredictionStore,
    ProbeMismatchError,
    find_stores,
    load_runs,
    sample_ids,
)


def _logp(rng, n=6, c=3):
    z = rng.normal(size=(n, c))
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_round_trip_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    ids = sample_ids(rng.normal(size=(6, 4)))
    y = np.array([0, 1, 2, 0, 1, 2])
    store = PredictionStore.create(str(tmp_path / "s"), probe_ids=ids, targets=y, n_classes=3)
    records = {s: _logp(rng) for s in (0, 5, 10)}
    for s, lp in records.items():
        store.append(s, lp, epoch=s // 5, loss=float(s))
    assert store.steps() == [0, 5, 10]
    got = store.read(5)
    assert (got.step, got.epoch, got.loss) == (5, 1, 5.0)
    np.testing.assert_array_equal(got.logp, records[5].astype(np.float32))
    assert not [f for f in os.listdir(store.path) if f.startswith(".tmp_")]
    # A crash mid-write leaves at most a temporary file, which is not a record.
    (tmp_path / "s" / ".tmp_step_000000015.npz").write_bytes(b"torn")
    again = PredictionStore.create(str(tmp_path / "s"), probe_ids=ids, targets=y, n_classes=3)
    assert again.steps() == [0, 5, 10]
    assert again.truncate(4) == [5, 10]
    assert again.steps() == [0]
    np.testing.assert_array_equal(again.targets, y)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["version"] == FORMAT_VERSION and meta["n_samples"] == 6
    assert find_stores(str(tmp_path)) == [str(tmp_path / "s")]


def test_refusals(tmp_path):
    ids = np.array([f"id{i}" for i in range(4)])
    store = PredictionStore.create(
        str(tmp_path / "s"), probe_ids=ids, targets=np.zeros(4, int), n_classes=2
    )
    with pytest.raises(ProbeMismatchError, match="written for other probe samples"):
        PredictionStore.create(
            str(tmp_path / "s"), probe_ids=ids[::-1], targets=np.zeros(4, int), n_classes=2
        )
    with pytest.raises(ValueError, match=r"logp must have shape \(4, 2\); got \(4, 3\)"):
        store.append(0, np.zeros((4, 3)))
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    meta["version"] = FORMAT_VERSION + 1
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version"):
        PredictionStore.open(str(tmp_path / "s"))
    with pytest.raises(FileNotFoundError, match="no prediction store"):
        PredictionStore.open(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="paths must name at least one prediction store"):
        load_runs([])


def test_sample_ids_follow_content_not_order():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 3)), np.arange(5)
    ids = sample_ids(x, y)
    assert len(set(ids.tolist())) == 5
    perm = np.array([3, 0, 4, 1, 2])
    np.testing.assert_array_equal(sample_ids(x[perm], y[perm]), ids[perm])
    assert sample_ids(x.astype(np.float32), y)[0] != ids[0]  # another dtype is another sample


def test_the_old_embeddings_paths_still_resolve_with_a_deprecation_warning():
    from lightning_landscape import embeddings, sampling
    from lightning_landscape.embeddings import predictions as old_module
    from lightning_landscape.sampling import predictions as new_module

    for name in new_module.__all__:
        with pytest.warns(
            DeprecationWarning, match=f"{name} moved to lightning_landscape.sampling"
        ):
            assert getattr(old_module, name) is getattr(new_module, name)
        with pytest.warns(DeprecationWarning, match=f"embeddings.{name} moved"):
            assert getattr(embeddings, name) is getattr(new_module, name)
    assert sampling.PredictionStore is new_module.PredictionStore
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        old_module.nothing  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        embeddings.nothing  # noqa: B018
