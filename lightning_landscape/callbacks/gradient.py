"""GradientCovarianceMonitor: per-sample gradient covariance and noise scale, during ``fit``."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from ..dashboard import (
    SpectrumAxis,
    spectrum_axis_markdown,
    tensorboard_writer,
    warn_once,
    write_figure,
    write_spectrum_histogram,
    write_text,
)
from ..dashboard.gradient import class_structure_figure, gradient_layout
from ..linalg.class_structure import (
    ClassStructure,
    class_structure,
    gradient_overlap,
    principal_angles,
)
from ..linalg.covariance import GradientCovariance, OutputsFn, gradient_covariance
from ..linalg.operators import default_batch_size
from ._base import LandscapeMonitor
from .hessian import HessianSpectrumMonitor

__all__ = ["GradientCovarianceMonitor"]

#: Display broadening of the spectrum histogram, in signed-log decades.
HISTOGRAM_SIGMA = 0.02
#: Training steps buffered on the device between folds into the noise-scale moving average.
_NORM_ROWS = 256


class _LocalNorms:
    """State of the DDP comm hook: this rank's squared gradient norm before the average."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sq = torch.zeros((), dtype=torch.float64, device=device)


def _local_norm_hook(state, bucket):  # type: ignore[no-untyped-def]
    """Add the bucket's local squared norm, then DDP's own averaging all-reduce, unchanged.

    Not annotated: DDP checks the annotations at run time, and postponed (string) annotations
    fail its check.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state.sq += bucket.buffer().detach().double().pow(2).sum().to(state.sq.device)
    return allreduce_hook(None, bucket)  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class _Measurement:
    covariance: GradientCovariance
    hessian_overlap: np.ndarray | None  # cumulative shares over the Hessian's top-k
    principal_angles: np.ndarray | None  # degrees, ascending
    class_structure: ClassStructure | None


class GradientCovarianceMonitor(LandscapeMonitor):
    r"""Gradient noise during ``fit``: the per-sample gradient covariance and the noise scale.

    Drop-in: ``Trainer(callbacks=[GradientCovarianceMonitor()])`` works on an unmodified
    LightningModule. Two signals:

    **Periodic, exact, on the probe set** (schedule and probe set as every monitor: the first
    ``num_probe_batches`` training batches of each rank, eval mode, the module's
    ``training_step`` as the loss): :func:`~lightning_landscape.gradient_covariance` of the
    per-sample gradients :math:`g_i` over the :math:`N` probe samples, with
    :math:`\Sigma = \frac1N\sum_i (g_i-\bar g)(g_i-\bar g)^\top`: its top eigenvalues, trace and
    the simple noise scale :math:`B_{\rm simple} = \operatorname{tr}\Sigma/\|\bar g\|^2`
    (McCandlish et al. 2018). :math:`\|\bar g\|^2` overestimates the true squared gradient norm by
    :math:`\operatorname{tr}\Sigma_{\rm pop}/N`, so ``noise_scale`` is biased low; the unbiased
    variant ``noise_scale_unbiased`` uses :math:`\frac{N}{N-1}\operatorname{tr}\Sigma` and
    :math:`\|\bar g\|^2 - \operatorname{tr}\Sigma/(N-1)` (NaN when the latter is not positive).
    Under DDP the products are all-reduced and the result equals one process on the union.

    When a :class:`HessianSpectrumMonitor` is in ``trainer.callbacks`` *before* this monitor and
    measured at the same step, its top-k eigenvectors are shared (not recomputed; it is switched
    to keep them) and the share of :math:`\|\bar g\|^2` in their span (Gur-Ari et al. 2018) and
    the principal angles between the covariance and Hessian top subspaces are logged.

    **Continuous, cheap, from the real training steps**: in ``on_before_optimizer_step`` the
    squared norm of the gradient the optimiser is about to use, :math:`\|g_B\|^2` (per-tensor
    norms by one fused reduction, stacked into a row of a device buffer: two kernel launches
    a step, no host sync; the buffer is read back at logging steps), goes into an exponential
    moving average (decay
    ``noise_ema``, bias-corrected; non-finite steps, e.g. skipped GradScaler steps, are left out
    and counted). Lightning unscales AMP gradients before this hook; under DDP the gradient is
    already averaged over ranks, so :math:`B` is the global batch (per-rank batch × world size ×
    accumulation). Since :math:`E\|g_B\|^2 = \|G\|^2 + \operatorname{tr}\Sigma/B`, with the
    trace from the last probe measurement:
    ``train_noise_scale`` :math:`= \operatorname{tr}\Sigma / \mathrm{EMA}\|g_B\|^2` (biased low:
    the denominator carries the noise :math:`\operatorname{tr}\Sigma/B`) and
    ``train_noise_scale_unbiased`` :math:`= \operatorname{tr}\Sigma_{\rm pop} /
    (\mathrm{EMA}\|g_B\|^2 - \operatorname{tr}\Sigma_{\rm pop}\,\mathrm{EMA}(1/B))` (NaN when not
    positive). Both lag the weights by the EMA window and use a trace measured in eval mode on the
    probe set; they are logged every ``log_every_n_steps`` (one sync each).

    Args:
        top_k: number of top covariance eigenvalues.
        every_n_steps: measure at every ``n``-th optimizer step (step 0 included).
        every_n_epochs: measure at the end of every ``n``-th epoch.
        max_overhead: the budget, as a share of training wall time.
        num_probe_batches: probe batches per rank.
        probe_dataloader: take the probe set from this loader instead (first batches).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss; called on single samples.
            Required with manual optimisation.
        outputs_fn: ``(model, batch) -> (logits, targets)`` for the per-sample-loss path (used
            when vmap over single samples fails, e.g. batch norm in train mode); default
            ``(model(batch[0]), batch[1])``.
        per_sample_loss_fn: ``(logits, targets) -> (n,)``; default cross-entropy.
        method: ``"auto"``, ``"gram"`` or ``"lanczos"`` (see ``gradient_covariance``).
        train_mode: measure in train mode (not deterministic under DDP).
        seed: seeds the Lanczos start vector.
        noise_ema: decay of the moving average of training-gradient norms, in (0, 1).
        track_training_noise: compute the continuous training-step signal.
        ddp_comm_hook: under DDP, also register a communication hook on the DDP wrapper that
            reads each rank's gradient before the all-reduce (then runs PyTorch's reference
            ``allreduce_hook``, documented to give DDP's own result), for McCandlish's
            two-batch-size estimator: per-rank batch ``B_small`` and global batch ``B_big``,
            :math:`\operatorname{tr}\Sigma \approx (|g_{small}|^2 - |g_{big}|^2) /
            (1/B_{small} - 1/B_{big})` and :math:`|G|^2 \approx (|g_{big}|^2/B_{small} -
            |g_{small}|^2/B_{big}) / (1/B_{small} - 1/B_{big})`, both EMA-smoothed, their ratio
            logged as ``train_noise_scale_two_batch``. Independent of the probe set; costs one
            norm per bucket and one scalar all-reduce per logging step. Off by default (it
            replaces DDP's built-in reducer call by the Python reference hook).
        log_histogram: write the top eigenvalues to the histogram dashboard.
        log_class_structure: also measure the class structure of the curvature
            (:func:`~lightning_landscape.linalg.class_structure.class_structure`, cross-entropy
            on ``outputs_fn``'s logits): top Gauss–Newton eigenvalues and the share of each top
            Hessian eigenvalue explained by the between-class part. Uses the Hessian monitor's
            eigenpairs when it measured at the same step, else computes them (costly: two
            Lanczos runs). Skipped with one notice where ``outputs_fn`` does not apply.
        batch_size_fn: samples in a batch; default length of its first tensor.
        clock: time source for the budget (tests).
        **covariance_kwargs: ``chunk_size``, ``gram_max_elements``, ``tol``, ``max_iter``,
            ``dtype`` of :func:`~lightning_landscape.gradient_covariance`.

    Logged metrics (step axis = ``trainer.global_step``; scalars go to every logger):
        ``landscape/gradient/eigenvalue_01`` … ``eigenvalue_{top_k}``: top eigenvalues of Σ;
        ``landscape/gradient/trace``, ``mean_gradient_norm``, ``noise_scale``,
        ``noise_scale_unbiased``, ``num_samples``;
        ``landscape/gradient/hessian_overlap`` (share of :math:`\|\bar g\|^2` in the Hessian's
        top-k span) and ``hessian_overlap_01`` (top-1 only), ``principal_angle_01`` …
        (degrees, ascending), with a Hessian monitor;
        ``landscape/gradient/ggn_eigenvalue_01`` …, ``between_class_share_01`` …,
        ``between_class_rayleigh_share_01`` … and the image ``landscape/gradient/
        class_structure`` (Hessian, GGN and between-class eigenvalues) with
        ``log_class_structure``;
        ``landscape/gradient/train_grad_norm_sq``, ``train_noise_scale``,
        ``train_noise_scale_unbiased``, ``train_nonfinite_steps`` (continuous signal);
        ``train_grad_norm_sq_local``, ``train_trace_two_batch``, ``train_noise_scale_two_batch``
        with ``ddp_comm_hook``;
        ``landscape/gradient/seconds``, ``skipped``;
        histogram ``landscape/gradient/spectrum_signed_log``: the top-k eigenvalues (each of
        weight 1/D), the other D-k lumped at 0 (exact when ``top_k >= N - 1``, the rank of Σ),
        on the signed-log axis of the text card ``landscape/gradient/spectrum_axis``.
    """

    name = "gradient"

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
        **covariance_kwargs: Any,
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
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a positive integer; got {top_k!r}")
        if method not in ("auto", "gram", "lanczos"):
            raise ValueError(f"method must be 'auto', 'gram' or 'lanczos'; got {method!r}")
        if isinstance(noise_ema, bool) or not (
            isinstance(noise_ema, (int, float)) and 0 < noise_ema < 1
        ):
            raise ValueError(f"noise_ema must be a decay in (0, 1); got {noise_ema!r}")
        for name, fn in (
            ("outputs_fn", outputs_fn),
            ("per_sample_loss_fn", per_sample_loss_fn),
            ("batch_size_fn", batch_size_fn),
        ):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be callable or None; got {fn!r}")
        allowed = {"chunk_size", "gram_max_elements", "tol", "max_iter", "dtype"}
        unknown = sorted(set(covariance_kwargs) - allowed)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for GradientCovarianceMonitor; "
                f"allowed: {sorted(allowed)}"
            )
        self.top_k = top_k
        self.outputs_fn = outputs_fn
        self.per_sample_loss_fn = per_sample_loss_fn
        self.method = method
        self.seed = seed
        self.noise_ema = float(noise_ema)
        self.track_training_noise = track_training_noise
        if not isinstance(ddp_comm_hook, bool):
            raise ValueError(f"ddp_comm_hook must be a bool; got {ddp_comm_hook!r}")
        self.ddp_comm_hook = ddp_comm_hook
        self.log_histogram = log_histogram
        self.log_class_structure = log_class_structure
        self.batch_size_fn = batch_size_fn
        self.covariance_kwargs = covariance_kwargs
        self.axis: SpectrumAxis | None = None
        # Checkpointed state of the continuous signal (host floats; device copies during fit).
        self.last_trace: float | None = None
        self.last_num_samples: int | None = None
        self._ema_state: dict[str, float] = {
            "norm_sq": 0.0,
            "weight": 0.0,
            "nonfinite": 0.0,
            "local_norm_sq": 0.0,
        }
        self._ema_inv_batch = 0.0
        self._ema_inv_weight = 0.0
        # Per-fit objects: per-tensor gradient norms of the steps not yet folded into the EMA
        # (one row a step), and this rank's pre-average squared norms (DDP comm hook).
        self._norm_buf: torch.Tensor | None = None
        self._local_buf: torch.Tensor | None = None
        self._buf_rows = 0
        self._grad_params: list[torch.Tensor] | None = None
        self._batch_size: int | None = None
        self._hessian: HessianSpectrumMonitor | None = None
        self._logged_step: int | None = None
        self._per_sample: Literal["auto", "vmap", "outputs"] = "auto"
        self._local: _LocalNorms | None = None

    def _state_key(self) -> str:
        return self._generate_state_key(
            top_k=self.top_k, every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs
        )

    # -- setup -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._hessian = None
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if cb is self:
                break
            if isinstance(cb, HessianSpectrumMonitor):
                self._hessian = cb
                cb.keep_eigenvectors = True
                if (cb.num_probe_batches, cb.probe_dataloader) != (
                    self.num_probe_batches,
                    self.probe_dataloader,
                ):
                    warn_once(
                        "gradient-hessian-probe",
                        "GradientCovarianceMonitor: the HessianSpectrumMonitor uses another "
                        "probe set (num_probe_batches or probe_dataloader differ); the overlap "
                        "and angles compare the gradient of this monitor's probe set with the "
                        "Hessian of that one.",
                    )
        if self._hessian is None and any(
            isinstance(cb, HessianSpectrumMonitor)
            for cb in trainer.callbacks  # type: ignore[attr-defined]
        ):
            warn_once(
                "gradient-hessian-order",
                "GradientCovarianceMonitor: the HessianSpectrumMonitor comes after it in "
                "callbacks; put it first to log the gradient's overlap with the Hessian's top "
                "eigenvectors.",
            )

    def _gradient_equivalents(self) -> float:
        # One per-sample-gradient pass (vmap) costs about 3 probe gradients; the operator route
        # adds a Lanczos run of up to ~N products of about 3 each, guessed as 6 top_k.
        if self.method == "gram":
            return 4.0
        return 4.0 + (3.0 * 6 * self.top_k if self.method == "lanczos" else 0.0)

    def _layout(self) -> dict[str, dict[str, list[str]]]:
        return gradient_layout(self.tag_prefix)

    # -- measurement -------------------------------------------------------------------------
    def _compute(
        self, pl_module: LightningModule, batches: list[Any], loss_fn: Any, reduce_fn: Any
    ) -> _Measurement:
        step = pl_module.trainer.global_step
        hess = self._hessian
        vectors = values = None
        if hess is not None and hess.last_measured_step == step:
            vectors, values = hess.last_eigenvectors, hess.last_eigenvalues
        try:
            cov = gradient_covariance(
                pl_module,
                loss_fn,
                batches,
                top_k=self.top_k,
                seed=self.seed,
                method=self.method,
                per_sample=self._per_sample,
                outputs_fn=self.outputs_fn,
                per_sample_loss_fn=self.per_sample_loss_fn,
                return_eigenvectors=vectors is not None,
                reduce_fn=reduce_fn,
                batch_size_fn=self.batch_size_fn,
                **self.covariance_kwargs,
            )
        except ValueError as err:
            # Neither single-sample calls nor outputs_fn apply to this module and batches: the
            # measurement cannot be made; skip it (counted, warned once) rather than stop
            # training. Decided identically on every rank (same module, same code path).
            raise FloatingPointError(f"no per-sample gradients: {err}") from err
        # The path that worked is kept: later measurements neither retry vmap nor warn again.
        self._per_sample = "outputs" if cov.per_sample == "outputs" else "vmap"
        if not (np.all(np.isfinite(cov.eigenvalues)) and math.isfinite(cov.trace)):
            raise FloatingPointError("non-finite covariance eigenvalue or trace")
        overlap = angles = None
        if vectors is not None and cov.gradient is not None and cov.eigenvectors is not None:
            V = vectors.to(device=cov.gradient.device, dtype=torch.float64)
            overlap = gradient_overlap(V, cov.gradient, cumulative=True)
            nonzero = cov.eigenvectors[cov.eigenvalues > 0]
            if nonzero.shape[0] > 0:
                angles = np.degrees(principal_angles(nonzero, V))
        structure = None
        if self.log_class_structure:
            try:
                structure = class_structure(
                    pl_module,
                    batches,
                    top_k=len(values) if values is not None else self.top_k,
                    outputs_fn=self.outputs_fn,
                    hessian_eigenvalues=values if vectors is not None else None,
                    hessian_eigenvectors=vectors if values is not None else None,
                    seed=self.seed,
                    reduce_fn=reduce_fn,
                    batch_size_fn=self.batch_size_fn,
                    dtype=self.covariance_kwargs.get("dtype"),
                )
            except ValueError as err:  # outputs_fn does not apply: drop the feature, train on
                self.log_class_structure = False
                warn_once(
                    "gradient-class-structure",
                    f"GradientCovarianceMonitor: class structure switched off ({err}).",
                )
        self.last_trace = cov.trace
        self.last_num_samples = cov.num_samples
        return _Measurement(cov, overlap, angles, structure)

    def _log(self, trainer: Trainer, step: int, result: _Measurement, seconds: float) -> None:
        cov = result.covariance
        values: dict[str, float] = {
            "trace": cov.trace,
            "mean_gradient_norm": cov.mean_gradient_norm,
            "noise_scale": cov.noise_scale,
            "noise_scale_unbiased": cov.noise_scale_unbiased,
            "num_samples": float(cov.num_samples),
        }
        for i, lam in enumerate(cov.eigenvalues, 1):
            values[f"eigenvalue_{i:02d}"] = float(lam)
        if result.hessian_overlap is not None and len(result.hessian_overlap):
            values["hessian_overlap"] = float(result.hessian_overlap[-1])
            values["hessian_overlap_01"] = float(result.hessian_overlap[0])
        if result.principal_angles is not None:
            for i, a in enumerate(result.principal_angles, 1):
                values[f"principal_angle_{i:02d}"] = float(a)
        cs = result.class_structure
        if cs is not None:
            for i in range(len(cs.hessian_eigenvalues)):
                values[f"ggn_eigenvalue_{i + 1:02d}"] = float(cs.ggn_eigenvalues[i])
                values[f"between_class_share_{i + 1:02d}"] = float(cs.between_class_share[i])
                values[f"between_class_rayleigh_share_{i + 1:02d}"] = float(
                    cs.between_class_rayleigh_share[i]
                )
        self._log_scalars(trainer, step, values)
        if not (self.log_histogram or cs is not None):
            return
        writer = tensorboard_writer(trainer)
        if writer is None:
            warn_once(
                "gradient-no-tensorboard",
                "GradientCovarianceMonitor: no TensorBoardLogger among trainer.loggers; scalars "
                "are logged, the spectrum histogram and figure are not.",
            )
            return
        if cs is not None:
            fig = class_structure_figure(
                cs.hessian_eigenvalues,
                cs.ggn_eigenvalues,
                cs.between_class_eigenvalues,
                title=f"Hessian outliers and class structure at step {step}",
            )
            write_figure(writer, f"{self.tag_prefix}/class_structure", fig, step)
        if not self.log_histogram:
            return
        lam = np.clip(cov.eigenvalues, 0.0, None)
        if self.axis is None:
            self.axis = SpectrumAxis.for_spectrum(float(lam[0]))
            write_text(
                writer, f"{self.tag_prefix}/spectrum_axis", spectrum_axis_markdown(self.axis)
            )
        D = cov.num_params
        k = len(lam)
        nodes = np.concatenate([lam, [0.0]])
        weights = np.concatenate([np.full(k, 1.0 / D), [max(0.0, 1.0 - k / D)]])
        weights = weights / weights.sum()
        write_spectrum_histogram(
            writer,
            f"{self.tag_prefix}/spectrum_signed_log",
            nodes,
            weights,
            dim=D,
            axis=self.axis,
            step=step,
            sigma=HISTOGRAM_SIGMA,
        )

    # -- continuous signal from the training steps -------------------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._local = None
        if not (self.track_training_noise and self.ddp_comm_hook):
            return
        from torch.nn.parallel import DistributedDataParallel

        model = getattr(trainer.strategy, "model", None)
        if int(getattr(trainer, "world_size", 1) or 1) < 2 or not isinstance(
            model, DistributedDataParallel
        ):
            warn_once(
                "gradient-comm-hook",
                "GradientCovarianceMonitor: ddp_comm_hook=True needs DDP with 2 or more "
                "processes; the two-batch-size noise scale is not logged.",
            )
            return
        state = _LocalNorms(pl_module.device)
        try:
            model.register_comm_hook(state, _local_norm_hook)
        except (RuntimeError, ValueError) as err:  # e.g. the strategy registered its own hook
            warn_once(
                "gradient-comm-hook",
                f"GradientCovarianceMonitor: could not register the DDP comm hook ({err}); the "
                "two-batch-size noise scale is not logged.",
            )
            return
        self._local = state

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._norm_buf = self._local_buf = self._grad_params = None
        self._buf_rows = 0
        super().on_train_start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.track_training_noise:
            try:
                self._batch_size = int((self.batch_size_fn or default_batch_size)(batch))
            except ValueError:
                self._batch_size = None

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.track_training_noise:
            return
        params = self._grad_params
        if params is None:  # all of them: a fine-tuning schedule may unfreeze some later
            params = self._grad_params = list(pl_module.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        buf = self._norm_buf
        if buf is None or buf.shape[1] != len(grads) or self._buf_rows == buf.shape[0]:
            self._fold()  # full, or another set of tensors has gradients this step
            dtype = functools.reduce(torch.promote_types, (g.dtype for g in grads))
            buf = self._norm_buf = grads[0].new_empty((_NORM_ROWS, len(grads)), dtype=dtype)
            if self._local is not None:
                self._local_buf = torch.empty(
                    _NORM_ROWS, dtype=torch.float64, device=self._local.sq.device
                )
        # Per-tensor norms by one fused reduction, written straight into the buffer's row.
        torch.stack(torch._foreach_norm(grads), out=buf[self._buf_rows])
        if self._local is not None and self._local_buf is not None:
            # This rank's gradient before DDP's average, summed over buckets by the comm hook.
            self._local_buf[self._buf_rows].copy_(self._local.sq)
            self._local.sq.zero_()
        self._buf_rows += 1
        beta = self.noise_ema
        if self._batch_size:
            world = max(1, int(getattr(trainer, "world_size", 1) or 1))
            accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
            inv = 1.0 / (self._batch_size * world * accumulate)
            self._ema_inv_batch = beta * self._ema_inv_batch + (1 - beta) * inv
            self._ema_inv_weight = beta * self._ema_inv_weight + (1 - beta)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        every = max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        if self.track_training_noise and step % every == 0 and step != self._logged_step:
            self._logged_step = step
            self._log_training_noise(trainer, step)

    def _fold(self) -> None:
        """Fold the buffered steps into the moving average, in step order (one host read)."""
        n, buf = self._buf_rows, self._norm_buf
        self._buf_rows = 0
        if n == 0 or buf is None:
            return
        norm_sq = buf[:n].double().pow(2).sum(dim=1).cpu().tolist()
        local = self._local_buf[:n].cpu().tolist() if self._local_buf is not None else None
        s, beta = self._ema_state, self.noise_ema
        for i, sq in enumerate(norm_sq):
            loc = local[i] if local is not None else s["local_norm_sq"]
            if not (math.isfinite(sq) and math.isfinite(loc)):
                s["nonfinite"] += 1.0
                continue
            s["norm_sq"] = beta * s["norm_sq"] + (1 - beta) * sq
            s["weight"] = beta * s["weight"] + (1 - beta)
            s["local_norm_sq"] = beta * s["local_norm_sq"] + (1 - beta) * loc

    def _log_training_noise(self, trainer: Trainer, step: int) -> None:
        self._fold()
        s = self._ema_state
        local_mean = None
        if self._local is not None:
            # Mean over ranks of the per-rank EMAs: one collective, at a step every rank logs.
            t = torch.tensor([s["local_norm_sq"]], dtype=torch.float64, device=self._local.device)
            torch.distributed.all_reduce(t)
            local_mean = float(t) / max(1, int(trainer.world_size))
        if s["weight"] <= 0 or not trainer.is_global_zero:
            return
        norm_sq = s["norm_sq"] / s["weight"]
        values = {"train_grad_norm_sq": norm_sq, "train_nonfinite_steps": s["nonfinite"]}
        if local_mean is not None and self._ema_inv_weight > 0:
            # E|g_B|^2 = |G|^2 + tr(Sigma)/B at the two batch sizes (McCandlish et al., App. A).
            small = local_mean / s["weight"]
            inv_big = self._ema_inv_batch / self._ema_inv_weight
            inv_small = inv_big * int(trainer.world_size)
            trace = (small - norm_sq) / (inv_small - inv_big)
            signal = (inv_small * norm_sq - inv_big * small) / (inv_small - inv_big)
            values["train_grad_norm_sq_local"] = small
            values["train_trace_two_batch"] = trace
            values["train_noise_scale_two_batch"] = trace / signal if signal > 0 else math.nan
        if self.last_trace is not None:
            values["train_noise_scale"] = self.last_trace / norm_sq if norm_sq > 0 else math.inf
            n = self.last_num_samples or 1
            unbiased = math.nan
            if n > 1 and self._ema_inv_weight > 0:
                tr_pop = n / (n - 1) * self.last_trace
                signal = norm_sq - tr_pop * self._ema_inv_batch / self._ema_inv_weight
                if signal > 0:
                    unbiased = tr_pop / signal
            values["train_noise_scale_unbiased"] = unbiased
        self._log_scalars(trainer, step, values)

    # -- state -------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        self._fold()
        return {
            "axis": self.axis.to_dict() if self.axis is not None else None,
            "last_trace": self.last_trace,
            "last_num_samples": self.last_num_samples,
            "ema": dict(self._ema_state),
            "ema_inv_batch": self._ema_inv_batch,
            "ema_inv_weight": self._ema_inv_weight,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        axis = state.get("axis")
        self.axis = SpectrumAxis.from_dict(axis) if axis else None
        self.last_trace = state.get("last_trace")
        self.last_num_samples = state.get("last_num_samples")
        ema = state.get("ema")
        if ema:
            self._ema_state = {k: float(ema.get(k, 0.0)) for k in self._ema_state}
        self._ema_inv_batch = float(state.get("ema_inv_batch", 0.0))
        self._ema_inv_weight = float(state.get("ema_inv_weight", 0.0))
