r"""Custom-scalars layout: related scalars (top-k eigenvalues, residuals, ...) in one chart each.

A layout here is ``{category: {chart_title: [tag_regex, ...]}}``; every chart is a multi-line
chart of all scalar tags matched by its regexes. TensorBoard's custom-scalars plugin matches with
Python's ``re.match`` (anchored at the start of the tag, not at its end, hence the ``$``), and
honours one layout per run: monitors contribute their parts (e.g. :func:`hessian_layout`), and one
writer writes :func:`merge_layouts` of all of them once, at the start of fit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["Layout", "hessian_layout", "merge_layouts", "write_custom_scalars_layout"]

Layout = dict[str, dict[str, list[str]]]
"""``{category: {chart_title: [tag_regex, ...]}}``."""


def _check_layout(layout: Any, *, name: str) -> Layout:
    """Validate a layout and return a fresh copy with lists."""
    if not isinstance(layout, Mapping):
        raise ValueError(
            f"{name} must be a mapping {{category: {{chart_title: [tag_regex, ...]}}}}; "
            f"got {type(layout).__name__}"
        )
    result: Layout = {}
    for category, charts in layout.items():
        if not isinstance(category, str) or not category:
            raise ValueError(f"{name}: categories must be non-empty strings; got {category!r}")
        if not isinstance(charts, Mapping) or not charts:
            raise ValueError(
                f"{name}[{category!r}] must be a non-empty mapping {{chart_title: [tag_regex]}}; "
                f"got {charts!r}"
            )
        result[category] = {}
        for title, regexes in charts.items():
            where = f"{name}[{category!r}][{title!r}]"
            if not isinstance(title, str) or not title:
                raise ValueError(
                    f"{name}[{category!r}]: chart titles must be non-empty strings; got {title!r}"
                )
            if isinstance(regexes, str) or not isinstance(regexes, Sequence) or not regexes:
                raise ValueError(
                    f"{where} must be a non-empty list of tag regexes; got {regexes!r}"
                )
            for regex in regexes:
                if not isinstance(regex, str) or not regex:
                    raise ValueError(
                        f"{where}: tag regexes must be non-empty strings; got {regex!r}"
                    )
                try:
                    re.compile(regex)
                except re.error as error:
                    raise ValueError(
                        f"{where}: tag regexes must compile as Python regexes; got {regex!r} "
                        f"({error})"
                    ) from None
            result[category][title] = list(regexes)
    return result


def merge_layouts(*layouts: Mapping[str, Mapping[str, Sequence[str]]]) -> Layout:
    """Merge layouts: categories and charts are united, regexes of same-titled charts appended.

    Order is kept (first appearance) and duplicate regexes dropped; the inputs are not modified.

    Args:
        *layouts: Layouts ``{category: {chart_title: [tag_regex, ...]}}``.

    Returns:
        The merged layout.

    Raises:
        ValueError: If a layout is malformed (the message names which part).
    """
    merged: Layout = {}
    for position, layout in enumerate(layouts):
        checked = _check_layout(layout, name=f"layouts[{position}]")
        for category, charts in checked.items():
            target = merged.setdefault(category, {})
            for title, regexes in charts.items():
                existing = target.setdefault(title, [])
                existing.extend(regex for regex in regexes if regex not in existing)
    return merged


_SGD_LINE_CHART = "sharpness vs stability line (λ_max, threshold; sharpness_ratio 1 = edge)"
_ADAM_LINE_CHART = "Adam: preconditioned sharpness λ_max(P⁻¹H) vs stability line 2(1+β₁)/((1-β₁)η)"


def hessian_layout(
    prefix: str = "landscape/hessian", *, groups: Sequence[str] = (), adam: bool = False
) -> Layout:
    """Charts for the Hessian monitor's scalars.

    Matches the tags ``<prefix>/eigenvalue_01``…, ``residual_01``…, ``trace``, ``trace_stderr``,
    ``n_outliers``, ``bulk_edge``, ``lambda_min``, ``ratio_max_over_bulk_edge``,
    ``ratio_max_over_kth``, ``stability_threshold``, ``sharpness_ratio``,
    ``preconditioned_sharpness``, ``lambda_max_batch_*``, ``subspace_overlap``, ``seconds``,
    ``num_hvps``, ``skipped``
    and, per parameter group,
    ``<prefix>/<group>/eigenvalue_01``…. Scalars of different units get different charts.

    Args:
        prefix: Tag prefix of the monitor.
        groups: Parameter-group names; each gets a chart of its top eigenvalues. Whatever the
            groups, one chart shows the largest eigenvalue of every group.
        adam: the optimizer is Adam-like: its line is set against the preconditioned sharpness
            ``preconditioned_sharpness``, not against λ_max (one unit per chart).

    Returns:
        ``{"landscape: hessian": {chart_title: [tag_regex, ...]}}`` (category named after
        ``prefix``).

    Raises:
        ValueError: If ``prefix`` or a group name is empty.
    """
    if not isinstance(prefix, str) or not prefix.strip("/"):
        raise ValueError(f"prefix must be a non-empty tag prefix; got {prefix!r}")
    prefix = prefix.rstrip("/")
    p = re.escape(prefix)
    charts: dict[str, list[str]] = {
        "top eigenvalues": [rf"{p}/eigenvalue_\d+$"],
        "error bounds (Ritz residuals)": [rf"{p}/residual_\d+$"],
        "trace (Hutchinson) ± stderr": [rf"{p}/trace$", rf"{p}/trace_stderr$"],
        "outliers / bulk edge: λ_max, bulk edge, λ_min": [
            rf"{p}/eigenvalue_01$",
            rf"{p}/bulk_edge$",
            rf"{p}/lambda_min$",
        ],
        "number of outliers": [rf"{p}/n_outliers$"],
        _SGD_LINE_CHART: [
            rf"{p}/eigenvalue_01$",
            rf"{p}/stability_threshold$",
        ],
        "outlier ratios (λ_max / bulk edge, λ_max / λ_k)": [
            rf"{p}/ratio_max_over_bulk_edge$",
            rf"{p}/ratio_max_over_kth$",
        ],
        "largest eigenvalue per parameter group": [rf"{p}/[^/]+/eigenvalue_01$"],
        "sharpness_ratio (sharpness / stability threshold; 1 = edge of stability)": [
            rf"{p}/sharpness_ratio$"
        ],
        "λ_max per probe batch: min, mean, max, std (and the probe set's λ_max)": [
            rf"{p}/lambda_max_batch_(min|mean|max|std)$",
            rf"{p}/eigenvalue_01$",
        ],
        "top-k subspace overlap with the previous measurement (1 = unchanged)": [
            rf"{p}/subspace_overlap$"
        ],
    }
    if adam:  # Adam's line is not λ_max's: the SGD chart would set λ_max against it
        del charts[_SGD_LINE_CHART]
        charts[_ADAM_LINE_CHART] = [rf"{p}/preconditioned_sharpness$", rf"{p}/stability_threshold$"]
    for group in groups:
        if not isinstance(group, str) or not group:
            raise ValueError(f"groups must hold non-empty strings; got {group!r}")
        charts[f"top eigenvalues: {group}"] = [rf"{p}/{re.escape(group)}/eigenvalue_\d+$"]
    charts["cost: seconds per measurement"] = [rf"{p}/seconds$"]
    charts["cost: HVPs per measurement"] = [rf"{p}/num_hvps$"]
    charts["skipped measurements"] = [rf"{p}/skipped$"]
    category = prefix.replace("/", ": ")
    return {category: charts}


def write_custom_scalars_layout(
    writer: SummaryWriter | Any, sections: Mapping[str, Mapping[str, Sequence[str]]]
) -> None:
    """Write a custom-scalars layout in which every chart is a multi-line chart.

    Write once per run with the merged layout of all monitors: TensorBoard reads one layout per
    run (the custom-scalars plugin's ``custom_scalars__config__`` tag).

    Args:
        writer: A ``torch.utils.tensorboard.SummaryWriter`` (or an object with
            ``add_custom_scalars``).
        sections: ``{category: {chart_title: [tag_regex, ...]}}``.

    Raises:
        ValueError: If ``sections`` is malformed or a regex does not compile.
    """
    layout = _check_layout(sections, name="sections")
    writer.add_custom_scalars(
        {
            category: {title: ["Multiline", regexes] for title, regexes in charts.items()}
            for category, charts in layout.items()
        }
    )
