"""Hessian-vector products of the sample-weighted mean loss over a fixed set of probe batches.

The operator uses Pearlmutter's trick by double backward: the gradient of the loss is built once
with ``create_graph=True`` and kept ("retained graph"), so every later product
:math:`Hv = \\nabla_\\theta (g^\\top v)` is a single backward pass through that graph. PyHessian and
hessian-eigenthings redo the forward pass and the first backward for every product; retaining the
first-order graph removes that repeated work. Several vectors are multiplied at once with
``is_grads_batched=True`` (one vmapped backward), which Lanczos quadrature probes and trace sketches
exploit.

Cost, with :math:`D` parameters, :math:`n` probe samples and :math:`B` vectors per call:

* building the graph (once per operator): one forward and one ``create_graph`` backward over all
  probe batches, about 1.5-2 gradient evaluations in time; it keeps the activations and the
  first-order graph of all probe batches alive (roughly twice the memory of one training step on
  the same samples);
* each product with the retained graph: one backward through the first-order graph, about 1-1.5
  gradient evaluations in time and :math:`O(BD)` extra memory;
* each product without the retained graph (``retain_graph=False`` or after an out-of-memory
  fallback): forward, ``create_graph`` backward and a second backward per probe batch, about 3-4
  gradient evaluations, but only one batch's graph in memory at a time.

Some kernels have a first derivative but no second: the CPU flash-attention backward
(``aten::_scaled_dot_product_flash_attention_for_cpu_backward``), custom operators without an
autograd formula, fused ops written as a ``torch.autograd.Function`` whose backward is not itself
differentiable. For those models ``hvp="finite_difference"`` replaces double backward by central
differences of the probe-set gradient,

.. math::
    Hv \\approx \\frac{g(\\theta + h v) - g(\\theta - h v)}{2h},
    \\qquad h = \\varepsilon^{1/3} \\, \\frac{1 + \\|\\theta\\|}{\\|v\\|},

with :math:`\\varepsilon` the machine epsilon of the compute dtype. The error has two parts: the
truncation :math:`\\tfrac{h^2}{6} \\|\\nabla^3 L[v, v, \\cdot]\\| + O(h^4)` and the rounding
:math:`O(\\varepsilon \\, (\\|H\\| (1 + \\|\\theta\\|) + G) / h)`, the rounding of
:math:`\\theta \\pm hv` and of the two gradients (summands of size :math:`G`) divided by
:math:`2h`. The step balances the two
when the loss varies on the scale of the weights (third derivative
:math:`\\sim \\|H\\| / (1 + \\|\\theta\\|)`): both are then
:math:`O(\\varepsilon^{2/3}) \\, \\|H\\| \\|v\\|`, about :math:`4 \\cdot 10^{-11}` relative in
float64 and :math:`2.5 \\cdot 10^{-5}` in float32 (times a model-dependent constant). Each such
product costs two gradient evaluations over the probe set (it is still counted as one product in
``num_hvps``) and no retained graph: memory is one training step's plus :math:`2D` numbers (a copy
of the weights and the gradient). The weights are shifted in place under ``torch.no_grad`` and
restored from the saved copy afterwards, also on an exception, so they come back bitwise.

That accuracy holds for losses that are twice differentiable near :math:`\\theta`. With
piecewise-linear activations (ReLU, max-pooling) the gradient jumps wherever a unit switches
inside :math:`\\theta \\pm hv`; among thousands of units some always do, and each jump divided
by :math:`2h` enters the product. Double backward returns the almost-everywhere Hessian (the
kinks' second derivative taken as zero); finite differences return something else, with a large
random error (measured: 3.5x the product's norm on a ReLU MLP in float32, against 2e-5 with tanh
or GELU; the top eigenvalue of a small ReLU ResNet 19% high). Use them for smooth models, or
read their spectra of ReLU models as the curvature of the loss smoothed at the scale
:math:`h\\|v\\|`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["HVPFailedError", "HessianOperator", "MatrixOperator"]

LossFn = Callable[[nn.Module, Any], Tensor]
ReduceFn = Callable[[Tensor], Tensor]
HVPMethod = Literal["exact", "finite_difference", "auto"]

# The errors autograd raises when a second derivative is missing, and only those: a native op
# without a double-backward formula, a torch.library op without an autograd formula, a custom
# Function without backward used inside another backward, and @once_differentiable.
_NO_DOUBLE_BACKWARD = re.compile(
    r"derivative for \S+ is not implemented"
    r"|no autograd formula was registered"
    r"|must implement either the backward or vjp method"
    r"|differentiate twice a function that was marked with @once_differentiable"
)


def missing_double_backward(error: BaseException) -> bool:
    """Whether ``error`` is autograd's "this op has no second derivative" error."""
    return isinstance(error, RuntimeError) and bool(_NO_DOUBLE_BACKWARD.search(str(error)))


