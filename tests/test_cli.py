"""The monitors configured from a LightningCLI YAML file and from the command line."""

from __future__ import annotations

import importlib.util
import os

import pytest

from lightning_landscape import DiffusionMapMonitor, HessianSpectrumMonitor
from lightning_landscape._checks import keyword_options
from lightning_landscape.callbacks.hessian import _SET_HERE, HessianOptions
from lightning_landscape.linalg import hessian_spectrum

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _cli_module():
    spec = importlib.util.spec_from_file_location("cli", os.path.join(EXAMPLES, "cli.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(tmp_path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        os.path.join(EXAMPLES, "landscape_cli.yaml"),
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=1",
        "--trainer.max_steps=20",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def test_the_example_config_builds_and_runs_the_monitors(tmp_path):
    cli = _cli_module().main(_args(tmp_path))
    monitors = [cb for cb in cli.trainer.callbacks if type(cb).__module__.startswith("lightning_")]
    hessian = next(cb for cb in monitors if isinstance(cb, HessianSpectrumMonitor))
    assert hessian.top_k == 5 and hessian.spectrum_kwargs == {"tol": 1e-5}
    assert hessian.num_measurements == 2 and hessian.skipped == 0  # steps 0 and 20
    diffusion = next(cb for cb in monitors if isinstance(cb, DiffusionMapMonitor))
    assert diffusion.num_measurements > 0
    assert cli.trainer.global_step == 20


def test_a_forwarded_option_from_the_command_line_and_a_bad_value(tmp_path, capsys):
    # Appended on the command line; init_args then address the last callback, this one.
    add = "--trainer.callbacks+=lightning_landscape.HessianSpectrumMonitor"
    cli = _cli_module().main(
        _args(tmp_path, add, "--trainer.callbacks.init_args.num_slq_probes=2",
              "--trainer.callbacks.init_args.top_k=3", "--trainer.max_steps=1")
    )  # fmt: skip
    added = [cb for cb in cli.trainer.callbacks if isinstance(cb, HessianSpectrumMonitor)][-1]
    assert added.top_k == 3 and added.spectrum_kwargs == {"num_slq_probes": 2}
    assert added.num_measurements == 1 and added.skipped == 0  # at the end of the 1-step fit
    with pytest.raises(SystemExit):  # jsonargparse refuses the type before anything runs
        _cli_module().main(_args(tmp_path, add, "--trainer.callbacks.init_args.tol=abc"))
    assert "tol" in capsys.readouterr().err


def test_the_typed_options_are_the_cores_keyword_options():
    # One source of truth: the TypedDict LightningCLI reads must follow hessian_spectrum.
    forwarded = set(keyword_options(hessian_spectrum)) - set(_SET_HERE)
    assert set(HessianOptions.__annotations__) == forwarded


def test_the_typed_covariance_options_are_the_cores_keyword_options():
    from lightning_landscape.callbacks.gradient import _SET_HERE as SET_BY_GRADIENT
    from lightning_landscape.linalg.covariance import CovarianceOptions, gradient_covariance

    forwarded = set(keyword_options(gradient_covariance)) - set(SET_BY_GRADIENT)
    assert set(CovarianceOptions.__annotations__) == forwarded


def test_the_typed_diffusion_options_are_the_cores_keyword_options():
    from lightning_landscape.embeddings.diffusion import DiffusionOptions, diffusion_map
    from lightning_landscape.embeddings.trajectory import _SET_HERE as SET_BY_EMBEDDER

    forwarded = set(keyword_options(diffusion_map)) - set(SET_BY_EMBEDDER)
    assert set(DiffusionOptions.__annotations__) == forwarded


def test_a_diffusion_option_is_typed_on_the_command_line(tmp_path, capsys):
    add = "--trainer.callbacks+=lightning_landscape.DiffusionMapMonitor"
    with pytest.raises(SystemExit):  # a value outside the Literal is refused before fit
        _cli_module().main(_args(tmp_path, add, "--trainer.callbacks.init_args.neighbors=knn"))
    assert "neighbors" in capsys.readouterr().err
