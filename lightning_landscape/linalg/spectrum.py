"""The Hessian spectrum of a loss: top eigenvalues with error bounds, density, trace, outliers.

One Lanczos run finds the top eigenvalues; its first ``slq_steps`` steps double as one stochastic
Lanczos quadrature probe, and the other probes advance in lockstep with it, so every step is one
batched product. The explicit residuals of the Ritz vectors and the deflated Hutchinson trace
probes share one more batched call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .lanczos import (
    Which,
    _validate,
    converged_stop,
    default_max_iter,
    is_converged,
    rademacher,
    ritz_vectors,
    run_lanczos,
)
from .operators import HessianOperator, LossFn, ReduceFn
from .outliers import split_outliers
from .slq import quadrature_rows, spectral_density
from .trace import deflated_trace, project_out

__all__ = ["HessianSpectrum", "hessian_spectrum", "parameter_groups"]


@dataclass(frozen=True, eq=False)
class HessianSpectrum:
    """Spectrum of the Hessian of the mean loss over the probe samples.

    Attributes:
        eigenvalues: the ``top_k`` wanted eigenvalues (descending for ``which="LA"``, ascending
            for ``"SA"``).
        residuals: ``||H y_i - theta_i y_i||`` of each Ritz pair, measured with explicit products;
            some eigenvalue of ``H`` lies within this distance of each value.
        trace: estimate of ``tr H`` (None when ``trace=False``).
        trace_stderr: its standard error.
        density_grid: eigenvalue grid of the density (None when ``density=False``).
        density: spectral density on the grid, integrating to 1.
        ritz_nodes: ``(P, m)`` quadrature nodes per probe.
        ritz_weights: ``(P, m)`` quadrature weights per probe (rows sum to 1).
        n_outliers: number of outliers among the top eigenvalues (``which="LA"`` with the density).
        bulk_edge: estimated upper edge of the bulk.
        lambda_min: smallest quadrature node, an estimate of the smallest eigenvalue.
        num_hvps: Hessian-vector products spent (vectors, however they were batched).
        num_params: dimension ``D``.
        eigenvectors: Ritz vectors as rows ``(top_k, D)`` on the model's device, if requested.
        converged: whether every wanted eigenvalue met the tolerance.
        groups: per-group spectra when ``groups=`` was given.
        seconds: wall time of the computation.
    """

    eigenvalues: np.ndarray
    residuals: np.ndarray
    trace: float | None
    trace_stderr: float | None
    density_grid: np.ndarray | None
    density: np.ndarray | None
    ritz_nodes: np.ndarray | None
    ritz_weights: np.ndarray | None
    n_outliers: int | None
    bulk_edge: float | None
    lambda_min: float | None
    num_hvps: int
    num_params: int
    eigenvectors: Tensor | None
    converged: bool
    groups: dict[str, HessianSpectrum] | None
    seconds: float


def parameter_groups(
    model: nn.Module, groups: Literal["layer"] | Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """Resolve ``groups`` to ``{group: [parameter names]}`` over trainable parameters.

    ``"layer"`` groups parameters by the module that owns them (``"net.0.weight"`` and
    ``"net.0.bias"`` form group ``"net.0"``). A mapping lists names or name prefixes per group.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if groups == "layer":
        out: dict[str, list[str]] = {}
        for n in names:
            out.setdefault(n.rsplit(".", 1)[0] if "." in n else n, []).append(n)
        return out
    if not isinstance(groups, Mapping):
        raise ValueError(
            f"groups must be 'layer' or a mapping of group name -> parameter names; got {groups!r}"
        )
    out = {}
    for g, members in groups.items():
        if isinstance(members, str):
            members = [members]
        chosen = [n for n in names if any(n == m or n.startswith(m + ".") for m in members)]
        if not chosen:
            raise ValueError(f"groups[{g!r}] matches no trainable parameter; got {list(members)}")
        out[str(g)] = chosen
    return out


def _check_options(**opts: Any) -> None:
    for name in ("num_slq_probes", "slq_steps"):
        v = opts[name]
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    v = opts["num_trace_probes"]
    if not isinstance(v, int) or v < 2:
        raise ValueError(f"num_trace_probes must be an integer >= 2; got {v!r}")


