"""The projector writer: coordinates and metadata land where TensorBoard's projector reads."""

from __future__ import annotations

import os

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_landscape.dashboard.projector import write_projector_embedding


def _read_tsv(path: str) -> list[list[str]]:
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f]


def test_coordinates_and_metadata_round_trip(tmp_path):
    coords = np.random.default_rng(0).normal(size=(6, 3))
    writer = SummaryWriter(str(tmp_path))
    write_projector_embedding(
        writer,
        "landscape/test/coordinates",
        coords,
        {"step": range(6), "loss": [1.0, 0.5, 0.25, 0.125, 0.0625, 1 / 3]},
        global_step=42,
    )
    writer.close()
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "landscape/test/coordinates:00042"' in config
    folder = next(p for p in (tmp_path / "00042").iterdir())
    tensors = np.array(_read_tsv(os.path.join(folder, "tensors.tsv")), dtype=np.float64)
    np.testing.assert_allclose(tensors, coords, rtol=1e-6, atol=1e-6)
    meta = _read_tsv(os.path.join(folder, "metadata.tsv"))
    assert meta[0] == ["step", "loss"]
    assert [row[0] for row in meta[1:]] == [str(i) for i in range(6)]
    assert meta[-1][1] == "0.333333"


def test_non_finite_rows_are_zeroed_and_flagged(tmp_path):
    coords = np.array([[1.0, 2.0], [np.nan, 0.0], [3.0, np.inf]])
    writer = SummaryWriter(str(tmp_path))
    write_projector_embedding(writer, "emb", coords, {"step": [0, 1, 2]}, global_step=0)
    writer.close()
    folder = tmp_path / "00000" / "emb"
    tensors = np.array(_read_tsv(str(folder / "tensors.tsv")), dtype=np.float64)
    np.testing.assert_array_equal(tensors, [[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
    meta = _read_tsv(str(folder / "metadata.tsv"))
    assert meta[0] == ["step", "finite"]
    assert [row[1] for row in meta[1:]] == ["True", "False", "False"]


@pytest.mark.parametrize(
    ("coords", "metadata", "match"),
    [
        (np.zeros((0, 2)), None, "coordinates must be a non-empty 2-D array"),
        (np.zeros((2, 2, 2)), None, "coordinates must be a non-empty 2-D array"),
        (np.zeros((3, 2)), {"step": [0, 1]}, r"metadata\['step'\] must have one value per point"),
    ],
)
def test_bad_input_is_named(tmp_path, coords, metadata, match):
    writer = SummaryWriter(str(tmp_path))
    with pytest.raises(ValueError, match=match):
        write_projector_embedding(writer, "emb", coords, metadata, global_step=0)
    writer.close()


def test_each_tag_keeps_its_latest_embedding_only(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    for step in (10, 20, 30):
        for tag in ("landscape/a/coordinates", "landscape/b/coordinates"):
            coords = np.full((4, 2), float(step))
            write_projector_embedding(writer, tag, coords, {"step": range(4)}, global_step=step)
    writer.close()
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert config.count("tensor_name") == 2
    assert 'tensor_name: "landscape/a/coordinates:00030"' in config
    assert 'tensor_name: "landscape/b/coordinates:00030"' in config
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["00030"]
    for folder in (tmp_path / "00030").iterdir():
        tensors = np.array(_read_tsv(os.path.join(folder, "tensors.tsv")), dtype=np.float64)
        assert np.all(tensors == 30.0)
