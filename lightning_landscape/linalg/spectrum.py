"""The Hessian spectrum of a loss: top eigenvalues with error bounds, density, trace, outliers.

One Lanczos run finds the top eigenvalues; it doubles as a stochastic Lanczos quadrature probe
(its tridiagonal matrix is the Gauss rule of its start vector) and its Krylov basis with the
products it stored deflates the trace (Hutch++ without a separate sketch). At the defaults the
rest is adaptive: quadrature steps and probes are added only until the density's own error
bound meets its target, trace probes only until the standard error meets its target, so a
measurement costs little more than its eigenvalues. Every random vector comes from one
generator seeded by ``seed``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ._spectrum_options import check_spectrum_options
from .lanczos import (
    EigenRun,
    Which,
    _Process,
    _products,
    _validate,
    eigen_run,
    extend,
    rademacher,
    ritz_run,
)
from .operators import HessianOperator, LossFn, ReduceFn
from .outliers import split_outliers
from .slq import density_error, pooled_measure, quadrature_rows, spectral_density
from .trace import basis_trace, deflated_samples, mean_stderr

__all__ = ["HessianSpectrum", "hessian_spectrum", "parameter_groups", "subspace_overlap"]


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
        n_outliers_stderr: standard error of ``n_outliers`` (0 when counted among the top_k).
        n_outliers_saturated: all top_k eigenvalues are outliers; ``n_outliers`` then comes
            from the density (see :func:`~lightning_landscape.linalg.split_outliers`).
        lambda_min: smallest quadrature node, an estimate of the smallest eigenvalue.
        num_hvps: Hessian-vector products spent (vectors, however they were batched).
        num_params: dimension ``D``.
        eigenvectors: Ritz vectors as rows ``(top_k, D)`` on the model's device, if requested.
        converged: whether every wanted eigenvalue met the tolerance.
        groups: per-group spectra when ``groups=`` was given.
        seconds: wall time of the computation.
        subspace_overlap: with ``warm_start``, the mean squared cosine of the principal angles
            between the previous and the new top subspace (1: unchanged, ``~k/D``: unrelated).
        principal_angles: those angles (radians, ascending).
        density_error: the density's W1 error bound over the spectral range (quadrature plus
            sampling, see :func:`~lightning_landscape.linalg.slq.density_error`), excluding the
            Gaussian broadening (at most 0.004 of the range).
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
    subspace_overlap: float | None = None
    principal_angles: np.ndarray | None = None
    density_error: float | None = None
    n_outliers_stderr: float | None = None
    n_outliers_saturated: bool | None = None


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


#: Adaptive density: stop adding quadrature steps/probes when the W1 error bound is below this
#: share of the spectral range (the acceptance target 0.02 less the broadening's 0.004).
DENSITY_TARGET = 0.015
#: Adaptive trace: stop adding probes when the standard error is below this share of
#: ``sum |lambda|``, so the error is within the acceptance target 0.05 at two standard errors.
TRACE_TARGET = 0.025
#: Limits of the adaptive choices (a measurement never exceeds them).
MAX_SLQ_PROBES = 16
MAX_SLQ_STEPS = 240
MIN_SLQ_STEPS = 20
MIN_TRACE_PROBES = 6
MAX_TRACE_PROBES = 64


def _warm_vectors(warm_start: Any, dim: int) -> Tensor | None:
    """Rows to start from: a previous result's eigenvectors, or vectors given directly."""
    if warm_start is None:
        return None
    if isinstance(warm_start, HessianSpectrum):
        if warm_start.eigenvectors is None:
            raise ValueError(
                "warm_start must be a HessianSpectrum measured with return_eigenvectors=True "
                "(its eigenvectors are None) or a (k, D) tensor of vectors"
            )
        warm_start = warm_start.eigenvectors
    if not isinstance(warm_start, Tensor):
        raise ValueError(
            f"warm_start must be a HessianSpectrum or a tensor; got {type(warm_start).__name__}"
        )
    V = warm_start.detach().reshape(1, -1) if warm_start.dim() == 1 else warm_start.detach()
    if V.dim() != 2 or V.shape[1] != dim or V.shape[0] == 0 or not torch.isfinite(V).all():
        raise ValueError(
            f"warm_start must hold finite vectors of length D={dim} as rows; "
            f"got shape {tuple(warm_start.shape)}"
        )
    return V


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
    tol: float = 1e-5,
    max_iter: int | None = None,
    num_slq_probes: int | None = None,
    slq_steps: int | None = None,
    num_trace_probes: int | None = None,
    groups: Literal["layer"] | Mapping[str, Sequence[str]] | None = None,
    return_eigenvectors: bool | Literal["ritz"] = False,
    warm_start: HessianSpectrum | Tensor | None = None,
    max_basis_bytes: int | None = None,
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
        trace: estimate the trace (Hutch++ deflated by the eigenvalue run's Krylov basis).
        seed: seeds one generator that draws every random vector of the measurement; the
            result is deterministic for a seed.
        tol: Lanczos stops when every wanted eigenvalue is within ``tol * ||H||`` by its
            bound ``min(r, r^2/gap)`` (see :func:`~lightning_landscape.linalg.lanczos`); the
            reported ``residuals`` stay the plain, always valid ``r``. The default ``1e-5``
            guarantees (by that bound) a relative error of ``1e-4`` for every eigenvalue above
            ``||H|| / 10``, and ``1e-5 ||H||`` absolute below.
        max_iter: Lanczos step limit; default ``min(D, max(4 top_k, 120))``.
        num_slq_probes: quadrature probes, the eigenvalue run included; None (default): as
            many as the density's error bound needs (1 to 16).
        slq_steps: Lanczos steps per quadrature probe (m); None (default): the eigenvalue
            run's steps (at least 20), more only while the error bound needs them (up to 240).
        num_trace_probes: Hutchinson probes on the complement of the Krylov basis; None
            (default): until the standard error is below 2.5% of ``sum |lambda|`` (estimated
            from the quadrature), at least 6, at most 64.
        groups: also compute the spectrum of each diagonal block ``H_gg``: ``"layer"`` or a
            mapping ``{group: [parameter names or prefixes]}``; the blocks reuse the same graph.
        return_eigenvectors: keep the Ritz vectors (``(top_k, D)``, on the model's device); the
            run then converges their residuals too (``r <= tol ||H||``), not only the values.
            ``"ritz"``: the Ritz vectors as they are once the values converged, at no extra
            product (their residuals are reported; the angle to the eigenvector is about
            ``r / gap``).
        warm_start: a previous result measured with ``return_eigenvectors=True``, or its
            vectors as rows: they are multiplied (one product each) and their Rayleigh-Ritz
            pairs expanded one vector at a time until the bound above holds (an unchanged
            Hessian stops at ``top_k`` products); far from the new top subspace, with fewer
            than ``top_k`` vectors, with ``return_eigenvectors=True`` (the residuals themselves
            must converge) or over ``max_basis_bytes``, the run is Lanczos from their sum
            instead. Far cheaper when the model moved little; the result then has
            ``subspace_overlap`` and ``principal_angles``, measured on the returned Ritz
            vectors (near the previous ones unless converged). Groups start cold.
        max_basis_bytes: memory budget of the Lanczos bases; default half the free memory.
            Over budget the eigenvalue run uses thick restart with a bounded basis and the
            quadrature probes keep two vectors each (no full reorthogonalisation).
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
    graph, plus one graph build of about 2): the eigenvalue run takes ``m`` products until
    convergence (at most ``max_iter``); at the defaults the density usually needs nothing more
    (the run is its first probe) and the trace 6 or a few more products, so a measurement costs
    at most about twice its eigenvalues alone. Fixed ``slq_steps``/``num_slq_probes`` cost
    ``(P - 1) s`` more products (batched with the run's extension), fixed ``num_trace_probes``
    that many. The residuals come from the products the run stored (no extra products).
    Memory (:func:`~lightning_landscape.linalg.lanczos_memory`, D parameters): the retained
    graph, plus ``(2 m + 1) D`` numbers for the run's basis and products and ``(s + 1) D`` per
    extra probe, allocated as used (float64 while the worst case fits in 1 GiB; in host memory
    when a GPU has too little free); over ``max_basis_bytes``, thick restart with a cap
    ``c = max(top_k + 2, min(top_k + 6, budget / D - 1))``: ``(c + 1) D`` during the run, then
    ``(top_k (1 + trace) + 3 P) D`` (the Ritz vectors, their products when the trace needs
    them, 3 rows per extra quadrature probe), ``top_k`` more products for the residuals.

    Raises:
        ValueError: bad options, naming the argument and the value.
        FloatingPointError: the loss or a product is not finite.
    """
    t0 = time.perf_counter()
    opts = dict(
        top_k=top_k, which=which, density=density, trace=trace, seed=seed, tol=tol,
        max_iter=max_iter, num_slq_probes=num_slq_probes, slq_steps=slq_steps,
        num_trace_probes=num_trace_probes, return_eigenvectors=return_eigenvectors,
        max_basis_bytes=max_basis_bytes,
    )  # fmt: skip
    check_spectrum_options(  # the one checker, shared with the monitor's constructor
        **opts, groups=groups, warm_start=warm_start, retain_graph=retain_graph,
        batch_size_fn=batch_size_fn, dtype=dtype, hvp=hvp,
    )  # fmt: skip
    group_names = parameter_groups(model, groups) if groups is not None else None
    op = HessianOperator(
        model, loss_fn, batches, params=params, retain_graph=retain_graph, reduce_fn=reduce_fn,
        batch_size_fn=batch_size_fn, dtype=dtype, hvp=hvp,
    )  # fmt: skip
    _validate(top_k, which, tol, op.dim, max_iter, name="top_k")
    start_vectors = _warm_vectors(warm_start, op.dim)
    loss = op.loss()
    if not np.isfinite(loss):
        raise FloatingPointError(f"the loss over the probe batches is not finite ({loss})")
    try:
        result = _spectrum(op, warm_start=start_vectors, **opts)
        sub = _group_spectra(op, group_names, opts)
    finally:
        op.release()
    total = op.num_hvps + sum(s.num_hvps for s in (sub or {}).values())
    fields = {**result.__dict__, "groups": sub, "num_hvps": total}
    fields["seconds"] = time.perf_counter() - t0
    return HessianSpectrum(**fields)


def _group_spectra(
    op: HessianOperator, group_names: dict[str, list[str]] | None, opts: dict[str, Any]
) -> dict[str, HessianSpectrum] | None:
    """The spectrum of each diagonal block ``H_gg``, on the same retained graph."""
    if group_names is None:
        return None
    sub = {}
    for g, names in group_names.items():
        block = op.block(names)
        sub[g] = _spectrum(block, **{**opts, "top_k": min(opts["top_k"], block.dim)})
    return sub


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
    num_slq_probes: int | None,
    slq_steps: int | None,
    num_trace_probes: int | None,
    return_eigenvectors: bool | Literal["ritz"],
    max_basis_bytes: int | None,
    warm_start: Tensor | None = None,
) -> HessianSpectrum:
    t0 = time.perf_counter()
    start = op.num_hvps
    gen = torch.Generator().manual_seed(int(seed))
    converge = return_eigenvectors is True  # "ritz": the vectors as the values leave them
    run = eigen_run(
        op, k=min(top_k, op.dim), which=which, tol=tol, max_iter=max_iter, generator=gen,
        vectors=converge, warm_start=warm_start, max_basis_bytes=max_basis_bytes,
        keep_products=trace,
    )  # fmt: skip
    probes: list[_Process] = [run.proc] if run.proc is not None else []
    fields: dict[str, Any] = {}
    nodes = weights = None
    if density:
        run, fields = _density(op, run, probes, gen, which, tol, converge,
                               num_slq_probes, slq_steps)  # fmt: skip
        nodes, weights = fields["ritz_nodes"], fields["ritz_weights"]
    elif trace and probes:
        nodes, weights = quadrature_rows(probes, probes[0].steps)  # free: for sum |lambda|
    if trace:
        extra = [p for p in probes if p is not run.proc]
        fields["trace"], fields["trace_stderr"] = _trace(
            op, run, extra, gen, num_trace_probes, nodes, weights
        )
    if warm_start is not None:
        fields["subspace_overlap"], fields["principal_angles"] = _overlap(warm_start, run.Y)
    vectors = run.Y.to(device=op.device, dtype=op.dtype) if return_eigenvectors else None
    return HessianSpectrum(
        **{**dict.fromkeys(_OPTIONAL_FIELDS), **fields},
        eigenvalues=run.theta,
        residuals=run.residuals,
        num_hvps=op.num_hvps - start,
        num_params=op.dim,
        eigenvectors=vectors,
        converged=run.converged,
        groups=None,
        seconds=time.perf_counter() - t0,
    )


_OPTIONAL_FIELDS = (
    "trace", "trace_stderr", "density_grid", "density", "ritz_nodes", "ritz_weights",
    "n_outliers", "bulk_edge", "lambda_min", "subspace_overlap", "principal_angles",
    "density_error", "n_outliers_stderr", "n_outliers_saturated",
)  # fmt: skip


def _density(
    op: HessianOperator,
    run: EigenRun,
    probes: list[_Process],
    gen: torch.Generator,
    which: Which,
    tol: float,
    vectors: bool,
    num_probes: int | None,
    num_steps: int | None,
) -> tuple[EigenRun, dict[str, Any]]:
    """Density fields from the quadrature (:func:`_quadrature`), the outlier split, and the
    eigenvalue run again when the quadrature extended it (more steps, more accurate)."""
    before = run.proc.steps if run.proc is not None else 0
    nodes, weights, w1 = _quadrature(op, run, probes, gen, num_probes, num_steps)
    if run.proc is not None and run.proc.steps > before:
        run = ritz_run(run.proc, k=len(run.theta), which=which, tol=tol, vectors=vectors)
    grid, dens = spectral_density(nodes, weights)
    fields = dict(
        ritz_nodes=nodes, ritz_weights=weights, density_grid=grid, density=dens,
        lambda_min=float(nodes.min()), density_error=w1,
    )  # fmt: skip
    if which == "LA":
        split = split_outliers(run.theta, nodes, weights, dim=op.dim)
        fields["n_outliers"], fields["bulk_edge"] = split.n_outliers, split.bulk_edge
        fields["n_outliers_stderr"] = split.n_outliers_stderr
        fields["n_outliers_saturated"] = split.n_outliers_saturated
    return run, fields


def _quadrature(
    op: HessianOperator,
    run: EigenRun,
    probes: list[_Process],
    gen: torch.Generator,
    num_probes: int | None,
    num_steps: int | None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Quadrature rules of the eigenvalue run (when it is one) and of added probes.

    Fixed ``num_probes``/``num_steps`` are used as given; what is None grows only while the W1
    bound (:func:`~lightning_landscape.linalg.slq.density_error`) exceeds
    :data:`DENSITY_TARGET` of the range: more steps (x1.5) while the quadrature part dominates,
    else as many probes as the sampling part's ``1/sqrt(P)`` law asks for. Returns the nodes,
    weights and the bound over the range.
    """
    D = op.dim
    m = min(D, num_steps or max(MIN_SLQ_STEPS, probes[0].steps if probes else 0))
    want = num_probes or 1
    while True:
        _add_probes(op, run, probes, want - len(probes), gen, m)
        extend(op, probes, m)
        nodes, weights = quadrature_rows(probes, m)
        quad, samp, span = density_error(nodes, weights, D)
        w1 = (quad + samp) / span if span > 0 else 0.0
        if w1 <= DENSITY_TARGET or (num_probes and num_steps):
            return nodes, weights, w1
        room = DENSITY_TARGET * span - quad
        if num_steps is None and m < min(D, MAX_SLQ_STEPS) and room < 0.5 * DENSITY_TARGET * span:
            m = min(D, MAX_SLQ_STEPS, math.ceil(1.5 * m))
        elif num_probes is None and len(probes) < MAX_SLQ_PROBES and room > 0:
            need = math.ceil(len(probes) * (samp / room) ** 2)
            want = min(MAX_SLQ_PROBES, max(len(probes) + 1, need))
        else:
            return nodes, weights, w1


def _add_probes(
    op: HessianOperator,
    run: EigenRun,
    probes: list[_Process],
    n: int,
    gen: torch.Generator,
    steps: int,
) -> None:
    """Append ``n`` Rademacher quadrature probes (stepped later by ``extend``)."""
    if n <= 0:
        return
    V0 = rademacher(n, op.dim, generator=gen, dtype=op.dtype, device=op.device)
    for v in V0:
        probes.append(
            _Process(
                v, steps, run.Y.dtype, False, gen, run.Y.device,
                keep_first_product=True, full_reorth=not run.bounded,
            )
        )  # fmt: skip


def _trace(
    op: HessianOperator,
    run: EigenRun,
    extra: list[_Process],
    gen: torch.Generator,
    num_probes: int | None,
    nodes: np.ndarray | None,
    weights: np.ndarray | None,
) -> tuple[float, float]:
    """Trace: exact on the run's basis, Hutchinson on its complement (deflated Hutch++).

    The quadrature probes' first products are free samples; ``num_probes`` more are drawn, or
    (None) as many as bring the standard error under :data:`TRACE_TARGET` of ``sum |lambda|``
    (estimated as ``D sum_j w_j |theta_j|`` from the quadrature).
    """
    D = op.dim
    exact = basis_trace(run.Q, run.W)
    samples = torch.zeros(0, dtype=torch.float64)
    if extra:
        Z = torch.stack([p.start for p in extra]) * math.sqrt(D)
        HZ = torch.stack([p.first_product for p in extra]) * math.sqrt(D)
        samples = deflated_samples(run.Q, run.W, Z, HZ).cpu()
    scale = None
    if nodes is not None and weights is not None:
        x, w = pooled_measure(nodes, weights)
        scale = D * float(np.sum(w * np.abs(x)))
    for _ in range(4):
        need = num_probes if num_probes is not None else _more_probes(samples, exact, scale)
        if need <= 0:
            break
        Z = rademacher(need, D, generator=gen, dtype=op.dtype, device=op.device)
        HZ = _products(op, Z, rows_per_call=1 if run.bounded else None)
        samples = torch.cat([samples, deflated_samples(run.Q, run.W, Z, HZ).cpu()])
        if num_probes is not None:
            break
    mean, se = mean_stderr(samples)
    return exact + mean, se


def _more_probes(samples: Tensor, exact: float, scale: float | None) -> int:
    """Trace probes still needed for the standard-error target (0 when met)."""
    have = samples.numel()
    if have < MIN_TRACE_PROBES:
        return MIN_TRACE_PROBES - have
    mean, se = mean_stderr(samples)
    target = TRACE_TARGET * (scale if scale is not None else abs(exact) + abs(mean))
    if se <= target or have >= MAX_TRACE_PROBES:
        return 0
    return min(MAX_TRACE_PROBES - have, math.ceil(have * (se / target) ** 2) - have)


def subspace_overlap(previous: Tensor, current: Tensor) -> float:
    """Overlap of two subspaces (their rows' spans), in [0, 1]: the mean squared cosine of the
    ``min(k₁, k₂)`` principal angles between them; 1 when one contains the other."""
    Y = torch.linalg.qr(current.detach().to(torch.float64).T).Q.T
    return _overlap(previous.detach(), Y)[0]


def _overlap(previous: Tensor, Y: Tensor) -> tuple[float, np.ndarray]:
    """Mean squared cosine of the principal angles between two subspaces, and the angles."""
    P = torch.linalg.qr(previous.to(device=Y.device, dtype=torch.float64).T).Q
    cos = torch.linalg.svdvals(P.T @ Y.double().T).clamp(0.0, 1.0).cpu().numpy()
    return float(np.mean(cos**2)), np.sort(np.arccos(cos))
