"""Fixtures shared by the whole suite."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import lightning_utilities.core.rank_zero as rank_zero
import pytest
from lightning.pytorch.loggers import Logger, TensorBoardLogger


@pytest.fixture
def make_trainer(tmp_path) -> Callable[..., L.Trainer]:
    """A factory for the quiet, deterministic single-CPU Trainer the monitor tests use.

    ``make_trainer(callbacks, max_steps=12, logger=True, root=None, **kw)``: ``logger=True`` is
    a TensorBoardLogger writing to ``root/version_0``; pass a logger, a list, or ``False``
    instead. ``root`` (default ``tmp_path``) is also the ``default_root_dir``. Checkpointing,
    the progress bar, the model summary and sanity checking are off, and the fit deterministic,
    unless a keyword says otherwise; every keyword goes to :class:`lightning.Trainer`.
    """

    def factory(
        callbacks: Sequence[Any] = (),
        *,
        max_steps: int = 12,
        logger: bool | Logger | Sequence[Logger] = True,
        root: str | os.PathLike[str] | None = None,
        **kw: Any,
    ) -> L.Trainer:
        root = str(tmp_path if root is None else root)
        if logger is True:
            logger = TensorBoardLogger(root, name="", version=0)
        quiet = {
            "enable_checkpointing": False,
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": root,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "deterministic": True,
        }
        return L.Trainer(
            max_steps=max_steps, logger=logger, callbacks=list(callbacks), **{**quiet, **kw}
        )

    return factory


@pytest.fixture
def said():
    """The lines given through ``rank_zero_info`` during the test."""
    lines: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = _Keep(level=logging.INFO)
    rank_zero.log.addHandler(handler)
    yield lines
    rank_zero.log.removeHandler(handler)
