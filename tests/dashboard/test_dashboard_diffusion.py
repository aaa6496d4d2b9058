"""write_diffusion_embedding: one call writes the diffusion monitor's histogram, figure and
projector embedding under their tags, or warns once when there is no TensorBoard writer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from lightning_landscape.dashboard.diffusion import write_diffusion_embedding
from lightning_landscape.dashboard.writer import _reset_warn_once

PREFIX = "landscape/diffusion"


def _embedding(n: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return np.array([0.9, 0.7, 0.4]), rng.standard_normal((n, 3)), np.arange(0, 2 * n, 2)


def test_histogram_figure_and_projector_under_their_tags(writer, logdir, read_events):
    lam, coords, steps = _embedding()
    meta = {"step": steps.tolist(), "epoch": [0] * 12, "loss": [1.0] * 12}
    assert write_diffusion_embedding(writer, 22, lam, coords, steps, projector=meta)
    assert write_diffusion_embedding(writer, 30, lam, coords, steps, figure=False)
    acc = read_events()
    histograms = acc.Histograms(f"{PREFIX}/eigenvalues")
    assert [h.step for h in histograms] == [22, 30]
    assert histograms[0].histogram_value.num == 3
    assert histograms[0].histogram_value.sum == pytest.approx(lam.sum())
    assert [i.step for i in acc.Images(f"{PREFIX}/trajectory")] == [22]
    written = np.loadtxt(next(logdir.rglob("tensors.tsv")))
    np.testing.assert_allclose(written, coords, rtol=1e-6)  # float32 in the file
    assert len(list(logdir.rglob("metadata.tsv"))) == 1  # the projector only when asked


def test_without_a_writer_nothing_is_written_and_one_notice_is_given():
    _reset_warn_once()
    lam, coords, steps = _embedding()
    with pytest.warns(UserWarning, match="no TensorBoardLogger among trainer.loggers"):
        assert not write_diffusion_embedding(None, 4, lam, coords, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not write_diffusion_embedding(None, 6, lam, coords, steps)  # once only
        _reset_warn_once()
        # Nothing asked for: no notice either.
        assert not write_diffusion_embedding(
            None, 8, lam, coords, steps, histogram=False, figure=False
        )