def hessian_spectrum(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    top_k: int = 10,
    which: Which = "LA",
    density: bool = True,
    trace: bool = True,
    seed: int = 0,
    tol: float = 1e-6,
    max_iter: int | None = None,
    num_slq_probes: int = 4,
    slq_steps: int = 80,
    num_trace_probes: int = 16,
    groups: Literal["layer"] | Mapping[str, Sequence[str]] | None = None,
    return_eigenvectors: bool = False,
    params: Sequence[nn.Parameter] | None = None,
    retain_graph: bool | Literal["auto"] = "auto",
    reduce_fn: ReduceFn | None = None,
    batch_size_fn: Callable[[Any], int] | None = None,
    dtype: torch.dtype | None = None,
    hvp: Literal["exact", "finite_difference", "auto"] = "auto",
) -> HessianSpectrum:
    """Top eigenvalues, density, trace and outlier/bulk split of the loss Hessian.

    The Hessian is that of the sample-weighted mean of ``loss_fn(model, batch)`` over
    ``batches``. The model is used as it is: put it in eval mode first for a deterministic
    result (dropout, batch-norm statistics).

    Args:
        model: the network.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss on a batch.
        batches: probe batches (materialised once).
        top_k: number of eigenvalues.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic (negative curvature).
        density: estimate the spectral density by stochastic Lanczos quadrature.
        trace: estimate the trace (deflated Hutchinson).
        seed: seeds every random vector; the result is deterministic for a seed.
        tol: Lanczos stops when every wanted eigenvalue is within ``tol * ||H||`` by its
            bound ``min(r, r^2/gap)`` (see :func:`~lightning_landscape.linalg.lanczos`); the
            reported ``residuals`` stay the plain, always valid ``r``.
        max_iter: Lanczos step limit; default ``min(D, max(4 top_k, 120))``.
        num_slq_probes: quadrature probes, the eigenvalue run included (1 + extra).
        slq_steps: Lanczos steps per quadrature probe (m). More steps resolve the density better.
        num_trace_probes: Hutchinson probes on the complement of the top Ritz vectors.
        groups: also compute the spectrum of each diagonal block ``H_gg``: ``"layer"`` or a
            mapping ``{group: [parameter names or prefixes]}``; the blocks reuse the same graph.
        return_eigenvectors: keep the Ritz vectors (``(top_k, D)``, on the model's device); the
            run then converges their residuals too (``r <= tol ||H||``), not only the values.
        params: restrict to these parameters (the block ``H_gg``).
        retain_graph: see :class:`~lightning_landscape.linalg.HessianOperator`.
        reduce_fn: all-reduce (sum) across data-parallel processes, each holding a shard.
        batch_size_fn: samples per batch for the weighting; default length of the first tensor.
        dtype: compute in this dtype (a temporary copy of the model); half precision is always
            upcast to float32.
        hvp: ``"exact"``, ``"finite_difference"`` or ``"auto"``: see ``HessianOperator``.

    Returns:
        :class:`HessianSpectrum`.

    Cost (in Hessian-vector products, each about 1-1.5 gradient evaluations with the retained
    graph, plus one graph build of about 2): the Lanczos run takes until convergence, at least
    ``slq_steps`` steps when ``density`` (up to ``max_iter``); the other ``num_slq_probes - 1``
    probes take ``slq_steps`` each but ride in the same batched calls; then
    ``num_trace_probes`` products in one batched call. The residuals come from the products the
    run stored (no extra products). Accuracy trades against cost through ``tol``/``max_iter``
    (eigenvalues), ``slq_steps``/``num_slq_probes`` (density: Wasserstein error falls like 1/m)
    and ``num_trace_probes`` (trace: standard error falls like 1/sqrt(s)).
    Memory: the retained graph, plus ``(2 max_iter + (num_slq_probes-1) * slq_steps) * D``
    numbers for the Lanczos bases and the eigenvalue run's products (float64 under 1 GiB; in
    host memory when a GPU has less than twice that free, so a large model's measurement runs
    slower instead of failing).

    Raises:
        ValueError: bad options, naming the argument and the value.
        FloatingPointError: the loss or a product is not finite.
    """
    t0 = time.perf_counter()
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
        raise ValueError(f"top_k must be a positive integer; got {top_k!r}")
    _check_options(
        num_slq_probes=num_slq_probes, slq_steps=slq_steps, num_trace_probes=num_trace_probes
    )
    group_names = parameter_groups(model, groups) if groups is not None else None
    op = HessianOperator(
        model,
        loss_fn,
        batches,
        params=params,
        retain_graph=retain_graph,
        reduce_fn=reduce_fn,
        batch_size_fn=batch_size_fn,
        dtype=dtype,
        hvp=hvp,
    )
    _validate(top_k, which, tol, op.dim, max_iter, name="top_k")
    loss = op.loss()
    if not np.isfinite(loss):
        raise FloatingPointError(f"the loss over the probe batches is not finite ({loss})")
    opts = dict(
        top_k=top_k,
        which=which,
        density=density,
        trace=trace,
        seed=seed,
        tol=tol,
        max_iter=max_iter,
        num_slq_probes=num_slq_probes,
        slq_steps=slq_steps,
        num_trace_probes=num_trace_probes,
        return_eigenvectors=return_eigenvectors,
    )
    try:
        result = _spectrum(op, **opts)
        sub = None
        if group_names is not None:
            sub = {}
            for g, names in group_names.items():
                block = op.block(names)
                sub[g] = _spectrum(block, **{**opts, "top_k": min(top_k, block.dim)})
    finally:
        op.release()
    total = op.num_hvps + sum(s.num_hvps for s in (sub or {}).values())
    fields = {**result.__dict__, "groups": sub, "num_hvps": total}
    fields["seconds"] = time.perf_counter() - t0
    return HessianSpectrum(**fields)


