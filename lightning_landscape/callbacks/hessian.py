"""HessianSpectrumMonitor: the Hessian spectrum of the training loss, during ``fit``."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypedDict

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import Unpack

from .._checks import check_bool, forward_options
from ..dashboard import SpectrumAxis, hessian_layout, warn_once
from ..dashboard.hessian import log_hessian_spectrum
from ..linalg import HessianSpectrum, hessian_spectrum, parameter_groups
from ..linalg._spectrum_options import check_spectrum_options
from ..linalg.sharpness import stability_from_param_group
from ._base import LandscapeMonitor
from ._schedule import HESSIAN_EIGENPAIRS

#: A priori seconds to draw the spectrum figure and write the histogram (one CPU core).
_LOG_SECONDS_GUESS = 0.25


def _row_pass_seconds(device: torch.device, dim: int) -> float:
    """Seconds of one Gram-Schmidt pass ``w - (B @ w) @ B`` per float64 basis row of ``dim``
    numbers on ``device``: timed on at most 8 × 2^19 numbers and scaled (memory-bound)."""
    n, rows = max(1, min(dim, 1 << 19)), 8
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(rows, n, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        w = w - (B @ w) @ B
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best / rows * (dim / n)


__all__ = ["HessianSpectrumMonitor"]

#: Options of :func:`hessian_spectrum` the monitor sets itself (the rest are forwarded).
_SET_HERE = (
    "top_k",
    "which",
    "density",
    "trace",
    "seed",
    "groups",
    "return_eigenvectors",
    "params",
    "reduce_fn",
    "warm_start",
)


class HessianOptions(TypedDict, total=False):
    """The options of :func:`~lightning_landscape.hessian_spectrum` a monitor forwards.

    Typed for LightningCLI / jsonargparse, which read ``**spectrum_kwargs`` through it; a test
    keeps it equal to the core's keyword options less those the monitor sets itself.
    """

    tol: float
    max_iter: int | None
    num_slq_probes: int | None
    slq_steps: int | None
    num_trace_probes: int | None
    max_basis_bytes: int | None
    retain_graph: bool | Literal["auto"]
    batch_size_fn: Callable[[Any], int] | None
    dtype: torch.dtype | None
    hvp: Literal["exact", "finite_difference", "auto"]


class HessianSpectrumMonitor(LandscapeMonitor):
    """Estimate the Hessian spectrum of the training loss periodically during ``fit``.

    Drop-in: ``Trainer(callbacks=[HessianSpectrumMonitor()])`` works on an unmodified
    LightningModule. The Hessian is that of the mean loss over a fixed probe set (the first
    ``num_probe_batches`` training batches of each rank, captured at the start of fit), measured in
    eval mode, with the module's own ``training_step`` as the loss (its ``self.log`` calls are
    silenced). Training is left bitwise unchanged. Under DDP every rank holds its shard of the
    probe set and the Hessian-vector products are all-reduced, so the result is that of the union.

    Schedule: by default a wall-time budget (``max_overhead``, 5% of training time) places the
    measurements; the end-of-fit measurement always runs, as the top-k eigenvalues only
    (``density=False, trace=False``) when the fit so far is too short to afford the full one.
    ``every_n_steps`` / ``every_n_epochs`` give a fixed, reproducible schedule instead. Under
    ``fast_dev_run``, or on the budget in a fit too short even for the top-k, it measures nothing
    (one line says so); a measurement of 5 s or more is announced (docs/design.md, "Fixed costs
    and short fits").

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
        keep_eigenvectors: keep the top-k Ritz vectors of the last measurement on the callback
            (``last_eigenvectors``, ``(top_k, D)`` on the model's device, and
            ``last_eigenvalues``; None after a skipped measurement); their residuals are then
            converged too, which costs more products. They are also kept when another monitor
            asks the trainer's coordinator for them (a :class:`GradientCovarianceMonitor` in
            the same trainer does), and then published there with the step they are of.
        clock: time source for the budget (tests).
        log_sharpness: log ``sharpness_ratio`` (λ_max over the optimizer's stability
            threshold, 1 = edge of stability) and ``stability_threshold``, read from the first
            optimizer's ``param_groups`` (SGD-like); warns once when above 1.
        **spectrum_kwargs: further options of :func:`~lightning_landscape.hessian_spectrum`
            (``tol``, ``max_iter``, ``num_slq_probes``, ``slq_steps``, ``num_trace_probes``,
            ``retain_graph``, ``batch_size_fn``, ``dtype``).

    Logged metrics (step axis = ``trainer.global_step``; scalars go to every logger, the rest to
    a TensorBoardLogger only):
        ``landscape/hessian/eigenvalue_01`` … ``eigenvalue_{top_k}``: top eigenvalues (one
        multi-line chart in the custom-scalars dashboard);
        ``landscape/hessian/residual_01`` …: their error bounds ``||Hv - θv||``;
        ``landscape/hessian/trace``, ``trace_stderr``;
        ``landscape/hessian/n_outliers``, ``bulk_edge``, ``lambda_min``;
        ``landscape/hessian/ratio_max_over_bulk_edge`` (λ_max / bulk edge) and
        ``ratio_max_over_kth`` (λ_1 / λ_k);
        ``landscape/hessian/sharpness_ratio`` (λ_max / stability threshold; 2/η for SGD,
        2(1+β)/η with momentum β) and ``stability_threshold``, with ``log_sharpness``;
        ``landscape/hessian/seconds``, ``num_hvps``, ``skipped``;
        ``landscape/hessian/<group>/eigenvalue_01`` … with ``groups``;
        histogram ``landscape/hessian/spectrum_signed_log``: x = sign(λ)·log10(1+|λ|/τ) with τ
        fixed at the first measurement (0.1% of |λ|max), y = log10(1 + number of eigenvalues),
        so single outliers stay visible beside a bulk of thousands; explained in the text card
        ``landscape/hessian/spectrum_axis``;
        image ``landscape/hessian/density``: the density on a log scale, outliers and bulk edge
        marked, and the top eigenvalues with error bars. TensorBoard keeps 10 images per tag
        unless started with ``--samples_per_plugin images=100``.
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
        max_overhead: float = 0.05,
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
        **spectrum_kwargs: Unpack[HessianOptions],
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
        self.spectrum_kwargs = forward_options(
            hessian_spectrum, spectrum_kwargs, owner=HessianSpectrumMonitor, exclude=_SET_HERE
        )
        # The core's own checker: a bad forwarded value fails here, not minutes into fit.
        check_spectrum_options(
            top_k=top_k,
            groups=groups,
            density=density,
            trace=trace,
            seed=seed,
            **self.spectrum_kwargs,
        )
        self.top_k = top_k
        self.groups = groups
        self.density = density
        self.trace = trace
        self.seed = seed
        self.log_histogram = check_bool("log_histogram", log_histogram)
        self.log_figure = check_bool("log_figure", log_figure)
        self.keep_eigenvectors = check_bool("keep_eigenvectors", keep_eigenvectors)
        self.last_eigenvectors: torch.Tensor | None = None
        self.last_eigenvalues: np.ndarray | None = None
        self.axis: SpectrumAxis | None = None
        self._group_names: list[str] = []
        if not isinstance(log_sharpness, bool):
            raise ValueError(f"log_sharpness must be a bool; got {log_sharpness!r}")
        self.log_sharpness = log_sharpness
        self._warned_above_line = False

    def _state_key(self) -> str:
        return self._generate_state_key(
            top_k=self.top_k, every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.groups is not None:
            self._group_names = list(parameter_groups(pl_module, self.groups))

    def _gradient_equivalents(self) -> float:
        # A Hessian-vector product costs 1.2 to 2 probe gradients (graph reuse, batched
        # vectors); the guess takes the conservative end: it only places the first
        # measurement, later ones use measured costs. Products: the Lanczos steps of
        # :meth:`_run_shape`, then the trace probes (top_k counted too, as a margin), per
        # spectrum (whole model and groups); plus the graph build.
        steps, processes, groups = self._run_shape()
        probes = self.spectrum_kwargs.get("num_trace_probes") or 8
        hvps = steps * processes + self.top_k + (probes if self.trace else 0)
        return 2.0 * hvps * groups + 2.0

    def _run_shape(self) -> tuple[int, int, int]:
        """Lanczos steps per process, processes in lockstep and spectra (whole model and
        groups) of one measurement, a priori: about 6 top_k steps for the top-k (the adaptive
        density rides on that run: benchmarks/hvp_counts.py measures 1.1-1.8x its products),
        or the fixed quadrature options when they are given."""
        kw = self.spectrum_kwargs
        steps = max((kw.get("slq_steps") or 0) if self.density else 0, 6 * self.top_k)
        processes = (kw.get("num_slq_probes") or 1) if self.density else 1
        return steps, processes, 1 + len(self._group_names)

    def _cost_guess(self, trainer: Trainer, pl_module: LightningModule) -> float:
        # The products (timed probe gradient, scaled) plus what does not scale with them: the
        # full reorthogonalisation of the Lanczos bases, memory-bound, about m²/2 passes over
        # a basis row for m steps of each process (timed on a slice), and the figures (a fixed
        # guess). Measured on the 85k-parameter MLP of benchmarks/overhead.py: products 0.9 s,
        # reorthogonalisation 0.7 s, figures 0.25 s; the gradient part alone guessed 0.4 s.
        guess = super()._cost_guess(trainer, pl_module)
        steps, processes, groups = self._run_shape()
        dim = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        row = _row_pass_seconds(pl_module.device, dim)
        guess += groups * processes * steps * steps / 2 * row
        if self.log_figure or self.log_histogram:
            guess += _LOG_SECONDS_GUESS
        return guess

    def _layout(self) -> dict[str, dict[str, list[str]]]:
        return hessian_layout(self.tag_prefix, groups=self._group_names)

    def _reduced(self) -> contextlib.AbstractContextManager[str] | None:
        if not (self.density or self.trace):
            return None  # top-k only already: nothing to leave out
        return self._top_k_only()

    @contextlib.contextmanager
    def _top_k_only(self) -> Iterator[str]:
        density, trace = self.density, self.trace
        self.density = self.trace = False
        try:
            yield "the top-k eigenvalues only, without density and trace"
        finally:
            self.density, self.trace = density, trace

    def _what(self) -> str:
        parts = [f"top-{self.top_k}"] + [n for n in ("density", "trace") if getattr(self, n)]
        return f"the Hessian spectrum ({', '.join(parts)})"

    def _compute(
        self, pl_module: LightningModule, batches: list[Any], loss_fn: Any, reduce_fn: Any
    ) -> HessianSpectrum:
        self.last_eigenvectors = self.last_eigenvalues = None
        # Another monitor asked for the eigenpairs: compute and publish them.
        coord = self._coord
        share = coord if coord is not None and coord.requested(HESSIAN_EIGENPAIRS) else None
        if share is not None:
            share.withdraw(HESSIAN_EIGENPAIRS)  # a failed measurement shares nothing
        result = hessian_spectrum(
            pl_module,
            loss_fn,
            batches,
            top_k=self.top_k,
            density=self.density,
            trace=self.trace,
            seed=self.seed,
            groups=self.groups,
            reduce_fn=reduce_fn,
            return_eigenvectors=self.keep_eigenvectors or share is not None,
            **self.spectrum_kwargs,
        )
        self.last_eigenvectors = result.eigenvectors
        self.last_eigenvalues = result.eigenvalues
        if share is not None and result.eigenvectors is not None:
            share.publish(HESSIAN_EIGENPAIRS, pl_module.trainer.global_step, result)
        return result

    def _log(self, trainer: Trainer, step: int, result: HessianSpectrum, seconds: float) -> None:
        extra = self._stability_scalars(trainer, result) if self.log_sharpness else {}
        self.axis = log_hessian_spectrum(
            trainer, step, result, prefix=self.tag_prefix, axis=self.axis,
            log_histogram=self.log_histogram, log_figure=self.log_figure, extra=extra,
        )  # fmt: skip

    def _stability_scalars(self, trainer: Trainer, result: HessianSpectrum) -> dict[str, float]:
        """``sharpness_ratio`` (λ_max / threshold, 1 = edge of stability) and the threshold.

        Reads the first optimizer's hyper-parameters at measurement time (never changes them):
        SGD's ``lr``, ``momentum``, ``dampening``, ``nesterov``, ``weight_decay``; see
        :mod:`lightning_landscape.linalg.sharpness`. Adam's line concerns the preconditioned
        sharpness, which needs its own Lanczos run: not measured here (one notice). Warns once
        when the ratio exceeds 1: the step is then unstable along the top eigenvector for the
        quadratic model, which full-batch training typically reaches and hovers at (Cohen et
        al. 2021), and which else signals a step size too large for the curvature.
        """
        optimizers = getattr(trainer, "optimizers", None) or []
        if not optimizers or result.eigenvalues.size == 0:
            return {}
        groups = optimizers[0].param_groups
        keys = ("lr", "momentum", "dampening", "nesterov", "weight_decay")
        if "betas" in groups[0] or any(
            tuple(g.get(k) for k in keys) != tuple(groups[0].get(k) for k in keys) for g in groups
        ):
            warn_once(
                "hessian-sharpness-unsupported",
                "HessianSpectrumMonitor: sharpness_ratio is logged for SGD-like optimizers with "
                "one set of hyper-parameters; for Adam use "
                "lightning_landscape.linalg.sharpness.preconditioned_sharpness.",
            )
            return {}
        st = stability_from_param_group(float(result.eigenvalues[0]), groups[0])
        if st.ratio > 1 and not self._warned_above_line:
            self._warned_above_line = True
            warnings.warn(
                f"HessianSpectrumMonitor: sharpness {st.sharpness:.4g} is {st.ratio:.3g}x the "
                f"stability threshold {st.threshold:.4g} of {st.kind} (lr={groups[0]['lr']}): "
                "training sits above the edge of stability (warned once).",
                UserWarning,
                stacklevel=2,
            )
        return {"sharpness_ratio": st.ratio, "stability_threshold": st.threshold}

    def _extra_state(self) -> dict[str, Any]:
        return {"axis": self.axis.to_dict() if self.axis is not None else None}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        axis = state.get("axis")
        self.axis = SpectrumAxis.from_dict(axis) if axis else None
