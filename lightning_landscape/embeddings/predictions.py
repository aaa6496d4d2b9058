"""Deprecated location of the prediction store: use :mod:`lightning_landscape.sampling.predictions`.

The store moved beside the parameter trajectory store (both are what a run leaves on disk). The
names below still resolve here, with a ``DeprecationWarning``, for one release.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..sampling import predictions as _moved

#: The store's public names, each resolved from its new module on first use.
_MOVED = tuple(_moved.__all__)
__all__ = list(_MOVED)


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"lightning_landscape.embeddings.predictions.{name} moved to "
            f"lightning_landscape.sampling.predictions.{name}; the old path will be removed in a "
            "future release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_moved, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
