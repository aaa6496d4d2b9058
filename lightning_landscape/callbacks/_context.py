"""What every monitor needs from the trainer: isolation from training, default loss, probe set,
collectives. No mathematics here."""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__: list[str] = []


@contextlib.contextmanager
def isolated(pl_module: nn.Module, *, train_mode: bool) -> Iterator[None]:
    """Run a measurement without leaving a trace on training.

    Restores each module's own train/eval flag (not a blanket ``.train()``), the torch (CPU and
    CUDA), numpy and ``random`` RNG states, and the module's own state (:class:`_ModuleState`):
    whatever ``training_step`` keeps on ``self`` or on a submodule (recurrent hidden state,
    counters, an EMA teacher, torchmetrics states) is as it was before. ``.grad`` is never
    written: the estimators use ``torch.autograd.grad``.
    """
    state = _ModuleState(pl_module)
    np_state, py_state = np.random.get_state(), random.getstate()
    devices = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = list(range(torch.cuda.device_count()))
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            pl_module.train(train_mode)
            yield
    finally:
        state.restore()
        np.random.set_state(np_state)
        random.setstate(py_state)


#: Containers whose contents are restored in place (a list that training_step appends to).
_CONTAINERS = (list, dict, set)


class _ModuleState:
    """A snapshot of every module's Python-level state, restored after a measurement.

    Per module (``pl_module.modules()``):

    * its ``__dict__`` by identity: an attribute reassigned in the measurement (``self.hidden =
      ...``, ``self.count = self.count + 1``, a train/eval flag) gets its old object back and an
      added attribute is removed;
    * the contents of lists, dicts and sets held directly as attributes
      (``self.outputs.append(...)``; also the registries of parameters, buffers, submodules and
      hooks), shallowly;
    * the values of tensors held directly as plain attributes (torchmetrics states, a counter
      updated with ``+=``), of every buffer (batch-norm statistics, registered counters) and of
      every parameter that does not require grad (an EMA teacher updated in place), by a copy
      written back unconditionally (``.data`` writes bypass the version counters).

    Trainable parameters are not copied: the estimators never write them, and a
    ``training_step`` that changed them in place would break its own backward pass.
    Memory: one copy of the buffers, the plain tensor attributes and the frozen parameters for
    the length of the measurement.
    """

    def __init__(self, root: nn.Module) -> None:
        self.dicts: list[tuple[nn.Module, dict[str, Any]]] = []
        self.contents: list[tuple[Any, Any]] = []
        self.values: list[tuple[Tensor, Tensor]] = []
        seen: set[int] = set()
        for m in root.modules():
            attrs = dict(m.__dict__)
            self.dicts.append((m, attrs))
            for value in attrs.values():
                if isinstance(value, _CONTAINERS) and id(value) not in seen:
                    seen.add(id(value))
                    self.contents.append((value, copy.copy(value)))
                elif isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                    self._copy_value(value, seen)
        for b in root.buffers():
            self._copy_value(b, seen)
        for p in root.parameters():
            if not p.requires_grad:
                self._copy_value(p, seen)

    def _copy_value(self, t: Tensor, seen: set[int]) -> None:
        if id(t) not in seen:
            seen.add(id(t))
            self.values.append((t, t.detach().clone()))

    def restore(self) -> None:
        for m, attrs in self.dicts:
            current = m.__dict__
            for key in [k for k in current if k not in attrs]:
                del current[key]
            for key, value in attrs.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value
        for container, saved in self.contents:
            container.clear()
            if isinstance(container, list):
                container.extend(saved)
            else:
                container.update(saved)
        with torch.no_grad():
            for t, saved in self.values:
                if t.shape == saved.shape:
                    t.copy_(saved)
                else:  # resized in place
                    t.set_(saved)


_MISSING = object()


def training_step_loss(pl_module: Any) -> Callable[[nn.Module, Any], Tensor]:
    """The module's own ``training_step`` as ``loss_fn``, with ``self.log`` silenced.

    ``log``/``log_dict`` are replaced by no-ops on the instance for the call, so nothing reaches
    the loggers or the progress bar; the class methods come back afterwards.
    """

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        idx = getattr(batch, "_landscape_index", 0)
        with silenced_logging(model):
            out = model.training_step(batch, idx)
        if isinstance(out, dict):
            out = out.get("loss")
        if not isinstance(out, Tensor):
            raise ValueError(
                "loss_fn: training_step returned no loss tensor (it returned "
                f"{type(out).__name__}); pass loss_fn=(lambda model, batch: ...) to the monitor"
            )
        return out

    return loss_fn


