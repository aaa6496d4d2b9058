"""The option checker of :func:`~lightning_landscape.hessian_spectrum`, callable on its own.

A monitor forwards its ``**kwargs`` to ``hessian_spectrum`` and must refuse a bad value when it
is constructed, not at the first measurement minutes into ``fit``; it calls this checker with
the options it will pass, so the rules (and their messages) live in one place. Checks that need
the model (``top_k`` at most the dimension, ``params`` belonging to it) stay in the core.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, TypedDict

import torch

from .._checks import (
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_positive_float,
    check_positive_int,
)

__all__ = ["HessianOptions", "check_spectrum_options"]


def _groups(name: str, value: Any) -> None:
    if value is not None and value != "layer" and not isinstance(value, Mapping):
        raise ValueError(f"{name} must be None, 'layer' or a mapping; got {value!r}")


def _which(name: str, value: Any) -> None:
    if not (isinstance(value, str) and value in ("LA", "SA")):
        raise ValueError(f"{name} must be 'LA' (largest) or 'SA' (smallest); got {value!r}")


def _dtype(name: str, value: Any) -> None:
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(f"{name} must be a floating torch.dtype or None; got {value!r}")


def _optional_callable(name: str, value: Any) -> None:
    check_callable(name, value, allow_none=True)


def _adaptive(minimum: int) -> Callable[[str, Any], None]:
    """None (the estimator adds probes or steps until its error target is met) or an int."""
    rule = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def check(name: str, value: Any) -> None:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < minimum
        ):
            raise ValueError(f"{name} must be None (adaptive) or {rule}; got {value!r}")

    return check


def _warm_start(name: str, value: Any) -> None:
    # The shape against the model's dimension is checked by the core.
    if value is not None and not (
        isinstance(value, torch.Tensor) or hasattr(value, "eigenvectors")
    ):
        raise ValueError(
            f"{name} must be None, a HessianSpectrum or a (k, D) tensor of vectors; got "
            f"{type(value).__name__}"
        )


#: One rule per option; ``max_iter`` is checked against ``top_k`` below, ``params`` by the core.
_RULES: dict[str, Callable[[str, Any], Any]] = {
    "top_k": check_positive_int,
    "which": _which,
    "density": check_bool,
    "trace": check_bool,
    "seed": check_int,
    "tol": check_positive_float,
    "num_slq_probes": _adaptive(1),
    "slq_steps": _adaptive(1),
    "num_trace_probes": _adaptive(2),
    "warm_start": _warm_start,
    "max_basis_bytes": lambda name, v: check_positive_int(name, v, allow_none=True),
    "groups": _groups,
    "return_eigenvectors": lambda name, v: check_choice(name, v, (True, False, "ritz")),
    "retain_graph": lambda name, v: check_choice(name, v, (True, False, "auto")),
    "hvp": lambda name, v: check_choice(name, v, ("exact", "finite_difference", "auto")),
    "reduce_fn": _optional_callable,
    "batch_size_fn": _optional_callable,
    "dtype": _dtype,
}


def check_spectrum_options(**options: Any) -> None:
    """Check the given options of :func:`~lightning_landscape.hessian_spectrum`.

    Only the options passed are checked; ``max_iter`` is compared with ``top_k`` when both are
    given. ``params`` (it needs the model) and any option without a rule here are left to the
    core; a test keeps a rule for every option of ``hessian_spectrum``.

    Raises:
        ValueError: a bad value, naming the option, the rule and the value.
    """
    for name, value in options.items():
        if name in _RULES:
            _RULES[name](name, value)
    if "max_iter" in options:
        top_k = options.get("top_k")
        if top_k is None:
            check_int("max_iter", options["max_iter"], minimum=1, allow_none=True)
        elif options["max_iter"] is not None:
            check_int("max_iter", options["max_iter"], minimum=top_k, what=f"top_k={top_k}")


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
