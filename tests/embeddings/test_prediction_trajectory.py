"""The prediction trajectory without a Trainer: probe predictions against float64 log-softmax,
the gather of several processes' shards, and the growing distance matrix, InPCA and scalars
against python loops and an explicit eigendecomposition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_landscape.embeddings.prediction_trajectory import (
    PredictionTrajectory,
    ProbePredictions,
    gather_predictions,
    predict_shard,
)
from lightning_landscape.sampling.predictions import PredictionRecord, sample_ids
from tests._reference import digits_batches


def _outputs(model, batch):
    return model(batch[0]), batch[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double().eval()


def _hex_to_int64(ids: np.ndarray) -> np.ndarray:
    return np.array([int(h, 16) for h in ids], dtype=np.uint64).view(np.int64)


def test_predict_shard_is_the_float64_log_softmax_with_content_ids():
    model = _model()
    batches = digits_batches([5, 9], dtype=torch.float64)
    logp, y, ids = predict_shard(model, batches, _outputs)
    x = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        z = model(x)
    ref = z - torch.log(torch.exp(z).sum(dim=1, keepdim=True))
    assert logp.dtype == torch.float64
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-13)
    assert torch.equal(y, labels)
    expected = sample_ids(x.numpy(), labels.numpy())
    np.testing.assert_array_equal(ids.numpy(), _hex_to_int64(expected))


def test_predict_shard_without_input_tensors_ids_by_position():
    model = _model()
    batches = [{"x": x, "y": y} for x, y in digits_batches([3, 2], dtype=torch.float64)]
    _, y, ids = predict_shard(model, batches, lambda m, b: (m(b["x"]), b["y"]))
    positions = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]])
    np.testing.assert_array_equal(ids.numpy(), _hex_to_int64(sample_ids(positions, y.numpy())))


def test_predict_shard_refuses_outputs_that_are_not_logits_and_labels():
    model = _model()
    batches = digits_batches([4], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"logits must be an \(n, C\) tensor; got \(4,\)"):
        predict_shard(model, batches, lambda m, b: (m(b[0])[:, 0], b[1]))
    with pytest.raises(ValueError, match="targets must be n integer labels; got"):
        predict_shard(model, batches, lambda m, b: (m(b[0]), b[1].double()))
    with pytest.raises(ValueError, match="targets must be n integer labels; got list"):
        predict_shard(model, batches, lambda m, b: (m(b[0]), [0, 1, 2, 3]))


def test_gather_keeps_rank_order_and_drops_padding_duplicates():
    model = _model()
    rank0 = predict_shard(model, digits_batches([6], dtype=torch.float64), _outputs)
    both = predict_shard(model, digits_batches([10], dtype=torch.float64), _outputs)
    # Rank 1 holds samples 6..9 and repeats samples 0 and 1 (DistributedSampler padding).
    rank1 = tuple(torch.cat([t[6:10], t[:2]]) for t in both)
    shards = iter(rank1)

    def gather(t):  # every process gathers logp, targets, ids in that order
        return torch.cat([t, next(shards)])

    got = gather_predictions(*rank0, gather_fn=gather)
    assert got.logp.dtype == np.float32
    np.testing.assert_array_equal(got.logp, both[0].numpy().astype(np.float32))
    np.testing.assert_array_equal(got.targets, both[1].numpy())
    x, y = digits_batches([10], dtype=torch.float64)[0]
    np.testing.assert_array_equal(got.ids, sample_ids(x.numpy(), y.numpy()))
    lp = both[0].numpy().astype(np.float32)
    assert got.loss == pytest.approx(float(-np.mean(lp[np.arange(10), y.numpy()])))
    assert got.accuracy == float(np.mean(lp.argmax(axis=1) == y.numpy()))
    bad = rank0[0].clone()
    bad[0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="non-finite predictions"):
        gather_predictions(bad, rank0[1], rank0[2])


def _random_predictions(rng, n=12, c=4) -> ProbePredictions:
    z = rng.normal(scale=2.0, size=(n, c))
    logp = (z - np.log(np.exp(z).sum(axis=1, keepdims=True))).astype(np.float32)
    targets = np.arange(n) % c
    return ProbePredictions(
        logp=logp, targets=targets, ids=np.array([f"{i:016x}" for i in range(n)])
    )


def _loop_distances(logps):
    m = len(logps)
    D = np.zeros((m, m))
    for u in range(m):
        for v in range(m):
            if u == v:
                continue
            total = 0.0
            for s in range(logps[u].shape[0]):
                bc = sum(
                    math.sqrt(math.exp(float(logps[u][s, c])) * math.exp(float(logps[v][s, c])))
                    for c in range(logps[u].shape[1])
                )
                total -= math.log(bc)
            D[u, v] = total / logps[u].shape[0]
    return D


def _loop_progress(logp, logp0, y) -> float:
    vals = []
    for n in range(len(y)):
        a = np.sqrt(np.exp(logp0[n].astype(np.float64)))
        a /= np.linalg.norm(a)
        b = np.zeros_like(a)
        b[y[n]] = 1.0
        theta = math.acos(float(a @ b))
        e2 = (b - (a @ b) * a) / np.linalg.norm(b - (a @ b) * a)
        u = np.sqrt(np.exp(logp[n].astype(np.float64)))
        u /= np.linalg.norm(u)
        vals.append(math.atan2(u @ e2, u @ a) / theta)
    return float(np.mean(vals))


def test_trajectory_grows_the_exact_distance_matrix_and_summarises_the_latest_checkpoint():
    rng = np.random.default_rng(0)
    preds = [_random_predictions(rng) for _ in range(5)]
    traj = PredictionTrajectory()
    for i, p in enumerate(preds):
        traj.append(10 * i, i // 2, p)
        s = traj.summary(3)
        logps = [q.logp for q in preds[: i + 1]]
        np.testing.assert_allclose(traj.distances, _loop_distances(logps), rtol=1e-10, atol=1e-12)
        assert s.num_checkpoints == i + 1
        y = p.targets
        assert s.probe_loss == pytest.approx(float(-np.mean(p.logp[np.arange(12), y])), rel=1e-6)
        assert s.probe_accuracy == float(np.mean(p.logp.argmax(axis=1) == y))
        assert s.progress == pytest.approx(_loop_progress(p.logp, preds[0].logp, y), abs=1e-6)
        np.testing.assert_array_equal(s.steps, 10 * np.arange(i + 1))
        np.testing.assert_array_equal(s.epochs, np.arange(i + 1) // 2)
        if i == 0:
            assert s.embedding is None
            continue
        # InPCA: W = -1/2 L D L, eigenvalues by |λ|, explained stress of the top k.
        n = i + 1
        L = np.eye(n) - 1.0 / n
        lam = np.linalg.eigvalsh(-0.5 * L @ traj.distances @ L)
        lam = lam[np.argsort(-np.abs(lam))]
        k = min(3, n)
        stress = [
            1 - math.sqrt(max(0.0, 1 - np.sum(lam[:j] ** 2) / np.sum(lam**2)))
            for j in range(1, k + 1)
        ]
        np.testing.assert_allclose(s.embedding.explained_stress_cumulative, stress, atol=1e-10)
        assert s.embedding.coordinates.shape == (n, k)
        np.testing.assert_allclose(s.embedding.eigenvalues, lam, rtol=0, atol=1e-12)
        # The centring's zero eigenvalue has a rounding sign: count the others.
        sig = np.abs(lam[:k]) > 1e-9 * np.abs(lam).max()
        zero = int(np.sum(s.embedding.eigenvalues[:k][~sig] < 0))
        assert s.embedding.n_imaginary - zero == int(np.sum(lam[:k][sig] < 0))


def test_trajectory_from_records_equals_the_one_grown_step_by_step():
    rng = np.random.default_rng(1)
    preds = [_random_predictions(rng) for _ in range(4)]
    grown = PredictionTrajectory()
    for i, p in enumerate(preds):
        grown.append(i, 0, p)
    records = [
        PredictionRecord(step=i, epoch=0, logp=p.logp, loss=p.loss) for i, p in enumerate(preds)
    ]
    loaded = PredictionTrajectory.from_records(records, preds[0].targets)
    np.testing.assert_allclose(loaded.distances, grown.distances, rtol=1e-12, atol=1e-14)
    assert loaded.steps == grown.steps and loaded.losses == grown.losses
    one = PredictionTrajectory.from_records(records[:1], preds[0].targets)
    np.testing.assert_array_equal(one.distances, np.zeros((1, 1)))
    assert len(PredictionTrajectory.from_records([], preds[0].targets)) == 0


def test_trajectory_refuses_a_new_probe_size_and_an_empty_summary():
    rng = np.random.default_rng(2)
    traj = PredictionTrajectory()
    with pytest.raises(ValueError, match="summary needs at least one checkpoint"):
        traj.summary(3)
    traj.append(0, 0, _random_predictions(rng, n=12))
    with pytest.raises(FloatingPointError, match="the probe set changed size during the run"):
        traj.append(1, 0, _random_predictions(rng, n=10))
    assert len(traj) == 1


def test_the_core_imports_neither_lightning_nor_tensorboard():
    import subprocess
    import sys

    code = (
        "import sys; import lightning_landscape.embeddings.prediction_trajectory, "
        "lightning_landscape.embeddings.geometry, lightning_landscape.sampling.predictions; "
        "bad = [m for m in ('lightning', 'tensorboard') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
