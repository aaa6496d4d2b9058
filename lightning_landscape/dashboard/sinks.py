"""Figures, histograms and text for the loggers besides TensorBoard: W&B and MLflow.

The monitors write through one ``SummaryWriter``-like object (:func:`~.writer.tensorboard_writer`).
When a ``WandbLogger`` or an ``MLFlowLogger`` is attached, that object is a :class:`FanOutWriter`:
it passes everything to TensorBoard's writer (if there is one) and mirrors what the other
logger can show: figures as W&B images and MLflow artifacts (``<tag>/step_<step>.png``),
spectrum histograms as W&B histograms, text cards as MLflow text artifacts. What a logger
cannot show is named once, in one line, with where to find it instead. Scalars do not pass
here: they go to every logger through ``trainer.loggers``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from .writer import warn_once

__all__ = ["FanOutWriter", "mirrors_for"]

#: Writer calls that need no mirror: nothing is lost where they are not shown.
_SILENT = frozenset({"add_custom_scalars", "flush", "close"})
#: What each call writes, for the notice.
_WHAT = {
    "add_embedding": "projector embeddings",
    "text": "text cards",
    "histogram": "spectrum histograms",
}


class _Mirror:
    """One non-TensorBoard logger: what it can show, and how."""

    name = "logger"
    shows: frozenset[str] = frozenset()

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def figure(self, tag: str, png: bytes, fig: Any, step: int) -> None:
        raise NotImplementedError

    def histogram(self, tag: str, edges: np.ndarray, counts: np.ndarray, step: int) -> None:
        raise NotImplementedError

    def text(self, tag: str, markdown: str, step: int) -> None:
        raise NotImplementedError


class _Wandb(_Mirror):
    name = "WandbLogger"
    shows = frozenset({"figure", "histogram"})

    def figure(self, tag: str, png: bytes, fig: Any, step: int) -> None:
        from PIL import Image

        self.logger.log_image(key=tag, images=[Image.open(io.BytesIO(png))], step=step)

    def histogram(self, tag: str, edges: np.ndarray, counts: np.ndarray, step: int) -> None:
        import wandb

        hist = wandb.Histogram(np_histogram=(np.asarray(counts), np.asarray(edges)))
        self.logger.log_metrics({tag: hist}, step=step)


class _MLflow(_Mirror):
    name = "MLFlowLogger"
    shows = frozenset({"figure", "text"})

    def figure(self, tag: str, png: bytes, fig: Any, step: int) -> None:
        self.logger.experiment.log_figure(self.logger.run_id, fig, f"{tag}/step_{step:08d}.png")

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.logger.experiment.log_text(self.logger.run_id, markdown, f"{tag}/step_{step:08d}.md")


def mirrors_for(loggers: Sequence[Any]) -> list[_Mirror]:
    """A mirror for each ``WandbLogger`` and ``MLFlowLogger`` among ``loggers``."""
    kinds = {"WandbLogger": _Wandb, "MLFlowLogger": _MLflow}
    found = []
    for logger in loggers:
        for cls in type(logger).__mro__:
            if cls.__name__ in kinds and cls.__module__.split(".")[0] in (
                "lightning",
                "pytorch_lightning",
            ):
                found.append(kinds[cls.__name__](logger))
                break
    return found


class FanOutWriter:
    """A ``SummaryWriter`` stand-in: TensorBoard (if any) plus W&B / MLflow mirrors.

    Args:
        tensorboard: the run's ``SummaryWriter``, or None when no TensorBoardLogger is attached.
        mirrors: from :func:`mirrors_for`.
    """

    def __init__(self, tensorboard: Any, mirrors: Sequence[_Mirror]) -> None:
        self.tensorboard = tensorboard
        self.mirrors = list(mirrors)

    def _fan(self, kind: str, call: Any) -> None:
        for mirror in self.mirrors:
            if kind in mirror.shows:
                call(mirror)
            else:
                _notice(mirror, _WHAT.get(kind, kind), self.tensorboard is not None)

    def add_figure(
        self, tag: str, figure: Any, global_step: int | None = None, close: bool = True
    ) -> None:
        step = int(global_step or 0)
        buf = io.BytesIO()
        figure.savefig(buf, format="png")
        png = buf.getvalue()
        if self.tensorboard is not None:
            self.tensorboard.add_figure(tag, figure, global_step=global_step, close=False)
        self._fan("figure", lambda m: m.figure(tag, png, figure, step))

    def add_histogram_raw(
        self,
        tag: str,
        *,
        min: float,
        bucket_limits: Sequence[float],
        bucket_counts: Sequence[float],
        global_step: int | None = None,
        **kw: Any,
    ) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_histogram_raw(
                tag,
                min=min,
                bucket_limits=bucket_limits,
                bucket_counts=bucket_counts,
                global_step=global_step,
                **kw,
            )
        edges = np.concatenate([[min], np.asarray(bucket_limits, dtype=np.float64)])
        self.histogram(tag, edges, np.asarray(bucket_counts, dtype=np.float64), global_step)

    def histogram(self, tag: str, edges: Any, counts: Any, global_step: int | None) -> None:
        """Mirror a histogram (left edges + last right edge, and counts) to the loggers."""
        step = int(global_step or 0)
        self._fan("histogram", lambda m: m.histogram(tag, edges, counts, step))

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_text(tag, text_string, global_step=global_step)
        step = int(global_step or 0)
        self._fan("text", lambda m: m.text(tag, text_string, step))

    @property
    def _get_file_writer(self) -> Any:
        # The histogram writer's fast path (a plugin tensor summary) when TensorBoard is
        # there; a property raising AttributeError sends it to add_histogram_raw otherwise.
        if self.tensorboard is None:
            raise AttributeError("_get_file_writer")
        return lambda: _SummaryTap(self)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self.tensorboard is not None:
            return getattr(self.tensorboard, name)
        if name not in _SILENT:
            for mirror in self.mirrors:
                _notice(mirror, _WHAT.get(name, name), False)
        return _ignore


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


class _SummaryTap:
    """Passes summaries to TensorBoard's file writer and mirrors histogram-plugin tensors."""

    def __init__(self, fan: FanOutWriter) -> None:
        self.fan = fan

    def add_summary(self, summary: Any, global_step: int | None = None) -> None:
        self.fan.tensorboard._get_file_writer().add_summary(summary, global_step)
        from tensorboard.util import tensor_util

        for value in summary.value:
            if value.metadata.plugin_data.plugin_name != "histograms":
                continue
            buckets = tensor_util.make_ndarray(value.tensor)  # rows [left, right, count]
            edges = np.concatenate([buckets[:, 0], buckets[-1:, 1]])
            self.fan.histogram(value.tag, edges, buckets[:, 2], global_step)


def _notice(mirror: _Mirror, what: str, has_tensorboard: bool) -> None:
    where = (
        "they are in the TensorBoard logs (and `python -m lightning_landscape report`)"
        if has_tensorboard
        else "add a TensorBoardLogger to record them"
    )
    warn_once(
        f"sinks-{mirror.name}-{what}",
        f"lightning_landscape: {mirror.name} cannot show the monitors' {what}; {where}.",
    )
