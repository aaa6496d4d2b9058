"""InPCAMonitor: the prediction trajectory in InPCA coordinates, and trajectory geometry."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from ..dashboard import tensorboard_writer, warn_once, write_figure
from ..dashboard.inpca import inpca_layout, trajectory_figure
from ..dashboard.projector import write_projector_embedding
from ..embeddings.inpca import (
    InPCA,
    bhattacharyya_distances,
    cross_bhattacharyya_distances,
    inpca,
    mode_connectivity,
    progress_coordinate,
)
from ..embeddings.predictions import PredictionStore, ProbeMismatchError, sample_ids
from . import _context as ctx
from ._base import LandscapeMonitor, _check_positive_int

__all__ = ["InPCAMonitor"]

OutputsFn = Callable[[torch.nn.Module, Any], tuple[Tensor, Tensor]]

#: Errors that mean "outputs_fn does not apply to these batches": skip predictions, train on.
_NOT_APPLICABLE = (ValueError, TypeError, IndexError, KeyError, AttributeError)
_ANCHORS = ("init", "previous")
GEOMETRY_PREFIX = "landscape/geometry"


@dataclass(eq=False)
class _Measurement:
    epoch: int
    logp: np.ndarray | None = None  # (N, C) float32 log-probabilities, gathered (rank 0)
    targets: np.ndarray | None = None  # (N,) labels
    ids: np.ndarray | None = None  # (N,) sample ids
    geometry: dict[str, float] = field(default_factory=dict)


def _is_log_spaced(step: int, per_decade: int) -> bool:
    """True when ``step`` is one of round(10**(k / per_decade)), k = 0, 1, … (or step 0)."""
    if step <= 1:
        return True
    centre = per_decade * math.log10(step)
    lo, hi = math.floor(centre) - 1, math.ceil(centre) + 1
    return any(round(10 ** (k / per_decade)) == step for k in range(lo, hi + 1))


class InPCAMonitor(LandscapeMonitor):
    r"""Record predictions on a fixed probe set during ``fit`` and embed them by InPCA.

    Drop-in: ``Trainer(callbacks=[InPCAMonitor()])`` works on an unmodified LightningModule whose
    batches are ``(inputs, labels)``. At every measurement the predicted log-probabilities on
    the probe set (the first ``num_probe_batches`` training batches of each rank, captured at the
    start of fit; pass ``probe_dataloader=`` to probe validation samples instead) are computed in
    eval mode, gathered across ranks, appended to a store in the run's log directory
    (:class:`~lightning_landscape.embeddings.predictions.PredictionStore`, one atomic file per
    checkpoint: a crash loses nothing already written) and the trajectory so far is embedded by
    :func:`~lightning_landscape.embeddings.inpca.inpca` of the per-sample Bhattacharyya distances
    (Mao et al., PNAS 2024). The distance matrix grows by one row per measurement (cost
    ``T · N · C`` for T checkpoints, N probe samples, C classes; the embedding one T × T
    eigendecomposition). The start of fit is always recorded (one forward pass): it is the origin
    of the progress coordinate and of the geometry.

    Trajectory geometry (Fort & Jastrzebski 2019; Yang et al. 2021) on the parameter vector
    (trainable parameters, ``named_parameters()`` order): distance from initialisation, cosine
    between successive updates (between successive recorded checkpoints) and, on the probe set
    with the monitor's loss, mode connectivity
    :math:`mc = \tfrac12(L(w_1)+L(w_2)) - L(\gamma(t^*))` on the linear path from the latest
    checkpoint to each anchor (``"init"``: the first recorded checkpoint, ``"previous"``: the
    last one), and the loss barrier :math:`\max_t L(\gamma(t)) - ((1-t)L(w_1) + tL(w_2))`. The
    path losses are evaluated by writing the interpolated weights into the module and restoring
    them bitwise. Memory: three parameter vectors kept (and checkpointed) for the geometry;
    ``barrier_grid · len(barrier_anchors)`` probe forward passes per measurement.

    Under DDP the probe set is the union of the ranks' shards (DistributedSampler padding
    duplicates are recorded once); all collectives run on every rank; rank 0 writes.

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
            integer targets (n,); default ``(model(batch[0]), batch[1])``. Where it does not
            apply the predictions are skipped with one notice (the geometry goes on).
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

    Logged metrics (step axis = ``trainer.global_step``):
        ``landscape/inpca/explained_stress_top1`` … ``top{n_components}``: explained stress of
        the top k dimensions, :math:`1-\sqrt{1-\sum_{i\le k}\lambda_i^2/\|W\|_F^2}`;
        ``landscape/inpca/n_imaginary``: negative eigenvalues among the top ``n_components``;
        ``landscape/inpca/progress``: progress coordinate from the first record to the labels;
        ``landscape/inpca/probe_loss``, ``probe_accuracy`` (from the recorded predictions),
        ``num_checkpoints``, ``seconds``, ``skipped``;
        projector ``landscape/inpca/coordinates`` (columns step, epoch, loss) and image
        ``landscape/inpca/trajectory`` (top 3 dims) at epoch ends and at the end of fit;
        ``landscape/geometry/distance_from_init``, ``cosine_successive_updates``,
        ``mc_init``, ``mc_previous``, ``barrier_init``, ``barrier_previous``.
    """

    name = "inpca"

    def __init__(
        self,
        *,
        n_components: int = 3,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        log_spaced_per_decade: int | None = None,
        max_overhead: float = 0.02,
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
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            max_overhead=max_overhead,
            num_probe_batches=num_probe_batches,
            probe_dataloader=probe_dataloader,
            loss_fn=loss_fn,
            train_mode=train_mode,
            clock=clock,
        )
        _check_positive_int("n_components", n_components)
        _check_positive_int("log_spaced_per_decade", log_spaced_per_decade, allow_none=True)
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
        _check_positive_int("barrier_grid", barrier_grid)
        if barrier_grid < 3:
            raise ValueError(
                f"barrier_grid must be at least 3 (endpoints + one); got {barrier_grid}"
            )
        anchors = tuple(barrier_anchors)
        if isinstance(barrier_anchors, str) or not set(anchors) <= set(_ANCHORS):
            raise ValueError(
                f"barrier_anchors must be a subset of {_ANCHORS}; got {barrier_anchors!r}"
            )
        self.n_components = n_components
        self.log_spaced_per_decade = log_spaced_per_decade
        self.outputs_fn = outputs_fn
        self.geometry = bool(geometry)
        self.barrier_grid = barrier_grid
        self.barrier_anchors = anchors
        self.store_dir = store_dir
        self.log_projector = log_projector
        self.log_figure = log_figure
        # Checkpointed.
        self._w0: Tensor | None = None
        self._w_prev: Tensor | None = None
        self._d_prev: Tensor | None = None
        self._predictions_enabled = True
        # Rank 0, rebuilt from the store on resume.
        self._store: PredictionStore | None = None
        self._logps: list[np.ndarray] = []
        self._steps: list[int] = []
        self._epochs: list[int] = []
        self._losses: list[float] = []
        self._targets: np.ndarray | None = None
        self._D: np.ndarray | None = None
        self._embedding: InPCA | None = None
        self._written_step: int | None = None
        self._written_embedding: InPCA | None = None
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

    # -- schedule ------------------------------------------------------------------------------
    def _due(self, trainer: Trainer, pl_module: LightningModule, step: int) -> bool:
        if self.log_spaced_per_decade is not None:
            return _is_log_spaced(step, self.log_spaced_per_decade)
        return super()._due(trainer, pl_module, step)

    def _gradient_equivalents(self) -> float:
        # A probe forward pass costs about a third of a probe gradient.
        forwards = 1 + (self.barrier_grid * len(self.barrier_anchors) if self.geometry else 0)
        return forwards / 3.0 + 0.5

    def _layout(self) -> dict[str, dict[str, list[str]]]:
        return inpca_layout(self.tag_prefix, GEOMETRY_PREFIX)

    # -- hooks ---------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.store_dir is None:
            # trainer.log_dir broadcasts: every rank asks, here, never inside rank-0-only code.
            self.store_dir = self._default_store_dir(trainer)
        if trainer.is_global_zero:
            self._open_store_for_resume(trainer)
        super().on_train_start(trainer, pl_module)
        if self.last_measured_step is None:
            # The origin of the trajectory (progress coordinate, distance from init).
            self._measure(trainer, pl_module, trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # Only a new embedding is rewritten: with short epochs the projector files and figure
        # would otherwise be rewritten at every epoch end, thousands of times.
        if self._embedding is not self._written_embedding:
            self._write_embedding(trainer, trainer.global_step)

    def _finish_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super()._finish_fit(trainer, pl_module)
        self._write_embedding(trainer, trainer.global_step)

    # -- measurement ---------------------------------------------------------------------------
    def _compute(
        self, pl_module: LightningModule, batches: list[Any], loss_fn: Any, reduce_fn: Any
    ) -> _Measurement:
        trainer = pl_module.trainer
        result = _Measurement(epoch=int(trainer.current_epoch))
        if self._predictions_enabled:
            self._predict(trainer, pl_module, batches, result)
        if self.geometry:
            result.geometry = self._geometry(pl_module, batches, loss_fn, reduce_fn)
        return result

    def _predict(
        self, trainer: Trainer, pl_module: LightningModule, batches: list[Any], out: _Measurement
    ) -> None:
        outputs_fn = self.outputs_fn or ctx.default_outputs
        logps, targets, ids = [], [], []
        failure: str | None = None
        try:
            with torch.no_grad():
                for batch in batches:
                    logits, y = outputs_fn(pl_module, batch)
                    if not isinstance(logits, Tensor) or logits.ndim != 2:
                        raise ValueError(f"logits must be an (n, C) tensor; got {_shape(logits)}")
                    if (
                        not isinstance(y, Tensor)
                        or y.ndim != 1
                        or y.shape[0] != logits.shape[0]
                        or y.is_floating_point()
                    ):
                        raise ValueError(
                            f"targets must be n integer labels; got {_shape(y)} for logits "
                            f"{tuple(logits.shape)}"
                        )
                    logps.append(torch.log_softmax(logits.double(), dim=-1))
                    targets.append(y.long())
                    x = batch[0] if isinstance(batch, (list, tuple)) else None
                    ids.append(_id_tensor(x, y, len(ids), pl_module.device))
        except _NOT_APPLICABLE as err:
            failure = f"{type(err).__name__}: {err}"
        if ctx.any_rank(trainer, failure is not None, pl_module.device):
            self._predictions_enabled = False
            warn_once(
                f"{self.name}-outputs",
                "InPCAMonitor: outputs_fn does not apply to these batches "
                f"({failure or 'it failed on another rank'}); predictions and the InPCA "
                "embedding are skipped for this run, the trajectory geometry goes on. Pass "
                "outputs_fn=(lambda model, batch: (logits, labels)).",
            )
            return
        logp = _gather(torch.cat(logps), trainer)
        y = _gather(torch.cat(targets), trainer)
        sid = _gather(torch.cat(ids), trainer)
        if not torch.isfinite(logp).all():
            raise FloatingPointError("non-finite predictions (NaN or inf logits)")
        if trainer.is_global_zero:
            sid_np = sid.cpu().numpy()
            _, first = np.unique(sid_np, return_index=True)
            keep = np.sort(first)  # DistributedSampler padding repeats samples: keep one
            out.logp = logp.cpu().numpy()[keep].astype(np.float32)
            out.targets = y.cpu().numpy()[keep]
            out.ids = np.array([f"{v & 0xFFFFFFFFFFFFFFFF:016x}" for v in sid_np[keep].tolist()])

    def _geometry(
        self, pl_module: LightningModule, batches: list[Any], loss_fn: Any, reduce_fn: Any
    ) -> dict[str, float]:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        with torch.no_grad():
            w = torch.cat([p.detach().reshape(-1) for p in params]).clone()
        values: dict[str, float] = {}
        w0 = self._w0.to(w) if self._w0 is not None else w
        values["distance_from_init"] = float(torch.linalg.vector_norm(w - w0))
        delta = None
        if self._w_prev is not None:
            delta = w - self._w_prev.to(w)
            if self._d_prev is not None:
                prev = self._d_prev.to(w)
                denom = float(torch.linalg.vector_norm(delta) * torch.linalg.vector_norm(prev))
                if denom > 0:
                    values["cosine_successive_updates"] = float(delta @ prev) / denom
        anchors = {"init": self._w0, "previous": self._w_prev}
        ts = np.linspace(0.0, 1.0, self.barrier_grid)
        for name in self.barrier_anchors:
            anchor = anchors[name]
            if anchor is None:
                continue
            a = anchor.to(w)
            if torch.equal(a, w):
                continue
            losses = [
                _probe_loss(pl_module, params, (1 - t) * w + t * a, batches, loss_fn, reduce_fn)
                for t in ts
            ]
            values[f"mc_{name}"] = mode_connectivity(losses, ts)
            chord = (1 - ts) * losses[0] + ts * losses[-1]
            values[f"barrier_{name}"] = float(np.max(np.asarray(losses) - chord))
        # The geometry state moves on only after everything above succeeded.
        if self._w0 is None:
            self._w0 = w.cpu()
        if delta is not None and float(torch.linalg.vector_norm(delta)) > 0:
            self._d_prev = delta.cpu()
        self._w_prev = w.cpu()
        return values

    def _log(self, trainer: Trainer, step: int, result: _Measurement, seconds: float) -> None:
        if result.geometry:
            metrics = {f"{GEOMETRY_PREFIX}/{k}": float(v) for k, v in result.geometry.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        if result.logp is None or result.targets is None or result.ids is None:
            return
        self._record(trainer, step, result)
        values: dict[str, float] = {"num_checkpoints": float(len(self._logps))}
        logp, y = result.logp, result.targets
        values["probe_loss"] = float(-np.mean(logp[np.arange(y.size), y]))
        values["probe_accuracy"] = float(np.mean(logp.argmax(axis=1) == y))
        values["progress"] = float(progress_coordinate(logp, self._logps[0], y, log=True))
        if self._D is not None and self._D.shape[0] >= 2:
            k = min(self.n_components, self._D.shape[0])
            emb = inpca(self._D, n_components=k)
            self._embedding = emb
            for i, v in enumerate(emb.explained_stress_cumulative, 1):
                values[f"explained_stress_top{i}"] = float(v)
            values["n_imaginary"] = float(emb.n_imaginary)
        self._log_scalars(trainer, step, values)

    def _record(self, trainer: Trainer, step: int, result: _Measurement) -> None:
        """Append to the store and to the in-memory trajectory; grow the distance matrix."""
        assert result.logp is not None and result.ids is not None
        if self._store is None and self._logps == []:
            self._open_store(trainer, result)
        if self._targets is None:
            self._targets = result.targets
        if self._logps and self._logps[0].shape != result.logp.shape:
            raise FloatingPointError(
                "the probe set changed size during the run; InPCA needs a fixed probe set"
            )
        loss = float(-np.mean(result.logp[np.arange(result.targets.size), result.targets]))
        if self._store is not None:
            try:
                self._store.append(step, result.logp, epoch=result.epoch, loss=loss)
            except OSError as err:
                warn_once(
                    f"{self.name}-store-write",
                    f"InPCAMonitor: could not write predictions to {self._store.path}: {err}",
                )
        row = (
            cross_bhattacharyya_distances(
                result.logp[None], np.stack(self._logps), log=True, dtype=torch.float64
            )[0]
            if self._logps
            else np.zeros(0)
        )
        n = len(self._logps)
        D = np.zeros((n + 1, n + 1))
        if self._D is not None and n:
            D[:n, :n] = self._D
        D[n, :n] = D[:n, n] = row
        self._D = D
        self._logps.append(result.logp)
        self._steps.append(step)
        self._epochs.append(result.epoch)
        self._losses.append(loss)

    # -- store ---------------------------------------------------------------------------------
    def _default_store_dir(self, trainer: Trainer) -> str:
        base = trainer.log_dir or trainer.default_root_dir
        return os.path.join(base, "landscape_inpca", "predictions")

    def _open_store(self, trainer: Trainer, result: _Measurement) -> None:
        assert self.store_dir is not None
        try:
            self._store = PredictionStore.create(
                self.store_dir,
                probe_ids=result.ids,
                targets=result.targets,
                n_classes=int(result.logp.shape[1]),
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

    def _open_store_for_resume(self, trainer: Trainer) -> None:
        """On resume: drop records after the checkpoint and reload the trajectory."""
        if self.store_dir is None or self.last_measured_step is None or self._logps:
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
        records = store.records()
        self._store = store
        self._targets = store.targets
        for r in records:
            self._logps.append(r.logp)
            self._steps.append(r.step)
            self._epochs.append(r.epoch)
            self._losses.append(r.loss)
        if len(records) >= 2:
            self._D = bhattacharyya_distances(np.stack(self._logps), log=True, dtype=torch.float64)
        elif records:
            self._D = np.zeros((1, 1))

    # -- projector and figure ------------------------------------------------------------------
    def _write_embedding(self, trainer: Trainer, step: int) -> None:
        if not trainer.is_global_zero or self._embedding is None or self._written_step == step:
            return
        if not (self.log_projector or self.log_figure):
            return
        writer = tensorboard_writer(trainer)
        if writer is None:
            warn_once(
                f"{self.name}-no-tensorboard",
                "InPCAMonitor: no TensorBoardLogger among trainer.loggers; scalars are logged, "
                "the projector embedding and the trajectory figure are not.",
            )
            return
        clock = self._now
        t0 = clock()
        self._written_step = step
        self._written_embedding = self._embedding
        emb = self._embedding
        n = emb.coordinates.shape[0]
        steps, epochs = self._steps[:n], self._epochs[:n]
        if self.log_projector:
            write_projector_embedding(
                writer,
                f"{self.tag_prefix}/coordinates",
                emb.coordinates,
                {"step": steps, "epoch": epochs, "loss": self._losses[:n]},
                global_step=step,
            )
        if self.log_figure:
            k = emb.coordinates.shape[1]
            fig = trajectory_figure(
                emb.coordinates,
                steps=np.asarray(steps),
                eigenvalues=emb.eigenvalues[: min(3, k)],
                explained_stress=float(emb.explained_stress_cumulative[min(3, k) - 1]),
                title=f"InPCA trajectory up to step {step}",
            )
            write_figure(writer, f"{self.tag_prefix}/trajectory", fig, step)
        # Charged to the budget like the measurement itself, and planned for with the next.
        self._write_cost = clock() - t0
        if self._coord is not None:
            self._coord.record(self.name, self._write_cost)

    def _deferred_cost(self) -> float:
        # Each measurement makes a new embedding, written at the next epoch end (rank 0).
        return self._write_cost

    # -- state ---------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {
            "store_dir": self.store_dir,
            "w0": self._w0,
            "w_prev": self._w_prev,
            "d_prev": self._d_prev,
            "predictions_enabled": self._predictions_enabled,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.store_dir = state.get("store_dir", self.store_dir)
        self._w0 = state.get("w0")
        self._w_prev = state.get("w_prev")
        self._d_prev = state.get("d_prev")
        self._predictions_enabled = bool(state.get("predictions_enabled", True))


def _shape(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _id_tensor(x: Any, y: Tensor, batch_index: int, device: torch.device) -> Tensor:
    """64-bit content ids of a batch's samples (inputs and label), as an int64 tensor."""
    if isinstance(x, Tensor) and x.ndim >= 1 and x.shape[0] == y.shape[0]:
        hexes = sample_ids(x.detach().cpu().numpy(), y.detach().cpu().numpy())
    else:  # no input tensor to hash: the position in the probe set stands in
        idx = np.stack([np.full(y.shape[0], batch_index), np.arange(y.shape[0])], axis=1)
        hexes = sample_ids(idx, y.detach().cpu().numpy())
    vals = np.array([int(h, 16) for h in hexes], dtype=np.uint64).view(np.int64)
    return torch.as_tensor(vals, device=device)


def _gather(t: Tensor, trainer: Trainer) -> Tensor:
    """Concatenate ``t`` (n_rank, ...) over ranks in rank order (shards may differ in length)."""
    if ctx.make_reduce(trainer) is None:
        return t
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


def _probe_loss(
    pl_module: torch.nn.Module,
    params: list[torch.nn.Parameter],
    w: Tensor,
    batches: list[Any],
    loss_fn: Any,
    reduce_fn: Any,
) -> float:
    """Sample-weighted mean loss over the probe set (all ranks) at flat weights ``w``.

    The weights are written into the module and restored bitwise afterwards.
    """
    saved = [p.detach().clone() for p in params]
    total = torch.zeros(2, dtype=torch.float64, device=w.device)
    try:
        with torch.no_grad():
            offset = 0
            for p in params:
                p.copy_(w[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            for batch in batches:
                n = _batch_size(batch)
                loss = loss_fn(pl_module, batch)
                total[0] += float(loss) * n
                total[1] += n
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    if reduce_fn is not None:
        total = reduce_fn(total)
    value = float(total[0] / total[1])
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite probe loss on the linear path ({value})")
    return value


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, Tensor) and item.ndim:
                return int(item.shape[0])
    return 1
