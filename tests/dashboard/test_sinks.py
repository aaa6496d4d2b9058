"""Figures and histograms reach W&B (offline) and MLflow (local file store), not only TensorBoard.

Real libraries, real Trainers: what W&B wrote is read back from its offline run file (a
LevelDB-style log of protobuf records, read here with a few lines and W&B's own protobuf
classes), what MLflow wrote from its artifact store and its client, what TensorBoard wrote with
TensorBoard's own reader; the W&B histogram must carry the same bins as TensorBoard's.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time

import numpy as np
import pytest
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.util import tensor_util

from lightning_landscape import HessianSpectrumMonitor
from lightning_landscape.dashboard.writer import _reset_warn_once
from tests.callbacks._models import DigitsModule, loader

TAG = "landscape/hessian"


def _monitor() -> HessianSpectrumMonitor:
    return HessianSpectrumMonitor(every_n_steps=2, top_k=3, num_probe_batches=1)


def _wandb_history(save_dir, *, rows: int = 0, key: str = "_step") -> dict[str, list]:
    """``{key: [value per history row]}`` from the offline run file, once it holds ``rows``
    values of ``key`` (W&B's service may still be writing the file after ``finish()``)."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + 60
    while True:
        try:
            history = _read_history(save_dir)
        except DecodeError:  # a record read while the service was writing it: read again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        if len(history.get(key, [])) >= rows or time.monotonic() > deadline:
            return history
        time.sleep(0.5)


def _read_history(save_dir) -> dict[str, list]:
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(str(save_dir), "wandb", "offline-run-*", "run-*.wandb"))
    raw = open(path, "rb").read()
    block, pos, part, out = 32768, 7, b"", {}
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        part = data if kind in (1, 2) else part + data
        if kind not in (1, 4):
            continue
        rec = pb.Record()
        rec.ParseFromString(part)
        if rec.WhichOneof("record_type") == "history":
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                out.setdefault(key, []).append(json.loads(item.value_json))
    return out


def _tensorboard_histograms(logdir) -> dict[int, np.ndarray]:
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return {
        e.step: tensor_util.make_ndarray(e.tensor_proto)
        for e in acc.Tensors(f"{TAG}/spectrum_signed_log")
    }


def test_wandb_gets_figures_and_histograms_beside_tensorboard(tmp_path, make_trainer):
    _reset_warn_once()
    wandb_logger = WandbLogger(project="ll", save_dir=str(tmp_path / "wb"), offline=True)
    tb = TensorBoardLogger(str(tmp_path / "tb"), name="", version=0)
    with pytest.warns(UserWarning, match="WandbLogger cannot show the monitors' text cards"):
        make_trainer([_monitor()], max_steps=4, logger=[tb, wandb_logger]).fit(
            DigitsModule(), loader(32)
        )
    wandb_logger.experiment.finish()
    history = _wandb_history(tmp_path / "wb", rows=3, key=f"{TAG}/density/filenames")
    # One density image per measurement (steps 0, 2, 4), as PNG files in the run's media.
    assert len(history[f"{TAG}/density/filenames"]) == 3
    media = tmp_path / "wb" / "wandb" / "offline-run-*" / "files" / "media" / "images"
    pngs = glob.glob(str(media / "**" / "density_*.png"), recursive=True)
    assert len(pngs) == 3 and all(open(p, "rb").read(4) == b"\x89PNG" for p in pngs)
    # The histograms carry TensorBoard's buckets: same edges, same heights.
    bins = history[f"{TAG}/spectrum_signed_log/bins"]
    values = history[f"{TAG}/spectrum_signed_log/values"]
    assert history[f"{TAG}/spectrum_signed_log/_type"] == ["histogram"] * 3
    expected = _tensorboard_histograms(tmp_path / "tb" / "version_0")
    assert sorted(expected) == [0, 2, 4]
    for (_, buckets), b, v in zip(sorted(expected.items()), bins, values, strict=True):
        edges = np.concatenate([buckets[:, 0], buckets[-1:, 1]])
        np.testing.assert_allclose(b, edges, rtol=1e-6)
        np.testing.assert_allclose(v, buckets[:, 2], rtol=1e-6)
    # Scalars reach W&B as before.
    assert len(history[f"{TAG}/eigenvalue_01"]) == 3


def test_mlflow_gets_figures_and_text_as_artifacts(tmp_path, make_trainer, monkeypatch):
    _reset_warn_once()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store, no server
    mlf = MLFlowLogger(experiment_name="ll", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    with pytest.warns(UserWarning, match="MLFlowLogger cannot show the monitors' spectrum"):
        make_trainer([_monitor()], max_steps=4, logger=mlf).fit(DigitsModule(), loader(32))
    run_dir = glob.glob(str(tmp_path / "mlruns" / "*" / mlf.run_id))[0]
    figures = sorted(glob.glob(os.path.join(run_dir, "artifacts", TAG, "density", "*.png")))
    names = [os.path.basename(f) for f in figures]
    assert names == [f"step_{s:08d}.png" for s in (0, 2, 4)]
    assert all(open(f, "rb").read(4) == b"\x89PNG" for f in figures)
    (card,) = glob.glob(os.path.join(run_dir, "artifacts", TAG, "spectrum_axis", "*.md"))
    assert "signed" in open(card).read().lower()
    history = mlf.experiment.get_metric_history(mlf.run_id, f"{TAG}/eigenvalue_01")
    assert sorted(m.step for m in history) == [0, 2, 4]


def test_without_tensorboard_nothing_is_written_for_it_and_the_notice_says_so(
    tmp_path, make_trainer
):
    _reset_warn_once()
    wandb_logger = WandbLogger(project="ll", save_dir=str(tmp_path / "wb"), offline=True)
    with pytest.warns(UserWarning, match="add a TensorBoardLogger to record them"):
        make_trainer([_monitor()], max_steps=2, logger=wandb_logger).fit(DigitsModule(), loader(32))
    wandb_logger.experiment.finish()
    assert not glob.glob(str(tmp_path / "**" / "events.out.tfevents*"), recursive=True)
    history = _wandb_history(tmp_path / "wb", rows=2, key=f"{TAG}/spectrum_signed_log/values")
    assert len(history[f"{TAG}/spectrum_signed_log/values"]) == 2  # steps 0 and 2
