"""Spectrum histograms: analytic bucket values, trimming, fixed edges, TensorBoard round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tensorboard.util import tensor_util

from lightning_landscape.dashboard import (
    SpectrumAxis,
    signed_log,
    spectrum_axis_markdown,
    spectrum_histogram,
    write_spectrum_histogram,
)

TAG = "landscape/hessian/spectrum"


def _expected_counts(nodes, weights, *, dim, axis, sigma):
    """Reference: dim/P Σ_p Σ_j w_pj [Φ(b) − Φ(a)] per bin, end bins unbounded, with math.erf."""
    nodes = np.atleast_2d(nodes)
    weights = np.atleast_2d(weights)
    edges = axis.edges.tolist()
    edges[0], edges[-1] = -math.inf, math.inf
    counts = np.zeros(len(edges) - 1)
    for p in range(nodes.shape[0]):
        for node, weight in zip(nodes[p], weights[p], strict=True):
            s = float(signed_log(node, axis.tau))
            cdf = [0.5 * (1 + math.erf((e - s) / (sigma * math.sqrt(2)))) for e in edges]
            counts += weight * np.diff(cdf)
    return dim * counts / nodes.shape[0]


def _in_edges(edges: np.ndarray, axis: SpectrumAxis) -> np.ndarray:
    """Index of each of ``edges`` in ``axis.edges`` (asserting it is one of them)."""
    index = np.searchsorted(axis.edges, edges)
    np.testing.assert_array_equal(axis.edges[index], edges)
    return index


@pytest.fixture
def axis() -> SpectrumAxis:
    return SpectrumAxis.for_spectrum(1000.0)  # tau = 1


def test_single_node_matches_analytic_counts(axis: SpectrumAxis) -> None:
    edges, values = spectrum_histogram([0.0], [1.0], dim=1000, axis=axis)
    expected = _expected_counts([0.0], [1.0], dim=1000, axis=axis, sigma=0.05)
    first = _in_edges(edges, axis)[0]
    counts = 10.0**values - 1
    np.testing.assert_allclose(counts, expected[first : first + values.size], rtol=1e-9, atol=1e-9)
    assert counts.sum() == pytest.approx(1000.0, abs=1e-2)  # trimmed tails hold < 1e-3 each
    # Symmetric about the zero-centred bin.
    np.testing.assert_allclose(values, values[::-1], atol=1e-12)
    assert edges[0] == pytest.approx(-edges[-1])


def test_two_separated_nodes_give_two_bumps(axis: SpectrumAxis) -> None:
    nodes = np.array([[-99.0, 999.0]])  # signed-log -2 and 3 with tau = 1
    weights = np.array([[0.3, 0.7]])
    edges, values = spectrum_histogram(nodes, weights, dim=1000, axis=axis)
    centres = 0.5 * (edges[:-1] + edges[1:])
    counts = 10.0**values - 1
    left, right = centres < 0.5, centres >= 0.5
    assert counts[left].sum() == pytest.approx(300.0, abs=1e-2)
    assert counts[right].sum() == pytest.approx(700.0, abs=1e-2)
    assert centres[left][np.argmax(counts[left])] == pytest.approx(-2.0, abs=0.05)
    assert centres[right][np.argmax(counts[right])] == pytest.approx(3.0, abs=0.05)
    # Empty inner bins between the bumps stay (fixed axis), the ends are trimmed.
    assert np.any(counts < 1e-6)
    assert counts[0] >= 1e-3 and counts[-1] >= 1e-3
    assert edges[0] > -3.0 and edges[-1] < 4.0


def test_probes_are_averaged(axis: SpectrumAxis) -> None:
    nodes = np.array([[0.0, 10.0], [0.0, 99.0]])
    weights = np.array([[0.5, 0.5], [0.9, 0.1]])
    edges, values = spectrum_histogram(nodes, weights, dim=500, axis=axis, sigma=0.1)
    expected = _expected_counts(nodes, weights, dim=500, axis=axis, sigma=0.1)
    first = _in_edges(edges, axis)[0]
    np.testing.assert_allclose(
        10.0**values - 1, expected[first : first + values.size], rtol=1e-9, atol=1e-9
    )


def test_single_outlier_stays_visible_beside_bulk(axis: SpectrumAxis) -> None:
    dim = 1000
    centre = float(0.5 * (axis.edges[250] + axis.edges[251]))  # a bin centre, ≈ 4.3 decades
    outlier = axis.tau * (10.0**centre - 1)
    nodes, weights = [0.0, outlier], [1 - 1 / dim, 1 / dim]  # one eigenvalue of 1000
    edges, values = spectrum_histogram(nodes, weights, dim=dim, axis=axis, sigma=0.02)
    index = _in_edges(edges, axis)[0]
    assert values.max() > 2.5  # the bulk
    assert values[250 - index] >= 0.25  # the outlier's own bucket
    # At the default broadening (σ = bin width) the count 1 spreads over ~3 bins: peak
    # log10(1 + 0.38) ≈ 0.14, still far above what a linear count axis would show (1/1000).
    edges, values = spectrum_histogram(nodes, weights, dim=dim, axis=axis)
    index = _in_edges(edges, axis)[0]
    width = axis.edges[1] - axis.edges[0]
    peak = math.log10(1 + math.erf(width / 2 / (0.05 * math.sqrt(2))))
    assert values[250 - index] == pytest.approx(peak, rel=1e-6)
    assert values[250 - index] > 0.13
    assert (10.0 ** values[250 - index - 3 : 250 - index + 4] - 1).sum() == pytest.approx(1, 1e-2)


def test_mass_beyond_axis_piles_into_end_bins(axis: SpectrumAxis) -> None:
    edges, values = spectrum_histogram([-1e12, 1e12], [0.25, 0.75], dim=100, axis=axis)
    np.testing.assert_array_equal(edges, axis.edges)  # nothing to trim: both end bins are full
    counts = 10.0**values - 1
    assert counts[0] == pytest.approx(25.0) and counts[-1] == pytest.approx(75.0)
    assert counts.sum() == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("nodes", "weights", "kwargs", "match"),
    [
        ([[0.0, 1.0]], [[0.5, 0.6]], {}, r"each row of weights must sum to 1 .*got row sums \[1.1"),
        (
            [[0.0, 1.0]],
            [[1.0]],
            {},
            r"nodes and weights must .*same shape .*\(1, 2\).*\(1, 1\)",
        ),
        ([[[0.0]]], [[[1.0]]], {}, r"nodes must have shape \(P, m\).*got shape \(1, 1, 1\)"),
        ([[0.0, np.nan]], [[0.5, 0.5]], {}, r"nodes must be finite"),
        ([[0.0, 1.0]], [[1.5, -0.5]], {}, r"weights must be finite and >= 0"),
        ([0.0], [1.0], {"dim": 0}, r"dim must be an integer >= 1 .*got 0"),
        ([0.0], [1.0], {"dim": 10.5}, r"dim must be an integer >= 1 .*got 10.5"),
        (
            [0.0],
            [1.0],
            {"sigma": 0.0},
            r"sigma must be a positive finite number; got 0.0",
        ),
    ],
)
def test_bad_inputs_raise(nodes, weights, kwargs, match, axis: SpectrumAxis) -> None:
    options = {"dim": 10, "axis": axis, **kwargs}
    with pytest.raises(ValueError, match=match):
        spectrum_histogram(nodes, weights, **options)


def test_axis_must_be_a_spectrum_axis() -> None:
    with pytest.raises(TypeError, match="axis must be a SpectrumAxis; got dict"):
        spectrum_histogram([0.0], [1.0], dim=1, axis={"tau": 1.0})


def _buckets(event) -> np.ndarray:
    return tensor_util.make_ndarray(event.tensor_proto)


def test_written_histogram_reads_back_with_description(axis, writer, read_events) -> None:
    nodes, weights = np.array([[0.0, 99.0]]), np.array([[0.9, 0.1]])
    write_spectrum_histogram(writer, TAG, nodes, weights, dim=1000, axis=axis, step=7)
    edges, values = spectrum_histogram(nodes, weights, dim=1000, axis=axis)
    events = read_events()
    assert TAG in events.PluginTagToContent("histograms")
    (event,) = events.Tensors(TAG)
    assert event.step == 7
    buckets = _buckets(event)  # rows [left edge, right edge, log10(1 + count)], exact float64
    assert buckets.dtype == np.float64
    np.testing.assert_array_equal(buckets[:, 0], edges[:-1])
    np.testing.assert_array_equal(buckets[:, 1], edges[1:])
    np.testing.assert_array_equal(buckets[:, 2], values)
    metadata = events.SummaryMetadata(TAG)
    assert metadata.plugin_data.plugin_name == "histograms"
    assert metadata.display_name == TAG
    description = metadata.summary_description
    assert "x: sign(λ)·log10(1+|λ|/τ), τ = 1 " in description
    assert "y: log10(1 + number of eigenvalues in the bin)" in description
    assert "SLQ estimate: dim = 1000, 1 probe(s)" in description


def test_histogram_plugin_reads_bins_and_description(axis, writer, logdir) -> None:
    """What TensorBoard's histogram plugin serves (Python loader): our bins and description."""
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.context import RequestContext
    from tensorboard.plugins.histogram import metadata as histogram_metadata

    nodes, weights = np.array([[0.0, -9.0]]), np.array([[0.5, 0.5]])
    for step in (3, 5):
        write_spectrum_histogram(writer, TAG, nodes, weights, dim=50, axis=axis, step=step)
    writer.flush()
    edges, values = spectrum_histogram(nodes, weights, dim=50, axis=axis)
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    context = RequestContext()
    listing = provider.list_tensors(
        context, experiment_id="", plugin_name=histogram_metadata.PLUGIN_NAME
    )
    ((run, tags),) = listing.items()
    assert tags[TAG].description.startswith("x: sign(λ)·log10(1+|λ|/τ)")
    data = provider.read_tensors(
        context,
        experiment_id="",
        plugin_name=histogram_metadata.PLUGIN_NAME,
        run_tag_filter=None,
        downsample=100,
    )
    points = data[run][TAG]
    assert [point.step for point in points] == [3, 5]
    np.testing.assert_array_equal(points[-1].numpy, np.stack([edges[:-1], edges[1:], values], 1))


