"""``python -m lightning_landscape report``: the HTML page and CSV tables of a run's records,
checked against what TensorBoard's own reader finds in the event files."""

from __future__ import annotations

import base64
import csv
import re

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator as ea
from torch.utils.tensorboard import SummaryWriter

from lightning_landscape import HessianSpectrumMonitor
from lightning_landscape.__main__ import main
from lightning_landscape.dashboard.figures import spectrum_figure, write_figure
from tests.callbacks._models import DigitsModule, loader


def _images(page: str) -> list[bytes]:
    return [
        base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    ]


def test_report_of_a_written_run_holds_every_family_and_figure(tmp_path):
    run = tmp_path / "run"
    w = SummaryWriter(str(run))
    for step in (0, 5, 10):
        for i in (1, 2, 3):
            w.add_scalar(f"landscape/hessian/eigenvalue_{i:02d}", 10.0 / i + step, step)
        w.add_scalar("landscape/hessian/trace", 3.5 + step, step)
        w.add_scalar("other/loss", 1.0, step)  # not a monitor's: left out
        grid = np.linspace(-1, 12, 50)
        fig = spectrum_figure(
            grid, np.exp(-(grid**2)), eigenvalues=[10.0 + step], n_outliers=1, bulk_edge=2.0
        )
        write_figure(w, "landscape/hessian/density", fig, step)
    w.close()
    out = tmp_path / "r.html"
    assert main(["report", str(run), "--out", str(out), "--steps", "0", "10"]) == 0
    page = out.read_text()
    assert "<h2>hessian</h2>" in page and "other/loss" not in page
    # One chart per family (the three eigenvalues share one, the trace has its own) plus the
    # density figure at the two chosen steps; every embedded image is a PNG.
    assert page.count("<figure>") == 4
    assert "density at step 0" in page and "density at step 10" in page
    assert "density at step 5" not in page
    assert all(png.startswith(b"\x89PNG") for png in _images(page)) and len(_images(page)) == 4
    assert "Top Hessian eigenvalues" in page  # the sentence on how to read it


def test_report_and_csv_of_a_real_fit_match_tensorboards_reader(tmp_path, make_trainer):
    monitor = HessianSpectrumMonitor(every_n_steps=2, top_k=3, num_probe_batches=1)
    make_trainer([monitor], max_steps=4).fit(DigitsModule(), loader(32))
    run = tmp_path / "version_0"
    out, table = tmp_path / "report.html", tmp_path / "csv"
    assert main(["report", str(tmp_path), "--out", str(out), "--csv", str(table)]) == 0
    page = out.read_text()
    assert "eigenvalue" in page and "density at step 4" in page
    acc = ea.EventAccumulator(str(run), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    expected = {e.step: e.value for e in acc.Scalars("landscape/hessian/eigenvalue_01")}
    with open(table / "hessian.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    got = {int(r["step"]): float(r["eigenvalue_01"]) for r in rows if r["eigenvalue_01"]}
    assert got == expected and sorted(got) == [0, 2, 4]


def test_report_of_a_directory_without_events_fails_clearly(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "no TensorBoard event file" in capsys.readouterr().err
    w = SummaryWriter(str(tmp_path / "plain"))
    w.add_scalar("loss", 1.0, 0)
    w.close()
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "no landscape/ tag" in capsys.readouterr().err


@pytest.mark.parametrize("value", [1e-30, 123456.789, -0.1])
def test_csv_round_trips_the_logged_float32_exactly(tmp_path, value):
    w = SummaryWriter(str(tmp_path / "run"))
    w.add_scalar("landscape/gradient/noise_scale", value, 3)
    w.close()
    assert (
        main(
            [
                "report",
                str(tmp_path),
                "--out",
                str(tmp_path / "r.html"),
                "--csv",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    with open(tmp_path / "c" / "gradient.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert float(row["noise_scale"]) == float(np.float32(value))


def test_each_chart_is_read_in_its_monitors_sense(tmp_path):
    w = SummaryWriter(str(tmp_path / "run"))
    for tag in ("landscape/hessian/eigenvalue_01", "landscape/diffusion/eigenvalue_01"):
        w.add_scalar(tag, 0.9, 0)
    w.close()
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "run"), "--out", str(out)]) == 0
    page = out.read_text()
    hessian, diffusion = page.index("<h2>hessian</h2>"), page.index("<h2>diffusion</h2>")
    assert "Non-trivial eigenvalues of the diffusion operator" in page[diffusion:hessian]
    assert "Top Hessian eigenvalues" in page[hessian:]
