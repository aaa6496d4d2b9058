"""Text cards, finding the TensorBoard writer, warning once; import boundary."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

import lightning_landscape.dashboard as dashboard
from lightning_landscape.dashboard import tensorboard_writer, warn_once, write_text
from lightning_landscape.dashboard.writer import _reset_warn_once


def test_write_text_reads_back(writer, read_events) -> None:
    write_text(writer, "landscape/hessian/spectrum_axis", "**x**: signed log", step=2)
    (event,) = read_events().Tensors("landscape/hessian/spectrum_axis/text_summary")
    assert event.step == 2
    assert event.tensor_proto.string_val[0].decode() == "**x**: signed log"
    with pytest.raises(ValueError, match="tag must be a non-empty string; got ''"):
        write_text(writer, "", "x")
    with pytest.raises(ValueError, match="markdown must be a string; got int"):
        write_text(writer, "t", 3)  # type: ignore[arg-type]


def test_tensorboard_writer_finds_the_first_tensorboard_logger(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from torch.utils.tensorboard import SummaryWriter

    tb = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    csv = CSVLogger(save_dir=str(tmp_path), name="csv")
    trainer = SimpleNamespace(loggers=[csv, tb], global_rank=0)
    found = tensorboard_writer(trainer)
    assert isinstance(found, SummaryWriter) and found is tb.experiment
    assert tensorboard_writer(SimpleNamespace(loggers=[csv], global_rank=0)) is None
    assert tensorboard_writer(SimpleNamespace(loggers=[], global_rank=0)) is None
    assert tensorboard_writer(SimpleNamespace(loggers=[tb], global_rank=1)) is None
    tb.experiment.close()


def test_warn_once_warns_once_per_key() -> None:
    _reset_warn_once()
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        assert warn_once("k1", "no TensorBoardLogger: histograms are skipped")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_once("k1", "no TensorBoardLogger: histograms are skipped")
    with pytest.warns(RuntimeWarning, match="other"):
        assert warn_once("k2", "other", category=RuntimeWarning)
    _reset_warn_once()


def test_dashboard_imports_neither_lightning_nor_matplotlib_at_module_level() -> None:
    """Top-level imports only (function-level imports are lazy by design)."""
    package = Path(dashboard.__file__).parent
    for module in package.glob("*.py"):
        tree = ast.parse(module.read_text())
        for node in tree.body:
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root not in {"lightning", "pytorch_lightning", "matplotlib"}, module.name


def test_public_names() -> None:
    assert sorted(dashboard.__all__) == dashboard.__all__
    for name in dashboard.__all__:
        assert hasattr(dashboard, name), name
