"""Spectrum figure: panels, scales, markers; written to the images dashboard."""

from __future__ import annotations

import io

import numpy as np
import pytest

from lightning_landscape.dashboard import spectrum_figure, write_figure


def _synthetic(signs: str = "positive"):
    grid = np.linspace(-1.0, 14.0, 400)
    bulk = np.exp(-0.5 * (grid / 0.1) ** 2) / (0.1 * np.sqrt(2 * np.pi))
    outliers = np.array([12.0, 7.5, 4.1, 2.8, 1.9])
    spikes = sum(np.exp(-0.5 * ((grid - o) / 0.05) ** 2) for o in outliers)
    density = 0.999 * bulk + 1e-3 * spikes
    top = np.concatenate([outliers, [0.3, 0.25, 0.2, 0.15, 0.1]])
    if signs == "mixed":
        top[-2:] = [-0.1, -0.4]
    residuals = np.full(top.shape, 1e-3)
    return grid, density, top, residuals


def test_figure_panels_and_scales() -> None:
    grid, density, top, residuals = _synthetic()
    fig = spectrum_figure(
        grid,
        density,
        eigenvalues=top,
        residuals=residuals,
        n_outliers=5,
        bulk_edge=0.35,
        title="step 10",
    )
    left, right = fig.axes
    assert left.get_yscale() == "log" and right.get_yscale() == "log"
    assert left.get_xlabel() == "eigenvalue λ"
    assert left.get_ylabel() == "density (log scale)"
    assert right.get_ylabel().startswith("eigenvalue λ")
    # 5 outlier lines + 1 bulk edge on the left; density never below the floor.
    vertical = [line for line in left.get_lines() if line.get_xdata()[0] == line.get_xdata()[-1]]
    assert len(vertical) == 6
    assert left.get_ylim()[0] > 0
    labels = [text.get_text() for text in left.get_legend().get_texts()]
    assert labels == ["SLQ density", "outliers (top 5)", "bulk edge λ = 0.35"]
    assert fig._suptitle.get_text() == "step 10"
    fig.savefig(io.BytesIO(), format="png")  # renders headless


def test_mixed_signs_use_symlog_and_plt_state_is_untouched() -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    grid, density, top, _ = _synthetic("mixed")
    fig = spectrum_figure(grid, density, eigenvalues=top, n_outliers=0, bulk_edge=None)
    assert fig.axes[1].get_yscale() == "symlog"
    assert plt.get_fignums() == before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid": np.zeros(3)}, r"grid and density must have the same shape; got grid \(3,\)"),
        (
            {"n_outliers": 11},
            r"n_outliers must be .*0 <= n_outliers <= .* = 10; got 11",
        ),
        ({"residuals": -np.ones(10)}, r"residuals must be >= 0"),
        ({"residuals": np.ones(3)}, r"residuals must have the same shape as eigenvalues"),
        ({"eigenvalues": [np.nan]}, r"eigenvalues must be finite"),
        ({"bulk_edge": np.inf}, r"bulk_edge must be finite, NaN or None; got inf"),
    ],
)
def test_bad_inputs_raise(kwargs: dict, match: str) -> None:
    grid, density, top, residuals = _synthetic()
    options = {
        "grid": grid,
        "density": density,
        "eigenvalues": top,
        "residuals": residuals,
        "n_outliers": 5,
        "bulk_edge": 0.35,
        **kwargs,
    }
    grid = options.pop("grid")
    density = options.pop("density")
    with pytest.raises(ValueError, match=match):
        spectrum_figure(grid, density, **options)


def test_write_figure_stores_an_image(writer, read_events) -> None:
    grid, density, top, residuals = _synthetic()
    fig = spectrum_figure(
        grid, density, eigenvalues=top, residuals=residuals, n_outliers=5, bulk_edge=0.35
    )
    write_figure(writer, "landscape/hessian/spectrum_figure", fig, step=4)
    (image,) = read_events().Images("landscape/hessian/spectrum_figure")
    assert image.step == 4
    assert (image.width, image.height) == (1100, 420)
    assert image.encoded_image_string.startswith(b"\x89PNG")
