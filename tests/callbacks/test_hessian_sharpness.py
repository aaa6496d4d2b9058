"""HessianSpectrumMonitor's sharpness against the stability line, with a real Trainer, read back
from the event file: the ratio is λ_max η / 2 for SGD (the logged λ_max checked against the
exact dense Hessian), 2(1+β)/η sets the line with momentum, Adam's preconditioned sharpness
λ_max(P⁻¹H) matches the dense float64 one from the optimizer's own state, and the optimizer is
left as it was."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lightning_landscape import HessianSpectrumMonitor
from lightning_landscape.dashboard import hessian_layout
from lightning_landscape.linalg import HessianOperator
from lightning_landscape.linalg.sharpness import preconditioned_sharpness
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
        return torch.optim.Adam(self.parameters(), lr=self.lr, betas=(0.9, 0.99))


def loader_batches(n: int) -> list:
    it = iter(loader(32))
    return [next(it) for _ in range(n)]


def _adam_p(module: torch.nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    """(1 - β1^(t+1)) (sqrt(v / (1 - β2^t)) + ε), recomputed from the state, flat order."""
    parts = []
    for _, p in module.named_parameters():
        st = opt.state[p]
        t = float(st["step"])
        v_hat = st["exp_avg_sq"].double() / (1 - 0.99**t)
        parts.append(((1 - 0.9 ** (t + 1)) * (v_hat.sqrt() + 1e-8)).reshape(-1))
    return torch.cat(parts)


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


def test_sharpness_can_be_switched_off(tmp_path, make_trainer):
    torch.manual_seed(0)
    off = HessianSpectrumMonitor(every_n_steps=5, top_k=2, num_probe_batches=1, log_sharpness=False)
    make_trainer([off], max_steps=5, root=tmp_path / "off").fit(_SGDDigits(hidden=8), loader(32))
    tags = load_events(str(tmp_path / "off")).Tags()["scalars"]
    assert "landscape/hessian/eigenvalue_01" in tags
    assert "landscape/hessian/sharpness_ratio" not in tags
    with pytest.raises(ValueError, match="log_sharpness must be a bool; got 1"):
        HessianSpectrumMonitor(log_sharpness=1)  # type: ignore[arg-type]


def test_adam_preconditioned_sharpness_matches_dense_float64(tmp_path, make_trainer):
    torch.manual_seed(0)
    module = _AdamDigits(hidden=8, lr=0.01)
    monitor = HessianSpectrumMonitor(
        every_n_steps=5, top_k=2, num_probe_batches=2, density=False, trace=False,
        log_batch_spread=False,
    )  # fmt: skip
    trainer = make_trainer([monitor], max_steps=10)
    trainer.fit(module, loader(32))
    acc = load_events(str(tmp_path))
    sharp = scalar_series(acc, "landscape/hessian/preconditioned_sharpness")
    ratio = scalar_series(acc, "landscape/hessian/sharpness_ratio")
    thr = scalar_series(acc, "landscape/hessian/stability_threshold")
    lam = scalar_series(acc, "landscape/hessian/eigenvalue_01")
    assert sorted(sharp) == sorted(ratio) == [5, 10]  # no second moment before the first step
    assert sorted(lam) == [0, 5, 10]
    # The reference: P from the optimizer's own state after the last step, dense float64 H.
    it = iter(loader(32))
    module.eval()
    H = dense_hessian(module, cross_entropy_loss, [next(it), next(it)])
    p = _adam_p(module, trainer.optimizers[0])
    exact = float(torch.linalg.eigvalsh(H / p.sqrt()[:, None] / p.sqrt()[None, :]).max())
    assert sharp[10] == pytest.approx(exact, rel=1e-4)
    assert thr[10] == pytest.approx(2 * 1.9 / (0.1 * 0.01), rel=1e-6)  # 38/η = 3800
    assert ratio[10] == pytest.approx(exact / 3800, rel=1e-4)
    # Teeth: neither the raw λ_max nor P without its bias correction gives that value.
    assert abs(lam[10] - exact) > 0.1 * exact
    q = p / (1 - 0.9**11)
    assert (
        abs(float(torch.linalg.eigvalsh(H / q.sqrt()[:, None] / q.sqrt()[None, :]).max()) - exact)
        > 1e-3 * exact
    )
    # The products of the preconditioned run are in the logged count: the same fit without it
    # logs exactly that many fewer (the run redone here on the same weights and state).
    op = HessianOperator(module, cross_entropy_loss, [*loader_batches(2)])
    _, used = preconditioned_sharpness(op, p.float(), tol=1e-5, seed=0)
    torch.manual_seed(0)
    off = HessianSpectrumMonitor(
        every_n_steps=5, top_k=2, num_probe_batches=2, density=False, trace=False,
        log_batch_spread=False, log_sharpness=False,
    )  # fmt: skip
    make_trainer([off], max_steps=10, root=tmp_path / "off").fit(
        _AdamDigits(hidden=8, lr=0.01), loader(32)
    )
    hvps = scalar_series(acc, "landscape/hessian/num_hvps")
    hvps_off = scalar_series(load_events(str(tmp_path / "off")), "landscape/hessian/num_hvps")
    assert used > 0 and hvps[10] - hvps_off[10] == used


def test_adam_above_its_line_warns_once_after_consecutive_measurements(tmp_path, make_trainer):
    torch.manual_seed(0)
    monitor = HessianSpectrumMonitor(
        every_n_steps=1, top_k=1, num_probe_batches=1, density=False, trace=False
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([monitor], max_steps=4).fit(_AdamDigits(hidden=8, lr=1.0), loader(32))
    ratio = scalar_series(load_events(str(tmp_path)), "landscape/hessian/sharpness_ratio")
    assert sorted(ratio) == [1, 2, 3, 4] and min(ratio.values()) > 1
    above = [w for w in caught if "above the edge of stability" in str(w.message)]
    assert len(above) == 1
    assert "for 3 consecutive measurements" in str(above[0].message)
    assert "adam" in str(above[0].message)


def test_layout_has_the_sharpness_chart():
    (charts,) = hessian_layout().values()
    (title,) = [t for t in charts if t.startswith("sharpness vs stability line")]
    assert charts[title] == [
        "landscape/hessian/eigenvalue_01$",
        "landscape/hessian/stability_threshold$",
    ]


def test_adam_layout_sets_the_preconditioned_sharpness_against_its_line(tmp_path, make_trainer):
    monitor = HessianSpectrumMonitor(every_n_steps=5, top_k=1, num_probe_batches=1)
    trainer = make_trainer([monitor], max_steps=1)
    trainer.fit(_AdamDigits(hidden=8), loader(32))
    (charts,) = monitor._layout().values()
    (adam,) = [t for t in charts if t.startswith("Adam: preconditioned sharpness")]
    assert charts[adam] == [
        "landscape/hessian/preconditioned_sharpness$",
        "landscape/hessian/stability_threshold$",
    ]
    # No chart sets the raw λ_max against Adam's line.
    assert not [
        t for t, tags in charts.items() if t != adam and any("threshold" in x for x in tags)
    ]


def test_adam_groups_with_different_lr_have_no_single_line(tmp_path, make_trainer):
    class TwoLr(DigitsModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            first, last = self.net[0].parameters(), self.net[-1].parameters()
            groups = [{"params": first}, {"params": last, "lr": 0.1}]
            return torch.optim.Adam(groups, lr=0.01)

    monitor = HessianSpectrumMonitor(every_n_steps=2, top_k=1, num_probe_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([monitor], max_steps=2).fit(TwoLr(hidden=8), loader(32))
    tags = load_events(str(tmp_path)).Tags()["scalars"]
    assert "landscape/hessian/eigenvalue_01" in tags
    assert "landscape/hessian/sharpness_ratio" not in tags
    assert "landscape/hessian/preconditioned_sharpness" not in tags
    assert any("one lr and β₁" in str(w.message) for w in caught)
