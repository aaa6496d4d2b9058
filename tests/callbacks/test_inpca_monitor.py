"""InPCAMonitor with a real Trainer and TensorBoardLogger, checked against float64 references
built from weight snapshots, and by reading the event files and the prediction store back."""

from __future__ import annotations

import copy
import math
import os
import warnings
from datetime import timedelta

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader

from lightning_landscape.callbacks.inpca import InPCAMonitor, _is_log_spaced
from lightning_landscape.dashboard import inpca as inpca_dashboard
from lightning_landscape.sampling.predictions import PredictionStore, find_stores
from tests.callbacks._clock import FakeClock, TimedDigits
from tests.callbacks._events import load_events, scalar_series
from tests.callbacks._models import DigitsModule, DistributedDigits, digits_dataset, loader


class _Snapshots(Callback):
    """Weights at the start of fit and after every ``every`` steps (reference trajectory)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def _take(self, trainer, pl_module) -> None:
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())

    def on_train_start(self, trainer, pl_module) -> None:
        self._take(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self._take(trainer, pl_module)


def _probe(n_batches: int = 2, batch_size: int = 32):
    it = iter(loader(batch_size))
    batches = [next(it) for _ in range(n_batches)]
    return torch.cat([b[0] for b in batches]).double(), torch.cat([b[1] for b in batches])


def _reference_logp(state, x) -> np.ndarray:
    model = DigitsModule(hidden=12).double()
    model.load_state_dict({k: v.double() for k, v in state.items()})
    model.eval()
    with torch.no_grad():
        return torch.log_softmax(model(x), dim=-1).numpy()


def _reference_stress(logps: list[np.ndarray], k: int) -> np.ndarray:
    n = len(logps)
    D = np.zeros((n, n))
    for u in range(n):
        for v in range(n):
            bc = np.exp(0.5 * (logps[u] + logps[v])).sum(axis=1)
            D[u, v] = -np.mean(np.log(bc))
    L_ = np.eye(n) - np.ones((n, n)) / n
    W = -0.5 * L_ @ D @ L_
    lam = np.linalg.eigvalsh(W)
    lam = lam[np.argsort(-np.abs(lam))]
    fro2 = np.sum(W * W)
    # max(0, .): with all dimensions the sum reaches ||W||^2 up to rounding, either side
    return np.array(
        [1 - math.sqrt(max(0.0, 1 - np.sum(lam[:i] ** 2) / fro2)) for i in range(1, k + 1)]
    )


def _reference_progress(logp, logp0, y) -> float:
    vals = []
    for n in range(len(y)):
        a = np.sqrt(np.exp(logp0[n]))
        a /= np.linalg.norm(a)
        b = np.zeros_like(a)
        b[y[n]] = 1.0
        theta = math.acos(float(a @ b))
        e2 = (b - (a @ b) * a) / np.linalg.norm(b - (a @ b) * a)
        u = np.sqrt(np.exp(logp[n]))
        u /= np.linalg.norm(u)
        vals.append(math.atan2(u @ e2, u @ a) / theta)
    return float(np.mean(vals))


def _flat(state) -> torch.Tensor:
    return torch.cat([v.reshape(-1).double() for v in state.values()])


def _path_loss(w, template, x, y) -> float:
    model = DigitsModule(hidden=12).double()
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(w[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    model.eval()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def test_logged_embedding_and_geometry_match_float64_references(tmp_path, make_trainer):
    monitor = InPCAMonitor(every_n_steps=5, num_probe_batches=2)
    snaps = _Snapshots(5)
    module = DigitsModule(hidden=12)
    trainer = make_trainer([monitor, snaps], max_steps=20)
    trainer.fit(module, loader(32))

    acc = load_events(str(tmp_path))
    steps = [0, 5, 10, 15, 20]
    assert sorted(scalar_series(acc, "landscape/inpca/num_checkpoints")) == steps
    assert scalar_series(acc, "landscape/inpca/skipped")[20] == 0
    x, y = _probe()
    logps = [_reference_logp(snaps.states[s], x) for s in steps]

    # The store holds every checkpoint, in the probe order, as float32 log-probabilities.
    (store_dir,) = find_stores(str(tmp_path))
    store = PredictionStore.open(store_dir)
    assert store.steps() == steps
    np.testing.assert_array_equal(store.targets, y.numpy())
    for s, ref in zip(steps, logps, strict=True):
        np.testing.assert_allclose(store.read(s).logp, ref, rtol=2e-5, atol=2e-5)

    for i, s in enumerate(steps[1:], 2):
        ref = _reference_stress(logps[:i], 3)
        for k in range(1, min(3, i) + 1):
            got = scalar_series(acc, f"landscape/inpca/explained_stress_top{k}")[s]
            assert got == pytest.approx(ref[k - 1], abs=1e-4)
        prog = scalar_series(acc, "landscape/inpca/progress")[s]
        assert prog == pytest.approx(_reference_progress(logps[i - 1], logps[0], y), abs=1e-5)
    loss20 = float(-np.mean(logps[-1][np.arange(len(y)), y.numpy()]))
    assert scalar_series(acc, "landscape/inpca/probe_loss")[20] == pytest.approx(loss20, rel=1e-5)

    # Geometry: distance from init, cosine of successive updates, mode connectivity.
    w = {s: _flat(snaps.states[s]) for s in steps}
    dist = scalar_series(acc, "landscape/geometry/distance_from_init")
    for s in steps:
        assert dist[s] == pytest.approx(float(torch.linalg.norm(w[s] - w[0])), rel=1e-5, abs=1e-6)
    d1, d2 = w[20] - w[15], w[15] - w[10]
    cos = float(d1 @ d2 / (torch.linalg.norm(d1) * torch.linalg.norm(d2)))
    got = scalar_series(acc, "landscape/geometry/cosine_successive_updates")[20]
    assert got == pytest.approx(cos, rel=1e-5)
    for anchor, w_a in (("init", w[0]), ("previous", w[15])):
        losses = [_path_loss((1 - t) * w[20] + t * w_a, module, x, y) for t in np.linspace(0, 1, 5)]
        mean_end = 0.5 * (losses[0] + losses[-1])
        gaps = [mean_end - v for v in losses[1:-1]]
        mc = gaps[int(np.argmax(np.abs(gaps)))]
        got = scalar_series(acc, f"landscape/geometry/mc_{anchor}")[20]
        assert got == pytest.approx(mc, rel=1e-4, abs=1e-6)
        barrier = max(
            v - ((1 - t) * losses[0] + t * losses[-1])
            for t, v in zip(np.linspace(0, 1, 5), losses, strict=True)
        )
        got = scalar_series(acc, f"landscape/geometry/barrier_{anchor}")[20]
        assert got == pytest.approx(barrier, abs=1e-5)

    # Figure, projector (epoch end at step 16 and end of fit at 20), layout.
    tags = acc.Tags()
    assert "landscape/inpca/trajectory" in tags["images"]
    assert [e.step for e in acc.Images("landscape/inpca/trajectory")] == [16, 20]
    logdir = os.path.join(str(tmp_path), "version_0")
    assert os.path.exists(os.path.join(logdir, "00020", "landscape%2finpca%2fcoordinates"))
    with open(os.path.join(logdir, "projector_config.pbtxt")) as f:
        assert "landscape/inpca/coordinates" in f.read()
    assert monitor.num_measurements == 5


def test_training_is_bitwise_unchanged(tmp_path, make_trainer):
    def run(callbacks, path):
        module = DigitsModule(hidden=12, dropout=0.1)
        make_trainer(callbacks, max_steps=12, root=path).fit(module, loader(32, shuffle=True))
        return [p.detach().clone() for p in module.parameters()]

    plain = run([], tmp_path / "plain")
    watched = run([InPCAMonitor(every_n_steps=3, num_probe_batches=2)], tmp_path / "watched")
    for a, b in zip(plain, watched, strict=True):
        assert torch.equal(a, b)


def test_default_monitor_is_drop_in(tmp_path, make_trainer):
    clock = FakeClock()  # each loss evaluation 1 ms: the budget decides machine-independently
    monitor = InPCAMonitor(clock=clock)  # budget schedule: the origin and the end of fit at least
    make_trainer([monitor], max_steps=20).fit(TimedDigits(clock, 1e-3, hidden=12), loader(32))
    acc = load_events(str(tmp_path))
    steps = sorted(scalar_series(acc, "landscape/inpca/num_checkpoints"))
    assert steps[0] == 0 and steps[-1] == 20
    # The origin is measured inside the warm-up; the next waits for timed steps (it used to
    # fall back to "the next step" and measure at every warm-up step).
    assert not set(steps) & set(range(1, 6)), steps
    assert scalar_series(acc, "landscape/inpca/skipped")[20] == 0
    assert "landscape/inpca/explained_stress_top1" in acc.Tags()["scalars"]
    assert "landscape/geometry/mc_init" in acc.Tags()["scalars"]


def test_epoch_end_writes_are_charged_to_the_budget(monkeypatch, make_trainer):
    """The projector and figure of a new embedding, written at the next epoch end, cost time
    outside the measurement: it is charged to the monitor and planned for with the next one."""

    clock = FakeClock()
    writes: list[int] = []

    def slow_figure(writer, tag, fig, step) -> None:
        writes.append(step)
        clock.now += 7.0

    monkeypatch.setattr(inpca_dashboard, "write_figure", slow_figure)
    monitor = InPCAMonitor(every_n_steps=8, clock=clock)  # measurements take 0 fake seconds
    trainer = make_trainer([monitor], max_steps=40)
    trainer.fit(DigitsModule(hidden=12), loader(32))  # epoch ends at 16 and 32, end at 40
    assert writes == [16, 32, 40]
    assert trainer._landscape_coordinator.spent["inpca"] == pytest.approx(7.0 * len(writes))
    assert monitor.last_cost == pytest.approx(7.0)  # the last write, expected after the next


def test_resume_continues_the_trajectory(tmp_path, make_trainer):
    modules = []

    def fit(steps, ckpt_path=None):
        monitor = InPCAMonitor(every_n_steps=4, num_probe_batches=2)
        ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_epochs=1)
        trainer = make_trainer([monitor, ckpt], max_steps=steps, enable_checkpointing=True)
        modules.append(DigitsModule(hidden=12))
        trainer.fit(modules[-1], loader(32, n=256), ckpt_path=ckpt_path)
        return monitor

    first = fit(8)  # 8 batches per epoch: the checkpoint is at the end of epoch 1
    store = PredictionStore.open(first.store_dir)
    before = {s: store.read(s).logp for s in store.steps()}
    assert sorted(before) == [0, 4, 8]
    # A record written after the checkpoint (then a crash) is dropped on resume.
    fake = np.log(np.full_like(before[8], 0.1))
    store.append(12, fake, epoch=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        second = fit(16, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.store_dir == first.store_dir
    store = PredictionStore.open(second.store_dir)
    assert store.steps() == [0, 4, 8, 12, 16]
    for s, logp in before.items():
        np.testing.assert_array_equal(store.read(s).logp, logp)
    assert not np.array_equal(store.read(12).logp, fake)
    x, y = _probe()
    np.testing.assert_allclose(
        store.read(16).logp, _reference_logp(modules[-1].state_dict(), x), rtol=2e-5, atol=2e-5
    )
    # The logged embedding is that of the whole trajectory, before and after the resume.
    acc = load_events(str(tmp_path))
    logps = [store.read(s).logp.astype(np.float64) for s in store.steps()]
    ref = _reference_stress(logps, 3)
    for k in (1, 2, 3):
        got = scalar_series(acc, f"landscape/inpca/explained_stress_top{k}")[16]
        assert got == pytest.approx(ref[k - 1], abs=1e-6)
    prog = scalar_series(acc, "landscape/inpca/progress")[16]
    assert prog == pytest.approx(_reference_progress(logps[-1], logps[0], y), abs=1e-6)
    assert scalar_series(acc, "landscape/inpca/num_checkpoints")[16] == 5
    # The geometry's anchor (the initial weights) survived the resume.
    w_init = _flat(DigitsModule(hidden=12).state_dict())
    w_end = _flat(modules[-1].state_dict())
    dist = scalar_series(acc, "landscape/geometry/distance_from_init")[16]
    assert dist == pytest.approx(float(torch.linalg.norm(w_end - w_init)), rel=1e-5)


def test_log_spaced_schedule_and_inapplicable_outputs(tmp_path, make_trainer):
    dict_loader = DataLoader(
        [{"x": x, "y": y} for x, y in digits_dataset(256)], batch_size=32, shuffle=False
    )

    class DictModule(DigitsModule):
        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch["x"]), batch["y"])

    monitor = InPCAMonitor(log_spaced_per_decade=4, num_probe_batches=2)
    with pytest.warns(UserWarning, match="outputs_fn does not apply"):
        make_trainer([monitor], max_steps=12).fit(DictModule(hidden=12), dict_loader)
    acc = load_events(str(tmp_path))
    expected = [0, 1, 2, 3, 6, 10, 12]  # round(10**(k/4)) = 1, 2, 3, 6, 10, ... and the end
    assert sorted(scalar_series(acc, "landscape/geometry/distance_from_init")) == expected
    assert "landscape/inpca/progress" not in acc.Tags()["scalars"]
    assert scalar_series(acc, "landscape/inpca/skipped")[12] == 0
    assert [s for s in range(200) if _is_log_spaced(s, 10)][:16] == [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        8,
        10,
        13,
        16,
        20,
        25,
        32,
        40,
        50,
    ]


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="n_components must be a positive integer; got 0"):
        InPCAMonitor(n_components=0)
    with pytest.raises(ValueError, match="log_spaced_per_decade excludes every_n_steps"):
        InPCAMonitor(log_spaced_per_decade=10, every_n_steps=5)
    with pytest.raises(ValueError, match="barrier_grid must be at least 3"):
        InPCAMonitor(barrier_grid=2)
    with pytest.raises(ValueError, match="barrier_anchors must be a subset of"):
        InPCAMonitor(barrier_anchors=("start",))
    with pytest.raises(ValueError, match="outputs_fn must be callable"):
        InPCAMonitor(outputs_fn=3)


def _fit_ddp(path, devices: int) -> None:
    per_rank = 32 // devices
    strategy = (
        DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120)) if devices > 1 else "auto"
    )
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        use_distributed_sampler=False,
        logger=TensorBoardLogger(str(path), name="", version=0),
        callbacks=[InPCAMonitor(every_n_steps=3, num_probe_batches=2)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(path),
    )
    trainer.fit(DigitsModule(hidden=12, dtype=torch.float64), DistributedDigits(per_rank))


@pytest.mark.ddp
def test_ddp_spawn_equals_single_process(tmp_path):
    _fit_ddp(tmp_path / "one", 1)
    _fit_ddp(tmp_path / "two", 2)
    one, two = load_events(str(tmp_path / "one")), load_events(str(tmp_path / "two"))
    tags = [
        "landscape/inpca/explained_stress_top1",
        "landscape/inpca/explained_stress_top2",
        "landscape/inpca/progress",
        "landscape/inpca/probe_loss",
        "landscape/geometry/distance_from_init",
        "landscape/geometry/mc_init",
        "landscape/geometry/barrier_previous",
    ]
    for tag in tags:
        a, b = scalar_series(one, tag), scalar_series(two, tag)
        assert sorted(a) == sorted(b) and len(a) >= 2, tag
        for s in a:
            assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-7), tag
    # The two ranks' shards were gathered into one store on the same 64 samples.
    s1 = PredictionStore.open(find_stores(str(tmp_path / "one"))[0])
    s2 = PredictionStore.open(find_stores(str(tmp_path / "two"))[0])
    assert set(s1.probe_ids.tolist()) == set(s2.probe_ids.tolist())
    assert s1.n_samples == s2.n_samples == 64
    assert s1.steps() == s2.steps() == [0, 3, 6]
