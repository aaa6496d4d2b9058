"""The examples run (shortened) and write what the README promises."""

from __future__ import annotations

import importlib.util
import os

from tests.callbacks._events import load_events


def _load(name: str):
    path = os.path.join(os.path.dirname(__file__), "..", "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_example_writes_the_landscape(tmp_path, capsys):
    example = _load("digits_landscape")
    example.main(["--logdir", str(tmp_path), "--max-steps", "30", "--every-n-steps", "15"])
    assert "3 Hessian measurements, 0 skipped" in capsys.readouterr().out
    acc = load_events(str(tmp_path))
    assert "landscape/hessian/eigenvalue_10" in acc.Tags()["scalars"]
    assert "landscape/hessian/spectrum_signed_log" in acc.Tags()["tensors"]


def test_core_imports_neither_lightning_nor_tensorboard():
    import subprocess
    import sys

    code = (
        "import sys, lightning_landscape.linalg; "
        "bad = [m for m in ('lightning', 'tensorboard', 'lightning_landscape.callbacks') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
