"""Argument validators shared by the whole package, and keyword-option forwarding for monitors.

Every validator raises :class:`ValueError` with one message shape, ``"<name> must be <rule>;
got <value!r>"``, so a user reads the argument, the rule and the value received, whichever
function refused it. They return the value (converted where stated) so a constructor can check
and store in one line. No Lightning or TensorBoard import: the numerical core uses them too.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

__all__: list[str] = []


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but True as a count or a step is always a mistake.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(
    name: str, value: Any, *, allow_none: bool = False, also: tuple[str, ...] = ()
) -> Any:
    """``value`` is an integer > 0 (or None when ``allow_none``, or one of the words ``also``)."""
    if (value is None and allow_none) or (isinstance(value, str) and value in also):
        return value
    if not _is_int(value) or value <= 0:
        words = "".join(f", {w!r}" for w in also)
        rule = "a positive integer" + words + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {rule}; got {value!r}")
    return int(value)


def check_int(
    name: str, value: Any, *, minimum: int | None = None, allow_none: bool = False, what: str = ""
) -> Any:
    """``value`` is an integer, ``>= minimum`` when given (or None when ``allow_none``).

    ``what`` names the minimum when it is another argument (``"top_k=10"`` reads better than
    ``10`` in "max_iter must be an integer >= top_k=10").
    """
    if value is None and allow_none:
        return None
    if not _is_int(value) or (minimum is not None and value < minimum):
        rule = "an integer" if minimum is None else f"an integer >= {what or minimum}"
        raise ValueError(f"{name} must be {rule}{' or None' if allow_none else ''}; got {value!r}")
    return int(value)


def check_fraction(name: str, value: Any, *, what: str = "a fraction") -> float:
    """``value`` is a real number in the open interval (0, 1); returned as a float."""
    if not _is_real(value) or not 0 < value < 1:
        raise ValueError(f"{name} must be {what} in (0, 1); got {value!r}")
    return float(value)


def check_positive_float(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """``value`` is a finite real number > 0 (or None when ``allow_none``); returned as a float."""
    if value is None and allow_none:
        return None
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        rule = "a positive finite number" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {rule}; got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` is a bool (not merely truthy: ``"no"`` is truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool; got {value!r}")
    return value


def check_nonempty_str(name: str, value: Any) -> str:
    """``value`` is a string with at least one character (a tag, a name)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string; got {value!r}")
    return value


def check_callable(name: str, value: Any, *, allow_none: bool = False, call: str = "") -> Any:
    """``value`` is callable (or None when ``allow_none``).

    ``call`` shows how it is called, e.g. ``"loss_fn(model, batch)"``.
    """
    if value is None and allow_none:
        return None
    if not callable(value):
        rule = "callable" + (f" as {call}" if call else "") + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {rule}; got {value!r}")
    return value


def _spell(choices: Collection[Any]) -> str:
    shown = [repr(c) for c in choices]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """``value`` is one of ``choices``, compared by type and value (so ``1`` is not ``True``)."""
    for choice in choices:
        if type(value) is type(choice) and value == choice:
            return value
    raise ValueError(f"{name} must be {_spell(choices)}; got {value!r}")


# -- option forwarding ---------------------------------------------------------------------


def keyword_options(fn: Callable[..., Any]) -> list[str]:
    """The keyword-only parameters of ``fn``: the tuning options of a core function (its
    positional parameters are the data: model, loss, batches)."""
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def forward_options(
    core_fn: Callable[..., Any],
    options: Mapping[str, Any],
    *,
    owner: type | str,
    exclude: Iterable[str],
    named: Iterable[str] = (),
) -> dict[str, Any]:
    """Check the ``**options`` a monitor forwards to ``core_fn`` and return them as a dict.

    The allowed names are ``core_fn``'s keyword-only parameters less ``exclude`` (what the
    monitor sets itself), read from its signature, so an option the core gains is forwarded
    without a hand-kept list. Only the names are checked here; the values are the core's
    business (its option checker, called by the monitor at construction).

    Args:
        core_fn: the function the options go to.
        options: the monitor's ``**kwargs``.
        owner: the monitor class (its name and its own named arguments are read from it) or
            just its name.
        exclude: core options the monitor sets itself.
        named: more names to suggest and list (the owner's arguments when it is a string).

    Raises:
        ValueError: for an unknown or excluded option, naming the owner, the options, the
            closest allowed name ("did you mean ...?") and every allowed name.
    """
    excluded = set(exclude)
    allowed = [n for n in keyword_options(core_fn) if n not in excluded]
    if isinstance(owner, str):
        owner_name, own = owner, list(named)
    else:
        owner_name = owner.__name__
        own = [*_named_arguments(owner), *named]
    unknown = sorted(set(options) - set(allowed))
    if not unknown:
        return dict(options)
    hints = []
    for name in unknown:
        if name in excluded:
            hints.append(f"`{name}` is set by {owner_name} itself")
            continue
        close = difflib.get_close_matches(name, [*allowed, *own], n=1)
        if close:
            hints.append(f"did you mean `{close[0]}`?")
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise ValueError(
        f"unknown option(s) {unknown} for {owner_name}{hint}; "
        f"allowed: {sorted(set(allowed) | set(own))}"
    )


def _named_arguments(cls: type) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()  # type: ignore[misc]
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.name != "self"]
