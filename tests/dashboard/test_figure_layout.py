"""The monitors' figures use fixed margins (no layout engine, which measured every text at each
draw): every axis, its labels and the titles must still lie inside the figure and the panels'
texts must not overlap, also with long tick labels (large steps, negative eigenvalues)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lightning_landscape.dashboard.diffusion import trajectory_figure as diffusion_figure
from lightning_landscape.dashboard.figures import spectrum_figure
from lightning_landscape.dashboard.gradient import class_structure_figure
from lightning_landscape.dashboard.inpca import trajectory_figure as inpca_figure

RNG = np.random.default_rng(0)
GRID = np.linspace(-1234.5, 98765.4, 300)
EIG = np.array([98765.4, 5432.1, 321.0, 12.5, 0.25, -0.5, -3.25, -45.5, -678.0, -1234.5])

FIGURES = {
    "spectrum": lambda: spectrum_figure(
        GRID,
        np.exp(-((GRID / 500.0) ** 2)) + 1e-9,
        eigenvalues=EIG,
        residuals=np.abs(EIG) * 1e-3,
        n_outliers=3,
        bulk_edge=0.5,
        title="landscape/hessian at step 1,234,567",
    ),
    "diffusion": lambda: diffusion_figure(
        RNG.standard_normal((300, 3)) * 1234.5,
        np.arange(300) * 123457,
        np.array([0.99, 0.5, 0.25]),
        title="diffusion map at step 37,037,100",
    ),
    "class structure": lambda: class_structure_figure(
        np.abs(EIG), np.abs(EIG) * 0.9, np.abs(EIG) * 0.01, title="class structure"
    ),
    "inpca": lambda: inpca_figure(
        np.cumsum(RNG.standard_normal((200, 3)), 0) * 12345.6,
        steps=np.arange(200),
        eigenvalues=np.array([12345.6, 234.5, -3456.7]),
        explained_stress=0.8,
        title="InPCA at step 1,234,567",
    ),
}


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figure_texts_stay_inside_the_figure_and_apart(name: str) -> None:
    fig = FIGURES[name]()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    width, height = fig.bbox.width, fig.bbox.height
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
    if fig._suptitle is not None:
        boxes.append(fig._suptitle.get_window_extent(renderer))
    for box in boxes:
        assert box.x0 >= 0 and box.y0 >= 0, (name, box)
        assert box.x1 <= width and box.y1 <= height, (name, box, width, height)
    # 2-D panels and the colour bar: their texts do not run into each other (3-D axes draw
    # their panes beyond their box by design and are left out).
    flat = [b for ax, b in zip(fig.axes, boxes, strict=False) if ax.name != "3d"]
    for a, b in itertools.combinations(flat, 2):
        assert not a.overlaps(b), (name, a, b)
