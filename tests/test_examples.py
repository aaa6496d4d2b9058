"""The examples run (shortened) and write what the README promises."""

from __future__ import annotations

import ast
import importlib.util
import os

import pytest

from tests.callbacks._events import load_events

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _load(name: str):
    path = os.path.join(EXAMPLES, f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_example_writes_the_landscape(tmp_path, capsys):
    example = _load("digits_landscape")
    # 80 steps: the trajectory (every 10 steps) has enough points to embed at the end.
    example.main(["--logdir", str(tmp_path), "--max-steps", "80", "--every-n-steps", "40"])
    out = capsys.readouterr().out
    # Samples and embeddings are told apart (the trajectory is sampled every 10 steps and
    # embedded at the end of fit).
    assert "3 Hessian, 3 gradient, 5 InPCA measurements; 9 trajectory samples, 1 diffusion " in out
    assert "1 diffusion embedding; 0 skipped" in out
    acc = load_events(str(tmp_path))
    tags = acc.Tags()
    for tag in (
        "landscape/hessian/eigenvalue_10",
        "landscape/gradient/noise_scale",
        "landscape/gradient/hessian_overlap",
        "landscape/diffusion/eigenvalue_01",
        "landscape/inpca/explained_stress_top1",
        "landscape/geometry/distance_from_init",
    ):
        assert tag in tags["scalars"], tag
    assert "landscape/hessian/spectrum_signed_log" in tags["tensors"]


def test_gradient_example_prints_the_concentration_table(tmp_path, capsys):
    example = _load("digits_gradient")
    rows = example.main(["--logdir", str(tmp_path), "--max-steps", "20", "--every-n-steps", "10"])
    assert sorted(rows) == [0, 10, 20]
    assert all(0.0 <= row["overlap"] <= 1.0 for row in rows.values())
    assert "3 Hessian and 3 gradient measurements, 0 skipped" in capsys.readouterr().out


def test_inpca_example_embeds_runs_jointly(tmp_path, capsys):
    example = _load("digits_inpca")
    example.main(["--logdir", str(tmp_path), "--max-steps", "30", "--runs", "2"])
    out = capsys.readouterr().out
    assert "joint InPCA of 2 runs" in out
    assert "explained stress, top 3 dims" in out


@pytest.mark.parametrize(
    "name", ["digits_landscape", "digits_gradient", "digits_diffusion", "digits_inpca"]
)
def test_examples_use_only_the_public_package(name):
    with open(os.path.join(EXAMPLES, f"{name}.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    ours = [m for m in modules if m and m.startswith("lightning_landscape")]
    assert ours == ["lightning_landscape"], ours
    assert "_digits" in modules  # the model and data come from the one shared module


def test_joint_inpca_writer_is_public_and_lazy():
    import lightning_landscape
    from lightning_landscape.dashboard import write_joint_inpca

    assert lightning_landscape.write_joint_inpca is write_joint_inpca
    assert "write_joint_inpca" in lightning_landscape.__all__


def test_core_imports_neither_lightning_nor_tensorboard():
    import subprocess
    import sys

    code = (
        "import sys, lightning_landscape.linalg, lightning_landscape.embeddings, "
        "lightning_landscape.sampling; "
        "bad = [m for m in ('lightning', 'tensorboard', 'lightning_landscape.callbacks') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
