"""GradientCovarianceMonitor with a real Trainer: logged values against per-sample gradients
computed one sample at a time in float64 and a dense Hessian, read back from the event files."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import warnings
from datetime import timedelta

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lightning_landscape.callbacks.gradient import GradientCovarianceMonitor
from lightning_landscape.callbacks.hessian import HessianSpectrumMonitor
from lightning_landscape.dashboard.gradient import gradient_layout
from lightning_landscape.linalg.class_structure import class_structure
from tests._reference import cross_entropy_loss, dense_hessian
from tests.callbacks._clock import FakeClock, TimedDigits
from tests.callbacks._events import load_events, scalar_series
from tests.callbacks._models import DigitsModule, DistributedDigits, loader


def _per_sample_reference(module: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients (python loop, float64) and their mean."""
    params = list(module.parameters())
    rows = []
    for x, y in batches:
        for i in range(len(x)):
            loss = cross_entropy_loss(module, (x[i : i + 1], y[i : i + 1]))
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    G = torch.stack(rows)
    return G, G.mean(0)


class _GradNorms(Callback):
    """Reference for the continuous signal: ||grad||^2 at every optimizer step, by a loop."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.values.append(sum(float(p.grad.double().pow(2).sum()) for p in pl_module.parameters()))


@pytest.mark.parametrize("hessian_first", [True, False])
def test_logged_values_match_loop_reference_and_hessian_subspace(
    tmp_path, make_trainer, hessian_first
):
    module = DigitsModule(hidden=6, dtype=torch.float64)
    hessian = HessianSpectrumMonitor(
        every_n_steps=5, top_k=3, num_probe_batches=2, density=False, trace=False
    )
    monitor = GradientCovarianceMonitor(
        every_n_steps=5, top_k=4, num_probe_batches=2, log_class_structure=True
    )
    norms = _GradNorms()
    # The eigenvectors are shared whatever the order: the Hessian monitor is run first.
    callbacks = [hessian, monitor, norms] if hessian_first else [monitor, norms, hessian]
    trainer = make_trainer(callbacks, max_steps=10, log_every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader(16, dtype=torch.float64))
    assert not [w for w in caught if "HessianSpectrumMonitor" in str(w.message)]  # no notice
    assert trainer.callbacks.index(hessian) < trainer.callbacks.index(monitor)
    # Asked through the coordinator, not switched on: the public attributes stay as given.
    assert hessian.keep_eigenvectors is False and hessian.last_eigenvectors is not None

    it = iter(loader(16, dtype=torch.float64))  # unshuffled: the probe set is the first batches
    probe = [next(it), next(it)]
    module.eval()
    G, gbar = _per_sample_reference(module, probe)
    N = len(G)
    Gc = G - gbar
    S = Gc.T @ Gc / N
    lam, vecs = torch.linalg.eigh(S)
    lam, vecs = lam.flip(0), vecs.flip(1)
    trace = float((Gc**2).sum()) / N
    gnorm2 = float(gbar @ gbar)

    acc = load_events(str(tmp_path))

    def at10(tag: str) -> float:
        return scalar_series(acc, f"landscape/gradient/{tag}")[10]

    logged = [at10(f"eigenvalue_{i:02d}") for i in range(1, 5)]
    np.testing.assert_allclose(logged, lam[:4].numpy(), rtol=1e-6)
    assert at10("trace") == pytest.approx(trace, rel=1e-6)
    assert at10("mean_gradient_norm") == pytest.approx(math.sqrt(gnorm2), rel=1e-6)
    assert at10("noise_scale") == pytest.approx(trace / gnorm2, rel=1e-6)
    signal = gnorm2 - trace / (N - 1)
    expected = N / (N - 1) * trace / signal if signal > 0 else math.nan
    assert at10("noise_scale_unbiased") == pytest.approx(expected, rel=1e-6, nan_ok=True)
    assert at10("num_samples") == N
    assert sorted(scalar_series(acc, "landscape/gradient/eigenvalue_01")) == [0, 5, 10]
    assert at10("skipped") == 0 and monitor.num_measurements == 3

    # Shared Hessian eigenvectors: overlap of the mean gradient and principal angles.
    H = dense_hessian(module, cross_entropy_loss, probe)
    _, hvecs = torch.linalg.eigh(H)
    VH = hvecs.flip(1)[:, :3].T
    assert at10("hessian_overlap") == pytest.approx(
        float((VH @ gbar).pow(2).sum()) / gnorm2, rel=1e-5
    )
    assert at10("hessian_overlap_01") == pytest.approx(
        float((VH[0] @ gbar) ** 2) / gnorm2, rel=1e-4, abs=1e-8
    )
    cos = torch.linalg.svdvals(vecs[:, :4].T @ VH.T).clamp(max=1.0).numpy()
    angles = np.sort(np.degrees(np.arccos(cos)))
    logged_angles = [at10(f"principal_angle_{i:02d}") for i in range(1, 4)]
    np.testing.assert_allclose(logged_angles, angles, atol=1e-3)

    # Continuous signal: bias-corrected EMA of ||g_t||^2 over the 10 training steps.
    beta, num, w = 0.9, 0.0, 0.0
    for v in norms.values:
        num, w = beta * num + (1 - beta) * v, beta * w + (1 - beta)
    assert len(norms.values) == 10
    assert at10("train_grad_norm_sq") == pytest.approx(num / w, rel=1e-6)
    assert at10("train_noise_scale") == pytest.approx(trace / (num / w), rel=1e-6)
    signal = num / w - N / (N - 1) * trace / 16  # batch size 16, constant
    expected = N / (N - 1) * trace / signal if signal > 0 else math.nan
    assert at10("train_noise_scale_unbiased") == pytest.approx(expected, rel=1e-6, nan_ok=True)
    assert sorted(scalar_series(acc, "landscape/gradient/train_grad_norm_sq")) == [2, 4, 6, 8, 10]

    # Class structure from the shared Hessian pairs (the core is checked against dense
    # references in tests/linalg/test_class_structure.py; here: the wiring).
    lam_h, hv = torch.linalg.eigh(H)
    cs = class_structure(
        module,
        probe,
        hessian_eigenvalues=lam_h.flip(0)[:3].numpy(),
        hessian_eigenvectors=hv.flip(1)[:, :3].T,
    )
    for i in range(3):
        for tag, ref in (
            ("ggn_eigenvalue", cs.ggn_eigenvalues),
            ("between_class_share", cs.between_class_share),
            ("between_class_rayleigh_share", cs.between_class_rayleigh_share),
        ):
            assert at10(f"{tag}_{i + 1:02d}") == pytest.approx(ref[i], rel=1e-5), tag

    tags = acc.Tags()
    # Every logged scalar has a chart in the custom-scalars layout.
    regexes = [r for charts in gradient_layout().values() for rs in charts.values() for r in rs]
    for tag in tags["scalars"]:
        if tag.startswith("landscape/gradient/"):
            assert any(re.match(r, tag) for r in regexes), tag
    assert "landscape/gradient/class_structure" in tags["images"]
    assert "landscape/gradient/spectrum_signed_log" in tags["tensors"]
    assert len(acc.Tensors("landscape/gradient/spectrum_signed_log")) == 3
    assert "custom_scalars__config__" in tags["tensors"]


@pytest.mark.parametrize("keep", [True, False])
def test_hessian_keeps_eigenvectors_when_asked_and_only_then_without_a_user(make_trainer, keep):
    hessian = HessianSpectrumMonitor(
        every_n_steps=2, top_k=2, density=False, trace=False, keep_eigenvectors=keep
    )
    module = DigitsModule(hidden=4)
    make_trainer([hessian], max_steps=2, logger=False).fit(module, loader(32))
    assert hessian.num_measurements == 2 and hessian.last_eigenvalues is not None
    if keep:
        D = sum(p.numel() for p in module.parameters())
        assert hessian.last_eigenvectors is not None
        assert hessian.last_eigenvectors.shape == (2, D)
    else:  # no monitor asked for them through the coordinator
        assert hessian.last_eigenvectors is None


@pytest.mark.parametrize(("dropout", "train_mode"), [(0.0, False), (0.3, True)])
def test_training_is_bitwise_unchanged(tmp_path, make_trainer, dropout, train_mode):
    def run(with_monitor: bool) -> list[torch.Tensor]:
        L.seed_everything(1)
        module = DigitsModule(hidden=8, dropout=dropout)
        cbs = [GradientCovarianceMonitor(every_n_steps=3, top_k=3, train_mode=train_mode)]
        trainer = make_trainer(
            cbs if with_monitor else [], max_steps=7, root=tmp_path / str(with_monitor)
        )
        trainer.fit(module, loader(32, shuffle=True))
        if with_monitor:
            assert cbs[0].num_measurements == 4  # steps 0, 3, 6 and the end (7)
        return [p.detach().clone() for p in module.parameters()]

    for a, b in zip(run(False), run(True), strict=True):
        assert torch.equal(a, b)


class _BNModule(DigitsModule):
    def __init__(self) -> None:
        super().__init__(hidden=8)
        self.net = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 10))


def test_batchnorm_in_train_mode_falls_back_once_and_leaves_training_unchanged(
    tmp_path, make_trainer
):
    def run(with_monitor: bool) -> tuple[list[torch.Tensor], GradientCovarianceMonitor]:
        L.seed_everything(2)
        module = _BNModule()
        monitor = GradientCovarianceMonitor(every_n_steps=2, top_k=2, train_mode=True)
        cbs = [monitor] if with_monitor else []
        make_trainer(cbs, max_steps=5, root=tmp_path / str(with_monitor)).fit(module, loader(32))
        return [t.detach().clone() for t in module.state_dict().values()], monitor

    with pytest.warns(RuntimeWarning, match="outputs_fn") as record:
        with_monitor, monitor = run(True)
    assert len([w for w in record if "outputs_fn" in str(w.message)]) == 1
    assert monitor.num_measurements == 4 and monitor.skipped == 0  # steps 0, 2, 4, 5
    for a, b in zip(run(False)[0], with_monitor, strict=True):
        assert torch.equal(a, b)  # weights and batch-norm statistics


class _InjectInf(Callback):
    """Training-step gradients that are inf at one step (a skipped GradScaler step)."""

    def __init__(self, step: int, value: float) -> None:
        self.step, self.value = step, value

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                p.grad.fill_(self.value)


@pytest.mark.parametrize("buffer_rows", [256, 2])  # 2: the step buffer fills and folds
def test_non_finite_training_steps_are_left_out_and_counted(
    tmp_path, make_trainer, monkeypatch, buffer_rows
):
    # The module (the package attribute of that name is the function noise_scale).
    tracker_module = importlib.import_module("lightning_landscape.linalg.noise_scale")
    monkeypatch.setattr(tracker_module, "_NORM_ROWS", buffer_rows)
    monitor = GradientCovarianceMonitor(every_n_steps=100, top_k=2)
    norms = _GradNorms()
    # inf before the monitor reads the gradients, zeros after, so the weights stay finite.
    cbs = [_InjectInf(2, math.inf), monitor, _InjectInf(2, 0.0), norms]
    make_trainer(cbs, max_steps=6, log_every_n_steps=3).fit(DigitsModule(), loader(32))
    acc = load_events(str(tmp_path))
    assert scalar_series(acc, "landscape/gradient/train_nonfinite_steps") == {3: 1.0, 6: 1.0}
    finite = [v for i, v in enumerate(norms.values) if i != 2]
    beta, num, w = 0.9, 0.0, 0.0
    for v in finite:
        num, w = beta * num + (1 - beta) * v, beta * w + (1 - beta)
    got = scalar_series(acc, "landscape/gradient/train_grad_norm_sq")[6]
    assert got == pytest.approx(num / w, rel=1e-5)


def test_nan_loss_warns_once_skips_and_training_goes_on(tmp_path, make_trainer):
    def loss_fn(model, batch):
        return cross_entropy_loss(model, batch) * float("nan")

    module = DigitsModule()
    monitor = GradientCovarianceMonitor(every_n_steps=2, top_k=3, loss_fn=loss_fn)
    with pytest.warns(RuntimeWarning, match="skipped the measurement") as record:
        make_trainer([monitor], max_steps=4).fit(module, loader(32))
    assert len([w for w in record if "skipped the measurement" in str(w.message)]) == 1
    assert monitor.skipped == 3 and monitor.num_measurements == 0
    assert module.global_step == 4
    acc = load_events(str(tmp_path))
    assert scalar_series(acc, "landscape/gradient/skipped")[4] == 3


def test_works_with_no_arguments_and_state_round_trips(tmp_path, make_trainer):
    # A fake clock (each loss evaluation 1 ms) makes the budget's decisions machine-independent.
    clock = FakeClock()
    module = TimedDigits(clock, seconds=1e-3)
    monitor = GradientCovarianceMonitor(clock=clock)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the end-of-fit measurement may overshoot the budget
        make_trainer([monitor], max_steps=12).fit(module, loader(32))
    acc = load_events(str(tmp_path))
    assert 12 in scalar_series(acc, "landscape/gradient/eigenvalue_10")
    assert monitor.skipped == 0 and monitor.num_measurements >= 1
    state = monitor.state_dict()
    fresh = GradientCovarianceMonitor()
    fresh.load_state_dict(state)
    state.pop("coordinator")  # restored into the shared coordinator at on_fit_start
    assert {k: v for k, v in fresh.state_dict().items() if k != "coordinator"} == state
    assert state["ema"]["weight"] > 0 and state["last_trace"] > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "top_k must be a positive integer; got 0"),
        ({"method": "svd"}, "method must be 'auto', 'gram' or 'lanczos'; got 'svd'"),
        ({"noise_ema": 1.0}, r"noise_ema must be a decay in \(0, 1\); got 1.0"),
        ({"outputs_fn": 3}, "outputs_fn must be callable or None; got 3"),
        ({"chunk_sise": 4}, r"unknown option\(s\) \['chunk_sise'\]"),
        ({"every_n_steps": 0}, "every_n_steps must be a positive integer or None; got 0"),
    ],
)
def test_bad_configuration_raises_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientCovarianceMonitor(**kwargs)


# -- DDP -------------------------------------------------------------------------------------

TOP_K = 5


def nan_on_rank1_at_step3(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy; NaN on rank 1 at step 3 only (the skip must be decided on all ranks)."""
    loss = cross_entropy_loss(model, batch)
    dist = torch.distributed.is_initialized()
    if dist and torch.distributed.get_rank() == 1 and model.trainer.global_step == 3:
        loss = loss * float("nan")
    return loss


