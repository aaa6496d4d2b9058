"""The phenomena scripts (examples/phenomena/) run in --quick mode and show the papers' shapes.

Each check is a structural claim of a paper that the quick run can fail: where the spectrum
steps down, which part of the Gauss–Newton term carries the outliers, how far above chance the
gradient's overlap is, the diffusion spectrum of a curve, the explained stress of InPCA.
"""

from __future__ import annotations

import ast
import importlib.util
import os

import numpy as np
import pytest

PHENOMENA = os.path.join(os.path.dirname(__file__), "..", "examples", "phenomena")
SCRIPTS = ["sagun", "papyan", "gur_ari", "fjellstrom", "mao"]


@pytest.fixture
def load(monkeypatch):
    monkeypatch.syspath_prepend(PHENOMENA)  # the scripts import their _common module

    def loader(name: str):
        spec = importlib.util.spec_from_file_location(name, os.path.join(PHENOMENA, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return loader


def _header(out: str, columns) -> None:
    assert any(all(c in line for c in columns) for line in out.splitlines()), out


def test_sagun_outliers_and_bulk(load, capsys):
    example = load("sagun")
    rows = example.main(["--quick"])
    _header(capsys.readouterr().out, example.HEADERS)
    assert [(r["C"], r["width"]) for r in rows] == [(3, 16), (3, 64)]
    for r in rows:
        # The spectrum steps down after about C eigenvalues (C - 1 on this mixture).
        assert r["gap@"] in {2, 3, 4}, r
        assert r["λi/λi+1"] > 1.4, r
    # A wider network (4x the parameters) puts more of its spectrum at zero.
    assert rows[1]["D"] > 3 * rows[0]["D"]
    assert rows[1]["near0"] > rows[0]["near0"] + 0.2, rows


def test_papyan_outliers_carry_the_class_means(load, capsys):
    example = load("papyan")
    rows = example.main(["--quick"])
    _header(capsys.readouterr().out, example.HEADERS)
    out, nxt = rows
    assert (out["which"], nxt["which"]) == ("outliers", "next")
    # The between-class part explains a larger share of the outliers than of the next ones.
    assert out["λ(B)/λ(H)"] > 2 * nxt["λ(B)/λ(H)"], rows
    assert out["vᵀBv/λ(H)"] > 2 * nxt["vᵀBv/λ(H)"], rows
    # Near convergence the Gauss–Newton term is most of the Hessian.
    assert 0.9 < out["λ(G)/λ(H)"] < 1.1, rows


def test_gur_ari_gradient_in_the_top_subspace(load, capsys):
    example = load("gur_ari")
    rows = example.main(["--quick"])
    out = capsys.readouterr().out
    _header(out, example.HEADERS)
    assert "median overlap from step 20 on" in out
    assert all(0.0 <= r["overlap full"] <= 1.0 and 0.0 <= r["overlap batch"] <= 1.0 for r in rows)
    late = [r["overlap full"] for r in rows if r["step"] >= 20]
    # A random direction has overlap k/D; the gradient's is two orders of magnitude larger.
    assert np.median(late) > 50 * rows[0]["k/D"], rows


def test_fjellstrom_iterates_are_low_dimensional(load, capsys):
    example = load("fjellstrom")
    rows = example.main(["--quick"])
    _header(capsys.readouterr().out, example.HEADERS)
    for r in rows:
        assert r["dim"] < 3 < r["D"], r
        assert 1 > r["λ1"] > r["λ2"] > r["λ3"] > r["λ4"] > 0, r
    # The whole run is a curve: Laplace–Beltrami ratios of a segment, 4 and 9.
    assert 3 < rows[0]["μ2/μ1"] < 5 and 7 < rows[0]["μ3/μ1"] < 11, rows[0]


def test_mao_inpca_stress(load, capsys):
    example = load("mao")
    rows = example.main(["--quick"])
    _header(capsys.readouterr().out, example.HEADERS)
    assert [r["points"] for r in rows][:2] == [2 * rows[2]["points"], 2 * rows[2]["points"] + 1]
    for r in rows:
        assert 0 < r["stress top1"] <= r["top2"] <= r["top3"] <= 1, r
        assert r["top3"] > 0.5, r


@pytest.mark.parametrize("name", SCRIPTS)
def test_phenomena_use_only_the_public_package(name):
    with open(os.path.join(PHENOMENA, f"{name}.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    ours = [m for m in modules if m and m.startswith("lightning_landscape")]
    assert ours == ["lightning_landscape"], ours
    assert "_common" in modules
