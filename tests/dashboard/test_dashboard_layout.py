"""Custom-scalars layout: Hessian charts match the monitor's tags; the layout round-trips."""

from __future__ import annotations

import re

import pytest
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from lightning_landscape.dashboard import (
    hessian_layout,
    merge_layouts,
    write_custom_scalars_layout,
)

P = "landscape/hessian"
EIGEN = [f"{P}/eigenvalue_{i:02d}" for i in range(1, 11)]
RESID = [f"{P}/residual_{i:02d}" for i in range(1, 11)]
OTHER = [
    f"{P}/{name}"
    for name in (
        "trace",
        "trace_stderr",
        "n_outliers",
        "bulk_edge",
        "lambda_min",
        "ratio_max_over_bulk_edge",
        "ratio_max_over_kth",
        "seconds",
        "skipped",
        "num_hvps",
    )
]
# conv1 is named in the layout (a chart of its own); fc.weight is not (only its largest is charted).
GROUP = [f"{P}/conv1/eigenvalue_{i:02d}" for i in range(1, 4)] + [f"{P}/fc.weight/eigenvalue_01"]


def _charts_matching(layout: dict, tag: str) -> set[str]:
    # TensorBoard's custom-scalars plugin selects tags with re.match.
    return {
        title
        for charts in layout.values()
        for title, regexes in charts.items()
        if any(re.match(regex, tag) for regex in regexes)
    }


def test_hessian_layout_matches_the_monitor_tags() -> None:
    layout = hessian_layout(groups=["conv1"])
    (category,) = layout
    assert category == "landscape: hessian"
    for tag in [*EIGEN, *RESID, *OTHER, *GROUP]:
        assert _charts_matching(layout, tag), tag
    for tag in EIGEN:
        assert "top eigenvalues" in _charts_matching(layout, tag)
    for tag in RESID:
        assert _charts_matching(layout, tag) == {"error bounds (Ritz residuals)"}
    assert "top eigenvalues" not in _charts_matching(layout, RESID[0])
    assert _charts_matching(layout, f"{P}/trace") == {"trace (Hutchinson) ± stderr"}
    assert _charts_matching(layout, f"{P}/trace_stderr") == {"trace (Hutchinson) ± stderr"}
    # Group tags stay out of the whole-model chart and go to their own.
    assert "top eigenvalues" not in _charts_matching(layout, GROUP[0])
    assert _charts_matching(layout, f"{P}/conv1/eigenvalue_02") == {"top eigenvalues: conv1"}
    assert _charts_matching(layout, f"{P}/fc.weight/eigenvalue_01") == {
        "largest eigenvalue per parameter group"
    }
    assert not _charts_matching(layout, f"{P}/fc.weight/eigenvalue_02")
    # Regexes are escaped ('.' in a group name is literal) and anchored at the end.
    assert not _charts_matching(layout, f"{P}/eigenvalue_01_extra")
    assert not _charts_matching(layout, f"{P}/conv1/eigenvalue_01x")


def test_layout_round_trips_through_events(writer, read_events) -> None:
    extra = {
        "landscape: hessian": {"top eigenvalues": [r"landscape/hessian/eigenvalue_01$"]},
        "landscape: noise": {"noise scale": [r"landscape/noise/noise_scale$"]},
    }
    layout = merge_layouts(hessian_layout(), extra)
    write_custom_scalars_layout(writer, layout)
    (event,) = read_events().Tensors(metadata.CONFIG_SUMMARY_TAG)
    proto = layout_pb2.Layout()
    proto.ParseFromString(event.tensor_proto.string_val[0])
    read_back = {
        category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
        for category in proto.category
    }
    assert read_back == layout
    assert all(chart.HasField("multiline") for c in proto.category for chart in c.chart)


def test_merge_layouts_unites_and_dedupes_without_mutating() -> None:
    a = {"cat": {"chart": ["a$", "b$"]}}
    b = {"cat": {"chart": ["b$", "c$"], "other": ["d$"]}, "cat2": {"x": ["e$"]}}
    merged = merge_layouts(a, b)
    assert merged == {"cat": {"chart": ["a$", "b$", "c$"], "other": ["d$"]}, "cat2": {"x": ["e$"]}}
    assert a == {"cat": {"chart": ["a$", "b$"]}}
    assert merge_layouts() == {}


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        (
            {"cat": {"chart": ["("]}},
            r"sections\['cat'\]\['chart'\]: tag regexes must compile .*'\('",
        ),
        ({"cat": {"chart": []}}, r"sections\['cat'\]\['chart'\] must be a non-empty list .*\[\]"),
        ({"cat": {"chart": "a$"}}, r"must be a non-empty list of tag regexes; got 'a\$'"),
        ({"": {"chart": ["a"]}}, r"sections: categories must be non-empty strings; got ''"),
        ({"cat": {}}, r"sections\['cat'\] must be a non-empty mapping"),
        (["a"], r"sections must be a mapping"),
    ],
)
def test_bad_layouts_raise(writer, sections, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_custom_scalars_layout(writer, sections)


def test_hessian_layout_rejects_bad_names() -> None:
    with pytest.raises(ValueError, match="prefix must be a non-empty tag prefix; got '/'"):
        hessian_layout("/")
    with pytest.raises(ValueError, match="groups must hold non-empty strings; got ''"):
        hessian_layout(groups=[""])