def test_edges_stay_on_the_fixed_grid_across_steps(axis, writer, read_events) -> None:
    spectra = [
        ([0.0, 5.0], [0.99, 0.01]),
        ([0.0, 50.0, 5000.0], [0.98, 0.01, 0.01]),
        ([-3.0, 0.0, 5e5], [0.1, 0.89, 0.01]),
    ]
    for step, (nodes, weights) in enumerate(spectra):
        write_spectrum_histogram(writer, TAG, nodes, weights, dim=2000, axis=axis, step=10 * step)
    events = read_events().Tensors(TAG)
    assert [event.step for event in events] == [0, 10, 20]
    rights = []
    for event in events:
        buckets = _buckets(event)
        _in_edges(np.append(buckets[:, 0], buckets[-1, 1]), axis)  # all on the run's grid
        rights.append(buckets[-1, 1])
    # Later, wider spectra extend the same grid to the right.
    assert rights[0] < rights[1] < rights[2]


def test_writer_without_file_writer_gets_add_histogram_raw(axis) -> None:
    calls = []

    class Recorder:
        def add_histogram_raw(self, tag, **kwargs):
            calls.append((tag, kwargs))

    write_spectrum_histogram(Recorder(), TAG, [0.0], [1.0], dim=10, axis=axis, step=1)
    ((tag, kwargs),) = calls
    assert tag == TAG and kwargs["global_step"] == 1
    assert len(kwargs["bucket_limits"]) == len(kwargs["bucket_counts"])


def test_write_rejects_empty_tag(axis, writer) -> None:
    with pytest.raises(ValueError, match="tag must be a non-empty string; got ''"):
        write_spectrum_histogram(writer, "", [0.0], [1.0], dim=1, axis=axis, step=0)


def test_axis_markdown_has_tick_table(axis) -> None:
    text = spectrum_axis_markdown(axis)
    assert "x = sign(λ)·log10(1 + |λ|/τ)" in text
    assert "| ±3 | ±999 |" in text  # tau = 1
    assert "| ±8 | ±1e+08 |" in text