@contextlib.contextmanager
def silenced_logging(model: Any) -> Iterator[None]:
    had = {name: name in vars(model) for name in ("log", "log_dict")}
    saved = {name: vars(model).get(name) for name in had}
    model.__dict__["log"] = lambda *a, **k: None
    model.__dict__["log_dict"] = lambda *a, **k: None
    try:
        yield
    finally:
        for name, present in had.items():
            if present:
                model.__dict__[name] = saved[name]
            else:
                model.__dict__.pop(name, None)


def default_outputs(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    """``(model(batch[0]), batch[1])`` for tuple or list batches; for a sequence model, one
    sample per position (:func:`per_position`)."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError("outputs_fn: the default needs (inputs, targets) batches")
    return per_position(model(batch[0]), batch[1])


def per_position(logits: Any, targets: Any) -> tuple[Any, Any]:
    """Next-token models as classifiers of every position: logits ``(B, T, C)`` with targets
    ``(B, T)``, or logits already flattened to ``(B*T, C)`` (Lightning's demo Transformer and
    LSTM) with targets ``(B, T)``, become ``(B*T, C)`` and ``(B*T,)``. Anything else is
    returned as it is (and judged by the caller)."""
    if not (isinstance(logits, Tensor) and isinstance(targets, Tensor)) or targets.ndim < 2:
        return logits, targets
    if targets.is_floating_point() or logits.ndim < 2:
        return logits, targets
    if logits.shape[:-1] == targets.shape:
        return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if logits.ndim == 2 and logits.shape[0] == targets.numel():
        return logits, targets.reshape(-1)
    return logits, targets


def clone_batch(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.detach().clone()
    if isinstance(batch, (list, tuple)):
        items = [clone_batch(b) for b in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    if isinstance(batch, dict):
        return type(batch)({k: clone_batch(v) for k, v in batch.items()})
    return batch


def capture_probe_batches(trainer: Any, loader: Any, num: int) -> list[Any]:
    """The first ``num`` batches of a separate iterator over ``loader``, on the model's device.

    The global RNG is forked, so a shuffling sampler draws the same permutation that training will
    draw next (the probe set is then training's first batches) and training is left as it was.
    """
    batches = []
    generators = _generators(loader)
    saved = [g.get_state() for g in generators]
    with torch.random.fork_rng(devices=[]):
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            iterator = iter(loader)
            for i, batch in enumerate(iterator):
                if i >= num:
                    break
                batches.append(clone_batch(batch))
            del iterator
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
            for g, state in zip(generators, saved, strict=True):
                g.set_state(state)
    return [to_device(trainer, b) for b in batches]


def _generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a loader, its sampler and batch sampler draw from.

    A loader built with ``generator=`` shuffles from it, not from the global RNG: the separate
    probe iterator must leave it where it was.
    """
    found: dict[int, torch.Generator] = {}
    todo, seen = [loader], set()
    while todo:
        obj = todo.pop()
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        for attr in ("generator", "sampler", "batch_sampler"):
            value = getattr(obj, attr, None)
            if isinstance(value, torch.Generator):
                found[id(value)] = value
            elif value is not None and attr != "generator":
                todo.append(value)
    return list(found.values())


def to_device(trainer: Any, batch: Any) -> Any:
    from lightning.pytorch.utilities import move_data_to_device

    return move_data_to_device(batch, trainer.strategy.root_device)


def world_size(trainer: Any) -> int:
    return int(getattr(trainer, "world_size", 1) or 1)


def make_reduce(trainer: Any) -> Callable[[Tensor], Tensor] | None:
    """Sum-all-reduce across processes (None in a single process)."""
    if world_size(trainer) <= 1 or not torch.distributed.is_initialized():
        return None

    def reduce(t: Tensor) -> Tensor:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    return reduce


def any_rank(trainer: Any, flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank (one collective under DDP)."""
    reduce = make_reduce(trainer)
    if reduce is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(reduce(t).item() > 0)


def check_strategy(trainer: Any, monitor: str) -> None:
    """Refuse sharded strategies: the estimators need every parameter on every rank."""
    name = type(trainer.strategy).__name__
    for bad in ("FSDP", "DeepSpeed", "ModelParallel"):
        if bad in name:
            raise RuntimeError(
                f"{monitor} does not support the {name} strategy yet: its parameters are sharded "
                "across ranks. Use a data-parallel strategy (ddp, ddp_spawn) or a single device."
            )
