"""InPCAMonitor: the prediction trajectory in InPCA coordinates, and trajectory geometry.

A thin adapter: ``embeddings`` computes, ``sampling.predictions`` stores, ``dashboard`` logs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from .._checks import check_positive_int
from ..dashboard import warn_once
from ..dashboard.inpca import inpca_layout, log_inpca
from ..embeddings.geometry import ANCHORS as _ANCHORS
from ..embeddings.geometry import GeometryTracker, TrajectoryGeometry
from ..embeddings.prediction_trajectory import (
    OutputsFn,
    PredictionSummary,
    PredictionTrajectory,
    ProbePredictions,
    gather_predictions,
    predict_shard,
)
from ..sampling.predictions import PredictionStore, ProbeMismatchError
from . import _context as ctx
from ._applicability import predictions_apply
from ._base import LandscapeMonitor

__all__ = ["InPCAMonitor"]

#: Errors that mean "outputs_fn does not apply to these batches": skip predictions, train on.
_NOT_APPLICABLE = (ValueError, TypeError, IndexError, KeyError, AttributeError)
GEOMETRY_PREFIX = "landscape/geometry"


@dataclass(eq=False)
class _Measurement:
    epoch: int
    predictions: ProbePredictions | None = None  # the whole probe set (every rank)
    geometry: TrajectoryGeometry | None = None


def _is_log_spaced(step: int, per_decade: int) -> bool:
    """True when ``step`` is one of round(10**(k / per_decade)), k = 0, 1, … (or step 0)."""
    if step <= 1:
        return True
    centre = per_decade * math.log10(step)
    lo, hi = math.floor(centre) - 1, math.ceil(centre) + 1
    return any(round(10 ** (k / per_decade)) == step for k in range(lo, hi + 1))


def _check_arguments(
    n_components: Any, log_spaced_per_decade: Any, every_n: tuple[Any, Any], outputs_fn: Any
) -> None:
    """The monitor's own arguments (the base class and the geometry tracker check theirs)."""
    check_positive_int("n_components", n_components)
    check_positive_int("log_spaced_per_decade", log_spaced_per_decade, allow_none=True)
    every_n_steps, every_n_epochs = every_n
    if log_spaced_per_decade is not None and (
        every_n_steps is not None or every_n_epochs is not None
    ):
        raise ValueError(
            "log_spaced_per_decade excludes every_n_steps and every_n_epochs; got "
            f"log_spaced_per_decade={log_spaced_per_decade}, every_n_steps={every_n_steps}, "
            f"every_n_epochs={every_n_epochs}"
        )
    if outputs_fn is not None and not callable(outputs_fn):
        raise ValueError(
            f"outputs_fn must be callable as outputs_fn(model, batch); got {outputs_fn!r}"
        )


