"""Fjellström & Nyström 2022: SGD iterates lie on a low-dimensional manifold (diffusion maps).

    python examples/phenomena/fjellstrom.py          # 1,000 SGD steps on the C = 5 mixture
    python examples/phenomena/fjellstrom.py --quick  # 150 steps (a few seconds)

Fjellström & Nyström ("Deep learning, stochastic gradient descent and diffusion maps", 2022)
treat the parameter vectors visited by SGD as a point cloud in ``R^D`` and find with diffusion
maps that it has a low intrinsic dimension and a diffusion spectrum that decays fast. Here: the
one-hidden-layer MLP (width 64, ``D`` = 1,413) of ``sagun.py`` on the 5-class mixture, trained by
SGD with momentum (batch 32, learning rate 0.05), every iterate recorded; ``diffusion_map`` of
the whole run and of its second half (where the loss has levelled off), and of a noisier run
(batch 4, learning rate 0.2, no momentum).

Columns: ``n`` iterates; ``dim`` the Levina–Bickel intrinsic dimension of the cloud (against
``D``); ``λ1..λ4`` the first non-trivial Markov eigenvalues; ``μ2/μ1``, ``μ3/μ1``, ``μ4/μ1`` the
ratios of ``μ_k = −log λ_k`` (Laplace–Beltrami eigenvalue ratios: 4, 9, 16 on a segment, 1, 4,
4 on a circle, 1, 1, 1.x on a surface).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import MIXTURE, gaussian_mixture, mlp, print_table, train

import lightning_landscape as ll

HEADERS = ["iterates", "n", "D", "dim", "λ1", "λ2", "λ3", "λ4", "μ2/μ1", "μ3/μ1", "μ4/μ1", "paper"]


def trajectory(
    steps: int, seed: int, *, batch_size: int = 32, lr: float = 0.05, momentum: float = 0.9
) -> np.ndarray:
    """Every SGD iterate (``steps + 1`` rows of ``D`` parameters)."""
    X, y = gaussian_mixture(5, seed=seed, **MIXTURE)
    model = mlp(X.shape[1], 64, 5, seed=seed)
    points: list[np.ndarray] = []

    def record(step: int, model: torch.nn.Module) -> None:
        points.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy())

    loss = train(
        model, X, y, steps=steps, lr=lr, momentum=momentum, batch_size=batch_size, seed=seed,
        on_step=record,
    )  # fmt: skip
    print(f"{steps} SGD steps (batch {batch_size}, lr {lr}), final training loss {loss:.3f}")
    return np.stack(points).astype(np.float64)


def row(name: str, W: np.ndarray, seed: int) -> dict:
    dm = ll.diffusion_map(W, n_components=4, seed=seed)
    lam = dm.eigenvalues
    mu = -np.log(lam)
    return {
        "iterates": name,
        "n": len(W),
        "D": W.shape[1],
        "dim": float(dm.intrinsic_dim),
        **{f"λ{i + 1}": float(lam[i]) for i in range(4)},
        **{f"μ{i + 1}/μ1": float(mu[i] / mu[0]) for i in range(1, 4)},
        "paper": "low dim, fast decay",
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="150 steps (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = 150 if args.quick else 1000
    W = trajectory(steps, args.seed)
    rows = [row("all", W, args.seed), row("second half", W[len(W) // 2 :], args.seed)]
    if not args.quick:  # more gradient noise: smaller batches, larger steps, no momentum
        noisy = trajectory(steps, args.seed, batch_size=4, lr=0.2, momentum=0.0)
        rows.append(row("all, noisier SGD", noisy, args.seed))
    print_table(HEADERS, [[r[h] for h in HEADERS] for r in rows])
    return rows


if __name__ == "__main__":
    main()
