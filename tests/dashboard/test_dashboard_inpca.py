"""log_inpca: every InPCAMonitor tag, from core results, to any logger and to TensorBoard."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator

from lightning_landscape.dashboard.inpca import log_inpca
from lightning_landscape.dashboard.writer import _reset_warn_once
from lightning_landscape.embeddings.geometry import TrajectoryGeometry
from lightning_landscape.embeddings.inpca import inpca
from lightning_landscape.embeddings.prediction_trajectory import PredictionSummary


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics, step) -> None:
        self.calls.append((dict(metrics), step))


def _summary(n: int = 4) -> PredictionSummary:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 3))
    D = ((X[:, None] - X[None]) ** 2).sum(-1)
    return PredictionSummary(
        num_checkpoints=n,
        probe_loss=0.5,
        probe_accuracy=0.75,
        progress=0.25,
        embedding=inpca(D, n_components=3),
        steps=np.arange(n) * 10,
        epochs=np.arange(n) // 2,
        losses=np.linspace(2.0, 0.5, n),
    )


def test_scalars_reach_every_logger_under_the_monitor_tags():
    rec = _Recorder()
    trainer = types.SimpleNamespace(loggers=[rec], global_rank=0)
    geometry = TrajectoryGeometry(
        distance_from_init=3.0,
        cosine_successive_updates=-0.5,
        mode_connectivity={"init": -0.1, "previous": 0.02},
        barrier={"init": 0.3, "previous": 0.0},
    )
    summary = _summary()
    assert log_inpca(trainer, 7, geometry=geometry, predictions=summary)
    (geo, s1), (pred, s2) = rec.calls
    assert s1 == s2 == 7
    assert geo == {
        "landscape/geometry/distance_from_init": 3.0,
        "landscape/geometry/cosine_successive_updates": -0.5,
        "landscape/geometry/mc_init": -0.1,
        "landscape/geometry/barrier_init": 0.3,
        "landscape/geometry/mc_previous": 0.02,
        "landscape/geometry/barrier_previous": 0.0,
    }
    stress = summary.embedding.explained_stress_cumulative
    assert pred == {
        "landscape/inpca/num_checkpoints": 4.0,
        "landscape/inpca/probe_loss": 0.5,
        "landscape/inpca/probe_accuracy": 0.75,
        "landscape/inpca/progress": 0.25,
        "landscape/inpca/explained_stress_top1": float(stress[0]),
        "landscape/inpca/explained_stress_top2": float(stress[1]),
        "landscape/inpca/explained_stress_top3": float(stress[2]),
        "landscape/inpca/n_imaginary": float(summary.embedding.n_imaginary),
    }
    # The first measurement: no cosine, no anchors yet, no embedding.
    rec.calls.clear()
    first = PredictionSummary(1, 2.3, 0.1, 0.0, None, np.zeros(1), np.zeros(1), np.ones(1))
    log_inpca(trainer, 0, geometry=TrajectoryGeometry(distance_from_init=0.0), predictions=first)
    assert sorted(rec.calls[0][0]) == ["landscape/geometry/distance_from_init"]
    assert sorted(rec.calls[1][0]) == [
        "landscape/inpca/num_checkpoints",
        "landscape/inpca/probe_accuracy",
        "landscape/inpca/probe_loss",
        "landscape/inpca/progress",
    ]


def test_embedding_goes_to_the_projector_and_the_figure(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="", version=0)
    trainer = types.SimpleNamespace(loggers=[logger], global_rank=0)
    assert log_inpca(trainer, 20, embedding=_summary())
    logger.experiment.flush()
    logdir = os.path.join(str(tmp_path), "version_0")
    folder = os.path.join(logdir, "00020", "landscape%2finpca%2fcoordinates")
    with open(os.path.join(folder, "metadata.tsv")) as f:
        rows = f.read().splitlines()
    assert rows[0].split("\t")[:3] == ["step", "epoch", "loss"]
    assert [r.split("\t")[0] for r in rows[1:]] == ["0", "10", "20", "30"]
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("landscape/inpca/trajectory")] == [20]


def test_no_tensorboard_logger_warns_once_and_reports_it():
    _reset_warn_once()
    trainer = types.SimpleNamespace(loggers=[_Recorder()], global_rank=0)
    with pytest.warns(UserWarning, match="no TensorBoardLogger among trainer.loggers"):
        assert not log_inpca(trainer, 3, embedding=_summary())
    # Nothing to write (no embedding, or neither output wanted) is not a failure.
    assert log_inpca(trainer, 3, embedding=_summary(), projector=False, figure=False)