class InPCAMonitor(LandscapeMonitor):
    r"""Record predictions on a fixed probe set during ``fit`` and embed them by InPCA.

    Drop-in: ``Trainer(callbacks=[InPCAMonitor()])`` works on an unmodified LightningModule whose
    batches are ``(inputs, labels)``. At every measurement the log-probabilities on the probe set
    (the first ``num_probe_batches`` training batches of each rank, or of ``probe_dataloader``)
    are computed in eval mode, gathered across ranks (padding duplicates recorded once), appended
    to a :class:`~lightning_landscape.sampling.predictions.PredictionStore` in the log directory,
    and the trajectory so far is embedded by InPCA of the per-sample Bhattacharyya distances (Mao
    et al., PNAS 2024; cost ``T · N · C`` per measurement for T checkpoints, N probe samples, C
    classes, plus one T × T eigendecomposition). The start of fit is always recorded: the origin
    of the progress coordinate and of the geometry.

    Trajectory geometry (:class:`~lightning_landscape.embeddings.geometry.GeometryTracker`, Fort
    & Jastrzebski 2019; Yang et al. 2021): distance from initialisation, cosine between successive
    updates and, with the monitor's loss on the probe set, mode connectivity and loss barrier on
    the linear path from the latest checkpoint to each anchor (``"init"``: the first record,
    ``"previous"``: the last). Memory: three parameter vectors, checkpointed;
    ``barrier_grid · len(barrier_anchors)`` probe forward passes per measurement.

    Args:
        n_components: InPCA dimensions logged (explained stress of the top 1 … k).
        every_n_steps: record every ``n`` optimizer steps (step 0 included).
        every_n_epochs: record at the end of every ``n``-th epoch.
        log_spaced_per_decade: record at steps round(10**(k/m)) for m = this value (0, 1, 2, 3,
            …, 10, 13, 16, 20, … for m = 10), like the paper's log-spaced checkpoints.
        max_overhead: wall-time budget share when no schedule is given.
        num_probe_batches: probe batches per rank.
        probe_dataloader: take the probe set from this loader (e.g. a validation loader).
        outputs_fn: ``outputs_fn(model, batch) -> (logits, targets)`` with logits (n, C) and
            integer targets (n,); default ``(model(batch[0]), batch[1])``, for a next-token
            model (logits ``(B, T, C)`` or ``(B*T, C)``, targets ``(B, T)``) one sample per
            position. Tried at fit start on the first probe batch: where the default does not
            apply (no ``forward``, dict batches, outputs that are not logits) the predictions
            are off with one notice (the geometry goes on); an ``outputs_fn`` passed here that
            does not apply raises ``ValueError`` before step 1.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for the path losses; default
            ``training_step``.
        train_mode: measure in train mode instead of eval mode (not deterministic under DDP).
        geometry: log the trajectory geometry.
        barrier_grid: points of the linear-path grid, endpoints included (≥ 3).
        barrier_anchors: anchors of the linear paths, a subset of ``("init", "previous")``.
        store_dir: directory of the prediction store; default
            ``<log_dir>/landscape_inpca/predictions``.
        log_projector: write the coordinates to the projector at epoch ends / end of fit.
        log_figure: write the trajectory figure at epoch ends / end of fit.
        clock: time source for the budget (tests).

    Logged: under ``landscape/inpca/`` (explained stress of the top dimensions, progress,
    probe loss and accuracy, the projector and the trajectory image) and
    ``landscape/geometry/`` (distance from initialisation, successive-update cosine, mode
    connectivity and barriers), on the ``trainer.global_step`` axis; the README's "What you
    see in TensorBoard" lists every tag.
    """

    name = "inpca"

    def __init__(
        self,
        *,
        n_components: int = 3,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        log_spaced_per_decade: int | None = None,
        max_overhead: float = 0.005,
        num_probe_batches: int = 4,
        probe_dataloader: Iterable[Any] | None = None,
        outputs_fn: OutputsFn | None = None,
        loss_fn: Callable[[torch.nn.Module, Any], Tensor] | None = None,
        train_mode: bool = False,
        geometry: bool = True,
        barrier_grid: int = 5,
        barrier_anchors: Sequence[str] = _ANCHORS,
        store_dir: str | None = None,
        log_projector: bool = True,
        log_figure: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, max_overhead=max_overhead,
            num_probe_batches=num_probe_batches, probe_dataloader=probe_dataloader,
            loss_fn=loss_fn, train_mode=train_mode, clock=clock,
        )  # fmt: skip
        _check_arguments(
            n_components, log_spaced_per_decade, (every_n_steps, every_n_epochs), outputs_fn
        )
        # Checks barrier_grid and barrier_anchors; holds the checkpointed w0, w_prev, d_prev.
        self._tracker = GeometryTracker(barrier_grid=barrier_grid, barrier_anchors=barrier_anchors)
        self.n_components = n_components
        self.log_spaced_per_decade = log_spaced_per_decade
        self.outputs_fn = outputs_fn
        self.geometry = bool(geometry)
        self.barrier_grid = barrier_grid
        self.barrier_anchors = self._tracker.anchors
        self.store_dir = store_dir
        self.log_projector = log_projector
        self.log_figure = log_figure
        self._predictions_enabled = True  # checkpointed
        # Rank 0, rebuilt from the store on resume.
        self._store: PredictionStore | None = None
        self._trajectory = PredictionTrajectory()
        self._latest: PredictionSummary | None = None  # the last one with an embedding
        self._written: tuple[int, PredictionSummary] | None = None
        self._write_cost = 0.0

    def _state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            every_n_epochs=self.every_n_epochs,
            log_spaced_per_decade=self.log_spaced_per_decade,
        )

    @property
    def uses_budget(self) -> bool:
        return super().uses_budget and self.log_spaced_per_decade is None

    def _due(self, trainer: Trainer, pl_module: LightningModule, step: int) -> bool:
        if self.log_spaced_per_decade is not None:
            return _is_log_spaced(step, self.log_spaced_per_decade)
        return super()._due(trainer, pl_module, step)

    def _gradient_equivalents(self) -> float:  # a probe forward ≈ a third of a probe gradient
        # A path to each anchor set so far: none at the first measurement (nothing to join).
        anchors = {"init": self._tracker.w0, "previous": self._tracker.w_prev}
        paths = sum(anchors[a] is not None for a in self.barrier_anchors) if self.geometry else 0
        return (1 + self.barrier_grid * paths) / 3.0 + 0.5

    def _what(self) -> str:
        return "the probe predictions" + (" and the trajectory geometry" if self.geometry else "")

    def _layout(self) -> dict[str, dict[str, list[str]]]:
        return inpca_layout(self.tag_prefix, GEOMETRY_PREFIX)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.store_dir is None:
            # trainer.log_dir broadcasts: every rank asks, here, never inside rank-0-only code.
            base = trainer.log_dir or trainer.default_root_dir
            self.store_dir = os.path.join(base, "landscape_inpca", "predictions")
        if trainer.is_global_zero:
            self._reopen_store()
        super().on_train_start(trainer, pl_module)
        if self.last_measured_step is None and self._off is None:
            # The origin of the trajectory (progress coordinate, distance from init).
            self._measure(trainer, pl_module, trainer.global_step)

    @override
    def _check_defaults(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._predictions_enabled:  # checkpointed: the same on every rank
            self._predictions_enabled = predictions_apply(
                trainer, pl_module, self._probe[0] if self._probe else None,
                outputs_fn=self.outputs_fn, train_mode=self.train_mode,
            )  # fmt: skip

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # Only a new embedding is rewritten: with short epochs the projector files and figure
        # would otherwise be rewritten at every epoch end, thousands of times.
        if self._written is None or self._written[1] is not self._latest:
            self._write_embedding(trainer, trainer.global_step)

    def _finish_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super()._finish_fit(trainer, pl_module)
        self._write_embedding(trainer, trainer.global_step)

    def _compute(
        self, pl_module: LightningModule, batches: list[Any], loss_fn: Any, reduce_fn: Any
    ) -> _Measurement:
        trainer = pl_module.trainer
        result = _Measurement(epoch=int(trainer.current_epoch))
        if self._predictions_enabled:
            result.predictions = self._predict(trainer, pl_module, batches)
        if self.geometry:
            result.geometry = self._tracker.update(pl_module, batches, loss_fn, reduce_fn=reduce_fn)
        return result

    def _predict(
        self, trainer: Trainer, pl_module: LightningModule, batches: list[Any]
    ) -> ProbePredictions | None:
        shard, failure = None, None
        try:
            shard = predict_shard(pl_module, batches, self.outputs_fn or ctx.default_outputs)
        except _NOT_APPLICABLE as err:
            failure = f"{type(err).__name__}: {err}"
        # Decided on all ranks alike: the gather below is a collective.
        if ctx.any_rank(trainer, failure is not None, pl_module.device) or shard is None:
            self._predictions_enabled = False
            warn_once(
                f"{self.name}-outputs",
                "InPCAMonitor: outputs_fn does not apply to these batches "
                f"({failure or 'it failed on another rank'}); predictions and the InPCA "
                "embedding are skipped for this run, the trajectory geometry goes on. Pass "
                "outputs_fn=(lambda model, batch: (logits, labels)).",
            )
            return None
        gather = None if ctx.make_reduce(trainer) is None else _all_gather
        return gather_predictions(*shard, gather_fn=gather)

    def _log(self, trainer: Trainer, step: int, result: _Measurement, seconds: float) -> None:
        summary = None
        if result.predictions is not None:
            self._record(step, result.epoch, result.predictions)
            summary = self._trajectory.summary(self.n_components)
            if summary.embedding is not None:
                self._latest = summary
        geometry = result.geometry
        log_inpca(trainer, step, geometry=geometry, predictions=summary, prefix=self.tag_prefix)

    def _record(self, step: int, epoch: int, predictions: ProbePredictions) -> None:
        """Append to the store (opened at the first record) and to the trajectory."""
        if self._store is None and not len(self._trajectory):
            self._open_store(predictions)
        self._trajectory.append(step, epoch, predictions)  # refuses a probe set of a new size
        if self._store is not None:
            try:
                self._store.append(step, predictions.logp, epoch=epoch, loss=predictions.loss)
            except OSError as err:
                warn_once(
                    f"{self.name}-store-write",
                    f"InPCAMonitor: could not write predictions to {self._store.path}: {err}",
                )

    def _open_store(self, predictions: ProbePredictions) -> None:
        assert self.store_dir is not None
        try:
            self._store = PredictionStore.create(
                self.store_dir,
                probe_ids=predictions.ids,
                targets=predictions.targets,
                n_classes=int(predictions.logp.shape[1]),
            )
            stale = self._store.steps()
            if stale:  # a fresh run in a directory an earlier run wrote to
                warn_once(
                    f"{self.name}-stale",
                    f"InPCAMonitor: {self.store_dir} held {len(stale)} records of an earlier run "
                    "(not resumed from a checkpoint); they were removed.",
                )
                self._store.truncate(-1)
        except (OSError, ProbeMismatchError) as err:  # the store must not stop training
            warn_once(
                f"{self.name}-store",
                f"InPCAMonitor: could not create the prediction store at {self.store_dir}: "
                f"{err}; the embedding is kept in memory only.",
            )

    def _reopen_store(self) -> None:
        """On resume: drop records after the checkpoint and reload the trajectory."""
        if self.store_dir is None or self.last_measured_step is None or len(self._trajectory):
            return
        try:
            store = PredictionStore.open(self.store_dir)
        except (OSError, ValueError) as err:
            warn_once(
                f"{self.name}-resume",
                f"InPCAMonitor: could not reopen the prediction store {self.store_dir} ({err}); "
                "the embedding restarts from the resumed step.",
            )
            return
        store.truncate(self.last_measured_step)
        self._store = store
        self._trajectory = PredictionTrajectory.from_records(store.records(), store.targets)

    def _write_embedding(self, trainer: Trainer, step: int) -> None:
        latest, written = self._latest, self._written
        wanted = self.log_projector or self.log_figure
        if not (wanted and trainer.is_global_zero and latest) or (written and written[0] == step):
            return
        clock = self._now
        t0 = clock()
        kinds = {"projector": self.log_projector, "figure": self.log_figure}
        if not log_inpca(trainer, step, embedding=latest, prefix=self.tag_prefix, **kinds):
            return
        self._written = (step, latest)
        # Charged to the budget like the measurement itself, and planned for with the next.
        self._write_cost = clock() - t0
        if self._coord is not None:
            self._coord.record(self.name, self._write_cost)

    def _deferred_cost(self) -> float:
        # Each measurement makes a new embedding, written at the next epoch end (rank 0).
        return self._write_cost

    def _extra_state(self) -> dict[str, Any]:
        return {
            "store_dir": self.store_dir,
            **self._tracker.state_dict(),  # w0, w_prev, d_prev
            "predictions_enabled": self._predictions_enabled,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.store_dir = state.get("store_dir", self.store_dir)
        self._tracker.load_state_dict(state)
        self._predictions_enabled = bool(state.get("predictions_enabled", True))


def _all_gather(t: Tensor) -> Tensor:
    """Concatenate ``t`` (n_rank, ...) over ranks in rank order (shards may differ in length)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    top = max(counts)
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])
