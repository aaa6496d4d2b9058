r"""Covariance of per-sample gradients: the operator and the estimator of its spectrum, trace and
gradient noise scale.

With per-sample gradients :math:`g_i = \nabla_\theta \ell_i` over the :math:`N` probe samples and
their mean :math:`\bar g`, the gradient covariance is

.. math::
    \Sigma = \frac1N \sum_{i=1}^N (g_i - \bar g)(g_i - \bar g)^\top

(the ``1/N`` convention: the covariance of the probe samples themselves; the unbiased estimate of
the population covariance is :math:`\frac{N}{N-1}\Sigma`). McCandlish et al. (2018, "An Empirical
Model of Large-Batch Training", arXiv 1812.06162) call :math:`B_{\rm simple} = \operatorname{tr}
\Sigma / \|\bar g\|^2` the simple gradient noise scale: the batch size at which the gradient noise
and the signal are of the same size (:func:`~lightning_landscape.linalg.noise_scale.noise_scale`).

Two routes to the top eigenvalues:

* **Gram** (small :math:`N D`): keep the centred per-sample gradients :math:`G_c`
  (:math:`N \times D`) and diagonalise the :math:`N \times N` Gram matrix
  :math:`G_c G_c^\top / N`, which has the same non-zero eigenvalues as :math:`\Sigma`. Exact up
  to rounding.
* **Operator** (large :math:`N D`, or data parallel): never store the :math:`N \times D` matrix;
  :math:`\Sigma v = \frac1N G^\top (G v - \mathbf 1 \bar g^\top v)` is one batched
  Jacobian-vector product of the per-sample losses (:math:`Gv`, by the double-backward trick
  through the retained graph) and one vector-Jacobian product (:math:`G^\top u`), and
  :func:`~lightning_landscape.linalg.lanczos` finds the top eigenvalues.

Per-sample gradients come from :mod:`~lightning_landscape.linalg.per_sample` (``vmap`` over
single-sample calls, or the per-sample losses of the full batch from ``outputs_fn``); a warning
says which path ran and the result records it. :func:`hessian_alignment` compares the result with
top Hessian eigenvectors (Gur-Ari et al. 2018, "Gradient Descent Happens in a Tiny Subspace").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import numpy as np
import torch
from torch import Tensor, nn

from .lanczos import default_max_iter, lanczos
from .noise_scale import noise_scale
from .operators import (
    HVPFailedError,
    LossFn,
    ReduceFn,
    _LinearOperator,
    _resolve_params,
    _working_copy,
    curvature_context,
    default_batch_size,
)
from .per_sample import (
    CHUNK_ELEMENTS,
    OutputsFn,
    PerSampleLossFn,
    _batched_grad,
    _check_per_sample,
    _chunk,
    _default_outputs,
    _flat,
    _PerSample,
    per_sample_gradients,
)

__all__ = [
    "CHUNK_ELEMENTS",
    "CovarianceOperator",
    "GradientCovariance",
    "OutputsFn",
    "PerSampleLossFn",
    "covariance_route",
    "gradient_covariance",
    "per_sample_gradients",  # re-exported: it lived here before linalg/per_sample.py
]

#: Default limit of the Gram route: N * D numbers kept (2 GiB in float32). Below it the Gram
#: route also holds fewer numbers than the Lanczos route's worst case whenever N <= 2 (m + 1)
#: (its basis and products, 2 (m + 1) vectors of D for m <= N + 1 steps), and it needs no
#: products (each two backward passes) and no reorthogonalisation: 4.3M parameters, 64
#: samples, a trained model: 5 s against 112 s for 65 Lanczos steps on 2 CPU cores.
GRAM_MAX_ELEMENTS = 2**29


@dataclass(frozen=True, eq=False)
class GradientCovariance:
    """Spectrum and scale of the per-sample gradient covariance over the probe samples.

    Attributes:
        eigenvalues: top ``top_k`` eigenvalues of :math:`\\Sigma` (``1/N`` convention),
            descending. :math:`\\Sigma` has rank at most ``N - 1``: beyond it they are 0.
        residuals: ``||Σy - θy||`` of each Ritz pair on the operator route; zeros on the Gram
            route (exact up to rounding).
        trace: :math:`\\operatorname{tr}\\Sigma = \\frac1N\\sum_i\\|g_i - \\bar g\\|^2`, exact.
        mean_gradient_norm: :math:`\\|\\bar g\\|`, the norm of the gradient of the mean loss.
        noise_scale: :math:`B_{\\rm simple} = \\operatorname{tr}\\Sigma / \\|\\bar g\\|^2`.
            :math:`\\|\\bar g\\|^2` overestimates the squared norm of the true gradient by
            :math:`\\operatorname{tr}\\Sigma_{\\rm pop}/N`, so this is biased low.
        noise_scale_unbiased: the same with unbiased pieces,
            :math:`\\frac{N}{N-1}\\operatorname{tr}\\Sigma \\,/\\, (\\|\\bar g\\|^2 -
            \\operatorname{tr}\\Sigma/(N-1))`; NaN when the noise swamps the mean (the
            denominator is not positive) or ``N = 1``.
        num_samples: ``N``, over all batches (and all processes).
        num_params: ``D``.
        method: ``"gram"`` or ``"lanczos"``.
        per_sample: ``"vmap"`` (single-sample calls of ``loss_fn``) or ``"outputs"`` (per-sample
            losses inside the full batch from ``outputs_fn``).
        loss: the mean loss over the probe samples.
        eigenvectors: ``(top_k, D)`` unit eigenvectors as rows on the model's device, if
            requested (rows beyond the rank of :math:`\\Sigma` are 0 on the Gram route).
        gradient: :math:`\\bar g` as a flat tensor on the model's device, if requested.
        num_products: covariance-vector products spent (operator route; 0 for Gram).
        converged: whether the eigenvalues met the tolerance (always True for Gram).
        seconds: wall time.
    """

    eigenvalues: np.ndarray
    residuals: np.ndarray
    trace: float
    mean_gradient_norm: float
    noise_scale: float
    noise_scale_unbiased: float
    num_samples: int
    num_params: int
    method: str
    per_sample: str
    loss: float
    eigenvectors: Tensor | None
    gradient: Tensor | None
    num_products: int
    converged: bool
    seconds: float


# -- the covariance operator -----------------------------------------------------------------


class CovarianceOperator(_LinearOperator):
    r"""The gradient covariance :math:`\Sigma` as a linear operator, without ``N x D`` storage.

    .. math::
        \Sigma V^\top = \frac1N G^\top \bigl(G V^\top - \mathbf 1\,\bar g^\top V^\top\bigr)

    per probe batch: :math:`G V^\top` is a batched Jacobian-vector product of the per-sample
    losses, by the double-backward trick :math:`Gv = \partial_u (\partial_\theta u^\top\ell)^\top
    v` through a retained graph, and :math:`G^\top U` one batched vector-Jacobian product. Both
    graphs of every probe batch are kept (about twice the memory of one training step on the probe
    samples); each product costs about two backward passes per batch. Under data parallelism the
    products are sum-all-reduced by ``reduce_fn``.

    Built by :func:`gradient_covariance`; ``gradient`` (:math:`\bar g`, all processes) must be
    given.
    """

    def __init__(
        self,
        per_sample: _PerSample,
        batches: list[Any],
        sizes: list[int],
        num_samples: int,
        gradient: Tensor,
        reduce_fn: ReduceFn | None,
    ) -> None:
        self._ps = per_sample
        self.params = per_sample.params
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.num_hvps = 0
        self.num_samples = num_samples
        self._gbar = gradient
        self._reduce = reduce_fn
        self._graphs: list[tuple[Tensor, Tensor, list[Tensor], list[int]]] = []
        for batch, n in zip(batches, sizes, strict=True):
            losses = per_sample.losses(batch, n)
            u0 = torch.zeros(n, dtype=losses.dtype, device=losses.device, requires_grad=True)
            h = torch.autograd.grad(
                losses, self.params, grad_outputs=u0, create_graph=True, allow_unused=True
            )
            keep = [i for i, t in enumerate(h) if t is not None and t.requires_grad]
            self._graphs.append((losses, u0, [h[i] for i in keep], keep))

    def losses(self) -> list[Tensor]:
        return [g[0] for g in self._graphs]

    def release(self) -> None:
        self._graphs = []

    def _local_matmat(self, V: Tensor) -> Tensor:
        B = V.shape[0]
        out = torch.zeros_like(V)
        vg = V @ self._gbar.to(V.dtype)
        offsets = np.cumsum([0] + [p.numel() for p in self.params])
        with curvature_context(self.device):
            for losses, u0, h, keep in self._graphs:
                if not h:  # the per-sample losses do not depend on the parameters
                    continue
                pieces = [
                    V[:, offsets[i] : offsets[i + 1]].reshape(B, *self.params[i].shape)
                    for i in keep
                ]
                (Gv,) = _batched_grad(h, [u0], pieces, self._ps.grad_state)
                assert Gv is not None
                U = Gv - vg[:, None].to(Gv.dtype)
                res = _batched_grad([losses], self.params, [U], self._ps.grad_state)
                out += _flat(res, self.params, B).to(V.dtype)
        return out / self.num_samples

    def _matmat(self, V: Tensor) -> Tensor:
        if self._reduce is None:
            return self._local_matmat(V)
        failed, error = 0.0, None
        try:
            local = self._local_matmat(V)
        except Exception as err:  # joins the collective with a flag (see HessianOperator)
            local, failed, error = torch.zeros_like(V), 1.0, err
        # One collective carries the products and the failure flag of every rank.
        packed = self._reduce(torch.cat([local.reshape(-1), local.new_tensor([failed])]))
        if packed[-1].item() > 0:
            why = "on another rank" if error is None else f"here: {type(error).__name__}: {error}"
            raise HVPFailedError(f"covariance-vector product failed ({why})") from error
        return packed[:-1].reshape(V.shape)


# -- the estimator ---------------------------------------------------------------------------


def covariance_route(
    num_samples: int,
    dim: int,
    *,
    method: str = "auto",
    gram_max_elements: int = GRAM_MAX_ELEMENTS,
    distributed: bool = False,
) -> str:
    """The route :func:`gradient_covariance` takes: ``method`` unless ``"auto"``, which picks
    ``"gram"`` (keep the ``N x D`` per-sample gradients) when ``N * D <= gram_max_elements``
    and the samples are on one process, else ``"lanczos"`` (the operator, no ``N x D``)."""
    if method != "auto":
        return method
    small = num_samples * dim <= gram_max_elements
    return "gram" if small and not distributed else "lanczos"


class CovarianceOptions(TypedDict, total=False):
    """The tuning options of :func:`gradient_covariance` that ``GradientCovarianceMonitor``
    forwards (typed for LightningCLI; a test keeps them equal to the core's keyword options
    less those the monitor sets itself)."""

    chunk_size: int | None
    gram_max_elements: int
    tol: float
    max_iter: int | None
    dtype: torch.dtype | None


def gradient_covariance(
    model: nn.Module,
    loss_fn: LossFn | None,
    batches: Iterable[Any],
    *,
    top_k: int = 10,
    seed: int = 0,
    method: Literal["auto", "gram", "lanczos"] = "auto",
    per_sample: Literal["auto", "vmap", "outputs"] = "auto",
    outputs_fn: OutputsFn | None = None,
    per_sample_loss_fn: PerSampleLossFn | None = None,
    chunk_size: int | None = None,
    gram_max_elements: int = GRAM_MAX_ELEMENTS,
    tol: float = 1e-8,
    max_iter: int | None = None,
    return_eigenvectors: bool = False,
    params: Sequence[nn.Parameter] | None = None,
    reduce_fn: ReduceFn | None = None,
    batch_size_fn: Callable[[Any], int] | None = None,
    dtype: torch.dtype | None = None,
) -> GradientCovariance:
    """Top eigenvalues, trace and noise scale of the per-sample gradient covariance.

    Multiple batches are the union of their samples (``N`` = all samples, every sample weighted
    equally). The model is used as it is: put it in eval mode first for a deterministic result.

    Args:
        model: the network.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss; called on single samples by the
            ``vmap`` path. None: only the ``outputs`` path.
        batches: probe batches (materialised once).
        top_k: number of eigenvalues (at most ``D``).
        seed: seeds the Lanczos start vector (operator route).
        method: ``"gram"`` (keep the ``N x D`` per-sample gradients, diagonalise the ``N x N``
            Gram matrix), ``"lanczos"`` (operator route, ``O(D)`` extra memory per vector), or
            ``"auto"``: Gram when ``N * D <= gram_max_elements`` and not data parallel.
        per_sample: ``"vmap"`` (single-sample calls under ``torch.func.vmap``), ``"outputs"``
            (per-sample losses inside the full batch from ``outputs_fn``) or ``"auto"``: vmap,
            falling back to outputs with a warning when vmap fails.
        outputs_fn: ``(model, batch) -> (logits, targets)``; default ``(model(batch[0]),
            batch[1])`` for tuple/list batches.
        per_sample_loss_fn: ``(logits, targets) -> (n,)`` per-sample losses whose mean is
            ``loss_fn``; default cross-entropy with integer targets.
        chunk_size: samples per vmapped gradient call; default ``2**23 // D``.
        gram_max_elements: the Gram route's limit on ``N * D`` under ``method="auto"``.
        tol: Lanczos tolerance (operator route), relative to ``||Σ||``.
        max_iter: Lanczos step limit; default ``min(D, max(4 top_k, 120), N + 1)`` (the rank of
            Σ is at most ``N - 1``), at least ``top_k``.
        return_eigenvectors: also return the eigenvectors ``(top_k, D)`` and :math:`\\bar g`.
        params: restrict to these parameters.
        reduce_fn: sum-all-reduce across data-parallel processes, each holding a shard of the
            samples (forces the operator route; the result equals one process on the union).
        batch_size_fn: samples per batch; default the length of the first tensor.
        dtype: compute in this dtype on a temporary copy of the model (half is upcast).

    Returns:
        :class:`GradientCovariance`.

    Cost: one pass of per-sample gradients (``vmap``: about 2-4 gradient evaluations over the
    probe set; ``outputs``: one backward through its batch per sample). Gram: memory ``N * D``,
    plus an ``N x N`` eigendecomposition. Operator: a retained double-backward graph (about
    twice a training step's activations on the probe set), plus the Lanczos run of at most
    ``max_iter`` products (each about 2-3 gradient evaluations) and ``2 (max_iter + 1) D``
    numbers for its basis; the rank of Σ is at most ``N - 1``, so Lanczos stops after at most
    ``N`` steps.

    Raises:
        ValueError: bad options, naming the argument and the value.
        FloatingPointError: the loss or a per-sample gradient is not finite.
    """
    t0 = time.perf_counter()
    _check_options(top_k, method, per_sample, loss_fn, gram_max_elements, dtype, reduce_fn)
    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one batch; got an empty iterable")
    if outputs_fn is None and per_sample != "vmap":
        outputs_fn = _default_outputs
    model, batches, names, plist = _prepare(model, batches, params, dtype, top_k)
    sizes, N = _sample_counts(batches, batch_size_fn, reduce_fn, plist[0].device)
    D = sum(p.numel() for p in plist)
    chunk = _chunk(chunk_size, D)
    method = covariance_route(N, D, method=method, gram_max_elements=gram_max_elements,
                              distributed=reduce_fn is not None)  # fmt: skip
    ps = _PerSample(model, loss_fn, names, plist, outputs_fn, per_sample_loss_fn, per_sample)
    with curvature_context(plist[0].device):
        ps.decide(batches[0], sizes[0], chunk)
        if method == "gram":
            s = _gram_route(ps, batches, sizes, N, D, chunk, top_k, return_eigenvectors)
        else:
            op, gbar, loss, trace = _operator_pass(ps, batches, sizes, N, D, chunk, reduce_fn)
            # Σ has rank <= N - 1: a Krylov space from any start has at most N dimensions, so
            # more steps add only null vectors (the run's restarts after a breakdown).
            steps = max_iter or max(top_k, min(default_max_iter(top_k, D), N + 1))
            lanczos_kw = {"tol": tol, "max_iter": steps, "seed": seed}
            s = _lanczos_route(op, gbar, loss, trace, top_k, return_eigenvectors, lanczos_kw)
    return _result(s, ps, N, D, method, return_eigenvectors, time.perf_counter() - t0)


def _prepare(
    model: nn.Module,
    batches: list[Any],
    params: Sequence[nn.Parameter] | None,
    dtype: torch.dtype | None,
    top_k: int,
) -> tuple[nn.Module, list[Any], list[str], list[nn.Parameter]]:
    """The model (a working copy in ``dtype``), its batches, and the parameters measured."""
    names, _ = _resolve_params(model, params)
    model, batches = _working_copy(model, batches, dtype)
    by_name = dict(model.named_parameters())
    plist = [by_name[n] for n in names]
    if not plist:
        raise ValueError("params: no trainable parameters (none has requires_grad=True)")
    D = sum(p.numel() for p in plist)
    if top_k > D:
        raise ValueError(f"top_k must be at most the dimension D={D}; got top_k={top_k}")
    return model, batches, names, plist


def _sample_counts(
    batches: list[Any],
    batch_size_fn: Callable[[Any], int] | None,
    reduce_fn: ReduceFn | None,
    device: torch.device,
) -> tuple[list[int], int]:
    """Samples per local batch, and ``N`` over all batches of all processes."""
    sizes = [int((batch_size_fn or default_batch_size)(b)) for b in batches]
    if any(s <= 0 for s in sizes):
        raise ValueError(f"batch_size_fn: every batch must hold > 0 samples; got {sizes}")
    reduce = reduce_fn or (lambda t: t)
    return sizes, int(reduce(torch.tensor([float(sum(sizes))], device=device)).item())


def _result(
    s: _Spectrum,
    ps: _PerSample,
    N: int,
    D: int,
    method: str,
    vectors: bool,
    seconds: float,
) -> GradientCovariance:
    """The result, with the noise scale of the probe set (its mean gradient over N samples)."""
    gnorm2 = float(s.gradient.double().pow(2).sum())
    scale = noise_scale(s.trace, gnorm2, num_samples=N, inv_batch=1.0 / N)
    return GradientCovariance(
        eigenvalues=s.eigenvalues,
        residuals=s.residuals,
        trace=s.trace,
        mean_gradient_norm=math.sqrt(gnorm2),
        noise_scale=scale.simple,
        noise_scale_unbiased=scale.unbiased,
        num_samples=N,
        num_params=D,
        method=method,
        per_sample=ps.path,
        loss=s.loss,
        eigenvectors=s.eigenvectors if vectors else None,
        gradient=s.gradient.detach().to(ps.params[0].dtype) if vectors else None,
        num_products=s.num_products,
        converged=s.converged,
        seconds=seconds,
    )


def _check_options(
    top_k: Any,
    method: Any,
    per_sample: Any,
    loss_fn: Any,
    gram_max_elements: Any,
    dtype: Any,
    reduce_fn: Any,
) -> None:
    """The argument checks of :func:`gradient_covariance` that need no model or batch."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
        raise ValueError(f"top_k must be a positive integer; got {top_k!r}")
    if method not in ("auto", "gram", "lanczos"):
        raise ValueError(f"method must be 'auto', 'gram' or 'lanczos'; got {method!r}")
    _check_per_sample(per_sample)
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(model, batch); got {loss_fn!r}")
    if loss_fn is None and per_sample == "vmap":
        raise ValueError("loss_fn is required with per_sample='vmap'; got loss_fn=None")
    if not isinstance(gram_max_elements, int) or gram_max_elements < 0:
        raise ValueError(
            f"gram_max_elements must be a non-negative integer; got {gram_max_elements!r}"
        )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None; got {dtype!r}")
    if method == "gram" and reduce_fn is not None:
        raise ValueError("method='gram' is single-process only; got a reduce_fn (use 'lanczos')")


@dataclass(frozen=True, eq=False)
class _Spectrum:
    """What either route returns: the top eigenpairs, the mean gradient (float64), the mean
    loss and the exact trace."""

    eigenvalues: np.ndarray
    eigenvectors: Tensor | None
    residuals: np.ndarray
    gradient: Tensor
    loss: float
    trace: float
    num_products: int
    converged: bool


def _gram_route(
    ps: _PerSample,
    batches: list[Any],
    sizes: list[int],
    N: int,
    D: int,
    chunk: int,
    top_k: int,
    vectors: bool,
) -> _Spectrum:
    """Keep the ``N x D`` per-sample gradients, diagonalise their ``N x N`` Gram matrix."""
    p0 = ps.params[0]
    G = torch.empty(N, D, dtype=p0.dtype, device=p0.device)
    losses = torch.empty(N, dtype=torch.float64, device=p0.device)
    i = 0
    for batch, n in zip(batches, sizes, strict=True):
        # The vmap path writes each chunk's rows straight into G (no temporary of that size).
        for r, ell in ps.gradient_chunks(batch, n, chunk, out=G[i : i + n]):
            if r.data_ptr() != G[i].data_ptr():
                G[i : i + len(r)] = r
            losses[i : i + len(r)] = ell.double()
            i += len(r)
    loss = float(losses.mean())
    _check_finite(loss)
    gbar, K = _centre_and_gram(G)
    eigvals, eigvecs = _gram_eigen(K, G, top_k, vectors)
    trace = float(K.diagonal().sum())
    return _Spectrum(eigvals, eigvecs, np.zeros(top_k), gbar, loss, trace, 0, True)


def _lanczos_route(
    op: CovarianceOperator,
    gbar: Tensor,
    loss: float,
    trace: float,
    top_k: int,
    vectors: bool,
    lanczos_kw: dict[str, Any],
) -> _Spectrum:
    """Lanczos on the operator built by :func:`_operator_pass` (its graphs released after)."""
    try:
        res = lanczos(op, top_k=top_k, return_eigenvectors=vectors, **lanczos_kw)
    finally:
        op.release()
    eigvecs = res.eigenvectors.to(op.dtype) if res.eigenvectors is not None else None
    return _Spectrum(
        eigenvalues=np.asarray(res.eigenvalues, dtype=np.float64),
        eigenvectors=eigvecs,
        residuals=np.asarray(res.residuals, dtype=np.float64),
        gradient=gbar,
        loss=loss,
        trace=trace,
        num_products=res.num_hvps,
        converged=res.converged,
    )


def _check_finite(loss: float) -> None:
    # The per-sample gradients are checked where they are reduced (the Gram diagonal, the
    # operator pass's mean gradient), never by a pass of their own.
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"the loss or a per-sample gradient over the probe batches is not finite (loss {loss})"
        )


