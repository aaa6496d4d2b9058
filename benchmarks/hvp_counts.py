"""Hessian-vector products per measurement: what density, trace and warm starts cost.

Machine independent: every figure is a count of Hessian-vector products (``num_hvps``), never
a time, so the table reads the same on any machine. For each model the script measures, with
``lightning_landscape.hessian_spectrum``:

* ``top-10 alone``: ``top_k=10, density=False, trace=False`` (the eigenvalues' own cost);
* ``defaults``: ``hessian_spectrum(model, loss_fn, batches)`` (top 10, density, trace: the
  adaptive quadrature and trace probes);
* ``old defaults``: the fixed settings of the previous release (``tol=1e-6``, 4 quadrature
  probes of 80 steps, 16 trace probes), for comparison;
* ``warm starts`` (a second table): top 10 started from the previous measurement's Ritz vectors
  (``return_eigenvectors="ritz"``, as ``HessianSpectrumMonitor`` keeps them) against a cold top
  10, on the same weights moved by seeded noise of 1e-4 and 1e-3 of their mean magnitude, and
  after 1 and 10 plain SGD steps (lr 0.1, the probe batches in turn, eval mode: what a monitor
  measuring every step or every 10 steps sees), with the logged ``subspace_overlap`` and the
  path the run took: ``RR`` (Rayleigh-Ritz on the previous vectors, then expanded) or ``sum``
  (the first vector's residual showed the top subspace turned: one product, then Lanczos from
  the vectors' sum);
* ``bounded top-10``: top 10 with a basis budget of 24 vectors (thick restart), and the bytes
  of the bases by the memory model :func:`~lightning_landscape.linalg.lanczos_memory`;

With ``--accuracy`` the small models' dense float64 Hessians (``torch.func``) check the defaults
against the targets (top 10 to 1e-4 relative, W1 <= 2% of the spectral range, trace within 5%
of sum |lambda|).

Models (CPU-cheap): the digits MLPs 64-32-10 and 64-96-64-10 (as in ``benchmarks/hessian.py``,
ReLU, 200 SGD steps), a small CNN with BatchNorm (eval mode) on digits, and
``lightning.pytorch.demos.transformer.Transformer`` with vocabulary 64 (2 layers, width 32) on
seeded random token sequences. Probe set: 4 batches.

Run (from the repository root)::

    python benchmarks/hvp_counts.py              # the table
    python benchmarks/hvp_counts.py --accuracy   # plus the dense-reference checks
    python benchmarks/hvp_counts.py --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_landscape.linalg import hessian_spectrum, lanczos_memory
from lightning_landscape.linalg.lanczos import bounded_cap

SEED = 0
OLD_DEFAULTS = dict(tol=1e-6, num_slq_probes=4, slq_steps=80, num_trace_probes=16)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED))
    return x[perm], y[perm]


def _ce(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 200) -> nn.Module:
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


def mlp(hidden: tuple[int, ...]) -> tuple[nn.Module, list, Callable]:
    torch.manual_seed(SEED)
    layers: list[nn.Module] = []
    width = 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    x, y = _digits()
    _train(model, x, y)
    return model, list(zip(x[:512].split(128), y[:512].split(128), strict=True)), _ce


class SmallCNN(nn.Module):
    """Conv(1->8) -> BatchNorm -> ReLU -> avg-pool -> Conv(8->8) -> ReLU -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(F.relu(self.bn(self.conv1(x.view(-1, 1, 8, 8)))), 2)
        return self.head(F.relu(self.conv2(h)).flatten(1))


def cnn() -> tuple[nn.Module, list, Callable]:
    torch.manual_seed(SEED)
    model = SmallCNN()
    x, y = _digits()
    model.train()
    _train(model, x, y)  # leaves it in eval mode: BatchNorm uses its running statistics
    return model, list(zip(x[:512].split(128), y[:512].split(128), strict=True)), _ce