def finite_difference_step(dtype: torch.dtype, theta_norm: float, v_norm: float) -> float:
    """Central-difference step ``h = eps^(1/3) (1 + ||theta||) / ||v||`` (see the module doc).

    ``eps^(1/3)`` balances the :math:`O(h^2)` truncation against the :math:`O(\\varepsilon/h)`
    rounding; ``(1 + ||theta||) / ||v||`` makes the shift ``h v`` a fixed fraction of the weights.
    """
    return torch.finfo(dtype).eps ** (1.0 / 3.0) * (1.0 + theta_norm) / v_norm


class HVPFailedError(RuntimeError):
    """A Hessian-vector product failed on some rank (out of memory, or a non-finite loss).

    Raised on every rank alike, because the failure flag travels with the all-reduced product.
    """


def default_batch_size(batch: Any) -> int:
    """Length of the first tensor found in ``batch`` (depth-first through lists, tuples, dicts)."""
    tensor = _first_tensor(batch)
    if tensor is None:
        raise ValueError(
            f"batch_size_fn: no tensor found in the batch (type {type(batch).__name__}); "
            "pass batch_size_fn= to say how many samples a batch holds"
        )
    return int(tensor.shape[0]) if tensor.dim() > 0 else 1


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


@contextlib.contextmanager
def curvature_context(device: torch.device) -> Iterator[None]:
    """Autocast off and scaled-dot-product attention on the math kernel, restored on exit.

    Fused attention kernels (flash, memory-efficient) have no double backward; the math kernel is
    differentiable twice and gives the same values.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        except ImportError:  # torch < 2.3
            stack.enter_context(
                torch.backends.cuda.sdp_kernel(
                    enable_flash=False, enable_math=True, enable_mem_efficient=False
                )
            )
        yield


@contextlib.contextmanager
def no_fallback_notice() -> Iterator[None]:
    """Silence torch's "performance drop" warning, given when ``vmap`` (or a batched backward)
    has no batching rule for an operator (the CPU flash attention kernels, say) and loops over
    it instead: the result is the same, the user can do nothing about it, and the
    measurement's cost is timed anyway."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        yield


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


