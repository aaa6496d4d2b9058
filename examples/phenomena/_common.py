"""What the phenomena scripts share: a seeded Gaussian mixture, a small MLP, a plain training loop.

The scripts train with plain PyTorch loops (no Trainer) so that each finishes in about a minute on
one CPU thread; the measurements are the package's public functions on the trained ``nn.Module``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

# examples/ on the path: the digits scripts share examples/_digits.py with the other examples.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

__all__ = [
    "cross_entropy",
    "full_gradient",
    "gaussian_mixture",
    "mlp",
    "print_table",
    "train",
    "trained_mixture_model",
]

#: The mixture every Hessian script uses: 16-dimensional, class means of norm 2, unit noise, so
#: the classes overlap and the loss stays well above zero (a saturated softmax hides the structure).
MIXTURE = {"per_class": 100, "dim": 16, "separation": 2.0}


def gaussian_mixture(
    num_classes: int, *, per_class: int = 100, dim: int = 16, separation: float = 3.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` points around each of ``num_classes`` random means, unit-variance noise.

    The means are drawn with norm about ``separation`` (standard normal directions, scaled), so
    the classes overlap a little and training needs a few hundred steps to fit them.
    """
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=gen)
    means *= separation / means.norm(dim=1, keepdim=True)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    X = means[y] + torch.randn(len(y), dim, generator=gen)
    return X, y


def mlp(in_dim: int, width: int, num_classes: int, *, depth: int = 1, seed: int = 0) -> nn.Module:
    """An MLP with ``depth`` tanh hidden layers of ``width`` units, seeded."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


def cross_entropy(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ``loss_fn(model, batch)`` the estimators take: mean cross-entropy of a batch."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def full_gradient(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient of the mean loss over all of ``(X, y)``, flattened in parameter order."""
    grads = torch.autograd.grad(cross_entropy(model, (X, y)), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]).detach()


def train(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int | None = None,
    momentum: float = 0.9,
    seed: int = 0,
    on_step: Callable[[int, nn.Module], Any] | None = None,
) -> float:
    """SGD with momentum (full batch when ``batch_size`` is None); returns the final full loss.

    ``on_step(step, model)`` is called before each step and after the last (steps 0..steps).
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps + 1):
        if on_step is not None:
            on_step(step, model)
        if step == steps:
            break
        if batch_size is None:
            idx = slice(None)
        else:
            idx = torch.randint(len(X), (batch_size,), generator=gen)
        opt.zero_grad()
        cross_entropy(model, (X[idx], y[idx])).backward()
        opt.step()
    with torch.no_grad():
        return float(cross_entropy(model, (X, y)))


def trained_mixture_model(
    num_classes: int, width: int, *, steps: int = 300, seed: int = 0
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float]:
    """The mixture of ``num_classes`` classes and a one-hidden-layer MLP trained on it.

    Full-batch gradient descent with momentum, learning rate 0.05, ``steps`` steps: near
    convergence (training accuracy within a few points of the Bayes rate). Returns the model,
    the data and the final training loss.
    """
    X, y = gaussian_mixture(num_classes, seed=seed, **MIXTURE)
    model = mlp(X.shape[1], width, num_classes, seed=seed)
    loss = train(model, X, y, steps=steps, lr=0.05, seed=seed)
    return model, X, y, loss


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Print (and return) a plain-text table; floats in 4 significant digits."""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in text]
    out = "\n".join(lines)
    print(out)
    return out
