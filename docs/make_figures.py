"""Draw the figures of docs/science.md: ``python docs/make_figures.py`` (a few seconds).

The spectrum is synthetic but shaped like a network Hessian's: a bulk of thousands of eigenvalues
of either sign near zero and ten outliers up to three decades larger. It is drawn with
the package's own signed-log histogram, as the Hessian monitor writes it to TensorBoard.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from lightning_landscape.dashboard import SpectrumAxis, spectrum_histogram

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "img")


def synthetic_spectrum(dim: int = 5000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bulk = 0.05 * rng.standard_normal(dim - 10) * np.abs(rng.standard_normal(dim - 10))
    outliers = np.geomspace(0.3, 30.0, 10)
    return np.sort(np.concatenate([bulk, outliers]))


def linear_vs_signed_log(path: str) -> None:
    lam = synthetic_spectrum()
    dim = len(lam)
    axis = SpectrumAxis.for_spectrum(float(np.abs(lam).max()))
    edges, values = spectrum_histogram(lam, np.full(dim, 1.0 / dim), dim=dim, axis=axis, sigma=0.02)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    counts, bins = np.histogram(lam, bins=100)
    left.stairs(counts, bins, fill=True)
    left.set(title="linear axis, counts", xlabel="eigenvalue λ", ylabel="eigenvalues per bin")
    right.stairs(values, edges, fill=True)
    right.set(
        title=f"signed-log axis, log10(1 + count); τ = {axis.tau:.2g}",
        xlabel="sign(λ) log10(1 + |λ|/τ)",
        ylabel="log10(1 + eigenvalues per bin)",
    )
    fig.suptitle(f"one spectrum, {dim} eigenvalues: a bulk near 0 and 10 outliers")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    linear_vs_signed_log(os.path.join(OUT, "spectrum-linear-vs-signed-log.png"))