def _spectrum(
    op: HessianOperator,
    *,
    top_k: int,
    which: Which,
    density: bool,
    trace: bool,
    seed: int,
    tol: float,
    max_iter: int | None,
    num_slq_probes: int,
    slq_steps: int,
    num_trace_probes: int,
    return_eigenvectors: bool,
) -> HessianSpectrum:
    t0 = time.perf_counter()
    start = op.num_hvps
    D = op.dim
    k = min(top_k, D)
    steps = min(slq_steps, D)
    m_main = min(D, max_iter if max_iter is not None else default_max_iter(k, D))
    if density:
        m_main = max(m_main, steps)
    P = num_slq_probes if density else 1
    V0 = rademacher(P, D, seed=seed, dtype=op.dtype, device=op.device)
    procs = run_lanczos(
        op,
        V0,
        [m_main] + [steps] * (P - 1),
        restart=[True] + [False] * (P - 1),
        stop=converged_stop(
            k, which, tol, min_steps=steps if density else 0, vectors=return_eigenvectors
        ),
        seed=seed,
    )
    main = procs[0]
    k = min(k, main.steps)
    theta, _, Y, HY = ritz_vectors(main, k, which)
    assert Y is not None and HY is not None
    converged = is_converged(main, k, which, tol, vectors=return_eigenvectors)
    # Residuals from the products the run computed: H y = (HQ) s, no extra products.
    theta_t = torch.as_tensor(theta.copy(), dtype=Y.dtype, device=Y.device)
    residuals = torch.linalg.vector_norm(HY - theta_t[:, None] * Y, dim=1).cpu().numpy()
    tr = tr_se = None
    if trace:
        Z = rademacher(num_trace_probes, D, seed=seed + 1, dtype=Y.dtype, device=Y.device)
        Z = project_out(Z, Y)
        HZ = op.matmat(Z.to(device=op.device, dtype=op.dtype)).to(device=Y.device, dtype=Y.dtype)
        if not torch.isfinite(HZ).all():
            raise FloatingPointError("non-finite Hessian-vector product")
        est = deflated_trace(Y, HY, Z, HZ)
        tr, tr_se = est.trace, est.stderr
    grid = dens = nodes = weights = None
    n_out = edge = lam_min = None
    if density:
        nodes, weights = quadrature_rows(procs, steps)
        grid, dens = spectral_density(nodes, weights)
        lam_min = float(nodes.min())
        if which == "LA":
            split = split_outliers(theta, nodes, weights, dim=D)
            n_out, edge = split.n_outliers, split.bulk_edge
    return HessianSpectrum(
        eigenvalues=np.asarray(theta, dtype=np.float64),
        residuals=np.asarray(residuals, dtype=np.float64),
        trace=tr,
        trace_stderr=tr_se,
        density_grid=grid,
        density=dens,
        ritz_nodes=nodes,
        ritz_weights=weights,
        n_outliers=n_out,
        bulk_edge=edge,
        lambda_min=lam_min,
        num_hvps=op.num_hvps - start,
        num_params=D,
        eigenvectors=Y.to(device=op.device, dtype=op.dtype) if return_eigenvectors else None,
        converged=converged,
        groups=None,
        seconds=time.perf_counter() - t0,
    )