#: Columns of one block of the Gram matrix of float32 (or lower precision) gradients: products
#: in their dtype, the blocks summed in float64 (as ``lanczos.matmul_sum``), so that no float64
#: copy of the gradients is made (float64 products of 64 x 4.3M gradients took 2.1 s, these
#: 0.37 s on 2 CPU cores).
GRAM_BLOCK_COLUMNS = 2**14


def _centre_and_gram(G: Tensor) -> tuple[Tensor, Tensor]:
    """Centre the rows of ``G`` in place; return the mean and ``Gc Gc^T / N`` (float64).

    Column block by column block (:data:`GRAM_BLOCK_COLUMNS`): the mean in float64, the Gram
    matrix's products in ``G``'s dtype (float32 at least), summed over the blocks in float64.
    A non-finite gradient entry makes its row's diagonal entry non-finite (inf - inf and nan
    propagate through the centring), so one check of the diagonal replaces a pass over ``G``.
    """
    N, D = G.shape
    exact = G.dtype == torch.float64
    block = D if exact else GRAM_BLOCK_COLUMNS
    gbar = torch.empty(D, dtype=torch.float64, device=G.device)
    K = torch.zeros(N, N, dtype=torch.float64, device=G.device)
    buf = None if exact else torch.empty(N, min(block, D), dtype=torch.float64, device=G.device)
    for s in range(0, D, block):
        cols = G[:, s : s + block]
        # The mean from one block in float64 (a reused buffer); products in float32 at least.
        upcast = cols if buf is None else buf[:, : cols.shape[1]].copy_(cols)
        mean = upcast.mean(dim=0)
        gbar[s : s + block] = mean
        cols -= mean.to(G.dtype)
        c = cols if exact else cols.float()
        K += (c @ c.T).double()
    if not bool(torch.isfinite(K.diagonal()).all()):
        raise FloatingPointError("a per-sample gradient over the probe batches is not finite")
    return gbar, K / N