def transformer() -> tuple[nn.Module, list, Callable]:
    from lightning.pytorch.demos.transformer import Transformer

    torch.manual_seed(SEED)
    model = Transformer(vocab_size=64, ninp=32, nhead=2, nhid=64, nlayers=2, dropout=0.0)
    gen = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, 64, (4 * 8, 17), generator=gen)
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens.split(8)]

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, target = batch
        return F.nll_loss(model(inputs, target), target.reshape(-1))

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(50):  # a few steps, so the Hessian is not the one at initialisation
        opt.zero_grad()
        loss_fn(model, batches[0]).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, batches, loss_fn


MODELS: dict[str, Callable[[], tuple[nn.Module, list, Callable]]] = {
    "MLP 64-32-10": lambda: mlp((32,)),
    "MLP 64-96-64-10": lambda: mlp((96, 64)),
    "CNN + BatchNorm": cnn,
    "Transformer (vocab 64)": transformer,
}


def _moved(model: nn.Module, scale: float = 1e-3) -> nn.Module:
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return out


def measure(name: str) -> dict[str, Any]:
    model, batches, loss_fn = MODELS[name]()
    D = sum(p.numel() for p in model.parameters() if p.requires_grad)
    top = dict(top_k=10, density=False, trace=False)
    alone = hessian_spectrum(model, loss_fn, batches, **top)
    defaults = hessian_spectrum(model, loss_fn, batches)
    old = hessian_spectrum(model, loss_fn, batches, **OLD_DEFAULTS)
    budget = 24 * D * 4
    bounded = hessian_spectrum(model, loss_fn, batches, max_basis_bytes=budget, **top)
    steps = alone.num_hvps
    return {
        "model": name,
        "D": D,
        "top10_alone": alone.num_hvps,
        "defaults": defaults.num_hvps,
        "ratio": defaults.num_hvps / alone.num_hvps,
        "slq_probes": int(defaults.ritz_nodes.shape[0]),
        "slq_steps": int(defaults.ritz_nodes.shape[1]),
        "density_error": defaults.density_error,
        "old_defaults": old.num_hvps,
        "bounded_top10": bounded.num_hvps,
        "bounded_rel_diff": float(
            np.max(np.abs(bounded.eigenvalues - alone.eigenvalues) / np.abs(alone.eigenvalues))
        ),
        "full_basis_bytes": lanczos_memory(D, steps, dtype=torch.float32),
        "bounded_basis_bytes": lanczos_memory(
            D, steps, top_k=10, max_basis_rows=bounded_cap(10, 24), keep_products=False
        ),
        "_results": (model, batches, loss_fn, defaults),
    }


def _stepped(model: nn.Module, batches: list, loss_fn: Callable, steps: int) -> nn.Module:
    """The model after ``steps`` plain SGD steps (lr 0.1) on the probe batches in turn."""
    out = copy.deepcopy(model)
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    for i in range(steps):
        opt.zero_grad()
        loss_fn(out, batches[i % len(batches)]).backward()
        opt.step()
    for p in out.parameters():
        p.grad = None
    return out


MOVES: dict[str, Callable[[nn.Module, list, Callable], nn.Module]] = {
    "noise 1e-4": lambda m, b, f: _moved(m, 1e-4),
    "noise 1e-3": lambda m, b, f: _moved(m, 1e-3),
    "1 SGD step": lambda m, b, f: _stepped(m, b, f, 1),
    "10 SGD steps": lambda m, b, f: _stepped(m, b, f, 10),
}