class _LocalGradRecorder(Callback):
    """Reference for the two-batch estimator: each rank's own gradient, recomputed on its batch
    (through the module, not the DDP wrapper), and the averaged one, saved per rank."""

    def __init__(self, out_dir) -> None:
        self.out_dir = str(out_dir)
        self.rows: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        x, y = self.batch
        with torch.enable_grad():
            loss = nn.functional.cross_entropy(pl_module(x), y)
            local = torch.autograd.grad(loss, list(pl_module.parameters()))
        big = sum(float(p.grad.pow(2).sum()) for p in pl_module.parameters())
        self.rows.append([sum(float(g.pow(2).sum()) for g in local), big, float(len(x))])

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(self.rows, f)
        weights = [p.detach().clone() for p in pl_module.parameters()]
        torch.save(weights, os.path.join(self.out_dir, f"weights{trainer.global_rank}.pt"))


def _fit_ddp(tmp_path, devices: int, comm_hook: bool = True) -> None:
    per_rank = 32 // devices  # the same global batch of 32 samples in both runs
    strategy = (
        DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120)) if devices > 1 else "auto"
    )
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        use_distributed_sampler=False,
        logger=TensorBoardLogger(str(tmp_path), name="", version=0),
        callbacks=[
            GradientCovarianceMonitor(
                every_n_steps=3,
                top_k=TOP_K,
                num_probe_batches=2,
                loss_fn=nan_on_rank1_at_step3,
                ddp_comm_hook=comm_hook and devices > 1,
            ),
            _LocalGradRecorder(tmp_path / "grads"),
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=3,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(DigitsModule(hidden=12, dtype=torch.float64), DistributedDigits(per_rank))


@pytest.mark.ddp
def test_ddp_spawn_equals_single_process_and_nan_on_one_rank_skips_on_all(tmp_path):
    _fit_ddp(tmp_path / "one", devices=1)
    _fit_ddp(tmp_path / "two", devices=2)
    _fit_ddp(tmp_path / "plain", devices=2, comm_hook=False)
    # The comm hook leaves training bitwise unchanged.
    for r in range(2):
        hooked = torch.load(tmp_path / "two" / "grads" / f"weights{r}.pt")
        plain = torch.load(tmp_path / "plain" / "grads" / f"weights{r}.pt")
        for a, b in zip(hooked, plain, strict=True):
            assert torch.equal(a, b)
    one, two = load_events(str(tmp_path / "one")), load_events(str(tmp_path / "two"))
    tags = [f"eigenvalue_{i:02d}" for i in range(1, TOP_K + 1)]
    tags += ["trace", "mean_gradient_norm", "noise_scale", "num_samples", "train_grad_norm_sq"]
    for tag in tags:
        a = scalar_series(one, f"landscape/gradient/{tag}")
        b = scalar_series(two, f"landscape/gradient/{tag}")
        steps = [0, 6] if tag != "train_grad_norm_sq" else [3, 6]
        assert set(steps) <= set(b), tag
        np.testing.assert_allclose([b[s] for s in steps], [a[s] for s in steps], rtol=1e-6)
    assert scalar_series(one, "landscape/gradient/num_samples")[0] == 64
    # Step 3 failed on rank 1 only: skipped (and not logged) on every rank, training went on.
    assert scalar_series(two, "landscape/gradient/skipped") == {0: 0.0, 3: 1.0, 6: 1.0}
    assert 3 not in scalar_series(two, "landscape/gradient/eigenvalue_01")
    assert scalar_series(one, "landscape/gradient/skipped") == {0: 0.0, 3: 0.0, 6: 0.0}
    # Two-batch-size estimator from the comm hook's per-rank norms, against the recomputed ones.
    ranks = []
    for r in range(2):
        with open(tmp_path / "two" / "grads" / f"rank{r}.json") as f:
            ranks.append(np.array(json.load(f)))
    local = (ranks[0][:, 0] + ranks[1][:, 0]) / 2
    big = ranks[0][:, 1]
    np.testing.assert_allclose(ranks[1][:, 1], big, rtol=1e-12)
    assert len(big) == 6 and set(ranks[0][:, 2]) == {16.0}
    w = s_loc = s_big = 0.0
    for a, b in zip(local, big, strict=True):
        w, s_loc, s_big = 0.9 * w + 0.1, 0.9 * s_loc + 0.1 * a, 0.9 * s_big + 0.1 * b
    small, large = s_loc / w, s_big / w
    trace = (small - large) / (1 / 16 - 1 / 32)
    signal = (large / 16 - small / 32) / (1 / 16 - 1 / 32)
    names = ("train_grad_norm_sq_local", "train_trace_two_batch", "train_noise_scale_two_batch")
    logged = {t: scalar_series(two, f"landscape/gradient/{t}")[6] for t in names}
    assert logged["train_grad_norm_sq_local"] == pytest.approx(small, rel=1e-6)
    assert logged["train_trace_two_batch"] == pytest.approx(trace, rel=1e-6)
    assert logged["train_noise_scale_two_batch"] == pytest.approx(
        trace / signal if signal > 0 else math.nan, rel=1e-6, nan_ok=True
    )


def test_resume_continues_schedule_and_probe_set(tmp_path, make_trainer):
    """A run resumed from a checkpoint measures the same probe set at the steps still due."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(max_steps, callbacks, logdir):
        logger = TensorBoardLogger(str(tmp_path / logdir), name="", version=0)
        return make_trainer(
            callbacks, max_steps=max_steps, logger=logger, enable_checkpointing=True
        )

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=10, save_top_k=-1)
    first = GradientCovarianceMonitor(every_n_steps=5, top_k=3)
    trainer(10, [first, ckpt], "a").fit(DigitsModule(), loader(32))
    path = os.path.join(str(tmp_path / "ckpt"), "epoch=0-step=10.ckpt")
    second = GradientCovarianceMonitor(every_n_steps=5, top_k=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(20, [second], "b").fit(DigitsModule(), loader(32), ckpt_path=path)
    # The saved probe set was found and reused (a re-capture warns that samples changed).
    assert not [w for w in caught if "probe set" in str(w.message)]
    a = scalar_series(load_events(str(tmp_path / "a")), "landscape/gradient/trace")
    b = scalar_series(load_events(str(tmp_path / "b")), "landscape/gradient/trace")
    assert sorted(a) == [0, 5, 10]
    assert sorted(b) == [15, 20]
    assert second.num_measurements == 5 and second.skipped == 0
    na = scalar_series(load_events(str(tmp_path / "a")), "landscape/gradient/num_samples")
    nb = scalar_series(load_events(str(tmp_path / "b")), "landscape/gradient/num_samples")
    assert set(na.values()) == set(nb.values()) == {4 * 32.0}
