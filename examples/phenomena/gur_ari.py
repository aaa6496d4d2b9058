"""Gur-Ari, Roberts & Dyer 2018: after a transient the gradient lies in the top Hessian subspace.

    python examples/phenomena/gur_ari.py          # C = 3 and 10, 600 SGD steps
    python examples/phenomena/gur_ari.py --quick  # C = 3, 60 steps (a few seconds)

Gur-Ari, Roberts & Dyer ("Gradient descent happens in a tiny subspace", arXiv 1812.04754) find
that, after a short initial phase, the gradient lies mostly in the span of the top ``k`` Hessian
eigenvectors, ``k`` the number of classes, and that this subspace changes little. Here: the
one-hidden-layer MLP (width 64) of ``sagun.py`` on the C-class mixture, trained by SGD with
momentum (batch 32, learning rate 0.05); at log-spaced steps ``hessian_spectrum`` gives the top
``k = C`` eigenvectors of the full training-set Hessian and the table shows the overlap
``‖V_kᵀ g‖² / ‖g‖²`` of the full-batch gradient and of a fresh mini-batch (32) gradient, beside
``k / D``, the expected overlap of a random direction.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import (
    MIXTURE,
    cross_entropy,
    full_gradient,
    gaussian_mixture,
    mlp,
    print_table,
    train,
)

import lightning_landscape as ll

HEADERS = ["C", "step", "loss", "λ1", "overlap full", "overlap batch", "k/D", "paper"]


def overlap(eigenvectors: torch.Tensor, g: torch.Tensor) -> float:
    """Share of ``‖g‖²`` in the span of the rows of ``eigenvectors`` (orthonormalised)."""
    Q, _ = torch.linalg.qr(eigenvectors.double().T)
    g = g.double()
    return float((Q.T @ g).pow(2).sum() / (g @ g))


def run(num_classes: int, steps: int, checkpoints: set[int], seed: int) -> list[dict]:
    X, y = gaussian_mixture(num_classes, seed=seed, **MIXTURE)
    model = mlp(X.shape[1], 64, num_classes, seed=seed)
    probe_gen = torch.Generator().manual_seed(seed + 1)  # measurement batches, not training's
    rows: list[dict] = []

    def on_step(step: int, model: torch.nn.Module) -> None:
        if step not in checkpoints:
            return
        spec = ll.hessian_spectrum(
            model, cross_entropy, [(X, y)], top_k=num_classes, density=False, trace=False,
            return_eigenvectors=True, seed=seed,
        )  # fmt: skip
        idx = torch.randint(len(X), (32,), generator=probe_gen)
        with torch.no_grad():
            loss = float(cross_entropy(model, (X, y)))
        rows.append(
            {
                "C": num_classes,
                "step": step,
                "loss": loss,
                "λ1": float(spec.eigenvalues[0]),
                "overlap full": overlap(spec.eigenvectors, full_gradient(model, X, y)),
                "overlap batch": overlap(spec.eigenvectors, full_gradient(model, X[idx], y[idx])),
                "k/D": num_classes / spec.num_params,
                "paper": "most of g, after a transient",
            }
        )

    train(model, X, y, steps=steps, lr=0.05, batch_size=32, seed=seed, on_step=on_step)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="C = 3, 60 steps (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = 60 if args.quick else 600
    checkpoints = {0, 1, 2, 5, 10, 20, 50, 100, 200, 400, 600}
    rows: list[dict] = []
    for C in (3,) if args.quick else (3, 10):
        rows += run(C, steps, {s for s in checkpoints if s <= steps}, args.seed)
    print_table(HEADERS, [[r[h] for h in HEADERS] for r in rows])
    for C in sorted({r["C"] for r in rows}):
        late = [r for r in rows if r["C"] == C and r["step"] >= 20]
        full = float(np.median([r["overlap full"] for r in late]))
        batch = float(np.median([r["overlap batch"] for r in late]))
        print(
            f"C={C}: median overlap from step 20 on: full-batch {full:.2f}, mini-batch "
            f"{batch:.2f}; random direction {late[0]['k/D']:.4f}"
        )
    return rows


if __name__ == "__main__":
    main()
