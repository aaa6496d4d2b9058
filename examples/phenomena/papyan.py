"""Papyan 2019/2020: the Hessian's outliers come from the class means of the Gauss–Newton term.

    python examples/phenomena/papyan.py           # the C = 3, 5, 10 mixtures and digits
    python examples/phenomena/papyan.py --quick   # C = 3 only (a few seconds)

Papyan ("Measurements of three-level hierarchical structure in the outliers in the spectrum of
deepnet Hessians", 2019; "Traces of class/cross-class structure pervade deep learning spectra",
2020) splits the Gauss–Newton term ``G`` of the cross-entropy Hessian into a between-class part
``B``, built from the ``C²`` class means ``δ_{c,c'}``, and the rest; the outliers of the spectrum
are those of ``B``. ``class_structure`` measures, for each top Hessian eigenvalue ``λ_k``, the
share ``λ_k(B) / λ_k(H)``, the Rayleigh share ``v_kᵀ B v_k / λ_k(H)`` at the Hessian's own
eigenvector, and ``λ_k(G) / λ_k(H)``.

Models: the one-hidden-layer MLPs (width 64) of ``sagun.py`` on the C-class mixtures, and a
one-hidden-layer MLP (width 32) trained on scikit-learn's digits (10 classes). Rows: the mean
shares over the outliers (the top ``n`` eigenvalues above the largest step ``λ_n / λ_{n+1}`` of
the spectrum) and over the next ``n`` eigenvalues (the start of the bulk).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import mlp, print_table, train, trained_mixture_model
from _digits import digits_split

import lightning_landscape as ll

HEADERS = ["model", "C", "n", "which", "λ(B)/λ(H)", "vᵀBv/λ(H)", "λ(G)/λ(H)", "paper"]


def digits_model(seed: int, steps: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A width-32 tanh MLP trained on 1,500 digits by full-batch gradient descent."""
    train_set, _ = digits_split(seed=seed)
    X, y = train_set.tensors
    model = mlp(64, 32, 10, seed=seed)
    train(model, X, y, steps=steps, lr=0.1, seed=seed)
    return model, X, y


def shares(name: str, model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, seed: int):
    """Two table rows: mean shares over the outliers and over as many next eigenvalues."""
    C = int(y.max()) + 1
    cs = ll.class_structure(model, [(X, y)], top_k=2 * C + 2, seed=seed)
    ev = cs.hessian_eigenvalues
    n = int(np.argmax(ev[:-1] / ev[1:])) + 1  # the largest step down: the outliers above it
    n = min(n, len(ev) // 2)
    rows = []
    for which, sl in (("outliers", slice(0, n)), ("next", slice(n, 2 * n))):
        rows.append(
            {
                "model": name,
                "C": C,
                "n": n,
                "which": which,
                "λ(B)/λ(H)": float(np.mean(cs.between_class_share[sl])),
                "vᵀBv/λ(H)": float(np.mean(cs.between_class_rayleigh_share[sl])),
                "λ(G)/λ(H)": float(np.mean(cs.ggn_share[sl])),
                "paper": "outliers from B",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="C = 3 only (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = []
    for C in (3,) if args.quick else (3, 5, 10):
        model, X, y, _ = trained_mixture_model(C, 64, seed=args.seed)
        rows += shares(f"mixture C={C}", model, X, y, args.seed)
    if not args.quick:
        model, X, y = digits_model(args.seed, steps=300)
        rows += shares("digits", model, X, y, args.seed)
    print_table(HEADERS, [[r[h] for h in HEADERS] for r in rows])
    return rows


if __name__ == "__main__":
    main()
