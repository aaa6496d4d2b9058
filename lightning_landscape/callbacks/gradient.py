"""GradientCovarianceMonitor: per-sample gradient covariance and noise scale, during ``fit``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import Unpack, override

from .._checks import (
    check_bool,
    check_callable,
    check_choice,
    check_fraction,
    check_positive_int,
    forward_options,
)
from ..dashboard import SpectrumAxis, warn_once
from ..dashboard.gradient import gradient_layout, log_gradient_covariance
from ..linalg import (
    ClassStructure,
    GradientCovariance,
    GradientNoiseTracker,
    HessianAlignment,
    class_structure,
    gradient_covariance,
    hessian_alignment,
)
from ..linalg.covariance import GRAM_MAX_ELEMENTS, CovarianceOptions, covariance_route
from ..linalg.operators import default_batch_size
from ..linalg.per_sample import OutputsFn
from . import _context as ctx
from ._applicability import per_sample_path
from ._base import LandscapeMonitor
from ._schedule import HESSIAN_EIGENPAIRS, dependency_order
from ._thinning import norm_reading

__all__ = ["GradientCovarianceMonitor"]


@dataclass(frozen=True, eq=False)
class _Measurement:
    covariance: GradientCovariance
    alignment: HessianAlignment | None  # with the Hessian monitor's eigenvectors, same step
    class_structure: ClassStructure | None


#: Options of :func:`gradient_covariance` the monitor sets itself (the rest are forwarded).
_SET_HERE = (
    "top_k", "seed", "method", "per_sample", "outputs_fn", "per_sample_loss_fn",
    "return_eigenvectors", "params", "reduce_fn", "batch_size_fn",
)  # fmt: skip


class GradientCovarianceMonitor(LandscapeMonitor):
    r"""Gradient noise during ``fit``: the per-sample gradient covariance and the noise scale.

    Drop-in: ``Trainer(callbacks=[GradientCovarianceMonitor()])`` works on an unmodified
    LightningModule. Two signals:

    **Periodic, exact, on the probe set**: :func:`~lightning_landscape.gradient_covariance` of
    the per-sample gradients of the :math:`N` probe samples (top eigenvalues and trace of
    :math:`\Sigma`, ``1/N`` convention; the simple noise scale
    :math:`\operatorname{tr}\Sigma/\|\bar g\|^2` of McCandlish et al. 2018 and its unbiased
    variant); with a :class:`HessianSpectrumMonitor` in the trainer (any order), the share of
    :math:`\|\bar g\|^2` in its top-k eigenvectors' span (Gur-Ari et al. 2018) and the
    principal angles (:func:`~lightning_landscape.linalg.hessian_alignment`). Under DDP the
    result equals one process on the union.

    **Continuous, cheap, from the training steps**
    (:class:`~lightning_landscape.GradientNoiseTracker`): a bias-corrected moving average of
    :math:`\|g_B\|^2` of the gradient the optimiser is about to use (no host sync a step) and,
    with the last probe trace, ``train_noise_scale``; logged every ``log_every_n_steps``.

    Args:
        top_k: number of top covariance eigenvalues.
        every_n_steps: measure at every ``n``-th optimizer step (step 0 included).
        every_n_epochs: measure at the end of every ``n``-th epoch.
        max_overhead: the budget, as a share of training wall time.
        num_probe_batches: probe batches per rank.
        probe_dataloader: take the probe set from this loader instead (first batches).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss; called on single samples.
            Required with manual optimisation.
        outputs_fn: ``(model, batch) -> (logits, targets)`` for the per-sample-loss path (when
            vmap fails); default ``(model(batch[0]), batch[1])``. Both paths are tried at fit
            start (README, "Guarantees"): where neither applies the probe covariance is off.
        per_sample_loss_fn: ``(logits, targets) -> (n,)``; default cross-entropy.
        method: ``"auto"``, ``"gram"`` or ``"lanczos"`` (see ``gradient_covariance``).
        train_mode: measure in train mode (not deterministic under DDP).
        seed: seeds the Lanczos start vector.
        noise_ema: decay of the moving average of training-gradient norms, in (0, 1), per
            step read.
        track_training_noise: compute the continuous training-step signal. Where reading the
            norms would cost more than 0.25% of a step (fast steps), every k-th step is read,
            k widened as timing requires (``callbacks/_thinning.py``; never with the comm hook).
        ddp_comm_hook: under DDP, read each rank's gradient before the all-reduce through a
            communication hook, for McCandlish's two-batch-size estimator
            (:func:`~lightning_landscape.linalg.two_batch_estimate`); off by default (it
            replaces DDP's built-in reducer call).
        log_histogram: write the top eigenvalues to the histogram dashboard.
        log_class_structure: also measure :func:`~lightning_landscape.class_structure` (with
            the Hessian monitor's eigenpairs of the same step, else two Lanczos runs).
        batch_size_fn: samples in a batch; default length of its first tensor.
        clock: time source for the budget (tests).
        **covariance_kwargs: ``chunk_size``, ``gram_max_elements``, ``tol``, ``max_iter``,
            ``dtype`` of :func:`~lightning_landscape.gradient_covariance`.

    Logged metrics: under ``landscape/gradient/`` on the ``trainer.global_step`` axis (top
    eigenvalues of Σ, trace, noise scales, the alignment with the Hessian, the class structure,
    the training-step signal, ``seconds``, ``skipped``; a spectrum histogram on the signed-log
    axis); the README's "What you see in TensorBoard" lists every tag.
    """

    name = "gradient"
    #: Results of other monitors this one reads from the coordinator (their providers run first).
    uses = (HESSIAN_EIGENPAIRS,)

    def __init__(
        self,
        *,
        top_k: int = 10,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        max_overhead: float = 0.01,
        num_probe_batches: int = 4,
        probe_dataloader: Iterable[Any] | None = None,
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
        outputs_fn: OutputsFn | None = None,
        per_sample_loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        method: Literal["auto", "gram", "lanczos"] = "auto",
        train_mode: bool = False,
        seed: int = 0,
        noise_ema: float = 0.9,
        track_training_noise: bool = True,
        ddp_comm_hook: bool = False,
        log_histogram: bool = True,
        log_class_structure: bool = False,
        batch_size_fn: Callable[[Any], int] | None = None,
        clock: Callable[[], float] | None = None,
        **covariance_kwargs: Unpack[CovarianceOptions],
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps, every_n_epochs=every_n_epochs,
            max_overhead=max_overhead, num_probe_batches=num_probe_batches,
            probe_dataloader=probe_dataloader, loss_fn=loss_fn, train_mode=train_mode,
            clock=clock,
        )  # fmt: skip
        fns = {"outputs_fn": outputs_fn, "per_sample_loss_fn": per_sample_loss_fn}
        fns["batch_size_fn"] = batch_size_fn
        _check_arguments(top_k, method, noise_ema, fns, covariance_kwargs)
        self.top_k, self.method, self.seed = top_k, method, seed
        self.outputs_fn, self.per_sample_loss_fn = outputs_fn, per_sample_loss_fn
        self.noise_ema = float(noise_ema)
        self.track_training_noise = track_training_noise
        self.ddp_comm_hook = check_bool("ddp_comm_hook", ddp_comm_hook)
        self.log_histogram, self.log_class_structure = log_histogram, log_class_structure
        self.batch_size_fn, self.covariance_kwargs = batch_size_fn, covariance_kwargs
        self.axis: SpectrumAxis | None = None
        # Checkpointed: the last probe trace and the training-step averages.
        self.last_trace, self.last_num_samples = None, None  # float, int once measured
        self._noise = GradientNoiseTracker(self.noise_ema)
        # Per-fit objects.
        self._grad_params: list[torch.Tensor] | None = None
        self._batch_size = self._logged_step = None  # int once known
        self._per_sample: Literal["auto", "vmap", "outputs"] = "auto"
        self._covariance_on = True  # off for the fit when no per-sample path applies
        self._route = method  # the covariance route the cost guess assumes
        self._tracking = norm_reading()  # which steps' gradient norms are read

    def _state_key(self) -> str:
        n = {"every_n_steps": self.every_n_steps, "every_n_epochs": self.every_n_epochs}
        return self._generate_state_key(top_k=self.top_k, **n)

    # -- setup -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self._coord is None:
            return
        self._coord.request(HESSIAN_EIGENPAIRS)
        # Hooks run in list order: a Hessian monitor after this one moves before it, so that its
        # eigenpairs of a step are published before they are read (later hooks see the new list).
        trainer.callbacks = dependency_order(trainer.callbacks)
        probe = (self.num_probe_batches, self.probe_dataloader)
        if any(
            HESSIAN_EIGENPAIRS in getattr(cb, "provides", ())
            and (cb.num_probe_batches, cb.probe_dataloader) != probe
            for cb in trainer.callbacks
        ):
            warn_once("gradient-hessian-probe", "GradientCovarianceMonitor: the Hessian "
                      "monitor has another probe set (num_probe_batches or probe_dataloader): "
                      "the overlap compares this gradient with that Hessian.")  # fmt: skip

    def _gradient_equivalents(self) -> float:
        # One per-sample-gradient pass (vmap) costs about 3 probe gradients; the operator route
        # adds a Lanczos run of up to ~N products of about 3 each, guessed as 6 top_k.
        return 4.0 + (3.0 * 6 * self.top_k if self._route == "lanczos" else 0.0)

    @override
    def _cost_guess(self, trainer: Trainer, pl_module: LightningModule) -> float:
        # The route method="auto" will take: the Gram route's guess for a model that takes the
        # Lanczos one put a 35 s measurement at 7 s.
        size = self.batch_size_fn or default_batch_size
        try:
            n = sum(size(b) for b in self._probe or [])
        except ValueError:  # no batch size to read: the measurement will say so, not this
            n = 0
        self._route = covariance_route(
            n, sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            method=self.method, distributed=ctx.make_reduce(trainer) is not None,
            gram_max_elements=self.covariance_kwargs.get("gram_max_elements", GRAM_MAX_ELEMENTS),
        )  # fmt: skip
        return super()._cost_guess(trainer, pl_module)

    def _layout(self) -> dict[str, dict[str, list[str]]]:
        return gradient_layout(self.tag_prefix)

    def _reduced(self) -> Any:  # the per-sample gradients of one probe batch instead of all
        return self._first_probe_batch()

    def _what(self) -> str:
        return f"the gradient covariance (top-{self.top_k})"

    # -- measurement -------------------------------------------------------------------------
    def _compute(
        self, pl_module: LightningModule, batches: list[Any], loss_fn: Any, reduce_fn: Any
    ) -> _Measurement:
        # The Hessian monitor's eigenpairs when it measured at this step (it runs first).
        coord, step = self._coord, pl_module.trainer.global_step
        hessian = coord.latest(HESSIAN_EIGENPAIRS, step) if coord is not None else None
        values, vectors = (hessian.eigenvalues, hessian.eigenvectors) if hessian else (None, None)
        options = {"seed": self.seed, "batch_size_fn": self.batch_size_fn, "reduce_fn": reduce_fn}
        try:
            cov = gradient_covariance(
                pl_module, loss_fn, batches, top_k=self.top_k, method=self.method,
                per_sample=self._per_sample, outputs_fn=self.outputs_fn,
                per_sample_loss_fn=self.per_sample_loss_fn, return_eigenvectors=vectors is not None,
                **options, **self.covariance_kwargs,
            )  # fmt: skip
        except ValueError as err:
            # Neither single-sample calls nor outputs_fn apply to this module and batches: the
            # measurement cannot be made; skip it (counted, warned once) rather than stop
            # training. Decided identically on every rank (same module, same code path).
            raise FloatingPointError(f"no per-sample gradients: {err}") from err
        # The path that worked is kept: later measurements neither retry vmap nor warn again.
        self._per_sample = "outputs" if cov.per_sample == "outputs" else "vmap"
        if not (np.all(np.isfinite(cov.eigenvalues)) and np.isfinite(cov.trace)):
            raise FloatingPointError("non-finite covariance eigenvalue or trace")
        self.last_trace, self.last_num_samples = cov.trace, cov.num_samples
        alignment = hessian_alignment(cov, vectors) if vectors is not None else None
        structure = None
        if self.log_class_structure:
            try:  # with the Hessian monitor's eigenpairs, else computed here (two Lanczos runs)
                structure = class_structure(
                    pl_module, batches, top_k=len(values) if values is not None else self.top_k,
                    outputs_fn=self.outputs_fn, hessian_eigenvectors=vectors,
                    hessian_eigenvalues=values if vectors is not None else None,
                    dtype=self.covariance_kwargs.get("dtype"), **options,
                )  # fmt: skip
            except ValueError as err:  # outputs_fn does not apply: drop the feature, train on
                self.log_class_structure = False
                warn_once(
                    "gradient-class-structure",
                    f"GradientCovarianceMonitor: class structure switched off ({err}).",
                )
        return _Measurement(cov, alignment, structure)

    def _log(self, trainer: Trainer, step: int, result: _Measurement, seconds: float) -> None:
        kw = {"prefix": self.tag_prefix, "axis": self.axis, "log_histogram": self.log_histogram}
        self.axis = log_gradient_covariance(trainer, step, **vars(result), **kw)

    # -- continuous signal from the training steps -------------------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._noise.release()
        if not (self.track_training_noise and self.ddp_comm_hook) or self._off is not None:
            return
        try:  # not DDP over 2+ processes, or the strategy registered its own hook
            self._noise.attach_ddp(getattr(trainer.strategy, "model", None), pl_module.device)
        except (RuntimeError, ValueError) as err:
            warn_once(
                "gradient-comm-hook",
                f"GradientCovarianceMonitor: could not register the DDP comm hook ({err}); the "
                "two-batch-size noise scale is not logged.",
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._grad_params, self._covariance_on, self._tracking = None, True, norm_reading()
        super().on_train_start(trainer, pl_module)

    @override
    def _check_defaults(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = per_sample_path(
            trainer, pl_module, self._probe[0] if self._probe else None,
            loss_fn=self.loss_fn or ctx.training_step_loss(pl_module),
            outputs_fn=self.outputs_fn, per_sample_loss_fn=self.per_sample_loss_fn,
            batch_size_fn=self.batch_size_fn, train_mode=self.train_mode,
            per_sample=self._per_sample,
        )  # fmt: skip
        self._covariance_on = path is not None
        self._per_sample = path or self._per_sample

    @override
    def _due(self, trainer: Trainer, pl_module: LightningModule, step: int) -> bool:
        return self._covariance_on and super()._due(trainer, pl_module, step)

    @override
    def _measure(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        if self._covariance_on:
            super()._measure(trainer, pl_module, step)

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.track_training_noise and self._tracking.due(trainer.global_step):
            try:
                self._batch_size = int((self.batch_size_fn or default_batch_size)(batch))
            except ValueError:
                self._batch_size = None

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        on = self.track_training_noise and self._off is None
        if not on or not self._tracking.due(trainer.global_step):
            return
        params, t0 = self._grad_params, self._now()
        if params is None:  # all of them: a fine-tuning schedule may unfreeze some later
            params = self._grad_params = list(pl_module.parameters())
        self._noise.update(
            [p.grad for p in params if p.grad is not None],
            batch_size=self._batch_size,
            world_size=int(getattr(trainer, "world_size", 1) or 1),
            accumulation=int(getattr(trainer, "accumulate_grad_batches", 1) or 1),
        )
        if self._noise.thinnable and self._coord is not None:  # the comm hook needs every step
            self._tracking.ran(self._now() - t0, self._coord.step_seconds)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        every = max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        on = self.track_training_noise and self._off is None
        if on and step % every == 0 and step != self._logged_step:
            self._logged_step, t0 = step, self._now()
            # Every rank (with the comm hook compute() holds a collective); the logger's writes
            # can take milliseconds (TensorBoard's queue): charged in full.
            noise = self._noise.compute(trace=self.last_trace, num_samples=self.last_num_samples)
            if noise is not None and trainer.is_global_zero:
                log_gradient_covariance(trainer, step, training_noise=noise, prefix=self.tag_prefix)
            self._charge(self._now() - t0)

    # -- state -------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        axis = self.axis.to_dict() if self.axis is not None else None
        own = {"last_trace": self.last_trace, "last_num_samples": self.last_num_samples}
        return {"axis": axis, **own, **self._noise.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        axis = state.get("axis")
        self.axis = SpectrumAxis.from_dict(axis) if axis else None
        self.last_trace = state.get("last_trace")
        self.last_num_samples = state.get("last_num_samples")
        self._noise.load_state_dict(state)


def _check_arguments(
    top_k: Any, method: Any, noise_ema: Any, fns: dict[str, Any], covariance_kwargs: dict[str, Any]
) -> None:
    """The constructor's checks of its own arguments (the base class checks the schedule)."""
    check_positive_int("top_k", top_k)
    check_choice("method", method, ("auto", "gram", "lanczos"))
    check_fraction("noise_ema", noise_ema, what="a decay")
    for name, fn in fns.items():
        check_callable(name, fn, allow_none=True)
    forward_options(
        gradient_covariance, covariance_kwargs, owner=GradientCovarianceMonitor, exclude=_SET_HERE
    )
