"""Finding the run's TensorBoard writer, and warning once when there is none.

Lightning is imported inside the functions, so importing the dashboard does not import it.
"""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["mark_resumed", "missing_tensorboard", "tensorboard_writer", "warn_once"]

_warned_keys: set[str] = set()
_warned_lock = threading.Lock()


def tensorboard_writer(trainer: Any) -> SummaryWriter | Any | None:
    """Where the monitors write histograms, figures, text and layouts.

    The ``SummaryWriter`` of the first ``TensorBoardLogger`` in ``trainer.loggers``; when a
    ``WandbLogger`` or ``MLFlowLogger`` is attached too (or instead), a
    :class:`~lightning_landscape.dashboard.sinks.FanOutWriter` that also mirrors what those
    can show. Scalars go through ``trainer.loggers`` (any logger) instead.

    Args:
        trainer: A ``lightning.pytorch.Trainer``.

    Returns:
        The writer on global rank 0; None on other ranks (rank 0 logs, and their logger holds
        only a no-op stand-in) or when no TensorBoard, W&B or MLflow logger is attached.
    """
    import sys

    from lightning.pytorch.loggers import TensorBoardLogger

    kinds: tuple[type, ...] = (TensorBoardLogger,)
    if "pytorch_lightning" in sys.modules:  # the standalone package's Trainer and loggers
        from pytorch_lightning.loggers import TensorBoardLogger as StandaloneTensorBoardLogger

        kinds += (StandaloneTensorBoardLogger,)
    if getattr(trainer, "global_rank", 0) != 0:
        return None
    from .sinks import FanOutWriter, mirrors_for

    loggers = list(getattr(trainer, "loggers", None) or ())
    tensorboard = next((lg.experiment for lg in loggers if isinstance(lg, kinds)), None)
    mirrors = mirrors_for(loggers)
    return FanOutWriter(tensorboard, mirrors) if mirrors else tensorboard


def mark_resumed(writer: Any, step: int) -> None:
    """Tell TensorBoard's readers that the run restarts at ``step``: they drop what an earlier
    process of the run wrote at ``step`` and later, which a run resumed from a checkpoint writes
    again (a session-log START event; TensorBoard's own restart marker).

    Without it a step measured after the last checkpoint and before a crash shows twice. Raw
    event files keep both copies; readers that ignore the marker see them.

    Args:
        writer: from :func:`tensorboard_writer` (a ``SummaryWriter`` or a ``FanOutWriter``).
        step: the first step the resumed run writes again.
    """
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    summary_writer = getattr(writer, "tensorboard", writer)  # a FanOutWriter's TensorBoard part
    get = getattr(summary_writer, "_get_file_writer", None)
    if get is not None:
        event = Event(step=int(step), session_log=SessionLog(status=SessionLog.START))
        get().add_event(event)


def missing_tensorboard(key: str, monitor: str, what: str, *, any_logger: bool) -> None:
    """Say once what is and is not recorded when no TensorBoard (or W&B / MLflow) writer is
    there: with another logger the scalars are; with no logger at all, nothing is."""
    if any_logger:
        told = f"scalars are logged, {what} are not"
    else:
        told = f"and no logger at all: neither scalars nor {what} are recorded (add a logger)"
    warn_once(key, f"{monitor}: no TensorBoardLogger among trainer.loggers; {told}.")


def warn_once(key: str, message: str, *, category: type[Warning] = UserWarning) -> bool:
    """Warn with ``message`` the first time ``key`` is seen in this process, on rank 0 only.

    Args:
        key: Identifies the warning, e.g. ``"landscape/hessian/no-tensorboard"``.
        message: The warning text.
        category: Warning class.

    Returns:
        True if this call warned (first time for ``key``), False otherwise.
    """
    with _warned_lock:
        if key in _warned_keys:
            return False
        _warned_keys.add(key)
    try:
        from lightning.pytorch.utilities import rank_zero_warn
    except ImportError:  # pragma: no cover - lightning is a dependency
        warnings.warn(message, category=category, stacklevel=2)
    else:
        rank_zero_warn(message, category=category, stacklevel=3)
    return True


def _reset_warn_once() -> None:
    """Forget which keys have warned (for tests)."""
    with _warned_lock:
        _warned_keys.clear()
