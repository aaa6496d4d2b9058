"""TensorBoard projector: embedding coordinates with per-point metadata (step, epoch, loss, ...).

Projector embeddings are files beside the event files (``<logdir>/<step>/<tag>/tensors.tsv``,
``metadata.tsv`` and one entry in ``projector_config.pbtxt``), not events, so monitors rewrite them
only at epoch ends or at the end of fit (docs/design.md, "Logging"). Each tag keeps its latest
embedding only: the projector lists one tensor per monitor, not one per epoch, most of them stale.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["write_projector_embedding"]


def write_projector_embedding(
    writer: SummaryWriter,
    tag: str,
    coordinates: Any,
    metadata: Mapping[str, Sequence[Any]] | None = None,
    *,
    global_step: int,
) -> None:
    """Write ``coordinates`` (n × k) to the projector, one row per point, with metadata columns.

    Args:
        writer: The run's ``SummaryWriter``.
        tag: Embedding name shown in the projector, e.g. ``"landscape/diffusion/coordinates"``.
        coordinates: Array-like of shape (n, k), k ≥ 1; non-finite rows are written as zeros
            (the projector refuses NaN) and flagged in a ``finite`` metadata column.
        metadata: ``{column: values}``, each of length n (step, epoch, loss, ...). Values are
            written as text; tabs and newlines are replaced by spaces.
        global_step: Step the embedding describes (it names the folder).

    Raises:
        ValueError: If ``coordinates`` is not 2-D with at least one row, or a metadata column's
            length differs from the number of rows.
    """
    import torch

    coords = np.asarray(coordinates, dtype=np.float64)
    if coords.ndim == 1:
        coords = coords[:, None]
    if coords.ndim != 2 or coords.shape[0] == 0 or coords.shape[1] == 0:
        raise ValueError(
            f"coordinates must be a non-empty 2-D array (n points × k dims); got shape "
            f"{coords.shape}"
        )
    n = coords.shape[0]
    columns: dict[str, list[str]] = {}
    for name, values in (metadata or {}).items():
        values = list(values)
        if len(values) != n:
            raise ValueError(
                f"metadata[{name!r}] must have one value per point ({n}); got {len(values)}"
            )
        columns[str(name)] = [_cell(v) for v in values]
    finite = np.isfinite(coords).all(axis=1)
    if not finite.all():
        columns["finite"] = [str(bool(f)) for f in finite]
        coords = np.where(finite[:, None], coords, 0.0)
    # The projector wants at least two metadata columns for a header; one column is written
    # without a header.
    if len(columns) >= 2:
        header = list(columns)
        rows = [[columns[c][i] for c in header] for i in range(n)]
        writer.add_embedding(
            torch.as_tensor(coords, dtype=torch.float32),
            metadata=rows,
            metadata_header=header,
            tag=tag,
            global_step=global_step,
        )
    else:
        rows_1d = next(iter(columns.values())) if columns else None
        writer.add_embedding(
            torch.as_tensor(coords, dtype=torch.float32),
            metadata=rows_1d,
            tag=tag,
            global_step=global_step,
        )

    _keep_latest(writer, tag)


def _keep_latest(writer: Any, tag: str) -> None:
    """Drop the earlier embeddings of ``tag`` (their folders and config entries).

    ``SummaryWriter.add_embedding`` keeps its projector config in memory and rewrites the file
    at each call; the earlier entries of ``tag`` are removed from it and the file rewritten.
    """
    writer = getattr(writer, "tensorboard", None) or writer  # a fan-out writer's TensorBoard
    config = getattr(writer, "_projector_config", None)
    get_logdir = getattr(writer, "get_logdir", None)
    if config is None or get_logdir is None:
        return
    mine = [e for e in config.embeddings if e.tensor_name.rsplit(":", 1)[0] == tag]
    if len(mine) < 2:
        return
    logdir = get_logdir()
    for old in mine[:-1]:
        folder = os.path.join(logdir, os.path.dirname(old.tensor_path))
        shutil.rmtree(folder, ignore_errors=True)
        step_dir = os.path.dirname(folder)
        if os.path.isdir(step_dir) and not os.listdir(step_dir):
            os.rmdir(step_dir)
        config.embeddings.remove(old)
    from google.protobuf import text_format
    from torch.utils.tensorboard._embedding import write_pbtxt

    write_pbtxt(logdir, text_format.MessageToString(config))


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        text = f"{float(value):.6g}"
    else:
        text = str(value)
    return text.replace("\t", " ").replace("\n", " ")
