"""Whether a monitor's defaults apply to the module, tried at fit start on the first probe batch.

A default that cannot apply (no ``forward``, batches that are not ``(inputs, targets)``, outputs
that are not logits) switches that part of the monitor off with one line saying what to pass;
an argument the user passed that cannot apply raises before the first step. Every rank decides
alike (:func:`~._context.any_rank`), so no rank waits in a collective another one skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from ..embeddings.prediction_trajectory import predict_shard
from ..linalg.per_sample import OutputsFn, describe_error, per_sample_problems
from . import _context as ctx

__all__: list[str] = []

PerSample = Literal["auto", "vmap", "outputs"]


def _per_sample_problems(
    pl_module: LightningModule, batch: Any, loss_fn: Any, train_mode: bool, **options: Any
) -> dict[str, str | None]:
    """Each per-sample path's problem on ``batch`` (None where it works), module isolated."""
    full_batch = None
    with ctx.isolated(pl_module, train_mode=train_mode):
        try:
            # As a training step would have first: state kept on the module (an RNN's hidden
            # state sized for the batch) is what the measurements will meet.
            with torch.no_grad():
                loss_fn(pl_module, batch)
        except Exception as err:
            full_batch = describe_error(err)
        try:
            problems = per_sample_problems(pl_module, loss_fn, batch, **options)
        except torch.OutOfMemoryError:  # no verdict: the measurements will tell
            return {"vmap": None, "outputs": None}
    return {**problems, "vmap": full_batch or problems["vmap"]}


def per_sample_path(
    trainer: Trainer,
    pl_module: LightningModule,
    batch: Any | None,
    *,
    loss_fn: Callable[..., Any],
    outputs_fn: OutputsFn | None,
    per_sample_loss_fn: Callable[..., Any] | None,
    batch_size_fn: Callable[[Any], int] | None,
    train_mode: bool,
    per_sample: PerSample,
) -> PerSample | None:
    """The per-sample path the gradient covariance will take on this module, or None when
    neither applies with the defaults (one warning: the probe covariance is off for the fit).

    Raises:
        ValueError: the user's ``outputs_fn`` is the path left and it does not apply.
    """
    problems: dict[str, str | None] = {"vmap": None, "outputs": None}
    if batch is not None:
        problems = _per_sample_problems(
            pl_module, batch, loss_fn, train_mode, outputs_fn=outputs_fn,
            per_sample_loss_fn=per_sample_loss_fn, batch_size_fn=batch_size_fn,
        )  # fmt: skip
    failed = [ctx.any_rank(trainer, problems[k] is not None, pl_module.device) for k in problems]
    if failed == [True, False] and per_sample == "auto":
        # Decided here, not at the first measurement: single-sample calls may work at step 0
        # and fail once a training step has left its state (an RNN's hidden state).
        rank_zero_warn(
            "GradientCovarianceMonitor: single-sample calls of the loss under vmap fail on "
            f"this module ({problems['vmap'] or 'on another rank'}); per-sample gradients "
            "come from outputs_fn's per-sample losses of the full batch (one Jacobian row "
            "per sample: slower). Pass a loss_fn that works on single samples to avoid it.",
            category=RuntimeWarning,
        )
        return "outputs"
    if not all(failed):
        return per_sample
    why = "; ".join(f"{k}: {v or 'failed on another rank'}" for k, v in problems.items())
    if outputs_fn is not None:
        raise ValueError(
            "GradientCovarianceMonitor: outputs_fn must return (logits (n, C), targets (n,)) "
            f"for per_sample_loss_fn on the training batches; got, on the first probe batch, {why}"
        )
    rank_zero_warn(
        "GradientCovarianceMonitor: no per-sample gradients with the defaults on this module "
        f"({why}); the probe covariance is off for this fit, the training-step noise goes "
        "on. Pass outputs_fn=(lambda model, batch: (logits, targets)) (with "
        "per_sample_loss_fn= if not cross-entropy), or a loss_fn=(lambda model, batch: "
        "loss) that works on single samples.",
    )
    return None


def predictions_apply(
    trainer: Trainer,
    pl_module: LightningModule,
    batch: Any | None,
    *,
    outputs_fn: OutputsFn | None,
    train_mode: bool,
) -> bool:
    """Whether the InPCA monitor's ``outputs_fn`` gives logits on the first probe batch; False
    (one warning: predictions off, the geometry goes on) when the default does not.

    Raises:
        ValueError: the user's ``outputs_fn`` does not apply.
    """
    failure = None
    if batch is not None:
        try:
            with ctx.isolated(pl_module, train_mode=train_mode):
                predict_shard(pl_module, [batch], outputs_fn or ctx.default_outputs)
        except torch.OutOfMemoryError:  # no verdict: the measurements will tell
            pass
        except Exception as err:
            failure = describe_error(err)
    if not ctx.any_rank(trainer, failure is not None, pl_module.device):
        return True
    why = failure or "it failed on another rank"
    if outputs_fn is not None:
        raise ValueError(
            "InPCAMonitor: outputs_fn must return (logits (n, C), integer targets (n,)) on "
            f"the training batches; got, on the first probe batch, {why}"
        )
    rank_zero_warn(
        f"InPCAMonitor: the default outputs_fn does not apply to this module ({why}); "
        "predictions and the InPCA embedding are off for this fit, the trajectory geometry "
        "goes on. Pass outputs_fn=(lambda model, batch: (logits, labels)).",
    )
    return False
