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

from ..dashboard import tensorboard_writer, warn_once, write_figure
from ..dashboard.diffusion import diffusion_layout, trajectory_figure
from ..dashboard.projector import write_projector_embedding
from ..embeddings.diffusion import (
    DiffusionMap,
    DisconnectedGraphError,
    align_to,
    diffusion_map,
)
from ..sampling.sketch import ParameterSketch
from ..sampling.store import Trajectory, TrajectoryStore
from . import _context as ctx
from ._base import NUMERICAL_FAILURES, LandscapeMonitor, _check_positive_int
from ._schedule import coordinator_for

__all__ = ["DiffusionMapMonitor"]

_DIFFUSION_OPTIONS = {"neighbors", "exact_max_n", "disconnected", "tol"}


class DiffusionMapMonitor(LandscapeMonitor):
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

    The diffusion map (:func:`~lightning_landscape.embeddings.diffusion.diffusion_map`) of the
    samples is computed at epoch ends and/or every ``embed_every_n_steps`` steps, and always at
    the end of fit. By default (``embed_every_n_epochs="auto"``) an epoch-end embedding runs when
    the budget affords it (below), so short epochs do not mean an embedding every few dozen
    steps; ``embed_every_n_epochs=n`` embeds at the end of every ``n``-th epoch instead, a
    reproducible schedule. Samples before
    ``burn_in_steps`` are left out (the early transient makes any trajectory look
    one-dimensional), and with ``window_steps`` only the latest samples count. Above
    ``max_points`` samples the map is fitted on evenly spaced ones and the others are placed by
    Nyström extension. Each new embedding is rotated onto the previous one on their common steps
    (Procrustes within groups of near-equal eigenvalues), so the axes do not jump between logs;
    the last embedding is kept beside the store, so this holds across a resume too.

    Where the embedding runs: synchronously on rank 0, at epoch ends, the end of fit, or the
    step schedule, and its time (and that of recording) is charged to the budget shared with the
    other monitors. Budget: an ``"auto"`` epoch-end embedding (and, with an explicit
    ``max_overhead``, every scheduled one) runs only if its predicted cost (the previous
    embedding's time, scaled to the samples there are now by m² + (n − m)·m, m = min(n,
    ``max_points``)) plus as much again in reserve for the end of fit keeps the monitor within
    ``max_overhead`` (default 5%) and all monitors within their 10% of the training time counted
    so far; otherwise it waits for a later epoch end. The end-of-fit embedding always runs.
    Neighbours are exact up to
    ``exact_max_n`` (20 000) points, more than ``max_points``, so pynndescent and its 40–60 s numba
    compilation are never reached by default; if you raise ``max_points`` above it, a warning
    announces the compilation before the first such call.

    Costs, for D trainable parameters, d = min(D, ``sketch_dim``) numbers per sample (D up to
    ``exact_max_params``) and n samples: recording O(D) time per sample (the sketch recomputes
    its hashes, O(D) integer operations, on the parameters' device; no D × d matrix), 8·d bytes
    per sample on disk and nothing kept in memory; an embedding reads the n × d samples and costs
    O(m² d) for m = min(n, ``max_points``) (exact neighbours), plus O((n − m) m d) for the Nyström
    part; the projector files are rewritten at epoch ends and the end of fit only.

    DDP: parameters are replicated, so only rank 0 records and embeds; the only collective is
    one barrier that every rank reaches at the end of fit (so all ranks finish together), so
    nothing can deadlock. While rank 0 embeds at an epoch end, the other ranks wait at their next
    gradient all-reduce.

    Args:
        every_n_steps: record a sample every ``n`` optimizer steps.
        embed_every_n_epochs: ``"auto"``: at epoch ends when the budget affords it; ``n``: at
            the end of every ``n``-th epoch; None: not at epoch ends.
        embed_every_n_steps: embed every ``n`` steps instead (a multiple of ``every_n_steps``).
        sample: ``"parameters"`` or ``"gradients"``.
        n_components: diffusion coordinates / eigenvalues to compute.
        n_neighbors: neighbours per sample in the kNN graph.
        alpha: density normalisation of the diffusion map (1: Laplace–Beltrami).
        epsilon: kernel bandwidth: ``"local"`` (default; self-tuning, σᵢσⱼ from each sample's
            ``n_neighbors // 2``-th neighbour), ``"auto"`` (Berry–Giannakis–Harlim), ``"median"``
            or a number. The default is local because SGD steps shrink by orders of magnitude
            along training: one global bandwidth fits the dense late iterates and leaves the
            early ones all but disconnected (eigenvalues stuck at 1).
        t: diffusion time of the coordinates.
        burn_in_steps: leave out the samples taken before this step.
        window_steps: only embed the samples of the last ``window_steps`` steps.
        max_points: fit the map on at most this many samples (O(max_points² · dim) time).
        sketch_dim: sketch size for models above ``exact_max_params`` parameters.
        exact_max_params: up to this many parameters the samples are exact.
        seed: seeds the sketch and the embedding.
        max_overhead: the monitor's share of training time for the budget (None: 5%, applied
            to the ``"auto"`` epoch-end embeddings only); given explicitly, it also gates the
            ``embed_every_n_epochs=n`` / ``embed_every_n_steps`` embeddings (not the end-of-fit
            one).
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
        # "auto" (the default) puts the epoch-end embeddings on the budget; an explicit
        # schedule replaces it (DESIGN "Cost") unless max_overhead is given as well.
        self.embed_budget = max_overhead is not None
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
        _check_positive_int("n_components", n_components)
        if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int) or n_neighbors < 2:
            raise ValueError(f"n_neighbors must be an integer >= 2; got {n_neighbors!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1]; got {alpha!r}")
        if epsilon not in ("auto", "median", "local") and (
            isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0
        ):
            raise ValueError(
                f"epsilon must be 'auto', 'median', 'local' or a positive number; got {epsilon!r}"
            )
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise ValueError(f"t must be a number >= 0; got {t!r}")
        if (
            isinstance(burn_in_steps, bool)
            or not isinstance(burn_in_steps, int)
            or burn_in_steps < 0
        ):
            raise ValueError(f"burn_in_steps must be an integer >= 0; got {burn_in_steps!r}")
        _check_positive_int("window_steps", window_steps, allow_none=True)
        if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 8:
            raise ValueError(f"max_points must be an integer >= 8; got {max_points!r}")
        _check_positive_int("sketch_dim", sketch_dim)
        if (
            isinstance(exact_max_params, bool)
            or not isinstance(exact_max_params, int)
            or exact_max_params < 0
        ):
            raise ValueError(f"exact_max_params must be an integer >= 0; got {exact_max_params!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
        unknown = sorted(set(diffusion_kwargs) - _DIFFUSION_OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for DiffusionMapMonitor; "
                f"allowed: {sorted(_DIFFUSION_OPTIONS)}"
            )
        self.embed_every_n_epochs = embed_every_n_epochs
        self.embed_every_n_steps = embed_every_n_steps
        self.sample = sample
        self.n_components = n_components
        self.n_neighbors = n_neighbors
        self.alpha = float(alpha)
        self.epsilon = epsilon
        self.t = float(t)
        self.burn_in_steps = burn_in_steps
        self.window_steps = window_steps
        self.max_points = max_points
        self.sketch_dim = sketch_dim
        self.exact_max_params = exact_max_params
        self.seed = seed
        self.log_projector = log_projector
        self.log_figure = log_figure
        self.log_histogram = log_histogram
        self.directory = directory
        self.diffusion_kwargs = diffusion_kwargs
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
        self._previous: tuple[np.ndarray, np.ndarray] | None = None
        self._last_result: DiffusionMap | None = None
        self._last: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._projector_written = False

    @property
    def last_result(self) -> DiffusionMap | None:
        """The latest diffusion map computed in this process (None before the first)."""
        return self._last_result

    def _state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, sample=self.sample)

    # -- base-class hooks --------------------------------------------------------------------
    def _layout(self) -> dict[str, dict[str, list[str]]]:
        return diffusion_layout(self.tag_prefix)

    def _load_or_capture_probe(self, trainer: Trainer) -> list[Any]:
        return []  # recording needs no probe batches

    # -- Lightning hooks ---------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Not the base checks: recording reads weights only, so manual optimisation and
        # half-precision weights are fine (the sketch upcasts).
        if stage != "fit":
            return
        ctx.check_strategy(trainer, type(self).__name__)
        self._coord = coordinator_for(trainer, self.name, self._clock)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if not trainer.is_global_zero:
            return
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
        self._previous = self._load_previous()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # Kept as a tensor: reading it (a device sync) waits until a sample is recorded.
            self._last_loss = loss.detach()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _measure(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """Record one sample (rank 0); embed when the step schedule says so."""
        self.last_measured_step = step
        if not trainer.is_global_zero:
            return
        self._record(trainer, pl_module, step)
        n = self.embed_every_n_steps
        if n is not None and step % n == 0 and step > 0:
            self._embed(trainer, step, final=False, budget=self.embed_budget)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = self.embed_every_n_epochs
        if n is None or not trainer.is_global_zero:
            return
        if n != "auto" and (trainer.current_epoch + 1) % n:
            return
        if trainer.global_step == self.last_embedded_step:
            return
        budget = self.embed_budget or n == "auto"
        self._embed(trainer, trainer.global_step, final=False, epoch_end=True, budget=budget)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if trainer.is_global_zero:
            if step != self.last_measured_step:
                self._record(trainer, pl_module, step)
            if step != self.last_embedded_step:
                self._embed(trainer, step, final=True)
            elif self._last_result is not None and not self._projector_written:
                self._write_projector(trainer, step)
        self.last_measured_step = step
        self._store = None
        # Ranks other than 0 did nothing here: hold them until rank 0 has finished.
        self._end_barrier(trainer)

    # -- recording ---------------------------------------------------------------------------
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
        if self._coord is not None:
            self._coord.record(self.name, clock() - t0)

    # -- embedding ---------------------------------------------------------------------------
    def _selected(self, traj: Trajectory, step: int) -> np.ndarray:
        keep = (traj.steps >= self.burn_in_steps) & (traj.steps <= step)
        if self.window_steps is not None:
            keep &= traj.steps > step - self.window_steps
        return np.flatnonzero(keep)

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
        rows = self._selected(traj, step)
        if rows.size < self.n_components + 2:
            warn_once(
                f"{self.name}-few-samples",
                f"DiffusionMapMonitor: {rows.size} samples at step {step}, fewer than "
                f"n_components + 2 = {self.n_components + 2}; the embedding waits for more "
                "(record more often with every_n_steps, or lower burn_in_steps).",
            )
            return
        self.last_embedded_step = step
        result = None
        coords = None
        try:
            coords, result = self._fit(traj.vectors[rows])
            if not np.all(np.isfinite(result.eigenvalues)):
                raise FloatingPointError("non-finite diffusion eigenvalue")
        except (*NUMERICAL_FAILURES, DisconnectedGraphError) as err:
            self.skipped += 1
            result = None
            warn_once(
                f"{self.name}-skip-{type(err).__name__}",
                f"DiffusionMapMonitor: skipped the embedding at step {step} "
                f"({type(err).__name__}: {err}); training goes on. Further skips of this kind "
                f"are counted in {self.tag_prefix}/skipped.",
                category=RuntimeWarning,
            )
        seconds = clock() - t0
        if result is not None and coords is not None:
            steps = traj.steps[rows]
            coords = self._align(coords, steps, result.eigenvalues)
            self._previous = (steps, coords)
            self._save_previous()
            self._last_result = result
            self._last = (coords, steps, traj.epochs[rows], traj.losses[rows])
            self.num_embeddings += 1
            self._log_embedding(trainer, step, result, coords, steps, int(rows.size))
            self._projector_written = False
            if final or epoch_end:
                self._write_projector(trainer, step)
        self._log_scalars(trainer, step, {"seconds": seconds, "skipped": float(self.skipped)})
        total = clock() - t0
        self.last_embed_cost = (total, int(rows.size))
        if self._coord is not None:
            self._coord.record(self.name, total)

    def _affordable(self) -> bool:
        """Whether a budgeted embedding runs now: when its predicted cost (the last
        embedding's, scaled by the cost model below to the samples there are now) and as much
        again in reserve for the end of fit keep this monitor within ``max_overhead`` and all
        monitors within the total cap (never before any training time has been counted)."""
        if self._coord is None:
            return True
        cost = 0.0
        if self.last_embed_cost is not None:
            seconds, n_last = self.last_embed_cost
            cost = seconds * self._cost_model(self.store_rows) / self._cost_model(n_last)
        return self._coord.affords(self.name, cost, self.max_overhead)

    def _cost_model(self, n: int) -> float:
        """Relative cost of embedding ``n`` samples: exact neighbours among the m fitted ones
        (m²) and the Nyström placement of the others ((n − m)·m)."""
        m = max(min(n, self.max_points), 1)
        return float(m * m + max(n - m, 0) * m)

    def _fit(self, X: np.ndarray) -> tuple[np.ndarray, DiffusionMap]:
        n = X.shape[0]
        kwargs = {
            "n_components": self.n_components,
            "n_neighbors": min(self.n_neighbors, n),
            "alpha": self.alpha,
            "epsilon": self.epsilon,
            "t": self.t,
            "seed": self.seed,
            **self.diffusion_kwargs,
        }
        if n <= self.max_points:
            result = diffusion_map(X, **kwargs)
            return result.coordinates, result
        landmarks = np.unique(np.linspace(0, n - 1, self.max_points).round().astype(np.int64))
        result = diffusion_map(X[landmarks], **kwargs)
        coords = np.empty((n, self.n_components))
        others = np.setdiff1d(np.arange(n), landmarks)
        coords[landmarks] = result.coordinates
        coords[others] = result.extend(X[others])
        return coords, result

    def _previous_path(self) -> str:
        return os.path.join(str(self.store_dir), "last_embedding.npz")

    def _save_previous(self) -> None:
        """Keep the last aligned embedding beside the store, so a resumed run aligns to it."""
        if self._previous is None or self.store_dir is None:
            return
        try:
            np.savez(self._previous_path(), steps=self._previous[0], coords=self._previous[1])
        except OSError as err:  # a read-only log directory must not stop training
            warn_once(f"{self.name}-save", f"could not save {self._previous_path()}: {err}")

    def _load_previous(self) -> tuple[np.ndarray, np.ndarray] | None:
        path = self._previous_path()
        if not os.path.exists(path):
            return None
        with np.load(path) as f:
            steps, coords = f["steps"], f["coords"]
        # Only the samples that survive the resume (taken up to the checkpoint).
        last = self.last_measured_step if self.last_measured_step is not None else -1
        keep = steps <= last
        return (steps[keep], coords[keep]) if keep.any() else None

    def _align(self, coords: np.ndarray, steps: np.ndarray, eigenvalues: np.ndarray) -> np.ndarray:
        if self._previous is None:
            return coords
        prev_steps, prev_coords = self._previous
        common, new_idx, old_idx = np.intersect1d(steps, prev_steps, return_indices=True)
        if common.size < self.n_components + 1 or prev_coords.shape[1] != coords.shape[1]:
            return coords
        return align_to(
            coords, prev_coords[old_idx], rows=new_idx, eigenvalues=eigenvalues
        ).coordinates

    # -- logging -----------------------------------------------------------------------------
    def _log_embedding(
        self,
        trainer: Trainer,
        step: int,
        result: DiffusionMap,
        coords: np.ndarray,
        steps: np.ndarray,
        num: int,
    ) -> None:
        values = {f"eigenvalue_{i:02d}": float(v) for i, v in enumerate(result.eigenvalues, 1)}
        values.update(
            intrinsic_dim=result.intrinsic_dim,
            epsilon=result.epsilon,
            num_samples=float(num),
            num_components=float(result.num_components),
        )
        self._log_scalars(trainer, step, values)
        writer = tensorboard_writer(trainer)
        if writer is None:
            if self.log_histogram or self.log_figure or self.log_projector:
                warn_once(
                    "diffusion-no-tensorboard",
                    "DiffusionMapMonitor: no TensorBoardLogger among trainer.loggers; scalars are "
                    "logged, the histogram, figure and projector embedding are not.",
                )
            return
        if self.log_histogram:
            writer.add_histogram(
                f"{self.tag_prefix}/eigenvalues", result.eigenvalues, global_step=step, bins="auto"
            )
        if self.log_figure:
            fig = trajectory_figure(
                coords, steps, result.eigenvalues, title=f"diffusion map at step {step}"
            )
            write_figure(writer, f"{self.tag_prefix}/trajectory", fig, step)

    def _write_projector(self, trainer: Trainer, step: int) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None or not self.log_projector or self._last is None:
            return
        coords, steps, epochs, losses = self._last
        write_projector_embedding(
            writer,
            f"{self.tag_prefix}/coordinates",
            coords,
            {"step": steps.tolist(), "epoch": epochs.tolist(), "loss": losses.tolist()},
            global_step=step,
        )
        self._projector_written = True

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
