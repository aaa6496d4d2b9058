"""log_gradient_covariance without a Trainer: every scalar reaches every logger under its tag, and
the histogram, axis card and class-structure figure reach TensorBoard, read back from the events."""

from __future__ import annotations

import math
import re
import types
import warnings

import numpy as np
import pytest
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator

from lightning_landscape.dashboard import SpectrumAxis
from lightning_landscape.dashboard.gradient import gradient_layout, log_gradient_covariance
from lightning_landscape.dashboard.writer import _reset_warn_once
from lightning_landscape.linalg import (
    ClassStructure,
    GradientCovariance,
    HessianAlignment,
    TrainingNoise,
)


class _Recorder(Logger):
    """A logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))


def _covariance() -> GradientCovariance:
    return GradientCovariance(
        eigenvalues=np.array([4.0, 1.0, 0.25]),
        residuals=np.zeros(3),
        trace=6.5,
        mean_gradient_norm=2.0,
        noise_scale=6.5 / 4.0,
        noise_scale_unbiased=math.nan,
        num_samples=12,
        num_params=40,
        method="gram",
        per_sample="vmap",
        loss=0.3,
        eigenvectors=None,
        gradient=None,
        num_products=0,
        converged=True,
        seconds=0.1,
    )


def _structure() -> ClassStructure:
    return ClassStructure(
        hessian_eigenvalues=np.array([3.0, 2.0]),
        ggn_eigenvalues=np.array([2.5, 1.5]),
        between_class_eigenvalues=np.array([2.0, 0.5]),
        class_level_eigenvalues=np.array([2.0, 0.5]),
        between_class_share=np.array([0.8, 0.3]),
        between_class_rayleigh_share=np.array([0.7, 0.2]),
        ggn_share=np.array([0.9, 0.8]),
        num_classes=3,
        classes=np.arange(3),
        class_counts=np.array([4, 4, 4]),
        num_samples=12,
        seconds=0.2,
    )


def _trainer(tmp_path, *, tensorboard: bool = True):
    recorder = _Recorder()
    loggers: list[Logger] = [recorder]
    if tensorboard:
        loggers.append(TensorBoardLogger(str(tmp_path), name="", version=0))
    return types.SimpleNamespace(loggers=loggers, global_rank=0), recorder


def _events(tmp_path) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(
        str(tmp_path / "version_0"),
        size_guidance={k: 0 for k in event_accumulator.DEFAULT_SIZE_GUIDANCE},
    )
    acc.Reload()
    return acc


def test_measurement_scalars_histogram_card_and_figure(tmp_path):
    trainer, recorder = _trainer(tmp_path)
    alignment = HessianAlignment(overlap=np.array([0.5, 0.75]), principal_angles=np.array([10.0]))
    kw = {"covariance": _covariance(), "alignment": alignment, "class_structure": _structure()}
    axis = log_gradient_covariance(trainer, 7, **kw, prefix="landscape/gradient")
    assert isinstance(axis, SpectrumAxis)
    again = log_gradient_covariance(trainer, 9, **kw, axis=axis)
    assert again is axis  # the axis is fixed at the first histogram
    p = "landscape/gradient/"
    expected = {
        "trace": 6.5,
        "mean_gradient_norm": 2.0,
        "noise_scale": 1.625,
        "noise_scale_unbiased": math.nan,
        "num_samples": 12.0,
        "eigenvalue_01": 4.0,
        "eigenvalue_02": 1.0,
        "eigenvalue_03": 0.25,
        "hessian_overlap": 0.75,
        "hessian_overlap_01": 0.5,
        "principal_angle_01": 10.0,
        "ggn_eigenvalue_01": 2.5,
        "ggn_eigenvalue_02": 1.5,
        "between_class_share_01": 0.8,
        "between_class_share_02": 0.3,
        "between_class_rayleigh_share_01": 0.7,
        "between_class_rayleigh_share_02": 0.2,
    }
    assert [step for step, _ in recorder.calls] == [7, 9]
    got = recorder.calls[0][1]
    assert set(got) == {p + k for k in expected}
    for k, v in expected.items():
        assert got[p + k] == pytest.approx(v, nan_ok=True), k
    trainer.loggers[1].experiment.flush()
    acc = _events(tmp_path)
    tags = acc.Tags()
    assert scalar_steps(acc, p + "trace") == [7, 9]  # the TensorBoardLogger got them too
    assert len(acc.Tensors(p + "spectrum_signed_log")) == 2
    assert len(acc.Tensors(p + "spectrum_axis/text_summary")) == 1  # the card is written once
    assert len(acc.Images(p + "class_structure")) == 2
    regexes = [r for charts in gradient_layout().values() for rs in charts.values() for r in rs]
    for tag in tags["scalars"]:
        assert any(re.match(r, tag) for r in regexes), tag


def scalar_steps(acc, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def test_training_noise_scalars_skip_what_is_not_known(tmp_path):
    trainer, recorder = _trainer(tmp_path)
    noise = TrainingNoise(grad_norm_sq=3.0, num_nonfinite_steps=1, noise_scale=2.0)
    axis = log_gradient_covariance(trainer, 4, training_noise=noise, prefix="x/g")
    assert axis is None
    assert recorder.calls == [
        (
            4,
            {
                "x/g/train_grad_norm_sq": 3.0,
                "x/g/train_nonfinite_steps": 1.0,
                "x/g/train_noise_scale": 2.0,
            },
        )
    ]
    full = TrainingNoise(1.0, 0, 2.0, 3.0, 4.0, 5.0, 6.0)
    log_gradient_covariance(trainer, 5, training_noise=full, prefix="x/g")
    assert recorder.calls[1][1] == {
        "x/g/train_grad_norm_sq": 1.0,
        "x/g/train_nonfinite_steps": 0.0,
        "x/g/train_noise_scale": 2.0,
        "x/g/train_noise_scale_unbiased": 3.0,
        "x/g/train_grad_norm_sq_local": 4.0,
        "x/g/train_trace_two_batch": 5.0,
        "x/g/train_noise_scale_two_batch": 6.0,
    }


def test_without_tensorboard_scalars_are_logged_and_one_warning_says_what_is_not(tmp_path):
    _reset_warn_once()
    trainer, recorder = _trainer(tmp_path, tensorboard=False)
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        assert log_gradient_covariance(trainer, 1, covariance=_covariance()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_gradient_covariance(trainer, 2, covariance=_covariance())
        # Nothing for TensorBoard asked: no warning either way.
        log_gradient_covariance(trainer, 3, covariance=_covariance(), log_histogram=False)
    assert [step for step, _ in recorder.calls] == [1, 2, 3]
    _reset_warn_once()