def warm_starts(name: str) -> dict[str, Any]:
    """Cold and warm top 10 after each move of :data:`MOVES`, and the warm run's path."""
    import importlib

    lanczos = importlib.import_module("lightning_landscape.linalg.lanczos")
    model, batches, loss_fn = MODELS[name]()
    top = dict(top_k=10, density=False, trace=False)
    prev = hessian_spectrum(model, loss_fn, batches, return_eigenvectors="ritz", **top)
    paths, real = [], lanczos.warm_run

    def spy(*args: Any, **kwargs: Any) -> Any:
        run, spent = real(*args, **kwargs)
        paths.append("RR" if run is not None else "sum")
        return run, spent

    out: dict[str, Any] = {"model": name}
    lanczos.warm_run = spy
    try:
        for label, move in MOVES.items():
            moved = move(model, batches, loss_fn)
            cold = hessian_spectrum(moved, loss_fn, batches, **top)
            warm = hessian_spectrum(moved, loss_fn, batches, warm_start=prev, **top)
            out[label] = {
                "cold": cold.num_hvps, "warm": warm.num_hvps, "path": paths[-1],
                "ratio": warm.num_hvps / cold.num_hvps, "overlap": warm.subspace_overlap,
            }  # fmt: skip
    finally:
        lanczos.warm_run = real
    return out


def accuracy(row: dict[str, Any]) -> dict[str, float]:
    """Defaults against the dense float64 Hessian of the same weights (small models only)."""
    from torch.func import functional_call, hessian

    model, batches, loss_fn, res = row["_results"]
    ref = copy.deepcopy(model).double()
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in ref.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in ref.named_parameters()])
    sizes = [batch[0].shape[0] for batch in batches]

    def f(theta: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = theta[i : i + math.prod(s)].view(s)
            i += math.prod(s)
        total = sum(
            loss_fn(_Bound(ref, params), _double(b)) * n
            for b, n in zip(batches, sizes, strict=True)
        )
        return total / sum(sizes)

    class _Bound(nn.Module):
        def __init__(self, module: nn.Module, params: dict) -> None:
            super().__init__()
            self.module, self.params = module, params

        def forward(self, *args: Any) -> torch.Tensor:
            return functional_call(self.module, self.params, args)

    lam = np.linalg.eigvalsh(hessian(f)(flat).detach().numpy())[::-1]
    span = lam.max() - lam.min()
    x, w = res.ritz_nodes.ravel(), res.ritz_weights.ravel() / res.ritz_nodes.shape[0]
    grid = np.sort(np.concatenate([x, lam]))
    F_est = np.array([w[x <= g].sum() for g in grid[:-1]])
    F_true = np.array([(lam <= g).mean() for g in grid[:-1]])
    return {
        "top10_rel_err": float(np.max(np.abs(res.eigenvalues - lam[:10]) / np.abs(lam[:10]))),
        "w1_over_range": float(np.sum(np.abs(F_est - F_true) * np.diff(grid)) / span),
        "trace_err": float(abs(res.trace - lam.sum()) / np.abs(lam).sum()),
    }


def _double(batch: Any) -> Any:
    return tuple(t.double() if t.is_floating_point() else t for t in batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accuracy", action="store_true", help="dense checks (small models)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print("| model | D | top-10 alone | defaults | ratio | SLQ probes x steps | old defaults "
          "| bounded top-10 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        row = measure(name)
        if args.accuracy and row["D"] <= 6000:
            row.update(accuracy(row))
        rows.append(row)
        print(
            f"| {name} | {row['D']:,} | {row['top10_alone']} | {row['defaults']} "
            f"| {row['ratio']:.2f} | {row['slq_probes']} x {row['slq_steps']} "
            f"| {row['old_defaults']} | {row['bounded_top10']} |",
            flush=True,
        )
    print("\nWarm top 10 / cold top 10 (warm/cold; path; subspace_overlap):\n")
    print("| model | " + " | ".join(MOVES) + " |")
    print("|---|" + "---|" * len(MOVES))
    for name in args.models:
        warm = warm_starts(name)
        rows.append(warm)
        cells = [
            f"{c['warm']} / {c['cold']} ({c['ratio']:.2f}; {c['path']}; {c['overlap']:.4f})"
            for c in (warm[label] for label in MOVES)
        ]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    for row in rows:
        row.pop("_results", None)
        if "top10_rel_err" in row:
            print(
                f"{row['model']}: top-10 rel err {row['top10_rel_err']:.1e} (<= 1e-4), "
                f"W1/range {row['w1_over_range']:.4f} (<= 0.02), "
                f"trace err {row['trace_err']:.4f} (<= 0.05)"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