def _gram_eigen(
    K: Tensor, Gc: Tensor, top_k: int, vectors: bool
) -> tuple[np.ndarray, Tensor | None]:
    """Top eigenpairs of ``Gc^T Gc / N`` from the ``N x N`` Gram matrix ``K = Gc Gc^T / N``."""
    N = K.shape[0]
    lam, U = torch.linalg.eigh(K)
    lam, U = lam.flip(0), U.flip(1)
    k = min(top_k, N)
    out = np.zeros(top_k)
    out[:k] = np.clip(lam[:k].cpu().numpy(), 0.0, None)  # PSD: rounding below 0 is 0
    if not vectors:
        return out, None
    V = torch.zeros(top_k, Gc.shape[1], dtype=Gc.dtype, device=Gc.device)
    tiny = float(lam[0]) * N * torch.finfo(Gc.dtype).eps
    kept = int((lam[:k] > tiny).sum())  # descending: the kept ones come first
    if kept:
        # One product for all vectors: G is read once, not once per eigenvector.
        torch.matmul(U[:, :kept].T.to(Gc.dtype), Gc, out=V[:kept])
        V[:kept] /= torch.linalg.vector_norm(V[:kept], dim=1, keepdim=True)
    return out, V


def _operator_pass(
    ps: _PerSample,
    batches: list[Any],
    sizes: list[int],
    N: int,
    D: int,
    chunk: int,
    reduce_fn: ReduceFn | None,
) -> tuple[CovarianceOperator, Tensor, float, float]:
    """Build the operator, the mean gradient and the exact trace (two passes, no N x D kept)."""
    device, pdtype = ps.params[0].device, ps.params[0].dtype
    reduce = reduce_fn or (lambda t: t)
    zero = torch.zeros((), device=device)
    op = CovarianceOperator(ps, batches, sizes, N, zero, reduce_fn)
    # Mean gradient and mean loss from the retained graphs (one backward per batch).
    gsum = torch.zeros(D, dtype=torch.float64, device=device)
    lsum = torch.zeros((), dtype=torch.float64, device=device)
    for losses in op.losses():
        gs = torch.autograd.grad(losses.sum(), ps.params, retain_graph=True, allow_unused=True)
        gsum += _flat(gs, ps.params, 1)[0].double()
        lsum += losses.detach().double().sum()
    packed = reduce(torch.cat([gsum, lsum.reshape(1)]))
    loss = float(packed[-1]) / N
    gbar64 = packed[:-1] / N
    gbar = gbar64.to(pdtype)
    if not math.isfinite(loss) or not bool(torch.isfinite(gbar64).all()):
        op.release()
        _check_finite(math.nan)
    op._gbar = gbar
    # Exact trace: sum of squared centred per-sample gradient norms, chunk by chunk.
    local = torch.zeros((), dtype=torch.float64, device=device)
    for batch, n, losses in zip(batches, sizes, op.losses(), strict=True):
        given = losses if ps.path == "outputs" else None
        for rows, _ in ps.gradient_chunks(batch, n, chunk, losses=given):
            local += (rows - gbar).double().pow(2).sum()
    flag = torch.zeros((), dtype=torch.float64, device=device)
    if not bool(torch.isfinite(local)):
        flag += 1
    total = reduce(torch.stack([local, flag]))
    if float(total[1]) > 0 or not math.isfinite(float(total[0])):
        op.release()
        _check_finite(math.nan)
    return op, gbar64, loss, float(total[0]) / N
