"""Sagun et al. 2017: a bulk near zero that grows with the parameters, and about C outliers.

    python examples/phenomena/sagun.py            # C = 3, 5, 10; widths 16, 64, 256, 1024
    python examples/phenomena/sagun.py --quick    # C = 3; widths 16, 64 (a few seconds)

Sagun, Evci, Güney, Dauphin & Bottou (2017, arXiv 1706.04454) train MLPs on a mixture of
Gaussians and find a Hessian spectrum made of a bulk concentrated at zero, which widens with the
number of parameters, and a few outliers whose number follows the data (the number of classes),
not the size of the network. Here: a C-class Gaussian mixture (16 dimensions, 100 points per
class, class means of norm 2 in unit noise), one-hidden-layer tanh MLPs trained to near
convergence by full-batch gradient descent, and ``hessian_spectrum`` on all training points.

Columns: ``D`` parameters; ``n_out`` the package's outlier count (gap to the bulk, see
docs/science.md), ``sat`` whether all computed eigenvalues were outliers (the count then comes
from the density); ``gap@`` the index i of the largest ratio ``λ_i / λ_{i+1}`` among the top
``2C + 4`` eigenvalues (where the spectrum visibly steps down) and that ratio; ``near0`` the
share of the spectral density within 1% of ``λ_1`` of zero (the bulk at zero).
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import cross_entropy, print_table, trained_mixture_model

import lightning_landscape as ll

HEADERS = "C width D loss acc λ1 n_out sat gap@ λi/λi+1 near0 paper".split()


def near_zero_share(spec: ll.HessianSpectrum, rel: float = 0.01) -> float:
    """Mass of the estimated spectral density with ``|λ| < rel · λ_1``."""
    grid, dens = spec.density_grid, spec.density
    inside = np.abs(grid) < rel * spec.eigenvalues[0]
    return float(np.trapezoid(dens * inside, grid))


def measure(num_classes: int, width: int, *, seed: int) -> dict[str, float]:
    model, X, y, loss = trained_mixture_model(num_classes, width, seed=seed)
    spec = ll.hessian_spectrum(model, cross_entropy, [(X, y)], top_k=2 * num_classes + 4, seed=seed)
    ev = spec.eigenvalues
    ratios = ev[:-1] / ev[1:]
    acc = float((model(X).argmax(1) == y).float().mean())
    return {
        "C": num_classes,
        "width": width,
        "D": spec.num_params,
        "loss": loss,
        "acc": acc,
        "λ1": float(ev[0]),
        "n_out": int(spec.n_outliers),
        "sat": "yes" if spec.n_outliers_saturated else "no",
        "gap@": int(np.argmax(ratios)) + 1,
        "λi/λi+1": float(ratios.max()),
        "near0": near_zero_share(spec),
        "paper": "outliers ≈ C",
    }


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="C = 3, two widths (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    classes = (3,) if args.quick else (3, 5, 10)
    widths = (16, 64) if args.quick else (16, 64, 256, 1024)
    rows = [measure(c, w, seed=args.seed) for c in classes for w in widths]
    print_table(HEADERS, [[r[h] for h in HEADERS] for r in rows])
    return rows


if __name__ == "__main__":
    main()
