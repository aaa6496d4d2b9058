"""DiffusionMapMonitor: the parameter trajectory of training, embedded by diffusion maps."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import Unpack, override

from .._checks import check_positive_int
from ..dashboard import tensorboard_writer, warn_once
from ..dashboard.diffusion import diffusion_layout, write_diffusion_embedding
from ..embeddings.diffusion import DiffusionMap, DiffusionOptions, DisconnectedGraphError
from ..embeddings.trajectory import TrajectoryEmbedder
from ..sampling.store import Trajectory
from ._base import NUMERICAL_FAILURES, ScheduledMonitor, _final_step, _log_dir
from ._recorder import TrajectoryRecorder

__all__ = ["DiffusionMapMonitor"]

#: Recording interval of ``every_n_steps=None`` in a fit long enough for it.
DEFAULT_EVERY_N_STEPS = 10
#: With ``every_n_steps=None`` a shorter fit records more often, so that the embedded window
#: holds at least this many times the ``n_components + 2`` samples an embedding needs.
SAMPLES_PER_MINIMUM = 2


class DiffusionMapMonitor(ScheduledMonitor):
    """Sample the parameters along training and embed the trajectory with a diffusion map.

    Drop-in: ``Trainer(callbacks=[DiffusionMapMonitor()])`` works on an unmodified
    LightningModule. Every ``every_n_steps`` optimizer steps (step 0 included) the trainable
    parameters (``named_parameters()`` order, buffers excluded, fixed at the first sample) are
    recorded, exactly up to ``exact_max_params`` parameters and as a seeded sparse JL sketch of
    ``sketch_dim`` numbers above (:mod:`lightning_landscape.sampling.sketch`), in a
    :class:`~lightning_landscape.sampling.store.TrajectoryStore` under
    ``<log_dir>/landscape_diffusion/<key>``: a crash loses at most the sample being written, and
    a resumed run cuts the store back to its checkpoint (no gaps, no duplicates). Recording
    reads the weights only: training is bitwise unchanged. With ``sample="gradients"`` the
    minibatch gradient that produced each sampled step is recorded instead (step 0 has none).

    The samples are embedded by
    :class:`~lightning_landscape.embeddings.trajectory.TrajectoryEmbedder` (burn-in, window,
    at most ``max_points`` landmarks plus Nyström, each map rotated onto the previous one, which
    is kept beside the store) on rank 0 at epoch ends and/or every ``embed_every_n_steps``
    steps, and always at the end of fit. With ``embed_every_n_epochs="auto"`` (the default) an
    epoch-end embedding runs only if its predicted cost, plus as much again in reserve for the
    end of fit, keeps the monitor within ``max_overhead`` (5%) and all monitors within 10% of the
    training time so far; ``embed_every_n_epochs=n`` is a reproducible schedule instead.
    Recording and embedding are charged to the budget shared with the other monitors.

    Costs, for D trainable parameters, d = min(D, ``sketch_dim``) numbers per sample (D up to
    ``exact_max_params``) and n samples: recording O(D) time per sample (no D × d matrix), 8·d
    bytes per sample on disk, nothing in memory; an embedding O(m² d + (n − m) m d) for m =
    min(n, ``max_points``) (neighbours exact up to ``exact_max_n`` = 20 000 points).

    DDP: parameters are replicated, so only rank 0 records and embeds; the only collective is
    one barrier that every rank reaches at the end of fit, so nothing can deadlock.

    Args:
        every_n_steps: record a sample every ``n`` optimizer steps. None (default): every 10
            steps, or more often in a fit whose known length (``max_steps``, or epochs ×
            batches) would give fewer than 2 × (``n_components`` + 2) samples in the embedded
            window: every ``max(1, window // (2 * (n_components + 2)))`` steps.
        embed_every_n_epochs: ``"auto"``: at epoch ends when the budget affords it; ``n``: at
            the end of every ``n``-th epoch; None: not at epoch ends.
        embed_every_n_steps: embed every ``n`` steps instead (a multiple of ``every_n_steps``;
            with ``every_n_steps=None`` the interval is a divisor of it).
        sample: ``"parameters"`` or ``"gradients"``.
        n_components: diffusion coordinates / eigenvalues to compute.
        n_neighbors: neighbours per sample in the kNN graph.
        alpha: density normalisation of the diffusion map (1: Laplace–Beltrami).
        epsilon: kernel bandwidth, as :func:`~lightning_landscape.diffusion_map`: ``"auto"``
            (default: one global bandwidth where it serves every sample, else a variable one,
            since SGD steps shrink by orders of magnitude along training), ``"variable"``,
            ``"local"``, ``"median"`` or a number.
        t: diffusion time of the coordinates.
        burn_in_steps: leave out the samples taken before this step.
        window_steps: only embed the samples of the last ``window_steps`` steps.
        max_points: fit the map on at most this many samples (O(max_points² · dim) time).
        sketch_dim: sketch size for models above ``exact_max_params`` parameters.
        exact_max_params: up to this many parameters the samples are exact.
        seed: seeds the sketch and the embedding.
        max_overhead: the budget's share (None: 5%, for the ``"auto"`` embeddings only; given,
            it also gates the scheduled embeddings, never the end-of-fit one).
        log_projector: write the coordinates to the projector (epoch ends and end of fit).
        log_figure: write a figure of the trajectory in the first two coordinates.
        log_histogram: write the eigenvalues to the histogram dashboard.
        directory: folder for the trajectory store instead of the run's log directory.
        clock: time source (tests).
        **diffusion_kwargs: further options of ``diffusion_map`` (``neighbors``,
            ``exact_max_n``, ``disconnected``, ``tol``).

    Logged metrics: under ``landscape/diffusion/`` on the ``trainer.global_step`` axis (the
    diffusion spectrum, ``intrinsic_dim``, ``epsilon``, ``num_samples``, ``num_components``,
    ``seconds``, ``skipped``; a histogram, the trajectory image and the projector coordinates
    with step, epoch and loss); the README's "What you see in TensorBoard" lists them.
    """

    name = "diffusion"

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        embed_every_n_epochs: int | Literal["auto"] | None = "auto",
        embed_every_n_steps: int | None = None,
        sample: Literal["parameters", "gradients"] = "parameters",
        n_components: int = 6,
        n_neighbors: int = 16,
        alpha: float = 1.0,
        epsilon: float | Literal["auto", "variable", "median", "local"] = "auto",
        t: float = 1.0,
        burn_in_steps: int = 0,
        window_steps: int | None = None,
        max_points: int = 1000,
        sketch_dim: int = 4096,
        exact_max_params: int = 8192,
        seed: int = 0,
        max_overhead: float | None = None,
        log_projector: bool = True,
        log_figure: bool = True,
        log_histogram: bool = True,
        directory: str | None = None,
        clock: Callable[[], float] | None = None,
        **diffusion_kwargs: Unpack[DiffusionOptions],
    ) -> None:
        check_positive_int("every_n_steps", every_n_steps, allow_none=True)
        super().__init__(
            every_n_steps=every_n_steps or DEFAULT_EVERY_N_STEPS,
            max_overhead=0.05 if max_overhead is None else max_overhead,
            clock=clock,
        )
        _check_schedule(every_n_steps, embed_every_n_epochs, embed_every_n_steps)
        self.recorder = TrajectoryRecorder(
            sample=sample, sketch_dim=sketch_dim, exact_max_params=exact_max_params, seed=seed
        )
        # Which samples, fitted how and aligned how: the core's options (it checks them).
        self.embedder = TrajectoryEmbedder(
            n_components=n_components,
            n_neighbors=n_neighbors,
            alpha=alpha,
            epsilon=epsilon,
            t=t,
            burn_in_steps=burn_in_steps,
            window_steps=window_steps,
            max_points=max_points,
            seed=seed,
            **diffusion_kwargs,
        )
        # "auto" (the default) puts the epoch-end embeddings on the budget; an explicit
        # schedule replaces it (DESIGN "Cost") unless max_overhead is given as well.
        self.embed_budget = max_overhead is not None
        self.embed_every_n_epochs = embed_every_n_epochs
        self.embed_every_n_steps = embed_every_n_steps
        self.requested_every_n_steps = every_n_steps  # None: adapted to each fit's length
        self.sample = sample
        self.log_projector, self.log_figure = log_projector, log_figure
        self.log_histogram, self.directory = log_histogram, directory
        self._init_state()

    def _init_state(self) -> None:
        # Checkpointed state.
        self.num_embeddings = 0
        self.last_embedded_step: int | None = None
        # (seconds, samples) of the latest embedding: the budget's cost model for the next one.
        self.last_embed_cost: tuple[float, int] | None = None
        # Per-fit objects (ddp_spawn pickles callbacks: nothing opened here).
        self._last_loss: float | torch.Tensor = math.nan
        self._last_result: DiffusionMap | None = None
        self._last: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._projector_written = False

    @property
    def store_dir(self) -> str | None:
        """The folder of the trajectory store (None before the first fit)."""
        return self.recorder.directory

    @property
    def last_result(self) -> DiffusionMap | None:
        """The latest diffusion map computed in this process (None before the first)."""
        return self._last_result

    def _state_key(self) -> str:
        # The key of checkpoints made before the interval adapted: None reads as the default.
        every = self.requested_every_n_steps or DEFAULT_EVERY_N_STEPS
        return self._generate_state_key(every_n_steps=every, sample=self.sample)

    def _layout(self) -> dict[str, dict[str, list[str]]]:
        return diffusion_layout(self.tag_prefix)

    # -- Lightning hooks ---------------------------------------------------------------------
    # Recording reads weights only: no probe set, and manual optimisation and half-precision
    # weights are fine (the sketch upcasts), so the base's setup is all this monitor needs.
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if not trainer.is_global_zero or self._off is not None:
            return
        key = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.state_key)[:120]
        root = self.directory or _log_dir(trainer)
        try:
            self.recorder.open(pl_module, os.path.join(root, "landscape_diffusion", key))
        except OSError as err:  # disk full, read-only: no trajectory this fit, training goes on
            warn_once(
                f"{self.name}-store",
                f"DiffusionMapMonitor: could not open the trajectory store under {root} ({err}); "
                "nothing is recorded in this fit.",
                category=RuntimeWarning,
            )
            return
        last = self.last_measured_step  # the saved embedding, cut back to the checkpoint
        self.embedder.load(self._previous_path(), until_step=-1 if last is None else last)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        total = _final_step(trainer)
        if total is not None and self._off is None:
            if self.requested_every_n_steps is None:
                self.every_n_steps = self._interval_for(total)
            self._check_sample_count(trainer, total)
        super().on_train_start(trainer, pl_module)

    def _window_start(self, total: int) -> int:
        """First step of the window the end-of-fit embedding takes its samples from."""
        start = self.embedder.burn_in_steps
        if self.embedder.window_steps is not None:
            start = max(start, total - self.embedder.window_steps + 1)
        return start

    def _interval_for(self, total: int) -> int:
        """The recording interval of ``every_n_steps=None`` for a fit of ``total`` steps."""
        span = max(total - self._window_start(total) + 1, 1)
        every = min(DEFAULT_EVERY_N_STEPS, max(1, span // (SAMPLES_PER_MINIMUM * self._needed)))
        n = self.embed_every_n_steps
        if n is not None:  # the embeddings fall on recorded steps
            every = max(d for d in range(1, every + 1) if n % d == 0)
        return every

    @property
    def _needed(self) -> int:
        return self.embedder.min_samples

    def _check_sample_count(self, trainer: Trainer, total: int) -> None:
        """Say at the start, not after the fit, when the end-of-fit embedding will lack
        samples (the same notice as :meth:`_embed`'s)."""
        assert self.every_n_steps is not None
        every, start = self.every_n_steps, self._window_start(total)
        # Multiples of the interval in [start, total], and the end-of-fit sample.
        ends = total % every != 0 and total >= start
        count = max(total // every - -(-max(start, 0) // every) + 1, 0) + ends
        if count < self._needed and trainer.is_global_zero:
            warn_once(
                f"{self.name}-few-samples",
                f"DiffusionMapMonitor: this fit of {total} steps will record {count} samples "
                f"(every {self.every_n_steps} steps) in the embedded window, fewer than "
                f"n_components + 2 = {self._needed}: no embedding (record more often with "
                "every_n_steps, or lower burn_in_steps).",
            )

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # Kept as a tensor: reading it (a device sync) waits until a sample is recorded.
            self._last_loss = loss.detach()
        seen = self._seen_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step, n = trainer.global_step, self.embed_every_n_steps
        if step != seen and n is not None and step % n == 0 and step > 0:
            if trainer.is_global_zero:  # the step schedule's embedding, after that step's sample
                self._embed(trainer, step, budget=self.embed_budget, projector=False)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        n, step = self.embed_every_n_epochs, trainer.global_step
        if n is None or not trainer.is_global_zero or step == self.last_embedded_step:
            return
        if n == "auto" or (trainer.current_epoch + 1) % n == 0:
            budget = self.embed_budget or n == "auto"
            self._embed(trainer, step, budget=budget, projector=True)

    def _measure(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """Record one sample (rank 0: parameters are replicated)."""
        self.last_measured_step = step
        if trainer.is_global_zero:
            self._record(trainer, pl_module, step)

    def _finish_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super()._finish_fit(trainer, pl_module)  # the last sample
        step = trainer.global_step
        if trainer.is_global_zero:
            if step != self.last_embedded_step:
                self._embed(trainer, step, budget=False, projector=True)  # always runs
            elif self._last_result is not None and not self._projector_written:
                self._write(trainer, step, plots=False, projector=True)
        self.recorder.close()

    def _record(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        epoch, t0 = trainer.current_epoch, self._now()
        try:
            done = self.recorder.record(pl_module, step=step, epoch=epoch, loss=self._last_loss)
        except OSError as err:  # disk full: the store keeps the samples before, training goes on
            self._skip(trainer, step, err, "sample")
            return
        if done is False:
            self.skipped += 1
            warn_once(
                f"{self.name}-nonfinite",
                f"DiffusionMapMonitor: the {self.sample} at step {step} are not finite; the sample "
                f"is skipped (counted in {self.tag_prefix}/skipped), training goes on.",
                category=RuntimeWarning,
            )
        elif done:
            self.num_measurements += 1
            self._charge(self._now() - t0)

    # -- recording and embedding -------------------------------------------------------------
    def _embed(self, trainer: Trainer, step: int, *, budget: bool, projector: bool) -> None:
        """Embed the samples so far, if affordable when on the ``budget``; log the result."""
        if not self.recorder.is_open:
            return
        clock = self._now
        if budget and not self._affordable():
            return
        announced = self._announce(trainer, step, self._embed_cost())
        t0 = clock()
        traj = self.recorder.load()
        rows = self.embedder.select(traj.steps, step)
        if rows.size < self.embedder.min_samples:
            warn_once(
                f"{self.name}-few-samples",
                f"DiffusionMapMonitor: {rows.size} samples at step {step}, fewer than "
                f"n_components + 2 = {self.embedder.min_samples}; the embedding waits for more "
                "(record more often with every_n_steps, or lower burn_in_steps).",
            )
            return
        self.last_embedded_step = step
        fitted = None
        try:
            fitted = self.embedder.fit(traj.vectors[rows])
        except (*NUMERICAL_FAILURES, DisconnectedGraphError) as err:
            self._skip(trainer, step, err, "embedding")
        seconds = clock() - t0
        if fitted is not None:
            self._accept(trainer, step, traj, rows, fitted, projector=projector)
        self._log_cost(trainer, step, seconds)
        total = clock() - t0
        self.last_embed_cost = (total, int(rows.size))
        self._charge(total)
        self._announce_done(trainer, step, total, announced)

    def _affordable(self) -> bool:
        """Whether the predicted cost (the last embedding's, scaled by the embedder's cost model)
        and as much again for the end of fit fit in the budget (see ``Coordinator.affords``)."""
        if self._coord is None:
            return True
        return self._coord.affords(self.name, self._embed_cost() or 0.0, self.max_overhead)

    def _embed_cost(self) -> float | None:
        """Predicted seconds of an embedding now: the last one's, scaled by the embedder's cost
        model to the samples recorded since (None before the first)."""
        if self.last_embed_cost is None:
            return None
        seconds, n_last = self.last_embed_cost
        return seconds * self.embedder.cost(self.recorder.rows) / self.embedder.cost(n_last)

    def _what(self) -> str:
        return f"the diffusion map of {self.recorder.rows} samples"

    def _accept(
        self,
        trainer: Trainer,
        step: int,
        traj: Trajectory,
        rows: np.ndarray,
        fitted: tuple[np.ndarray, DiffusionMap],
        *,
        projector: bool,
    ) -> None:
        """Align a new embedding to the previous one, keep it (beside the store too) and log it."""
        coords, result = fitted
        steps = traj.steps[rows]
        coords = self.embedder.align(coords, steps, result.eigenvalues)
        if self.recorder.directory is not None:
            try:
                self.embedder.save(self._previous_path())
            except OSError as err:  # a read-only log directory must not stop training
                warn_once(f"{self.name}-save", f"could not save {self._previous_path()}: {err}")
        self._last_result = result
        self._last = (coords, steps, traj.epochs[rows], traj.losses[rows])
        self.num_embeddings += 1
        values = {f"eigenvalue_{i:02d}": float(v) for i, v in enumerate(result.eigenvalues, 1)}
        values.update(intrinsic_dim=result.intrinsic_dim, epsilon=result.epsilon)
        values.update(num_samples=float(rows.size), num_components=float(result.num_components))
        self._log_scalars(trainer, step, values)
        self._projector_written = False
        self._write(trainer, step, plots=True, projector=projector)

    def _previous_path(self) -> str:
        """The last aligned embedding, kept beside the store so a resumed run aligns to it."""
        return os.path.join(str(self.recorder.directory), "last_embedding.npz")

    def _write(self, trainer: Trainer, step: int, *, plots: bool, projector: bool) -> None:
        """The latest embedding to TensorBoard: histogram and figure (``plots``), projector."""
        if self._last is None or self._last_result is None:
            return
        coords, steps, epochs, losses = self._last
        projector = projector and self.log_projector
        meta = {"step": steps.tolist(), "epoch": epochs.tolist(), "loss": losses.tolist()}
        written = write_diffusion_embedding(
            tensorboard_writer(trainer),
            step,
            self._last_result.eigenvalues,
            coords,
            steps,
            prefix=self.tag_prefix,
            any_logger=bool(trainer.loggers),
            histogram=plots and self.log_histogram,
            figure=plots and self.log_figure,
            projector=meta if projector else None,
        )
        self._projector_written = self._projector_written or (projector and written)

    # -- state -------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {
            **self.recorder.state_dict(),
            "num_embeddings": self.num_embeddings,
            "last_embedded_step": self.last_embedded_step,
            "last_embed_cost": self.last_embed_cost,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.recorder.load_state_dict(state)
        self.num_embeddings = int(state.get("num_embeddings", 0))
        self.last_embedded_step = state.get("last_embedded_step")
        cost = state.get("last_embed_cost")
        self.last_embed_cost = (float(cost[0]), int(cost[1])) if cost is not None else None


def _check_schedule(every_n_steps: int | None, n_epochs: Any, n_steps: int | None) -> None:
    """The embedding schedule: ``embed_every_n_epochs`` and ``embed_every_n_steps``."""
    if n_epochs not in ("auto", None) and (
        isinstance(n_epochs, bool) or not isinstance(n_epochs, int) or n_epochs <= 0
    ):
        raise ValueError(
            f"embed_every_n_epochs must be 'auto', a positive integer or None; got {n_epochs!r}"
        )
    check_positive_int("embed_every_n_steps", n_steps, allow_none=True)
    if n_steps is not None and every_n_steps is not None and n_steps % every_n_steps:
        raise ValueError(
            "embed_every_n_steps must be a multiple of every_n_steps "
            f"({every_n_steps}); got {n_steps}"
        )
