r"""Per-sample gradients :math:`g_i = \nabla_\theta \ell_i` of a batch, by ``torch.func``.

Two paths:

* **vmap**: ``vmap`` over single-sample calls of ``loss_fn`` (``grad`` inside), in chunks so memory
  stays at ``chunk_size * D`` numbers.
* **outputs**: where single-sample calls are ill-defined or ``vmap`` fails (batch norm in train
  mode, data-dependent control flow), the per-sample losses are taken inside the full batch from
  ``outputs_fn(model, batch) -> (logits, targets)`` and a per-sample loss (cross-entropy by
  default); the rows of their Jacobian are the per-sample gradients.

``"auto"`` tries vmap on the first chunk and falls back to outputs with a warning; the chosen path
is recorded. The pieces here (:class:`_PerSample`, :func:`_batched_grad`, :func:`_flat`) are shared
with the covariance operator and the class-structure estimator.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .operators import (
    LossFn,
    _resolve_params,
    curvature_context,
    default_batch_size,
    no_fallback_notice,
)

__all__ = ["OutputsFn", "PerSampleLossFn", "per_sample_gradients", "per_sample_problems"]

OutputsFn = Callable[[nn.Module, Any], tuple[Tensor, Tensor]]
PerSampleLossFn = Callable[[Tensor, Tensor], Tensor]

#: Default budget of one chunk of per-sample gradients, in numbers (chunk_size * D).
CHUNK_ELEMENTS = 2**23


# -- batches ---------------------------------------------------------------------------------


def _split_batch(batch: Any, n: int) -> tuple[list[Any], Any, list[int]]:
    """Leaves, tree spec and the indices of the per-sample leaves (tensors of length ``n``)."""
    leaves, spec = pytree.tree_flatten(batch)
    idx = [
        j
        for j, leaf in enumerate(leaves)
        if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == n
    ]
    if not idx:
        raise ValueError(
            f"batches: no tensor of length {n} (the batch size) found in the batch, so it cannot "
            "be split into samples; pass batch_size_fn= if the size is wrong"
        )
    return leaves, spec, idx


def _default_per_sample_loss(logits: Tensor, targets: Tensor) -> Tensor:
    if targets.is_floating_point():
        raise ValueError(
            "per_sample_loss_fn: the default is cross-entropy with integer class targets; got "
            f"targets of dtype {targets.dtype}. Pass per_sample_loss_fn=(logits, targets) -> (n,)"
        )
    return nn.functional.cross_entropy(logits, targets, reduction="none")


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def _flat(
    tensors: Sequence[Tensor | None],
    params: Sequence[Tensor],
    lead: int,
    out: Tensor | None = None,
) -> Tensor:
    """Concatenate per-parameter tensors with ``lead`` leading rows into ``(lead, D)`` (into
    ``out`` when given: no temporary of that size)."""
    p0 = params[0]
    parts = [
        torch.zeros(lead, p.numel(), dtype=p0.dtype, device=p0.device)
        if t is None
        else t.reshape(lead, -1).to(p0.dtype)
        for p, t in zip(params, tensors, strict=True)
    ]
    return torch.cat(parts, dim=1, out=out)


def _batched_grad(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    state: dict[str, bool],
) -> tuple[Tensor | None, ...]:
    """``B`` vector-Jacobian products at once (rows of ``grad_outputs``), graph retained.

    One vmapped backward when the operators support it, else a loop (``state`` remembers).
    """
    B = grad_outputs[0].shape[0]
    if B > 1 and state.get("batched", True):
        try:
            with no_fallback_notice():
                return torch.autograd.grad(
                    list(outputs),
                    list(inputs),
                    grad_outputs=list(grad_outputs),
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
        except RuntimeError as err:
            if "out of memory" in str(err):
                raise
            state["batched"] = False
    rows = [
        torch.autograd.grad(
            list(outputs),
            list(inputs),
            grad_outputs=[go[b] for go in grad_outputs],
            retain_graph=True,
            allow_unused=True,
        )
        for b in range(B)
    ]
    return tuple(
        None if rows[0][i] is None else torch.stack([r[i] for r in rows])
        for i in range(len(inputs))
    )


# -- per-sample losses and gradients ---------------------------------------------------------


class _PerSample:
    """Per-sample losses and gradients of one model over its batches, by either path."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        names: list[str],
        params: list[nn.Parameter],
        outputs_fn: OutputsFn | None,
        per_sample_loss_fn: PerSampleLossFn | None,
        path: str,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.names = names
        self.params = params
        self.outputs_fn = outputs_fn
        self.per_sample_loss_fn = per_sample_loss_fn or _default_per_sample_loss
        self.path = path  # "auto" until decided, then "vmap" or "outputs"
        self.wrapper = _LossModule(model, loss_fn) if loss_fn is not None else None
        self.grad_state: dict[str, bool] = {}
        self._decided = False
        self._first: tuple[int, tuple[Tensor, Tensor]] | None = None

    # vmap path ---------------------------------------------------------------------------
    def _single(self, leaves: list[Any], spec: Any, idx: list[int]) -> Callable[..., Tensor]:
        wrapper = self.wrapper
        assert wrapper is not None

        def f(pdict: dict[str, Tensor], *samples: Tensor) -> Tensor:
            items = list(leaves)
            for j, s in zip(idx, samples, strict=True):
                items[j] = s.unsqueeze(0)
            batch = pytree.tree_unflatten(items, spec)
            loss = torch.func.functional_call(wrapper, pdict, (batch,))
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(
                    f"loss_fn must return a scalar tensor; got {type(loss).__name__} "
                    f"with shape {getattr(loss, 'shape', None)}"
                )
            return loss.reshape(())

        return f

    def _vmap_grads(
        self, batch: Any, n: int, start: int, stop: int, out: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        leaves, spec, idx = _split_batch(batch, n)
        f = self._single(leaves, spec, idx)
        pdict = {f"model.{k}": p.detach() for k, p in zip(self.names, self.params, strict=True)}
        samples = [leaves[j][start:stop] for j in idx]
        in_dims = (None, *([0] * len(samples)))
        with no_fallback_notice():
            grads, losses = torch.func.vmap(
                torch.func.grad_and_value(f), in_dims=in_dims, randomness="different"
            )(pdict, *samples)
        rows = _flat([grads[f"model.{k}"] for k in self.names], self.params, stop - start, out)
        return rows.detach(), losses.detach()

    def _vmap_losses(self, batch: Any, n: int) -> Tensor:
        """Per-sample losses with the autograd graph to the real parameters."""
        leaves, spec, idx = _split_batch(batch, n)
        f = self._single(leaves, spec, idx)
        pdict = {f"model.{k}": p for k, p in zip(self.names, self.params, strict=True)}
        in_dims = (None, *([0] * len(idx)))
        with no_fallback_notice():
            return torch.func.vmap(f, in_dims=in_dims, randomness="different")(
                pdict, *[leaves[j] for j in idx]
            )

    # outputs path ------------------------------------------------------------------------
    def _outputs_losses(self, batch: Any, n: int) -> Tensor:
        if self.outputs_fn is None:
            raise ValueError("outputs_fn is required for the per-sample-loss path")
        logits, targets = self.outputs_fn(self.model, batch)
        losses = self.per_sample_loss_fn(logits, targets)
        if not isinstance(losses, Tensor) or losses.shape != (n,):
            raise ValueError(
                f"per_sample_loss_fn must return a vector of the {n} per-sample losses; got "
                f"shape {getattr(losses, 'shape', None)}"
            )
        return losses

    def _jacobian_rows(self, losses: Tensor, start: int, stop: int) -> Tensor:
        n = losses.shape[0]
        eye = torch.zeros(stop - start, n, dtype=losses.dtype, device=losses.device)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
        res = _batched_grad([losses], self.params, [eye], self.grad_state)
        return _flat(res, self.params, stop - start).detach()

    # decide ------------------------------------------------------------------------------
    def decide(self, batch: Any, n: int, chunk: int) -> None:
        """Try the ``vmap`` path on the first chunk; fall back to ``outputs_fn`` with a notice.

        The first chunk's result is kept for :meth:`gradient_chunks`, so trying costs nothing.
        """
        if self.path == "outputs" or self._decided:
            return
        self._decided = True
        if self.wrapper is None:
            self.path = "outputs"
            return
        try:
            self._first = (id(batch), self._vmap_grads(batch, n, 0, min(n, chunk)))
            self.path = "vmap"
        except (ValueError, torch.OutOfMemoryError):
            raise
        except Exception as err:  # vmap has no rule, or single-sample calls are ill-defined
            if self.outputs_fn is None or self.path == "vmap":
                raise ValueError(
                    "per-sample gradients by torch.func.vmap over single-sample calls of "
                    f"loss_fn failed ({type(err).__name__}: {err}); use per_sample='auto' or "
                    "'outputs' with outputs_fn=(model, batch) -> (logits, targets) to take "
                    "per-sample losses of the full batch instead"
                ) from err
            self.path = "outputs"
            warnings.warn(
                "gradient_covariance: torch.func.vmap over single-sample calls failed "
                f"({type(err).__name__}: {str(err)[:200]}); per-sample gradients are taken "
                "from the per-sample losses of the full batch (outputs_fn), one Jacobian row "
                "per sample (slower: each row is a backward through the whole batch).",
                RuntimeWarning,
                stacklevel=4,
            )

    def losses(self, batch: Any, n: int) -> Tensor:
        if self.path == "vmap":
            return self._vmap_losses(batch, n)
        return self._outputs_losses(batch, n)

    def gradient_chunks(
        self,
        batch: Any,
        n: int,
        chunk: int,
        losses: Tensor | None = None,
        out: Tensor | None = None,
    ) -> Iterable[tuple[Tensor, Tensor]]:
        """``(rows, losses)`` per chunk of samples: per-sample gradients ``(c, D)``; with
        ``out`` (``(n, D)``), the ``vmap`` path writes the rows into it (and yields views)."""
        if self.path == "outputs" and losses is None:
            losses = self._outputs_losses(batch, n)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            first, self._first = self._first, None
            if start == 0 and first is not None and first[0] == id(batch):
                yield first[1]
            elif self.path == "vmap":
                yield self._vmap_grads(
                    batch, n, start, stop, None if out is None else out[start:stop]
                )
            else:
                assert losses is not None
                yield self._jacobian_rows(losses, start, stop), losses[start:stop].detach()


def per_sample_gradients(
    model: nn.Module,
    loss_fn: LossFn | None,
    batch: Any,
    *,
    params: Sequence[nn.Parameter] | None = None,
    chunk_size: int | None = None,
    per_sample: Literal["auto", "vmap", "outputs"] = "auto",
    outputs_fn: OutputsFn | None = None,
    per_sample_loss_fn: PerSampleLossFn | None = None,
    batch_size_fn: Callable[[Any], int] | None = None,
) -> Tensor:
    """Per-sample gradients of one batch as an ``(n, D)`` matrix (rows in parameter order).

    Args:
        model: the network (used as it is: mode, dtype, device).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss; called on single samples
            (``vmap`` path).
        batch: one batch; tensors whose first dimension is the batch size are split.
        params: restrict to these parameters (default: all with ``requires_grad``).
        chunk_size: samples per ``vmap`` call (memory ``chunk_size * D`` plus activations).
        per_sample: ``"vmap"``, ``"outputs"`` or ``"auto"`` (vmap, else outputs with a notice).
        outputs_fn: ``(model, batch) -> (logits, targets)`` for the ``"outputs"`` path.
        per_sample_loss_fn: ``(logits, targets) -> (n,)``; default cross-entropy.
        batch_size_fn: samples in the batch; default length of its first tensor.

    Returns:
        ``(n, D)`` tensor; memory ``n * D`` numbers (use :func:`gradient_covariance` for
        statistics that never store it).
    """
    _check_per_sample(per_sample)
    names, plist = _resolve_params(model, params)
    if not plist:
        raise ValueError("params: no trainable parameters (none has requires_grad=True)")
    n = int((batch_size_fn or default_batch_size)(batch))
    ps = _PerSample(model, loss_fn, names, plist, outputs_fn, per_sample_loss_fn, per_sample)
    D = sum(p.numel() for p in plist)
    chunk = _chunk(chunk_size, D)
    with curvature_context(plist[0].device):
        ps.decide(batch, n, chunk)
        out = torch.empty(n, D, dtype=plist[0].dtype, device=plist[0].device)
        i = 0
        for rows, _ in ps.gradient_chunks(batch, n, chunk, out=out):
            if rows.data_ptr() != out[i].data_ptr():  # not written in place (outputs path)
                out[i : i + len(rows)] = rows
            i += len(rows)
        return out


def per_sample_problems(
    model: nn.Module,
    loss_fn: LossFn | None,
    batch: Any,
    *,
    outputs_fn: OutputsFn | None = None,
    per_sample_loss_fn: PerSampleLossFn | None = None,
    batch_size_fn: Callable[[Any], int] | None = None,
    samples: int = 2,
) -> dict[str, str | None]:
    """Which per-sample path applies to ``model`` on ``batch``: tried on its first ``samples``.

    Cheap (a ``vmap`` over ``samples`` single-sample calls, one forward of the batch and one
    Jacobian row), for a caller that must know before a long run whether the defaults apply.
    ``.grad`` is never written; the caller isolates any state ``loss_fn`` keeps.

    Returns:
        ``{"vmap": problem, "outputs": problem}``, each None where the path works, else the
        error as ``"Type: message"``. ``outputs`` is tried with :func:`_default_outputs` when
        ``outputs_fn`` is None; ``vmap`` is a problem when ``loss_fn`` is None.

    Raises:
        torch.OutOfMemoryError: passed through (it says nothing about applicability).
    """
    names, plist = _resolve_params(model, None)
    problems: dict[str, str | None] = {"vmap": "no loss_fn", "outputs": None}
    try:
        n = int((batch_size_fn or default_batch_size)(batch))
    except Exception as err:  # no batch size: neither path can split the batch
        return dict.fromkeys(problems, describe_error(err))
    ps = _PerSample(
        model, loss_fn, names, plist, outputs_fn or _default_outputs, per_sample_loss_fn, "auto"
    )
    if loss_fn is not None:
        try:
            with curvature_context(plist[0].device):  # the kernels the measurement will use
                ps._vmap_grads(batch, n, 0, min(n, samples))
            problems["vmap"] = None
        except torch.OutOfMemoryError:  # says nothing about whether the path applies
            raise
        except Exception as err:
            problems["vmap"] = describe_error(err)
    try:
        ps._jacobian_rows(ps._outputs_losses(batch, n), 0, 1)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:
        problems["outputs"] = describe_error(err)
    return problems


def describe_error(err: BaseException) -> str:
    """``"Type: message"`` (the message cut at 200 characters), as the problems report it."""
    return f"{type(err).__name__}: {str(err)[:200]}"


def _check_per_sample(per_sample: Any) -> None:
    if per_sample not in ("auto", "vmap", "outputs"):
        raise ValueError(f"per_sample must be 'auto', 'vmap' or 'outputs'; got {per_sample!r}")


def _chunk(chunk_size: int | None, D: int) -> int:
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // max(D, 1))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}")
    return chunk_size


def _default_outputs(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError(
            "outputs_fn: the default (model(batch[0]), batch[1]) needs (inputs, targets) "
            f"batches; got {type(batch).__name__}. Pass outputs_fn=(model, batch) -> "
            "(logits, targets)"
        )
    return model(batch[0]), batch[1]
