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
from ..dashboard.diffusion import diffusion_layout, diffusion_scalars, write_diffusion_embedding
from ..embeddings.diffusion import DiffusionMap, DiffusionOptions, DisconnectedGraphError
from ..embeddings.trajectory import TrajectoryEmbedder
from ..sampling.store import Trajectory
from ._base import NUMERICAL_FAILURES, ScheduledMonitor, _final_step, _log_dir
from ._diffusion_plan import EmbedCost, check_sample_count, check_schedule, end_plan, few_samples
from ._fixed_costs import say
from ._recorder import TrajectoryRecorder
from ._thinning import RECORDING_SHARE, SAMPLES_PER_MINIMUM, Thinning, recording_interval

__all__ = ["DiffusionMapMonitor"]

#: Recording interval of ``every_n_steps=None`` in a fit long enough for it.
DEFAULT_EVERY_N_STEPS = 10


class DiffusionMapMonitor(ScheduledMonitor):
    """Sample the parameters along training and embed the trajectory with a diffusion map.

    Drop-in: ``Trainer(callbacks=[DiffusionMapMonitor()])`` works on an unmodified
    LightningModule. Every ``every_n_steps`` optimizer steps the trainable parameters are
    recorded (exactly up to ``exact_max_params``, else a seeded sparse JL sketch of
    ``sketch_dim`` numbers) in a :class:`~lightning_landscape.sampling.store.TrajectoryStore`
    under ``<log_dir>/landscape_diffusion/<key>`` (crash-safe, cut back to the checkpoint on
    resume); ``sample="gradients"`` records the minibatch gradients instead. Recording reads
    the weights only: training is bitwise unchanged.

    The samples are embedded by
    :class:`~lightning_landscape.embeddings.trajectory.TrajectoryEmbedder` (burn-in, window,
    landmarks plus Nyström, each map rotated onto the previous one) at epoch ends the budget
    affords (``embed_every_n_epochs="auto"``), on a fixed schedule if given, and always at the
    end of fit, then on fewer landmarks (or landmarks only) if the budget affords no more.

    Costs (D parameters, d = min(D, ``sketch_dim``), n samples, m = min(n, ``max_points``)),
    charged to the budget all monitors share: recording O(D) a sample and 8·d bytes on disk; an
    embedding O(m² d + (n − m) m d). DDP: parameters are replicated, so only rank 0 records
    and embeds (no collective but the end barrier).

    Args:
        every_n_steps: record a sample every ``n`` optimizer steps. None (default): every 10
            steps, more often in a fit too short to leave 2 × (``n_components`` + 2) samples
            in the embedded window (:meth:`TrajectoryEmbedder.recording_interval`).
        embed_every_n_epochs: ``"auto"`` (epoch ends the budget affords), ``n`` or None.
        embed_every_n_steps: embed every ``n`` steps instead (a multiple of ``every_n_steps``).
        sample: ``"parameters"`` or ``"gradients"``.
        n_components: diffusion coordinates / eigenvalues to compute.
        n_neighbors: neighbours per sample in the kNN graph.
        alpha, epsilon, t: density normalisation (1: Laplace–Beltrami), kernel bandwidth
            and diffusion time, as :func:`~lightning_landscape.diffusion_map`.
        burn_in_steps: leave out the samples taken before this step.
        window_steps: only embed the samples of the last ``window_steps`` steps.
        max_points: fit the map on at most this many samples (O(max_points² · dim) time).
        sketch_dim: sketch size for models above ``exact_max_params`` parameters.
        exact_max_params: up to this many parameters the samples are exact.
        seed: seeds the sketch and the embedding.
        max_overhead: the budget's share (None: 2% for the ``"auto"`` embeddings; given, it
            also gates scheduled ones).
        log_projector, log_figure, log_histogram: write the coordinates to the projector, the
            trajectory figure, the eigenvalues to the histogram dashboard.
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
            max_overhead=0.02 if max_overhead is None else max_overhead,
            clock=clock,
        )
        check_schedule(every_n_steps, embed_every_n_epochs, embed_every_n_steps)
        self.recorder = TrajectoryRecorder(
            sample=sample, sketch_dim=sketch_dim, exact_max_params=exact_max_params, seed=seed
        )
        # Which samples, fitted how and aligned how: the core's options (it checks them).
        self.embedder = TrajectoryEmbedder(
            n_components=n_components, n_neighbors=n_neighbors, alpha=alpha, epsilon=epsilon,
            t=t, burn_in_steps=burn_in_steps, window_steps=window_steps, max_points=max_points,
            seed=seed, **diffusion_kwargs,
        )  # fmt: skip
        # "auto" (the default) puts the epoch-end embeddings on the budget; an explicit
        # schedule replaces it (docs/design.md, "Cost") unless max_overhead is given as well.
        self.embed_budget = max_overhead is not None
        # The end-of-fit embedding is bounded by the budget unless the schedule is explicit.
        auto = embed_every_n_epochs == "auto" and embed_every_n_steps is None
        self.end_on_budget = self.embed_budget or auto
        self.embed_every_n_epochs, self.embed_every_n_steps = (
            embed_every_n_epochs,
            embed_every_n_steps,
        )
        self.requested_every_n_steps = every_n_steps  # None: adapted to each fit's length
        self.sample, self.directory = sample, directory
        self.log_projector, self.log_figure = log_projector, log_figure
        self.log_histogram = log_histogram
        # Checkpointed state; last_embed_cost: what the latest embedding took.
        self.num_embeddings, self.last_embedded_step = 0, None
        self.last_embed_cost: EmbedCost | None = None
        # Per-fit objects (ddp_spawn pickles callbacks: nothing opened here).
        self._last_loss: float | torch.Tensor = math.nan
        self.last_result: DiffusionMap | None = None  # the latest map, in this process
        self._last: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._projector_written = False

    @property
    def store_dir(self) -> str | None:
        """The folder of the trajectory store (None before the first fit)."""
        return self.recorder.directory

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
            warn_once(f"{self.name}-store", "DiffusionMapMonitor: could not open the trajectory "
                      f"store under {root} ({err}); nothing is recorded in this fit.",
                      category=RuntimeWarning)  # fmt: skip
            return
        last = self.last_measured_step  # the saved embedding, cut back to the checkpoint
        self.embedder.load(self._previous_path(), until_step=-1 if last is None else last)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        total, self.recording = _final_step(trainer), Thinning(RECORDING_SHARE)
        if total is not None and self._off is None:
            if self.requested_every_n_steps is None:
                self.every_n_steps = self.embedder.recording_interval(
                    total, longest=DEFAULT_EVERY_N_STEPS, per_minimum=SAMPLES_PER_MINIMUM,
                    divides=self.embed_every_n_steps,
                )  # fmt: skip
            if trainer.is_global_zero:  # said at the start, not after the fit
                check_sample_count(self.embedder, total, self.every_n_steps)
        super().on_train_start(trainer, pl_module)

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
            if step != self.last_embedded_step:  # always runs; bounded on the budget
                self._embed(trainer, step, budget=False, projector=True, bounded=True)
            elif self.last_result is not None and not self._projector_written:
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
            warn_once(f"{self.name}-nonfinite", f"DiffusionMapMonitor: the {self.sample} at "
                      f"step {step} are not finite; the sample is skipped (counted in "
                      f"{self.tag_prefix}/skipped), training goes on.",
                      category=RuntimeWarning)  # fmt: skip
        elif done:
            self.num_measurements += 1
            self._charge(seconds := self._now() - t0)
            self.every_n_steps = recording_interval(self, trainer, seconds)

    # -- recording and embedding -------------------------------------------------------------
    def _embed(
        self, trainer: Trainer, step: int, *, budget: bool, projector: bool, bounded: bool = False
    ) -> None:
        """Embed the samples so far, if affordable when on the ``budget``; log the result. A
        ``bounded`` one (the end of fit's) is reduced to what the budget still affords."""
        if not self.recorder.is_open:
            return
        clock = self._now
        if budget and not self._affordable(step):
            return
        t0 = clock()
        traj = self.recorder.load()
        rows = self.embedder.select(traj.steps, step)
        if rows.size < self.embedder.min_samples:  # on the budget, mid-fit: wait in silence
            if not budget or bounded:
                what = f"{rows.size} samples at step {step}"
                few_samples(self.embedder, what, "the embedding waits for more")
            return
        landmarks, nystrom, expected = self._plan(trainer, int(rows.size), bounded)
        if not nystrom:
            rows = rows[self.embedder.landmarks(rows.size, max_points=landmarks)]
        announced = self._announce(trainer, step, expected)
        self.last_embedded_step = step
        fitted = None
        try:
            fitted = self.embedder.fit(traj.vectors[rows], max_points=landmarks)
        except (*NUMERICAL_FAILURES, DisconnectedGraphError) as err:
            self._skip(trainer, step, err, "embedding")
        seconds = clock() - t0
        if fitted is not None:
            self._accept(trainer, step, traj, rows, fitted, projector=projector)
        self._log_cost(trainer, step, seconds)
        total = clock() - t0
        units = self.embedder.cost(rows.size, max_points=landmarks)
        self.last_embed_cost = EmbedCost(seconds, units, total - seconds, int(rows.size))
        self._charge(total)
        self._announce_done(trainer, step, total, announced)

    def _plan(self, trainer: Trainer, n: int, bounded: bool) -> tuple[int, bool, float]:
        """``(landmarks, nystrom, predicted seconds)`` of an embedding of ``n`` samples: the
        full one, or the ``bounded`` one of a fit on the budget (``_diffusion_plan``)."""
        coord = self._coord  # an explicit schedule is the user's: its end is whole
        bounded = bounded and coord is not None and self.end_on_budget
        allowed = coord.room(self.name, self.max_overhead) if bounded and coord else None
        plan = end_plan(self.embedder, n, self._cost_model(), allowed)
        if plan.reduced and coord is not None and coord.first_notice(f"end:{self.name}"):
            say(trainer, plan.notice(type(self).__name__, n, allowed))
        return plan.landmarks, plan.nystrom, plan.seconds

    def _affordable(self, step: int) -> bool:
        """Whether the predicted cost and as much again for the end of fit fit in the budget,
        with enough training since the last embedding (no bursts; the first embedding runs as
        soon as there is any budget, and is timed)."""
        cost = self._embed_cost() if self.last_embed_cost is not None else 0.0
        last = self.last_embedded_step
        since = None if last is None else step - last
        return self._coord is None or self._coord.affords(self.name, cost, self.max_overhead, since)

    def _cost_model(self) -> EmbedCost:
        """The latest embedding's costs, else the a-priori ones for this sample size."""
        return self.last_embed_cost or EmbedCost.guess(self.recorder.sketch)

    def _embed_cost(self, n: int | None = None) -> float:
        """Predicted seconds of a full embedding of ``n`` samples (default: all recorded)."""
        n = self.recorder.rows if n is None else n
        return self._cost_model().predict(self.embedder.cost(n), n)

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
        self.last_result = result
        self._last = (coords, steps, traj.epochs[rows], traj.losses[rows])
        self.num_embeddings += 1
        self._log_scalars(trainer, step, diffusion_scalars(result, int(rows.size)))
        self._projector_written = False
        self._write(trainer, step, plots=True, projector=projector)

    def _previous_path(self) -> str:
        """The last aligned embedding, kept beside the store so a resumed run aligns to it."""
        return os.path.join(str(self.recorder.directory), "last_embedding.npz")

    def _write(self, trainer: Trainer, step: int, *, plots: bool, projector: bool) -> None:
        """The latest embedding to TensorBoard: histogram and figure (``plots``), projector."""
        if self._last is None or self.last_result is None:
            return
        coords, steps, epochs, losses = self._last
        projector = projector and self.log_projector
        meta = {"step": steps.tolist(), "epoch": epochs.tolist(), "loss": losses.tolist()}
        written = write_diffusion_embedding(
            tensorboard_writer(trainer), step, self.last_result.eigenvalues, coords, steps,
            prefix=self.tag_prefix, any_logger=bool(trainer.loggers),
            histogram=plots and self.log_histogram, figure=plots and self.log_figure,
            projector=meta if projector else None,
        )  # fmt: skip
        self._projector_written = self._projector_written or (projector and written)

    # -- state -------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        cost = self.last_embed_cost.state() if self.last_embed_cost is not None else None
        own = {"num_embeddings": self.num_embeddings, "last_embedded_step": self.last_embedded_step}
        return {**self.recorder.state_dict(), **own, "last_embed_cost": cost}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.recorder.load_state_dict(state)
        self.num_embeddings = int(state.get("num_embeddings", 0))
        self.last_embedded_step = state.get("last_embedded_step")
        self.last_embed_cost = EmbedCost.from_state(state.get("last_embed_cost"), self.embedder)
