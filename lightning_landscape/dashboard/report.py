"""A self-contained HTML report of what the monitors recorded in a run, and the same as CSV.

``python -m lightning_landscape report RUN_DIR [--out report.html] [--csv DIR]`` reads the
TensorBoard event files under ``RUN_DIR`` with TensorBoard's own reader, after the fact: the
run needs no server, and a run logged elsewhere only needs its event files. The page embeds
every chart as a PNG (base64), so it can be mailed or attached to a paper's supplement.

Per monitor (``landscape/<monitor>/...`` tags): the scalars over training, quantities that
share a stem drawn in one chart (``eigenvalue_01`` … ``eigenvalue_10``), each chart with one
sentence on how to read it; the figures the monitor logged (the latest, or those nearest to
chosen steps). ``--csv`` writes one table per monitor (step, then one column per scalar).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["RunRecord", "read_run", "write_csv", "write_report"]

#: Tags the report reads: the monitors' namespace.
PREFIX = "landscape/"

#: How to read each quantity (matched on the stem of the tag's last part).
READING: dict[str, str] = {
    "eigenvalue": "Top Hessian eigenvalues (the outliers). They usually rise early in training "
    "and settle; a top value growing without bound signals instability.",
    "residual": "Error bound of each eigenvalue: some true eigenvalue lies within this "
    "distance of the reported one.",
    "trace": "Trace of the matrix: the sum of all eigenvalues, bulk and outliers.",
    "trace_stderr": "Standard error of the stochastic trace estimate.",
    "n_outliers": "Eigenvalues above the bulk edge; for a C-class classifier it is often near C.",
    "bulk_edge": "Upper edge of the bulk of near-zero eigenvalues.",
    "lambda_min": "Smallest eigenvalue estimate: negative values are directions of negative "
    "curvature.",
    "ratio_max_over_bulk_edge": "How far the top outlier stands out of the bulk.",
    "ratio_max_over_kth": "Spread of the top-k eigenvalues (λ1/λk).",
    "noise_scale": "Gradient noise scale B = tr Σ / |G|²: batches much smaller than B waste "
    "little; much larger ones give diminishing returns (McCandlish et al. 2018).",
    "overlap": "Share of the gradient inside the Hessian's top-k subspace (Gur-Ari et al.): "
    "near 1 means descent happens in a tiny subspace.",
    "explained_stress": "Share of the InPCA stress in the top dimensions: high values mean the "
    "predictions move on a low-dimensional manifold (Mao et al. 2024).",
    "intrinsic_dim": "Estimated dimension of the manifold the sampled parameters lie on.",
    "seconds": "Wall time of each measurement (what the monitor costs).",
    "skipped": "Measurements skipped after a numerical failure (0 on a healthy run).",
    "num_hvps": "Hessian-vector products spent per measurement.",
    "sharpness_ratio": "Sharpness over the optimiser's stability threshold (λ_max for SGD, the "
    "preconditioned λ_max(P⁻¹H) for Adam): 1 is the edge of stability (Cohen et al. 2021, 2022).",
    "stability_threshold": "The optimiser's stability line: 2/η for SGD, 2(1+β)/η with momentum, "
    "2(1+β₁)/((1-β₁)η) for Adam's preconditioned sharpness.",
    "preconditioned_sharpness": "λ_max(P⁻¹H) with Adam's preconditioner P from its second "
    "moment: what Adam's stability line bounds (Cohen et al. 2022).",
    "lambda_max_batch": "Top eigenvalue of each probe batch's own Hessian (min, mean, max, std): "
    "the curvature spread one minibatch step sees.",
    "subspace_overlap": "Overlap of successive top-k Hessian subspaces (1 = unchanged, near 0 = "
    "the top directions turned).",
}

#: Where a stem means something else in one monitor than in the table above.
READING_BY_MONITOR: dict[tuple[str, str], str] = {
    ("gradient", "eigenvalue"): "Top eigenvalues of the per-sample gradient covariance Σ (the "
    "SGD noise); compare their directions with the Hessian's through the overlap.",
    ("gradient", "trace"): "tr Σ: the total variance of the per-sample gradients.",
    ("diffusion", "eigenvalue"): "Non-trivial eigenvalues of the diffusion operator on the "
    "sampled parameters: a few near 1 before a drop mean SGD moves on a low-dimensional manifold.",
}

_STEM = re.compile(r"^(?P<stem>.+?)_(?P<index>\d+)$")


@dataclass
class RunRecord:
    """What a run recorded under ``landscape/``: scalars and the latest images per tag."""

    run_dir: str
    #: ``{tag: (steps, values)}``
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: ``{tag: [(step, png bytes), ...]}`` in step order
    images: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)

    @property
    def monitors(self) -> list[str]:
        names = {t[len(PREFIX) :].split("/", 1)[0] for t in (*self.scalars, *self.images)}
        return sorted(names)


def _event_dirs(run_dir: str) -> list[str]:
    found = []
    for root, _, files in os.walk(run_dir):
        if any(f.startswith("events.out.tfevents") for f in files):
            found.append(root)
    return sorted(found)


def read_run(run_dir: str) -> RunRecord:
    """Read every event file under ``run_dir`` (all of them kept: no TensorBoard sampling).

    Raises:
        FileNotFoundError: ``run_dir`` holds no event file.
    """
    from tensorboard.backend.event_processing import event_accumulator as ea

    dirs = _event_dirs(run_dir)
    if not dirs:
        raise FileNotFoundError(f"run_dir: no TensorBoard event file under {run_dir!r}")
    record = RunRecord(run_dir)
    keep = {ea.SCALARS: 0, ea.IMAGES: 0, ea.HISTOGRAMS: 1, ea.TENSORS: 1}
    for d in dirs:
        acc = ea.EventAccumulator(d, size_guidance=keep)
        acc.Reload()
        tags = acc.Tags()
        for tag in tags.get(ea.SCALARS, []):
            if tag.startswith(PREFIX):
                events = acc.Scalars(tag)
                steps = np.array([e.step for e in events], dtype=np.int64)
                values = np.array([e.value for e in events], dtype=np.float64)
                record.scalars[tag] = _merge(record.scalars.get(tag), steps, values)
        for tag in tags.get(ea.IMAGES, []):
            if tag.startswith(PREFIX):
                shots = [(int(e.step), bytes(e.encoded_image_string)) for e in acc.Images(tag)]
                record.images[tag] = sorted(record.images.get(tag, []) + shots)
    return record


def _merge(
    old: tuple[np.ndarray, np.ndarray] | None, steps: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate, sort by step, keep the last value written for a step (a resumed run)."""
    if old is not None:
        steps, values = np.concatenate([old[0], steps]), np.concatenate([old[1], values])
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    last = np.r_[steps[1:] != steps[:-1], True]
    return steps[last], values[last]


