"""Joint InPCA of several runs: known answers, refusal of mismatched probe sets, the CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from lightning_landscape.__main__ import main
from lightning_landscape.embeddings.joint import joint_inpca, resolve_runs
from lightning_landscape.sampling.predictions import PredictionStore, ProbeMismatchError

N, C = 12, 4


def _softmax_log(z):
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _trajectory(rng, n_steps, direction):
    """Log-probabilities moving from uniform towards the labels along ``direction``."""
    return [_softmax_log(t * direction + 0.01 * rng.normal(size=(N, C))) for t in range(n_steps)]


def _write_run(path, ids, targets, logps, order=None):
    order = np.arange(N) if order is None else order
    store = PredictionStore.create(
        str(path / "version_0" / "landscape_inpca" / "predictions"),
        probe_ids=ids[order],
        targets=targets[order],
        n_classes=C,
    )
    for step, lp in enumerate(logps):
        store.append(10 * step, lp[order], epoch=step, loss=float(step))
    return store


def _reference(logps):
    n = len(logps)
    D = np.zeros((n, n))
    for u in range(n):
        for v in range(n):
            D[u, v] = -np.mean(np.log(np.exp(0.5 * (logps[u] + logps[v])).sum(axis=1)))
    np.fill_diagonal(D, 0.0)  # float32 rounding of the stored log-probabilities
    L = np.eye(n) - 1.0 / n
    W = -0.5 * L @ D @ L
    lam = np.linalg.eigvalsh(W)
    lam = lam[np.argsort(-np.abs(lam))]
    stress = [1 - math.sqrt(1 - np.sum(lam[:k] ** 2) / np.sum(W * W)) for k in (1, 2, 3)]
    return D, np.array(stress)


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.array([f"s{i:02d}" for i in range(N)])
    y = rng.integers(0, C, size=N)
    onehot = np.eye(C)[y]
    a = _trajectory(rng, 5, 2.0 * onehot)
    b = _trajectory(rng, 4, 1.0 * onehot + rng.normal(size=(N, C)))
    _write_run(tmp_path / "a", ids, y, a)
    # Run b stored its samples in another order (e.g. gathered from two ranks).
    _write_run(tmp_path / "b", ids, y, b, order=rng.permutation(N))
    return tmp_path, a, b, ids, y


def test_joint_embedding_matches_reference_on_aligned_samples(runs):
    tmp_path, a, b, _, _ = runs
    paths, names = resolve_runs([str(tmp_path / "a"), str(tmp_path / "b")])
    assert names == [
        os.path.join("a", "version_0", "landscape_inpca", "predictions"),
        os.path.join("b", "version_0", "landscape_inpca", "predictions"),
    ]
    result = joint_inpca(paths, names=names, n_components=3)
    D_ref, stress_ref = _reference([x.astype(np.float32).astype(np.float64) for x in a + b])
    np.testing.assert_allclose(result.distances, D_ref, atol=1e-9)
    np.testing.assert_allclose(result.embedding.explained_stress_cumulative, stress_ref, atol=1e-9)
    np.testing.assert_array_equal(result.run, [0] * 5 + [1] * 4)
    np.testing.assert_array_equal(result.step, [0, 10, 20, 30, 40, 0, 10, 20, 30])
    assert result.progress[0] == pytest.approx(0.0, abs=1e-6)
    assert result.progress[5] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(result.progress[:5]) > 0)  # run a heads straight for the labels


def test_identical_runs_coincide(runs):
    tmp_path, a, _, ids, y = runs
    _write_run(tmp_path / "a2", ids, y, a, order=np.arange(N)[::-1])
    result = joint_inpca(resolve_runs([str(tmp_path / "a"), str(tmp_path / "a2")])[0])
    coords = result.embedding.coordinates
    np.testing.assert_allclose(coords[:5], coords[5:], atol=1e-8)
    # Records are stored in float32: normalisation holds to ~1e-8.
    np.testing.assert_allclose(np.diag(result.distances[:5, 5:]), 0.0, atol=1e-7)


def test_mismatched_probe_sets_are_refused(runs):
    tmp_path, a, _, ids, y = runs
    other = ids.copy()
    other[3] = "elsewhere"
    _write_run(tmp_path / "c", other, y, a)
    paths, names = resolve_runs([str(tmp_path / "a"), str(tmp_path / "c")])
    with pytest.raises(ProbeMismatchError, match=r"were probed on different samples.*lacks 1"):
        joint_inpca(paths, names=names)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no saved predictions under"):
        resolve_runs([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="does not exist"):
        resolve_runs([str(tmp_path / "missing")])


def test_command_line_writes_a_tensorboard_run(runs, capsys):
    tmp_path, a, b, _, _ = runs
    out = tmp_path / "joint"
    assert main(["inpca", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    _, stress_ref = _reference([x.astype(np.float32).astype(np.float64) for x in a + b])
    assert f"explained stress, top 3: {stress_ref[2]:.4f}" in printed
    acc = event_accumulator.EventAccumulator(
        str(out), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
    )
    acc.Reload()
    got = {e.step: e.value for e in acc.Scalars("inpca_joint/explained_stress")}
    np.testing.assert_allclose([got[k] for k in (1, 2, 3)], stress_ref, rtol=1e-6)
    assert "inpca_joint/trajectories" in acc.Tags()["images"]
    with open(out / "projector_config.pbtxt") as f:
        assert "inpca_joint/coordinates" in f.read()
    meta = (out / "00000" / "inpca_joint%2fcoordinates" / "metadata.tsv").read_text().splitlines()
    assert meta[0].split("\t") == ["run", "step", "epoch", "loss", "progress"]
    assert len(meta) == 1 + 9


def test_command_line_refuses_mismatch_with_a_message(runs, tmp_path):
    root, a, _, ids, y = runs
    other = ids.copy()
    other[0] = "elsewhere"
    _write_run(root / "c", other, y, a)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_landscape",
            "inpca",
            str(root / "a"),
            str(root / "c"),
            "--out",
            str(root / "joint"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "were probed on different samples" in proc.stderr
