"""DiffusionMapMonitor: the parameter trajectory of training, embedded by diffusion maps."""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from ..dashboard import tensorboard_writer, warn_once
from ..dashboard.diffusion import diffusion_layout, write_diffusion_embedding
from ..embeddings.diffusion import DiffusionMap, DisconnectedGraphError
from ..embeddings.trajectory import TrajectoryEmbedder
from ..sampling.sketch import ParameterSketch
from ..sampling.store import Trajectory, TrajectoryStore
from ._base import NUMERICAL_FAILURES, ScheduledMonitor, _check_positive_int

__all__ = ["DiffusionMapMonitor"]


class DiffusionMapMonitor(ScheduledMonitor):
    """Sample the parameters along training and embed the trajectory with a diffusion map.

    Drop-in: ``Trainer(callbacks=[DiffusionMapMonitor()])`` works on an unmodified
    LightningModule. Every ``every_n_steps`` optimizer steps (step 0 included) the trainable
    parameters (``named_parameters()`` order, buffers excluded; the set is fixed at the first
    sample) are copied, exactly for models of at most ``exact_max_params`` parameters and as a
    seeded sparse JL sketch of ``sketch_dim`` numbers above (see
    :mod:`lightning_landscape.sampling.sketch` for the distance distortion), and appended to a
    :class:`~lightning_landscape.sampling.store.TrajectoryStore` in the run's log directory
    (``<log_dir>/landscape_diffusion/<key>``): a crash loses at most the sample being written, and
    a resumed run cuts the store back to its checkpoint, so there are no gaps or duplicates.
    Recording reads the weights only (no probe set, no forward pass): training is bitwise
    unchanged. With ``sample="gradients"`` the minibatch gradient in ``.grad`` that produced each
    sampled step is recorded instead (the gradient field along the trajectory; step 0 has none).

    The samples are embedded by
    :class:`~lightning_landscape.embeddings.trajectory.TrajectoryEmbedder` (burn-in and window;
    at most ``max_points`` evenly spaced samples fitted, the others placed by Nyström; each map
    rotated onto the previous one, which is kept beside the store, so across a resume too),
    synchronously on rank 0, at epoch ends and/or every ``embed_every_n_steps`` steps, and
    always at the end of fit. With ``embed_every_n_epochs="auto"`` (the default) an epoch-end
    embedding runs only if its predicted cost (the previous one's, scaled to the samples there
    are now by the embedder's cost model) plus as much again in reserve for the end of fit keeps
    the monitor within ``max_overhead`` (5%) and all monitors within 10% of the training time so
    far; ``embed_every_n_epochs=n`` is a reproducible schedule instead. Recording and embedding
    are charged to the budget shared with the other monitors. Neighbours are exact up to
    ``exact_max_n`` (20 000) points, more than ``max_points``, so pynndescent and its 40–60 s
    numba compilation are not reached by default.

    Costs, for D trainable parameters, d = min(D, ``sketch_dim``) numbers per sample (D up to
    ``exact_max_params``) and n samples: recording O(D) time per sample (the sketch recomputes
    its hashes on the parameters' device; no D × d matrix), 8·d bytes per sample on disk and
    nothing in memory; an embedding reads the n × d samples and costs O(m² d + (n − m) m d) for
    m = min(n, ``max_points``); the projector files are rewritten at epoch ends and the end of
    fit only.

    DDP: parameters are replicated, so only rank 0 records and embeds; the only collective is
    one barrier that every rank reaches at the end of fit, so nothing can deadlock.

    Args:
        every_n_steps: record a sample every ``n`` optimizer steps.
        embed_every_n_epochs: ``"auto"``: at epoch ends when the budget affords it; ``n``: at
            the end of every ``n``-th epoch; None: not at epoch ends.
        embed_every_n_steps: embed every ``n`` steps instead (a multiple of ``every_n_steps``).
        sample: ``"parameters"`` or ``"gradients"``.
        n_components: diffusion coordinates / eigenvalues to compute.
        n_neighbors: neighbours per sample in the kNN graph.
        alpha: density normalisation of the diffusion map (1: Laplace–Beltrami).
        epsilon: kernel bandwidth: ``"local"`` (default; self-tuning, because SGD steps shrink
            by orders of magnitude along training), ``"auto"``, ``"median"`` or a number.
        t: diffusion time of the coordinates.
        burn_in_steps: leave out the samples taken before this step.
        window_steps: only embed the samples of the last ``window_steps`` steps.
        max_points: fit the map on at most this many samples (O(max_points² · dim) time).
        sketch_dim: sketch size for models above ``exact_max_params`` parameters.
        exact_max_params: up to this many parameters the samples are exact.
        seed: seeds the sketch and the embedding.
        max_overhead: the monitor's share of training time for the budget (None: 5%, applied
            to the ``"auto"`` epoch-end embeddings only); given explicitly, it also gates the
            scheduled embeddings (not the end-of-fit one).
        log_projector: write the coordinates to the TensorBoard projector (epoch ends and the end
            of fit only: they are files, not events).
        log_figure: write a figure of the trajectory in the first two coordinates.
        log_histogram: write the eigenvalues to the histogram dashboard.
        directory: folder for the trajectory store instead of the run's log directory.
        clock: time source (tests).
        **diffusion_kwargs: further options of ``diffusion_map`` (``neighbors``,
            ``exact_max_n``, ``disconnected``, ``tol``).

    Logged metrics (step axis = ``trainer.global_step``; scalars go to every logger, the rest to
    a TensorBoardLogger only):
        ``landscape/diffusion/eigenvalue_01`` … ``eigenvalue_{n_components}``: non-trivial
        eigenvalues of the Markov operator (one multi-line chart);
        ``landscape/diffusion/intrinsic_dim``, ``epsilon``, ``num_samples`` (samples embedded),
        ``num_components`` (of the kNN graph), ``seconds``, ``skipped``;
        histogram ``landscape/diffusion/eigenvalues``;
        image ``landscape/diffusion/trajectory``: the first two coordinates coloured by step
        and the decay rates of the spectrum;
        projector embedding ``landscape/diffusion/coordinates`` with metadata step, epoch, loss.
    """

    name = "diffusion"

    def __init__(
        self,
        *,
        every_n_steps: int = 10,
        embed_every_n_epochs: int | Literal["auto"] | None = "auto",
        embed_every_n_steps: int | None = None,
        sample: Literal["parameters", "gradients"] = "parameters",
        n_components: int = 6,
        n_neighbors: int = 16,
        alpha: float = 1.0,
        epsilon: float | Literal["auto", "median", "local"] = "local",
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
        **diffusion_kwargs: Any,
    ) -> None:
        _check_positive_int("every_n_steps", every_n_steps)
        super().__init__(
            every_n_steps=every_n_steps,
            max_overhead=0.05 if max_overhead is None else max_overhead,
            clock=clock,
        )
        _check_recording(every_n_steps, embed_every_n_epochs, embed_every_n_steps, sample)
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
        _check_sketch(sketch_dim, exact_max_params)
        # "auto" (the default) puts the epoch-end embeddings on the budget; an explicit
        # schedule replaces it (DESIGN "Cost") unless max_overhead is given as well.
        self.embed_budget = max_overhead is not None
        self.embed_every_n_epochs = embed_every_n_epochs
        self.embed_every_n_steps = embed_every_n_steps
        self.sample = sample
        self.sketch_dim, self.exact_max_params, self.seed = sketch_dim, exact_max_params, seed
        self.log_projector, self.log_figure = log_projector, log_figure
        self.log_histogram, self.directory = log_histogram, directory
        self._init_state()

    def _init_state(self) -> None:
        # Checkpointed state.
        self.store_dir: str | None = None
        self.store_rows = 0
        self.param_names: list[str] | None = None
        self.num_embeddings = 0
        self.last_embedded_step: int | None = None
        # (seconds, samples) of the latest embedding: the budget's cost model for the next one.
        self.last_embed_cost: tuple[float, int] | None = None
        # Per-fit objects (ddp_spawn pickles callbacks: nothing opened here).
        self._store: TrajectoryStore | None = None
        self._sketch: ParameterSketch | None = None
        self._last_loss: float | torch.Tensor = math.nan
        self._last_result: DiffusionMap | None = None
        self._last: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._projector_written = False

    @property
    def last_result(self) -> DiffusionMap | None:
        """The latest diffusion map computed in this process (None before the first)."""
        return self._last_result

    def _state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, sample=self.sample)

    def _layout(self) -> dict[str, dict[str, list[str]]]:
        return diffusion_layout(self.tag_prefix)

    # -- Lightning hooks ---------------------------------------------------------------------
    # Recording reads weights only: no probe set, and manual optimisation and half-precision
    # weights are fine (the sketch upcasts), so the base's setup is all this monitor needs.
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if trainer.is_global_zero:
            self._open_store(trainer, pl_module)

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
                self._embed(trainer, step, final=False, budget=self.embed_budget)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        n = self.embed_every_n_epochs
        if n is None or not trainer.is_global_zero:
            return
        if n != "auto" and (trainer.current_epoch + 1) % n:
            return
        if trainer.global_step == self.last_embedded_step:
            return
        budget = self.embed_budget or n == "auto"
        self._embed(trainer, trainer.global_step, final=False, epoch_end=True, budget=budget)

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
                self._embed(trainer, step, final=True)
            elif self._last_result is not None and not self._projector_written:
                self._write(trainer, step, plots=False, projector=True)
        self._store = None

    # -- recording ---------------------------------------------------------------------------
    def _open_store(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Open (or, on resume, reopen and cut back to the checkpoint) the trajectory store."""
        if self.param_names is None:
            self.param_names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        params = dict(pl_module.named_parameters())
        missing = [n for n in self.param_names if n not in params]
        if missing:
            raise ValueError(
                f"DiffusionMapMonitor: parameters {missing[:3]} of the recorded trajectory are "
                "not in the module; resume with the same model"
            )
        self._sketch = ParameterSketch(
            [params[n].numel() for n in self.param_names],
            dim=self.sketch_dim,
            seed=self.seed,
            exact_max_params=self.exact_max_params,
        )
        resumed = self.store_dir is not None
        if resumed and os.path.isdir(str(self.store_dir)):
            directory = str(self.store_dir)
        else:
            if resumed:
                warnings.warn(
                    f"DiffusionMapMonitor: the trajectory store {self.store_dir} was not found; "
                    "started a new one, so the samples before the resume are missing.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            key = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.state_key)[:120]
            root = self.directory or _log_dir(trainer)
            directory = os.path.join(root, "landscape_diffusion", key)
            self.store_rows = 0
        self._store = TrajectoryStore(
            directory, self._sketch.output_dim, info={"sample": self.sample, **self._sketch.state()}
        )
        if len(self._store) > self.store_rows:  # samples taken after the checkpoint
            self._store.truncate(self.store_rows)
        elif len(self._store) < self.store_rows:
            warnings.warn(
                f"DiffusionMapMonitor: the trajectory store holds {len(self._store)} samples, the "
                f"checkpoint counted {self.store_rows} (the unsaved tail of a crash is lost).",
                RuntimeWarning,
                stacklevel=2,
            )
            self.store_rows = len(self._store)
        self.store_dir = os.path.abspath(directory)
        last = self.last_measured_step
        self.embedder.load(self._previous_path(), until_step=-1 if last is None else last)

    def _record(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        if self._store is None or self._sketch is None or self.param_names is None:
            return
        clock = self._now
        t0 = clock()
        params = dict(pl_module.named_parameters())
        tensors = [params[n] for n in self.param_names]
        if self.sample == "gradients":
            if all(p.grad is None for p in tensors):
                return  # no gradient yet (step 0) or frozen
            tensors = [p.grad if p.grad is not None else torch.zeros_like(p) for p in tensors]
        vector = self._sketch(tensors)
        if not np.all(np.isfinite(vector)):
            self.skipped += 1
            warn_once(
                f"{self.name}-nonfinite",
                f"DiffusionMapMonitor: the {self.sample} at step {step} are not finite; the sample "
                f"is skipped (counted in {self.tag_prefix}/skipped), training goes on.",
                category=RuntimeWarning,
            )
            return
        loss = float(self._last_loss)
        self._store.append(vector, step=step, epoch=trainer.current_epoch, loss=loss)
        self.store_rows = len(self._store)
        self.num_measurements += 1
        self._charge(clock() - t0)

    # -- embedding ---------------------------------------------------------------------------
    def _embed(
        self,
        trainer: Trainer,
        step: int,
        *,
        final: bool,
        epoch_end: bool = False,
        budget: bool = False,
    ) -> None:
        if self._store is None:
            return
        clock = self._now
        if budget and not final and not self._affordable():
            return
        t0 = clock()
        traj = self._store.load()
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
            self._accept(trainer, step, traj, rows, *fitted, projector=final or epoch_end)
        self._log_cost(trainer, step, seconds)
        total = clock() - t0
        self.last_embed_cost = (total, int(rows.size))
        self._charge(total)

    def _affordable(self) -> bool:
        """Whether a budgeted embedding runs now: when its predicted cost (the last
        embedding's, scaled by the embedder's cost model to the samples there are now) and as
        much again in reserve for the end of fit keep this monitor within ``max_overhead`` and
        all monitors within the total cap (never before any training time has been counted)."""
        if self._coord is None:
            return True
        cost = 0.0
        if self.last_embed_cost is not None:
            seconds, n_last = self.last_embed_cost
            cost = seconds * self.embedder.cost(self.store_rows) / self.embedder.cost(n_last)
        return self._coord.affords(self.name, cost, self.max_overhead)

    def _accept(
        self,
        trainer: Trainer,
        step: int,
        traj: Trajectory,
        rows: np.ndarray,
        coords: np.ndarray,
        result: DiffusionMap,
        *,
        projector: bool,
    ) -> None:
        """Align a new embedding to the previous one, keep it (beside the store too) and log it."""
        steps = traj.steps[rows]
        coords = self.embedder.align(coords, steps, result.eigenvalues)
        if self.store_dir is not None:
            try:
                self.embedder.save(self._previous_path())
            except OSError as err:  # a read-only log directory must not stop training
                warn_once(f"{self.name}-save", f"could not save {self._previous_path()}: {err}")
        self._last_result = result
        self._last = (coords, steps, traj.epochs[rows], traj.losses[rows])
        self.num_embeddings += 1
        values = {f"eigenvalue_{i:02d}": float(v) for i, v in enumerate(result.eigenvalues, 1)}
        values.update(
            intrinsic_dim=result.intrinsic_dim,
            epsilon=result.epsilon,
            num_samples=float(rows.size),
            num_components=float(result.num_components),
        )
        self._log_scalars(trainer, step, values)
        self._projector_written = False
        self._write(trainer, step, plots=True, projector=projector)

    def _previous_path(self) -> str:
        """The last aligned embedding, kept beside the store so a resumed run aligns to it."""
        return os.path.join(str(self.store_dir), "last_embedding.npz")

    # -- logging -----------------------------------------------------------------------------
    def _write(self, trainer: Trainer, step: int, *, plots: bool, projector: bool) -> None:
        """The latest embedding to TensorBoard: histogram and figure (``plots``), projector."""
        writer = tensorboard_writer(trainer)
        if writer is None:
            if plots and (self.log_histogram or self.log_figure or self.log_projector):
                warn_once(
                    "diffusion-no-tensorboard",
                    "DiffusionMapMonitor: no TensorBoardLogger among trainer.loggers; scalars are "
                    "logged, the histogram, figure and projector embedding are not.",
                )
            return
        if self._last is None or self._last_result is None:
            return
        coords, steps, epochs, losses = self._last
        projector = projector and self.log_projector
        meta = {"step": steps.tolist(), "epoch": epochs.tolist(), "loss": losses.tolist()}
        write_diffusion_embedding(
            writer,
            step,
            self._last_result.eigenvalues,
            coords,
            steps,
            prefix=self.tag_prefix,
            histogram=plots and self.log_histogram,
            figure=plots and self.log_figure,
            projector=meta if projector else None,
        )
        self._projector_written = self._projector_written or projector

    # -- state -------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {
            "store_dir": self.store_dir,
            "store_rows": self.store_rows,
            "param_names": self.param_names,
            "num_embeddings": self.num_embeddings,
            "last_embedded_step": self.last_embedded_step,
            "last_embed_cost": self.last_embed_cost,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.store_dir = state.get("store_dir")
        self.store_rows = int(state.get("store_rows", 0))
        self.param_names = state.get("param_names")
        self.num_embeddings = int(state.get("num_embeddings", 0))
        self.last_embedded_step = state.get("last_embedded_step")
        cost = state.get("last_embed_cost")
        self.last_embed_cost = (float(cost[0]), int(cost[1])) if cost is not None else None


def _log_dir(trainer: Trainer) -> str:
    """The first logger's directory, else ``default_root_dir``.

    Not ``trainer.log_dir``: it broadcasts, and this runs on rank 0 only.
    """
    for logger in trainer.loggers:
        directory = getattr(logger, "log_dir", None)
        if directory:
            return str(directory)
    return str(trainer.default_root_dir)


def _check_recording(
    every_n_steps: int, embed_every_n_epochs: Any, embed_every_n_steps: int | None, sample: Any
) -> None:
    if embed_every_n_epochs != "auto" and (
        isinstance(embed_every_n_epochs, bool)
        or not isinstance(embed_every_n_epochs, (int, type(None)))
        or (embed_every_n_epochs is not None and embed_every_n_epochs <= 0)
    ):
        raise ValueError(
            "embed_every_n_epochs must be 'auto', a positive integer or None; "
            f"got {embed_every_n_epochs!r}"
        )
    _check_positive_int("embed_every_n_steps", embed_every_n_steps, allow_none=True)
    if embed_every_n_steps is not None and embed_every_n_steps % every_n_steps:
        raise ValueError(
            "embed_every_n_steps must be a multiple of every_n_steps "
            f"({every_n_steps}); got {embed_every_n_steps}"
        )
    if sample not in ("parameters", "gradients"):
        raise ValueError(f"sample must be 'parameters' or 'gradients'; got {sample!r}")


def _check_sketch(sketch_dim: int, exact_max_params: int) -> None:
    _check_positive_int("sketch_dim", sketch_dim)
    if (
        isinstance(exact_max_params, bool)
        or not isinstance(exact_max_params, int)
        or exact_max_params < 0
    ):
        raise ValueError(f"exact_max_params must be an integer >= 0; got {exact_max_params!r}")
