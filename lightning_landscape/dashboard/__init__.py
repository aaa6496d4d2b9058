"""TensorBoard output: spectrum histograms on a signed-log axis, figures, layouts, text.

The only package that writes TensorBoard artifacts. It takes numpy arrays and a
``torch.utils.tensorboard.SummaryWriter``; it holds no estimator and does not import Lightning at
import time.
"""

from lightning_landscape.dashboard.axis import SpectrumAxis, inverse_signed_log, signed_log
from lightning_landscape.dashboard.diffusion import diffusion_layout
from lightning_landscape.dashboard.diffusion import trajectory_figure as diffusion_figure
from lightning_landscape.dashboard.figures import spectrum_figure, write_figure
from lightning_landscape.dashboard.gradient import class_structure_figure, gradient_layout
from lightning_landscape.dashboard.histogram import (
    spectrum_axis_markdown,
    spectrum_histogram,
    write_spectrum_histogram,
)
from lightning_landscape.dashboard.inpca import inpca_layout, write_joint_inpca
from lightning_landscape.dashboard.inpca import trajectory_figure as inpca_figure
from lightning_landscape.dashboard.layout import (
    Layout,
    hessian_layout,
    merge_layouts,
    write_custom_scalars_layout,
)
from lightning_landscape.dashboard.text import write_text
from lightning_landscape.dashboard.writer import tensorboard_writer, warn_once

__all__ = [
    "Layout",
    "SpectrumAxis",
    "class_structure_figure",
    "diffusion_figure",
    "diffusion_layout",
    "gradient_layout",
    "hessian_layout",
    "inpca_figure",
    "inpca_layout",
    "inverse_signed_log",
    "merge_layouts",
    "signed_log",
    "spectrum_axis_markdown",
    "spectrum_figure",
    "spectrum_histogram",
    "tensorboard_writer",
    "warn_once",
    "write_custom_scalars_layout",
    "write_figure",
    "write_joint_inpca",
    "write_spectrum_histogram",
    "write_text",
]
