"""HessianSpectrumMonitor's sharpness against the stability line, with a real Trainer, read back
from the event file: the ratio is λ_max η / 2 for SGD (the logged λ_max checked against the
exact dense Hessian), 2(1+β)/η sets the line with momentum, and the optimizer is left as it was."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lightning_landscape import HessianSpectrumMonitor
from lightning_landscape.dashboard import hessian_layout
from tests._reference import cross_entropy_loss, dense_hessian
from tests.callbacks._events import load_events, scalar_series
from tests.callbacks._models import DigitsModule, loader


class _SGDDigits(DigitsModule):
    def __init__(self, momentum: float = 0.0, **kw) -> None:
        super().__init__(**kw)
        self.momentum = momentum

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class _AdamDigits(DigitsModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_logged_ratio_is_lambda_max_eta_over_two_for_sgd(tmp_path, make_trainer):
    torch.manual_seed(0)
    module = _SGDDigits(hidden=12, lr=0.2)
    monitor = HessianSpectrumMonitor(every_n_steps=5, top_k=3, num_probe_batches=2)
    trainer = make_trainer([monitor], max_steps=10)
    trainer.fit(module, loader(32))
    acc = load_events(str(tmp_path))
    lam = scalar_series(acc, "landscape/hessian/eigenvalue_01")
    ratio = scalar_series(acc, "landscape/hessian/sharpness_ratio")
    thr = scalar_series(acc, "landscape/hessian/stability_threshold")
    assert sorted(ratio) == sorted(lam) == [0, 5, 10]
    for step in ratio:
        assert ratio[step] == pytest.approx(lam[step] * 0.2 / 2, rel=1e-6)
        assert thr[step] == pytest.approx(2 / 0.2, rel=1e-6)
    # The λ_max in the ratio is the exact one of the probe set (the end-of-fit weights).
    it = iter(loader(32))
    module.eval()
    exact = np.linalg.eigvalsh(dense_hessian(module, cross_entropy_loss, [next(it), next(it)]))
    assert ratio[10] == pytest.approx(exact[-1] * 0.2 / 2, rel=1e-4)
    # Read-only: the optimizer's hyper-parameters are those it was built with.
    group = trainer.optimizers[0].param_groups[0]
    assert (group["lr"], group["momentum"]) == (0.2, 0.0)


def test_momentum_moves_the_line_and_a_large_step_warns_once(tmp_path, make_trainer):
    torch.manual_seed(0)
    module = _SGDDigits(hidden=12, lr=5.0, momentum=0.5)
    monitor = HessianSpectrumMonitor(every_n_steps=2, top_k=2, num_probe_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([monitor], max_steps=6).fit(module, loader(32))
    acc = load_events(str(tmp_path))
    lam = scalar_series(acc, "landscape/hessian/eigenvalue_01")
    ratio = scalar_series(acc, "landscape/hessian/sharpness_ratio")
    for step in ratio:
        assert ratio[step] == pytest.approx(lam[step] * 5.0 / (2 * 1.5), rel=1e-6)
    above = [w for w in caught if "above the edge of stability" in str(w.message)]
    assert max(ratio.values()) > 1 and len(above) == 1


def test_sharpness_can_be_switched_off_and_adam_is_not_guessed(tmp_path, make_trainer):
    torch.manual_seed(0)
    off = HessianSpectrumMonitor(every_n_steps=5, top_k=2, num_probe_batches=1, log_sharpness=False)
    make_trainer([off], max_steps=5, root=tmp_path / "off").fit(_SGDDigits(hidden=8), loader(32))
    tags = load_events(str(tmp_path / "off")).Tags()["scalars"]
    assert "landscape/hessian/eigenvalue_01" in tags
    assert "landscape/hessian/sharpness_ratio" not in tags
    adam = HessianSpectrumMonitor(every_n_steps=5, top_k=2, num_probe_batches=1)
    make_trainer([adam], max_steps=5, root=tmp_path / "adam").fit(_AdamDigits(hidden=8), loader(32))
    tags = load_events(str(tmp_path / "adam")).Tags()["scalars"]
    assert "landscape/hessian/eigenvalue_01" in tags
    assert "landscape/hessian/sharpness_ratio" not in tags
    with pytest.raises(ValueError, match="log_sharpness must be a bool; got 1"):
        HessianSpectrumMonitor(log_sharpness=1)  # type: ignore[arg-type]


def test_layout_has_the_sharpness_chart():
    (charts,) = hessian_layout().values()
    (title,) = [t for t in charts if t.startswith("sharpness vs stability line")]
    assert charts[title] == [
        "landscape/hessian/eigenvalue_01$",
        "landscape/hessian/stability_threshold$",
    ]