class _LinearOperator:
    """Shared public surface: ``@`` checks shapes and counts products; subclasses do ``_matmat``."""

    dim: int
    dtype: torch.dtype
    device: torch.device
    num_hvps: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    #: Whether ``_matmat`` takes ``out``, a buffer the product may be written into.
    accepts_out = False

    def _matmat(self, V: Tensor) -> Tensor:
        raise NotImplementedError

    def matmat(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        """Multiply a block of vectors, given as the rows of ``V`` with shape ``(B, D)``.

        ``out``: a contiguous ``(B, D)`` buffer of the operator's dtype and device, not sharing
        ``V``'s storage, that the product may be written into (a hint: use the returned tensor,
        which may be another).
        A caller that multiplies many vectors one after another saves a fresh allocation of
        length ``D`` per product: on a CPU, page faults that cost 45 ms for 2e7 parameters.
        """
        if V.dim() != 2 or V.shape[1] != self.dim:
            raise ValueError(
                f"V must have shape (B, {self.dim}) (rows are vectors); got {tuple(V.shape)}"
            )
        dtype = V.dtype
        V = V.to(device=self.device, dtype=self.dtype)
        usable = (
            out is not None and self.accepts_out and out.shape == V.shape
            and out.dtype == self.dtype and out.device == V.device and out.is_contiguous()
            and out.untyped_storage().data_ptr() != V.untyped_storage().data_ptr()
        )  # fmt: skip
        res = self._matmat(V, out=out) if usable else self._matmat(V)  # type: ignore[call-arg]
        self.num_hvps += V.shape[0]
        return res.to(dtype=dtype)

    def matvec(self, v: Tensor) -> Tensor:
        """Multiply one vector of shape ``(D,)``."""
        if v.dim() != 1:
            raise ValueError(f"v must be 1-D of length {self.dim}; got shape {tuple(v.shape)}")
        return self.matmat(v.unsqueeze(0))[0]

    def __matmul__(self, x: Tensor) -> Tensor:
        """``op @ v`` for a vector; ``op @ X`` for a ``(D, B)`` matrix whose columns are vectors."""
        if x.dim() == 1:
            return self.matvec(x)
        if x.dim() == 2:
            return self.matmat(x.T).T
        raise ValueError(f"operand must be 1-D or 2-D; got shape {tuple(x.shape)}")


class MatrixOperator(_LinearOperator):
    """A dense symmetric matrix with the operator interface: the reference in tests.

    Args:
        A: symmetric matrix of shape ``(D, D)``.
    """

    def __init__(self, A: Tensor) -> None:
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"A must be a square matrix; got shape {tuple(A.shape)}")
        self.A = A
        self.dim = A.shape[0]
        self.dtype = A.dtype
        self.device = A.device
        self.num_hvps = 0

    accepts_out = True

    def _matmat(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        return torch.matmul(V, self.A.T, out=out)


class HessianOperator(_LinearOperator):
    """Hessian of the sample-weighted mean loss over probe batches, as a linear operator.

    .. math::
        H = \\nabla^2_\\theta \\frac{\\sum_b n_b L_b(\\theta)}{\\sum_b n_b}

    with :math:`L_b` = ``loss_fn(model, batch_b)`` (the mean loss over batch :math:`b`) and
    :math:`n_b` its number of samples. Vectors are flat: the trainable parameters in
    ``named_parameters()`` order, flattened and concatenated.

    Args:
        model: the network. It is used as it is (mode, dtype, device); callers put it in eval
            mode for a deterministic operator.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss on ``batch``.
        batches: the probe batches; materialised into a list once, so a shuffling loader cannot
            change the operator between products.
        params: restrict to these parameters (``Parameter`` objects or ``(name, Parameter)``
            pairs): the operator is then the diagonal block :math:`H_{gg}`. Default: all
            parameters with ``requires_grad``.
        retain_graph: ``True`` keeps the first-order graph of all probe batches (fast, more
            memory), ``False`` recomputes per product, ``"auto"`` retains and falls back to
            recomputing when building the graph runs out of memory.
        reduce_fn: sums a tensor over processes (an all-reduce) and returns it; under data
            parallelism each process holds a shard of the probe batches. The failure flag of each
            product travels in the same collective, so all processes fail or succeed together.
        batch_size_fn: number of samples in a batch; default: length of its first tensor.
        dtype: compute in this floating dtype, on a temporary copy of the model (and of the
            batches' floating tensors). Half-precision weights are always upcast to float32 that
            way; a ``torch.compile``d module is measured through its original module.
        hvp: how products are computed. ``"exact"``: double backward (Pearlmutter).
            ``"finite_difference"``: central differences of the probe-set gradient, for models
            whose kernels have no second derivative (see the module docstring for the step and
            the error, about ``eps^(2/3)`` relative on a twice-differentiable loss, unreliable
            with ReLU-like kinks); no graph is retained then. ``"auto"``
            (default): double backward, switching to finite differences with one
            ``RuntimeWarning`` naming the reason when autograd reports a missing second
            derivative (and only then). Under data parallelism every process meets the same
            error, so all switch together. A backward that silently drops its second derivative
            (one computed outside autograd) cannot be detected: pass
            ``"finite_difference"`` for such a model.

    Attributes:
        hvp: the method in use, ``"exact"`` or ``"finite_difference"`` (``"auto"`` resolved).
        fallback_reason: the autograd error that made ``"auto"`` switch, or None.

    Memory: see the module docstring. Cost per product: one backward through the retained graph
    (about 1-1.5 gradient evaluations), about 3-4 gradient evaluations when recomputing, two
    gradient evaluations with finite differences (still counted as one product in ``num_hvps``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Any],
        *,
        params: Sequence[nn.Parameter] | Sequence[tuple[str, nn.Parameter]] | None = None,
        retain_graph: bool | Literal["auto"] = "auto",
        reduce_fn: ReduceFn | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        dtype: torch.dtype | None = None,
        hvp: HVPMethod = "auto",
    ) -> None:
        if hvp not in ("exact", "finite_difference", "auto"):
            raise ValueError(f"hvp must be 'exact', 'finite_difference' or 'auto'; got {hvp!r}")
        if retain_graph not in (True, False, "auto"):
            raise ValueError(f"retain_graph must be True, False or 'auto'; got {retain_graph!r}")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(model, batch); got {loss_fn!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None; got {dtype!r}")
        batches = list(batches)
        if not batches:
            raise ValueError("batches must hold at least one batch; got an empty iterable")
        names, _ = _resolve_params(model, params)
        model, batches = _working_copy(model, batches, dtype)
        self.model = model
        self.loss_fn = loss_fn
        self.batches = batches
        by_name = dict(model.named_parameters())
        self.names = names
        self.params = [by_name[n] for n in names]
        if not self.params:
            raise ValueError("params: no trainable parameters (none has requires_grad=True)")
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.num_hvps = 0
        self._reduce = reduce_fn
        size_fn = batch_size_fn or default_batch_size
        sizes = [int(size_fn(b)) for b in self.batches]
        if any(s <= 0 for s in sizes):
            raise ValueError(f"batch_size_fn: every batch must hold > 0 samples; got {sizes}")
        total = self._allreduce(torch.tensor([float(sum(sizes))], device=self.device))
        self.num_samples = int(total.item())
        self._weights = [s / self.num_samples for s in sizes]
        self._batched_ok = True
        self._grads: list[Tensor | None] | None = None
        self._loss: float | None = None
        self._gradient: Tensor | None = None
        self._auto = hvp == "auto"
        self.hvp: HVPMethod = "finite_difference" if hvp == "finite_difference" else "exact"
        self.fallback_reason: str | None = None
        if retain_graph is not False and self.hvp == "exact":
            try:
                self._build_graph(fallback=retain_graph == "auto")
            except RuntimeError as err:
                if not (self._auto and missing_double_backward(err)):
                    raise
                self._switch_to_finite_differences(err)

    # -- collectives -------------------------------------------------------------------------
    def _allreduce(self, x: Tensor) -> Tensor:
        return self._reduce(x) if self._reduce is not None else x

    # -- graph -------------------------------------------------------------------------------
    def _batch_grads(self, batch: Any, create_graph: bool) -> tuple[Tensor, list[Tensor | None]]:
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar tensor; got {type(loss).__name__} "
                f"with shape {getattr(loss, 'shape', None)}"
            )
        grads = torch.autograd.grad(
            loss.reshape(()), self.params, create_graph=create_graph, allow_unused=True
        )
        return loss.detach(), list(grads)

    def _build_graph(self, fallback: bool) -> None:
        failed = 0.0
        error: BaseException | None = None
        try:
            with curvature_context(self.device):
                total: list[Tensor | None] = [None] * len(self.params)
                loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
                for w, batch in zip(self._weights, self.batches, strict=False):
                    loss, grads = self._batch_grads(batch, create_graph=True)
                    loss_sum = loss_sum + w * loss.double()
                    for i, g in enumerate(grads):
                        if g is not None:
                            total[i] = w * g if total[i] is None else total[i] + w * g
            self._grads = total
            self._loss_local = loss_sum
        except RuntimeError as err:
            if not (fallback and _is_oom(err)):
                raise
            self._grads = None
            failed, error = 1.0, err
        flag = self._allreduce(torch.tensor([failed], device=self.device))
        if flag.item() > 0:
            # Some rank could not hold the graph: every rank recomputes, so collectives match.
            self._grads = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            warnings.warn(
                "HessianOperator: the first-order graph did not fit in memory "
                f"({error or 'on another rank'}); recomputing it for every product instead.",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def retains_graph(self) -> bool:
        """Whether products reuse the retained first-order graph."""
        return self._grads is not None

    def release(self) -> None:
        """Free the retained graph; later products recompute it per batch."""
        self._grads = None

    # -- products ----------------------------------------------------------------------------
    def _double_backward(
        self, grads: Sequence[Tensor | None], V: Tensor, retain: bool, out: Tensor | None = None
    ) -> Tensor:
        """Rows of ``V`` times the Jacobian of ``grads`` with respect to the parameters (into
        ``out`` when given)."""
        B = V.shape[0]
        outputs, grad_outputs = [], []
        offset = 0
        for p, g in zip(self.params, grads, strict=False):
            n = p.numel()
            if g is not None and g.requires_grad:
                outputs.append(g)
                grad_outputs.append(V[:, offset : offset + n].reshape(B, *p.shape))
            offset += n
        if not outputs:  # the gradient does not depend on the parameters: H = 0
            return torch.zeros_like(V) if out is None else out.zero_()

        def run(batched: bool) -> tuple[Tensor | None, ...]:
            if batched:
                with no_fallback_notice():
                    return torch.autograd.grad(
                        outputs,
                        self.params,
                        grad_outputs=grad_outputs,
                        retain_graph=retain,
                        allow_unused=True,
                        is_grads_batched=True,
                    )
            rows = []
            for b in range(B):
                res = torch.autograd.grad(
                    outputs,
                    self.params,
                    grad_outputs=[go[b] for go in grad_outputs],
                    retain_graph=True if b < B - 1 else retain,
                    allow_unused=True,
                )
                rows.append(res)
            if B == 1:  # a view, not a copy of length D (45-60 ms for 2e7 parameters)
                return tuple(None if r is None else r.unsqueeze(0) for r in rows[0])
            return tuple(
                None if rows[0][i] is None else torch.stack([r[i] for r in rows])
                for i in range(len(self.params))
            )

        if B > 1 and self._batched_ok:
            try:
                res = run(batched=True)
            except RuntimeError as err:
                if _is_oom(err):
                    raise
                # Some operators have no batching rule for their double backward: loop instead.
                self._batched_ok = False
                res = run(batched=False)
        else:
            res = run(batched=False)
        # Filled in place, each parameter's block freed once copied: one vector of overhead at
        # most the largest parameter, not a second full copy (torch.cat). Only the blocks of
        # parameters the loss does not reach are zero-filled.
        out = torch.empty_like(V) if out is None else out
        parts, offset = list(res), 0
        for i, p in enumerate(self.params):
            block = out[:, offset : offset + p.numel()]
            if parts[i] is not None:
                block.copy_(parts[i].reshape(B, -1))  # type: ignore[union-attr]
                parts[i] = None
            else:
                block.zero_()
            offset += p.numel()
        return out

    def _switch_to_finite_differences(self, error: BaseException) -> None:
        self._grads = None  # the weights are about to move in place: drop the graph on them
        self.hvp = "finite_difference"
        self.fallback_reason = str(error)
        warnings.warn(
            f"HessianOperator: double backward is not available for this model ({error}); "
            "using central finite differences of the gradient instead (2 gradients per product, "
            "about eps^(2/3) relative accuracy on a twice-differentiable loss; ReLU-like kinks "
            "make them unreliable). Pass hvp='finite_difference' to skip the attempt, or "
            "hvp='exact' to make this an error.",
            RuntimeWarning,
            stacklevel=4,
        )

    def _local_matmat(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        if self.hvp == "finite_difference":
            return self._finite_difference_matmat(V, out)
        try:
            return self._exact_local_matmat(V, out)
        except RuntimeError as err:
            if not (self._auto and missing_double_backward(err)):
                raise
            self._switch_to_finite_differences(err)
            return self._finite_difference_matmat(V, out)

    def _finite_difference_matmat(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        """Central differences of the local probe-set gradient, one row of ``V`` at a time.

        The weights move in place under ``no_grad`` and are copied back from a saved copy in
        ``finally``: bitwise restored, also when a gradient raises.
        """
        saved = [p.detach().clone() for p in self.params]
        theta_norm = math.sqrt(sum(float(s.double().pow(2).sum()) for s in saved))
        v_norms = torch.linalg.vector_norm(V.double(), dim=1).tolist()
        out = torch.empty_like(V) if out is None else out
        try:
            for i, v_norm in enumerate(v_norms):
                if v_norm == 0.0:
                    out[i].zero_()
                    continue
                h = finite_difference_step(self.dtype, theta_norm, v_norm)
                self._shift_weights(saved, V[i], h)
                g_plus = self._local_gradient()[1]
                self._shift_weights(saved, V[i], -h)
                g_minus = self._local_gradient()[1]
                torch.sub(g_plus, g_minus, out=out[i]).div_(2.0 * h)  # no temporaries of length D
                del g_plus, g_minus
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)
        return out

    def _shift_weights(self, saved: Sequence[Tensor], v: Tensor, h: float) -> None:
        """Set the weights to ``saved + h v`` (from the saved copy, so no drift accumulates)."""
        offset = 0
        with torch.no_grad():
            for p, s in zip(self.params, saved, strict=True):
                n = p.numel()
                p.copy_(s).add_(v[offset : offset + n].view_as(s), alpha=h)  # no temporaries
                offset += n

    def _exact_local_matmat(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        if self._grads is not None:
            return self._double_backward(self._grads, V, retain=True, out=out)
        out = torch.zeros_like(V) if out is None else out.zero_()
        with curvature_context(self.device):
            for w, batch in zip(self._weights, self.batches, strict=False):
                _, grads = self._batch_grads(batch, create_graph=True)
                # In place: ``w * product`` would allocate a second block of D-vectors.
                out.add_(self._double_backward(grads, V, retain=False), alpha=w)
        return out

    accepts_out = True

    def _matmat(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        failed, error = 0.0, None
        try:
            # Under DDP the products travel packed with the failure flag: no use for ``out``.
            single = out is not None and self._reduce is None
            local = self._local_matmat(V, out) if single else self._local_matmat(V)
        except Exception as err:
            # Across processes any failure (out of memory, or a loss_fn that raises on this
            # shard only) joins the collective with a flag: raising here would leave the other
            # ranks waiting in it.
            if self._reduce is None:
                raise
            local, failed, error = torch.zeros_like(V), 1.0, err
        if self._reduce is None:
            return local
        # One collective carries the products and the failure flag of every rank.
        packed = torch.cat([local.reshape(-1), local.new_tensor([failed])])
        packed = self._reduce(packed)
        if packed[-1].item() > 0:
            why = "on another rank" if error is None else f"here: {type(error).__name__}: {error}"
            raise HVPFailedError(f"Hessian-vector product failed ({why})") from error
        return packed[:-1].reshape(V.shape)

    # -- first-order quantities --------------------------------------------------------------
    def _first_order(self) -> tuple[float, Tensor]:
        if self._loss is not None and self._gradient is not None:
            return self._loss, self._gradient
        if self._grads is not None:
            local_loss, flat = self._loss_local, self._flatten(self._grads)
        else:
            local_loss, flat = self._local_gradient()
        packed = self._allreduce(torch.cat([flat.double(), local_loss.reshape(1)]))
        self._gradient = packed[:-1].to(self.dtype)
        self._loss = float(packed[-1].item())
        return self._loss, self._gradient

    def _flatten(self, grads: Sequence[Tensor | None]) -> Tensor:
        return torch.cat(
            [
                torch.zeros(p.numel(), dtype=self.dtype, device=self.device)
                if g is None
                else g.detach().reshape(-1)
                for p, g in zip(self.params, grads, strict=False)
            ]
        )

    def _local_gradient(self) -> tuple[Tensor, Tensor]:
        """(loss, flat gradient) of the sample-weighted mean over this process's batches."""
        local_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        acc: list[Tensor | None] = [None] * len(self.params)
        with curvature_context(self.device):
            for w, batch in zip(self._weights, self.batches, strict=False):
                loss, gs = self._batch_grads(batch, create_graph=False)
                local_loss = local_loss + w * loss.double()
                for i, g in enumerate(gs):
                    if g is not None:
                        acc[i] = w * g if acc[i] is None else acc[i] + w * g
        return local_loss, self._flatten(acc)

    def loss(self) -> float:
        """The sample-weighted mean loss over all probe samples (all processes)."""
        if self._loss is None and self._grads is not None:
            # From the retained graph's loss alone: no flat copy of the gradient (in float64).
            self._loss = float(self._allreduce(self._loss_local.reshape(1))[0].item())
        return self._loss if self._loss is not None else self._first_order()[0]

    def gradient(self) -> Tensor:
        """Flat gradient of the mean loss over all probe samples (all processes)."""
        return self._first_order()[1]

    def block(self, names: Sequence[str]) -> HessianOperator:
        """The diagonal block :math:`H_{gg}` for the parameters named in ``names``.

        Shares the retained first-order graph (no new forward pass): the block's products cost
        one backward restricted to the group's parameters.
        """
        index = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(f"names: unknown parameter names {missing}")
        sub = object.__new__(HessianOperator)
        sub.__dict__.update(self.__dict__)
        ids = [index[n] for n in names]
        sub.names = [self.names[i] for i in ids]
        sub.params = [self.params[i] for i in ids]
        sub.dim = sum(p.numel() for p in sub.params)
        sub.num_hvps = 0
        sub._grads = None if self._grads is None else [self._grads[i] for i in ids]
        sub._loss = None
        sub._gradient = None
        return sub


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        items = [_cast(o, dtype) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return type(obj)({k: _cast(v, dtype) for k, v in obj.items()})
    return obj


def _working_copy(
    model: nn.Module, batches: list[Any], dtype: torch.dtype | None
) -> tuple[nn.Module, list[Any]]:
    """The module to differentiate: the original, or a copy in ``dtype`` (half is upcast)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile: measure the original module
    current = next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)
    target = dtype or (torch.float32 if current in (torch.float16, torch.bfloat16) else current)
    if target == current:
        return model, batches
    # A LightningModule refers to its trainer: share it rather than copy the whole trainer.
    memo = {id(v): v for k in ("_trainer", "_fabric") if (v := getattr(model, k, None)) is not None}
    return copy.deepcopy(model, memo).to(target), [_cast(b, target) for b in batches]


def _resolve_params(
    model: nn.Module,
    params: Sequence[nn.Parameter] | Sequence[tuple[str, nn.Parameter]] | None,
) -> tuple[list[str], list[nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return [n for n, _ in named], [p for _, p in named]
    by_id = {id(p): n for n, p in model.named_parameters()}
    names, plist = [], []
    for item in params:
        p = item[1] if isinstance(item, tuple) else item
        if not isinstance(p, Tensor) or id(p) not in by_id:
            raise ValueError("params: every entry must be a parameter of model")
        if not p.requires_grad:
            raise ValueError(f"params: parameter {by_id[id(p)]!r} has requires_grad=False")
        names.append(by_id[id(p)])
        plist.append(p)
    return names, plist