def _families(tags: Sequence[str]) -> dict[str, list[str]]:
    """Group a monitor's scalar tags by stem: ``eigenvalue_01``.. share one chart."""
    families: dict[str, list[str]] = {}
    for tag in sorted(tags):
        name = tag.rsplit("/", 1)[-1]
        group = tag.rsplit("/", 1)[0]
        match = _STEM.match(name)
        key = f"{group}/{match['stem']}" if match else tag
        families.setdefault(key, []).append(tag)
    return families


def _reading(key: str) -> str:
    name = key.rsplit("/", 1)[-1]
    monitor = key[len(PREFIX) :].split("/", 1)[0]
    if (monitor, name) in READING_BY_MONITOR:
        return READING_BY_MONITOR[(monitor, name)]
    for stem in sorted(READING, key=len, reverse=True):
        if name == stem or name.endswith(stem) or name.startswith(stem):
            return READING[stem]
    return "Logged by the monitor at each measurement; see the README's table of tags."


def _chart_png(title: str, series: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for label, (steps, values) in series.items():
        ax.plot(steps, values, marker="." if len(steps) < 40 else None, label=label)
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    finite = np.concatenate([v[np.isfinite(v)] for _, v in series.values()] or [np.zeros(0)])
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 1e3:
        ax.set_yscale("log")
    if 1 < len(series) <= 12:
        ax.legend(fontsize=7, ncol=2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _chosen(shots: list[tuple[int, bytes]], steps: Sequence[int] | None) -> list[tuple[int, bytes]]:
    if not shots:
        return []
    if not steps:
        return [shots[-1]]
    at = np.array([s for s, _ in shots])
    picks = sorted({int(np.argmin(np.abs(at - s))) for s in steps})
    return [shots[i] for i in picks]


def _section(record: RunRecord, monitor: str, steps: Sequence[int] | None) -> str:
    prefix = f"{PREFIX}{monitor}/"
    tags = [t for t in record.scalars if t.startswith(prefix)]
    parts = [f"<h2>{html.escape(monitor)}</h2>"]
    for key, members in _families(tags).items():
        title = key[len(prefix) :]
        series = {m.rsplit("/", 1)[-1]: record.scalars[m] for m in members}
        parts.append(
            f"<figure>{_img(_chart_png(title, series), title)}"
            f"<figcaption><b>{html.escape(title)}</b>: {html.escape(_reading(key))}"
            "</figcaption></figure>"
        )
    for tag in sorted(t for t in record.images if t.startswith(prefix)):
        for step, png in _chosen(record.images[tag], steps):
            label = f"{tag[len(prefix) :]} at step {step}"
            parts.append(
                f"<figure>{_img(png, label)}<figcaption><b>{html.escape(label)}</b>: the "
                "figure the monitor logged.</figcaption></figure>"
            )
    return "\n".join(parts)


_STYLE = (
    "body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}"
    "figure{display:inline-block;width:640px;margin:.5em;vertical-align:top}"
    "img{max-width:100%}figcaption{font-size:.85em;color:#333}"
)


def write_report(
    run_dir: str, out: str, *, steps: Sequence[int] | None = None, record: Any = None
) -> str:
    """Write the HTML report of ``run_dir`` to ``out`` and return ``out``.

    Args:
        run_dir: a run or log directory (searched recursively for event files).
        out: the HTML file to write.
        steps: show each monitor's figures at the logged steps nearest to these (default: the
            latest figure of each tag).
        record: an already read :class:`RunRecord` (default: :func:`read_run`).

    Raises:
        FileNotFoundError: no event file under ``run_dir``.
        ValueError: the run recorded nothing under ``landscape/``.
    """
    record = record if record is not None else read_run(run_dir)
    if not record.monitors:
        raise ValueError(f"run_dir: {run_dir!r} holds no landscape/ tag (no monitor logged)")
    body = "\n".join(_section(record, m, steps) for m in record.monitors)
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>Landscape report: {html.escape(run_dir)}</title><style>{_STYLE}</style>"
        f"</head><body><h1>Landscape report</h1><p>Run: <code>{html.escape(run_dir)}</code>. "
        f"Monitors: {', '.join(record.monitors)}. Step axis: optimizer steps.</p>"
        f"{body}</body></html>"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(page)
    return out


def write_csv(record: RunRecord, out_dir: str) -> list[str]:
    """One CSV per monitor: ``step`` then one column per scalar (empty where not logged)."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for monitor in record.monitors:
        prefix = f"{PREFIX}{monitor}/"
        tags = sorted(t for t in record.scalars if t.startswith(prefix))
        if not tags:
            continue
        rows: dict[int, dict[str, float]] = {}
        for tag in tags:
            for s, v in zip(*record.scalars[tag], strict=True):
                rows.setdefault(int(s), {})[tag[len(prefix) :]] = float(v)
        path = os.path.join(out_dir, f"{monitor}.csv")
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            names = [t[len(prefix) :] for t in tags]
            writer.writerow(["step", *names])
            for step in sorted(rows):
                row = rows[step]
                writer.writerow([step, *(repr(row[n]) if n in row else "" for n in names)])
        written.append(path)
    return written
