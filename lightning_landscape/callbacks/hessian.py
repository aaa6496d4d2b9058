"""HessianSpectrumMonitor: the Hessian spectrum of the training loss, during ``fit``."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import Unpack

from .._checks import check_bool, check_int, forward_options
from ..dashboard import SpectrumAxis, hessian_layout, warn_once
from ..dashboard.hessian import batch_spread_scalars, log_hessian_spectrum
from ..linalg import HessianSpectrum, hessian_spectrum, parameter_groups
from ..linalg._spectrum_options import HessianOptions, check_spectrum_options
from ..linalg.lanczos import reorthogonalisation_seconds
from ..linalg.sharpness import (
    OptimizerSharpness,
    StabilityWatch,
    adam_hyperparameters,
    batch_sharpness,
    optimizer_sharpness,
)
from ..linalg.spectrum import subspace_overlap
from ._base import LandscapeMonitor
from ._schedule import HESSIAN_EIGENPAIRS

#: A priori seconds to draw the spectrum figure and write the histogram (one CPU core).
_LOG_SECONDS_GUESS = 0.25


__all__ = ["HessianSpectrumMonitor"]

#: Consecutive measurements above the stability line before the (single) warning: at the edge
#: of stability the ratio hovers around 1, so one reading above it is expected.
ABOVE_LINE_MEASUREMENTS = 3

#: Options of :class:`HessianOperator` the extra runs (per batch, Adam) share with the spectrum.
_OPERATOR_OPTIONS = ("retain_graph", "batch_size_fn", "dtype", "hvp")


@dataclasses.dataclass(frozen=True)
class _Measurement:
    """One measurement: the spectrum and the scalars of the runs beside it."""

    result: HessianSpectrum
    extra: dict[str, float]
    sharpness: OptimizerSharpness | None = None


#: Options of :func:`hessian_spectrum` the monitor sets itself (the rest are forwarded).
_SET_HERE = tuple(
    "top_k which density trace seed groups return_eigenvectors params reduce_fn warm_start".split()
)


class HessianSpectrumMonitor(LandscapeMonitor):
    """Estimate the Hessian spectrum of the training loss periodically during ``fit``.

    Drop-in: ``Trainer(callbacks=[HessianSpectrumMonitor()])`` works on an unmodified
    LightningModule. The Hessian is that of the mean loss over a fixed probe set (the first
    ``num_probe_batches`` training batches of each rank, captured at the start of fit), measured in
    eval mode, with the module's own ``training_step`` as the loss (its ``self.log`` calls are
    silenced). Training is left bitwise unchanged. Under DDP every rank holds its shard of the
    probe set and the Hessian-vector products are all-reduced, so the result is that of the union.

    Schedule: by default a wall-time budget (``max_overhead``, 2% of training time) places the
    measurements; the end-of-fit measurement always runs, as the top-k eigenvalues only
    (no density, trace, per-batch spread or Adam's preconditioned run) when the fit so far is
    too short to afford the full one.
    ``every_n_steps`` / ``every_n_epochs`` give a fixed, reproducible schedule instead. Under
    ``fast_dev_run``, or on the budget in a fit too short even for the top-k, it measures nothing
    (one line says so); a measurement of 5 s or more is announced (docs/design.md, "Fixed costs
    and short fits").

    Edge of stability: the sharpness is set against the first optimizer's stability line; for
    Adam/AdamW that is the preconditioned sharpness λ_max(P⁻¹H) with Adam's own second moment
    (Cohen et al. 2022), measured during training, which tools reporting λ_max(H) alone miss
    (Adam's λ_max(H) may sit far above 2/η while training is stable).

    Args:
        top_k: number of top eigenvalues.
        every_n_steps: measure at every ``n``-th optimizer step (step 0 included).
        every_n_epochs: measure at the end of every ``n``-th epoch.
        max_overhead: the budget, as a share of training wall time.
        num_probe_batches: probe batches per rank.
        probe_dataloader: take the probe set from this loader instead (first batches).
        loss_fn: ``loss_fn(model, batch) -> scalar`` instead of ``training_step``; required with
            manual optimisation.
        train_mode: measure in train mode instead of eval mode (not deterministic under DDP).
        groups: also per-parameter-group spectra: ``"layer"`` or ``{name: [param prefixes]}``.
        density: estimate the spectral density (needed for the histogram, figure, outliers).
        trace: estimate the trace.
        seed: seeds the random probe vectors (the same at every measurement).
        log_histogram: write the spectrum to TensorBoard's histogram dashboard.
        log_figure: write a figure of the density with the outliers marked.
        keep_eigenvectors: keep the last measurement's converged top-k eigenvectors as
            ``last_eigenvectors`` (and ``last_eigenvalues``; more products). Also kept, and
            published through the trainer's coordinator, when another monitor asks for them.
        clock: time source for the budget (tests).
        log_sharpness: log the sharpness against the first optimizer's stability line: λ_max
            for SGD-like optimizers, Adam's preconditioned sharpness λ_max(P⁻¹H) (one extra
            Lanczos run, counted in ``num_hvps``) for Adam/AdamW; warns once when it stays
            above the line for :data:`ABOVE_LINE_MEASUREMENTS` measurements. Formulas in
            :mod:`lightning_landscape.linalg.sharpness`.
        warm_start: keep the previous top-k Ritz vectors (in memory, not checkpointed) and log
            ``subspace_overlap`` (free); with ``density=False, trace=False`` the top-k run also
            starts from them (with density or trace on, a cold run is cheaper: it doubles as
            the first quadrature probe and deflates the trace).
        log_batch_spread: with several probe batches, also λ_max of each batch's own Hessian
            (a short Lanczos run per batch from the probe set's top eigenvector).
        batch_max_hvps: product cap of each per-batch run (a capped run reads low, by about the
            logged ``lambda_max_batch_residual``).
        **spectrum_kwargs: further options of :func:`~lightning_landscape.hessian_spectrum`
            (``tol``, ``max_iter``, ``num_slq_probes``, ``slq_steps``, ``num_trace_probes``,
            ``retain_graph``, ``batch_size_fn``, ``dtype``).

    Logged: under ``landscape/hessian/`` on the ``trainer.global_step`` axis (top eigenvalues
    and their error bounds, trace, outliers and bulk edge, sharpness against the stability
    line, per-batch λ_max, subspace overlap, cost; a signed-log spectrum histogram and the
    density figure); the README's "What you see in TensorBoard" lists every tag.
    """

    name = "hessian"
    #: Results this monitor shares through the coordinator (measured before their users).
    provides = (HESSIAN_EIGENPAIRS,)

    def __init__(
        self,
        *,
        top_k: int = 10,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        max_overhead: float = 0.02,
        num_probe_batches: int = 4,
        probe_dataloader: Iterable[Any] | None = None,
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
        train_mode: bool = False,
        groups: Literal["layer"] | Mapping[str, Sequence[str]] | None = None,
        density: bool = True,
        trace: bool = True,
        seed: int = 0,
        log_histogram: bool = True,
        log_figure: bool = True,
        keep_eigenvectors: bool = False,
        clock: Callable[[], float] | None = None,
        log_sharpness: bool = True,
        warm_start: bool = True,
        log_batch_spread: bool = True,
        batch_max_hvps: int = 16,
        **spectrum_kwargs: Unpack[HessianOptions],
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps, every_n_epochs=every_n_epochs,
            max_overhead=max_overhead, num_probe_batches=num_probe_batches,
            probe_dataloader=probe_dataloader, loss_fn=loss_fn, train_mode=train_mode,
            clock=clock,
        )  # fmt: skip
        self.spectrum_kwargs = forward_options(
            hessian_spectrum, spectrum_kwargs, owner=HessianSpectrumMonitor, exclude=_SET_HERE
        )
        # The core's own checker: a bad forwarded value fails here, not minutes into fit.
        check_spectrum_options(
            top_k=top_k, groups=groups, density=density, trace=trace, seed=seed,
            **self.spectrum_kwargs,
        )  # fmt: skip
        self.top_k, self.groups, self.seed = top_k, groups, seed
        self.density, self.trace = density, trace
        self.log_histogram = check_bool("log_histogram", log_histogram)
        self.log_figure = check_bool("log_figure", log_figure)
        self.keep_eigenvectors = check_bool("keep_eigenvectors", keep_eigenvectors)
        self.last_eigenvectors: torch.Tensor | None = None
        self.last_eigenvalues: np.ndarray | None = None
        self.axis: SpectrumAxis | None = None
        self._group_names: list[str] = []
        self.log_sharpness = check_bool("log_sharpness", log_sharpness)
        self.warm_start = check_bool("warm_start", warm_start)
        self.log_batch_spread = check_bool("log_batch_spread", log_batch_spread)
        self.batch_max_hvps = check_int("batch_max_hvps", batch_max_hvps, minimum=2)
        self._previous: torch.Tensor | None = None  # last top-k eigenvectors (warm start)
        self._watch = StabilityWatch(ABOVE_LINE_MEASUREMENTS)  # the above-the-line warning
        self._trainer: weakref.ref[Trainer] | None = None

    def _state_key(self) -> str:
        return self._generate_state_key(
            top_k=self.top_k, every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = weakref.ref(trainer)  # the layout asks which optimizer it is
        self._previous = None  # a new fit (maybe another model): cold
        if self.groups is not None:
            self._group_names = list(parameter_groups(pl_module, self.groups))

    def _gradient_equivalents(self) -> float:
        # One HVP in probe gradients: timed (1.2-1.5 on MLPs, 4 on an LSTM), else 2; Lanczos
        # steps, trace probes and top_k as a margin, per spectrum; per-batch products 1/B of
        # a probe-set one (on the probe set as it is now: a reduced form may hold one batch);
        # a graph per run, about two gradients.
        per_hvp = (self._product_seconds or 0.0) / (self._batch_seconds or 1.0) or 2.0
        steps, processes, groups = self._run_shape()
        probes = self.spectrum_kwargs.get("num_trace_probes") or 8
        hvps = steps * processes + self.top_k + (probes if self.trace else 0)
        spread = self._spread_on(len(self._probe or ()) or self.num_probe_batches)
        adam = self.log_sharpness and self._adam() is not False  # unless known to be another
        extra = self.batch_max_hvps * spread + 40.0 * adam  # the extra runs' products
        return per_hvp * (hvps * groups + extra) + 2.0 * (1 + spread + adam)

    def _run_shape(self) -> tuple[int, int, int]:
        """Lanczos steps per process, processes and spectra of one measurement, a priori: about
        6 top_k steps (the adaptive density rides on that run), or the fixed quadrature's."""
        kw = self.spectrum_kwargs
        steps = max((kw.get("slq_steps") or 0) if self.density else 0, 6 * self.top_k)
        processes = (kw.get("num_slq_probes") or 1) if self.density else 1
        return steps, processes, 1 + len(self._group_names)

    def _cost_guess(self, trainer: Trainer, pl_module: LightningModule) -> float:
        # The products, plus what does not scale with them: the reorthogonalisation (about
        # m²/2 passes over a basis row for m steps, memory-bound) and the figures.
        if self._product_seconds is None:  # timed once a fit, as the measurement computes it
            self._product_seconds = self._time_probe_product(pl_module, **self.spectrum_kwargs)
        guess = super()._cost_guess(trainer, pl_module)
        steps, processes, groups = self._run_shape()
        dim = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        row = reorthogonalisation_seconds(pl_module.device, dim)
        guess += groups * processes * steps * steps / 2 * row
        if self.log_figure or self.log_histogram:
            guess += _LOG_SECONDS_GUESS
        return guess

    def _layout(self) -> dict[str, dict[str, list[str]]]:
        return hessian_layout(self.tag_prefix, groups=self._group_names, adam=bool(self._adam()))

    def _adam(self) -> bool | None:
        """Whether the first optimizer is Adam or AdamW (None: no optimizer known yet)."""
        trainer = self._trainer() if self._trainer is not None else None
        optimizers = getattr(trainer, "optimizers", None)
        return adam_hyperparameters(optimizers[0]) is not None if optimizers else None

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callbacks; a weak reference cannot be, and is not needed there.
        return {**self.__dict__, "_trainer": None}

    def _spread_on(self, num_batches: int) -> bool:
        return self.log_batch_spread and num_batches > 1

    def _extras(self) -> dict[str, str]:
        """What a measurement adds to the top-k that costs products: attribute -> name."""
        extras = {"density": "density", "trace": "trace"}
        extras["log_batch_spread"] = "per-batch lambda_max"
        if self._adam():  # the SGD line needs no product; Adam's preconditioned run does
            extras["log_sharpness"] = "Adam's preconditioned sharpness"
        return {k: v for k, v in extras.items() if getattr(self, k)}

    def _reduced(self) -> contextlib.AbstractContextManager[str] | None:
        # None: top-k only already, nothing to leave out.
        return self._top_k_only() if self._extras() else None

    @contextlib.contextmanager
    def _top_k_only(self) -> Iterator[str]:
        extras = self._extras()
        for name in extras:
            setattr(self, name, False)
        try:
            yield f"the top-k eigenvalues only, without {', '.join(extras.values())}"
        finally:
            for name in extras:
                setattr(self, name, True)

    def _what(self) -> str:
        parts = [f"top-{self.top_k}"] + [n for n in ("density", "trace") if getattr(self, n)]
        return f"the Hessian spectrum ({', '.join(parts)})"

    def _compute(
        self, pl_module: LightningModule, batches: list[Any], loss_fn: Any, reduce_fn: Any
    ) -> _Measurement:
        self.last_eigenvectors = self.last_eigenvalues = None
        # Another monitor asked for the eigenpairs: compute and publish them.
        coord = self._coord
        share = coord if coord is not None and coord.requested(HESSIAN_EIGENPAIRS) else None
        if share is not None:
            share.withdraw(HESSIAN_EIGENPAIRS)  # a failed measurement shares nothing
        previous = self._previous if self.warm_start else None
        spread = self._spread_on(len(batches))
        kept = self.keep_eigenvectors or share is not None
        # The overlap and the per-batch start need no converged vectors: the Ritz vectors the
        # eigenvalues leave are free, converging them cost up to 1.6x the products.
        vectors = True if kept else ("ritz" if self.warm_start or spread else False)
        warm = None if self.density or self.trace else previous  # where it saves products
        result = hessian_spectrum(
            pl_module, loss_fn, batches, top_k=self.top_k, density=self.density,
            trace=self.trace, seed=self.seed, groups=self.groups, reduce_fn=reduce_fn,
            return_eigenvectors=vectors, warm_start=warm,
            **self.spectrum_kwargs,
        )  # fmt: skip
        extra: dict[str, float] = {}
        if previous is not None and warm is None:
            assert result.eigenvectors is not None
            extra["subspace_overlap"] = subspace_overlap(previous, result.eigenvectors)
        hvps, sharp = result.num_hvps, None
        if spread:
            hvps += self._batch_spread(pl_module, batches, loss_fn, reduce_fn, result, extra)
        if self.log_sharpness:
            sharp = self._sharpness(pl_module, batches, loss_fn, reduce_fn, result)
            hvps += sharp.num_hvps if sharp is not None else 0
        self._previous = result.eigenvectors if self.warm_start else None
        result = dataclasses.replace(
            result, num_hvps=hvps, eigenvectors=result.eigenvectors if kept else None
        )
        self.last_eigenvectors = result.eigenvectors
        self.last_eigenvalues = result.eigenvalues
        if share is not None and result.eigenvectors is not None:
            share.publish(HESSIAN_EIGENPAIRS, pl_module.trainer.global_step, result)
        return _Measurement(result, extra, sharp)

    def _operator_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.spectrum_kwargs.items() if k in _OPERATOR_OPTIONS}

    def _batch_spread(
        self,
        pl_module: LightningModule,
        batches: list[Any],
        loss_fn: Any,
        reduce_fn: Any,
        result: HessianSpectrum,
        extra: dict[str, float],
    ) -> int:
        """λ_max of each probe batch, from the probe set's top eigenvector; its products."""
        assert result.eigenvectors is not None
        spread = batch_sharpness(
            pl_module, loss_fn, batches, start=result.eigenvectors[0],
            max_hvps=self.batch_max_hvps, tol=self.spectrum_kwargs.get("tol", 1e-5),
            seed=self.seed, reduce_fn=reduce_fn, **self._operator_options(),
        )  # fmt: skip
        extra.update(batch_spread_scalars(spread))
        return spread.num_hvps

    def _sharpness(
        self,
        pl_module: LightningModule,
        batches: list[Any],
        loss_fn: Any,
        reduce_fn: Any,
        result: HessianSpectrum,
    ) -> OptimizerSharpness | None:
        """The first optimizer's sharpness against its line (Adam: an extra Lanczos run)."""
        try:
            optimizers = pl_module.trainer.optimizers
        except RuntimeError:  # a module measured outside fit: no optimizer to read
            return None
        if not optimizers or result.eigenvalues.size == 0:
            return None
        return optimizer_sharpness(
            pl_module, loss_fn, batches, optimizers[0], lambda_max=float(result.eigenvalues[0]),
            tol=self.spectrum_kwargs.get("tol", 1e-5), seed=self.seed, reduce_fn=reduce_fn,
            **self._operator_options(),
        )  # fmt: skip

    def _log(self, trainer: Trainer, step: int, result: _Measurement, seconds: float) -> None:
        extra = dict(result.extra)
        sharp = result.sharpness
        if sharp is not None and sharp.unsupported is not None:
            warn_once("hessian-sharpness-unsupported", f"HessianSpectrumMonitor: "
                      f"{sharp.unsupported}; sharpness_ratio is not logged.")  # fmt: skip
        st = sharp.stability if sharp is not None else None
        if st is not None:
            if st.kind == "adam":
                extra["preconditioned_sharpness"] = st.sharpness
            extra.update(sharpness_ratio=st.ratio, stability_threshold=st.threshold)
            if self._watch.update(st):
                lr, n = trainer.optimizers[0].param_groups[0]["lr"], self._watch.above
                warnings.warn(f"HessianSpectrumMonitor: the sharpness has been above the "
                              f"stability threshold of {st.kind} (lr={lr}) for {n} consecutive "
                              f"measurements (now {st.ratio:.3g}x): training sits above the edge "
                              "of stability (warned once).", stacklevel=2)  # fmt: skip
        self.axis = log_hessian_spectrum(
            trainer, step, result.result, prefix=self.tag_prefix, axis=self.axis,
            log_histogram=self.log_histogram, log_figure=self.log_figure, extra=extra,
        )  # fmt: skip

    def _extra_state(self) -> dict[str, Any]:
        return {"axis": self.axis.to_dict() if self.axis is not None else None}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        axis = state.get("axis")
        self.axis = SpectrumAxis.from_dict(axis) if axis else None
