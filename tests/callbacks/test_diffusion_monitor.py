"""DiffusionMapMonitor with a real Trainer and TensorBoardLogger: the recorded trajectory equals
the parameters, the logged spectrum equals diffusion_map of them, projector files, bitwise
unchanged training, resume without gaps or duplicates, gradient samples, DDP."""

from __future__ import annotations

import glob
import itertools
import os
from datetime import timedelta

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from lightning_landscape.callbacks._schedule import PLANNING_SHARE
from lightning_landscape.callbacks.diffusion import DiffusionMapMonitor
from lightning_landscape.embeddings import trajectory as embedder_module
from lightning_landscape.embeddings.diffusion import diffusion_map
from lightning_landscape.sampling.store import TrajectoryStore
from tests.callbacks._clock import AdvanceClock, FakeClock
from tests.callbacks._events import load_events, scalar_series
from tests.callbacks._models import DigitsModule, DistributedDigits, loader

TAG = "landscape/diffusion"


class _Recorder(Callback):
    """Reference: float64 copies of all parameters at every n-th step."""

    def __init__(self, n: int) -> None:
        self.n, self.vectors, self.steps = n, [], []

    def _take(self, trainer, module) -> None:
        step = trainer.global_step
        if step % self.n == 0 and step not in self.steps:
            flat = torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])
            self.vectors.append(flat.numpy().copy())
            self.steps.append(step)

    def on_train_start(self, trainer, module) -> None:
        self._take(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._take(trainer, module)


def test_logged_spectrum_and_projector_match_the_parameter_trajectory(tmp_path, make_trainer):
    recorder = _Recorder(2)
    monitor = DiffusionMapMonitor(
        every_n_steps=2, n_components=4, n_neighbors=8, embed_every_n_epochs=1
    )
    trainer = make_trainer([monitor, recorder], max_steps=40)
    trainer.fit(DigitsModule(), loader(32))  # 16 batches per epoch: epoch ends at 16, 32

    traj = TrajectoryStore(monitor.store_dir, monitor.recorder.sketch.output_dim).load()
    assert monitor.store_dir.startswith(str(tmp_path))
    np.testing.assert_array_equal(traj.steps, np.arange(0, 41, 2))
    np.testing.assert_array_equal(traj.vectors, np.stack(recorder.vectors))
    assert np.isnan(traj.losses[0]) and np.all(np.isfinite(traj.losses[1:]))

    acc = load_events(str(tmp_path))
    series = scalar_series(acc, f"{TAG}/eigenvalue_01")
    assert sorted(series) == [16, 32, 40]
    reference = diffusion_map(
        np.stack(recorder.vectors), n_components=4, n_neighbors=8
    )  # the monitor's default bandwidth is the function's
    logged = [scalar_series(acc, f"{TAG}/eigenvalue_{i:02d}")[40] for i in range(1, 5)]
    np.testing.assert_allclose(logged, reference.eigenvalues, rtol=1e-6)
    np.testing.assert_allclose(
        scalar_series(acc, f"{TAG}/intrinsic_dim")[40], reference.intrinsic_dim, rtol=1e-6
    )
    assert scalar_series(acc, f"{TAG}/num_samples") == {16: 9.0, 32: 17.0, 40: 21.0}
    assert set(scalar_series(acc, f"{TAG}/skipped").values()) == {0.0}
    assert [e.step for e in acc.Histograms(f"{TAG}/eigenvalues")] == [16, 32, 40]
    assert [e.step for e in acc.Images(f"{TAG}/trajectory")] == [16, 32, 40]

    # Projector: written at the epoch ends and the end of fit, with step/epoch/loss metadata;
    # each write replaces the previous one, so the final embedding is the one left.
    assert os.path.exists(os.path.join(str(tmp_path), "version_0", "projector_config.pbtxt")) or (
        glob.glob(os.path.join(str(tmp_path), "**", "projector_config.pbtxt"), recursive=True)
    )
    metas = sorted(glob.glob(os.path.join(str(tmp_path), "**", "metadata.tsv"), recursive=True))
    assert len(metas) == 1
    last = next(m for m in metas if "00040" in m)
    lines = open(last).read().splitlines()
    assert lines[0].split("\t") == ["step", "epoch", "loss"]
    assert [int(x.split("\t")[0]) for x in lines[1:]] == list(range(0, 41, 2))
    coords = np.loadtxt(os.path.join(os.path.dirname(last), "tensors.tsv"))
    assert coords.shape == (21, 4)
    # The coordinates are those of the reference up to the alignment rotation (norms per row).
    np.testing.assert_allclose(
        np.linalg.norm(coords, axis=1),
        np.linalg.norm(reference.coordinates, axis=1),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize("sample", ["parameters", "gradients"])
def test_training_is_bitwise_unchanged(tmp_path, make_trainer, sample):
    def run(with_monitor: bool) -> list[torch.Tensor]:
        L.seed_everything(1)
        module = DigitsModule(dropout=0.3)
        cbs = [
            DiffusionMapMonitor(
                every_n_steps=1, n_components=2, sample=sample, embed_every_n_epochs=1
            )
        ]
        trainer = make_trainer(
            cbs if with_monitor else [], max_steps=20, root=tmp_path / str(with_monitor)
        )
        trainer.fit(module, loader(32, shuffle=True))
        if with_monitor:
            assert cbs[0].num_embeddings == 2  # epoch end at 16 and the end at 20
        return [p.detach().clone() for p in module.parameters()]

    for a, b in zip(run(False), run(True), strict=True):
        assert torch.equal(a, b)


class _PlainSGD(DigitsModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_gradient_samples_are_the_gradients_that_made_each_step(make_trainer):
    recorder = _Recorder(1)
    monitor = DiffusionMapMonitor(every_n_steps=1, sample="gradients", n_components=2)
    module = _PlainSGD(lr=0.1)
    make_trainer([monitor, recorder], max_steps=12).fit(module, loader(32))
    traj = TrajectoryStore(monitor.store_dir, monitor.recorder.sketch.output_dim).load()
    np.testing.assert_array_equal(traj.steps, np.arange(1, 13))  # no gradient at step 0
    w = np.stack(recorder.vectors)  # plain SGD: w_s = w_{s-1} - lr g_s
    np.testing.assert_allclose(traj.vectors, -(w[1:] - w[:-1]) / 0.1, rtol=1e-4, atol=1e-6)


def test_resume_continues_the_trajectory_without_gaps_or_duplicates(tmp_path, make_trainer):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=10, save_top_k=-1)
    monitor = DiffusionMapMonitor(every_n_steps=2, n_components=3)
    trainer = make_trainer(
        [monitor, ckpt], max_steps=20, root=tmp_path / "a", enable_checkpointing=True
    )
    trainer.fit(DigitsModule(), loader(32))  # "crashes" after step 20, checkpoint at step 10
    store_dir = monitor.store_dir
    assert len(TrajectoryStore(store_dir, 1210)) == 11

    monitor2 = DiffusionMapMonitor(every_n_steps=2, n_components=3)
    trainer2 = make_trainer([monitor2], max_steps=30, root=tmp_path / "b")
    trainer2.fit(
        DigitsModule(),
        loader(32),
        ckpt_path=os.path.join(str(tmp_path / "ckpt"), "epoch=0-step=10.ckpt"),
    )
    assert monitor2.store_dir == store_dir  # the same store, continued
    traj = TrajectoryStore(store_dir, 1210).load()
    np.testing.assert_array_equal(traj.steps, np.arange(0, 31, 2))
    acc = load_events(str(tmp_path / "b"))
    assert scalar_series(acc, f"{TAG}/num_samples")[30] == 16.0
    with np.load(os.path.join(store_dir, "last_embedding.npz")) as saved:
        np.testing.assert_array_equal(saved["steps"], np.arange(0, 31, 2))


def test_numerical_failure_warns_once_skips_and_training_goes_on(
    tmp_path, make_trainer, monkeypatch
):
    def broken(*args, **kwargs):
        raise np.linalg.LinAlgError("no convergence")

    monkeypatch.setattr(embedder_module, "diffusion_map", broken)
    monitor = DiffusionMapMonitor(every_n_steps=2, n_components=2, embed_every_n_epochs=1)
    module = DigitsModule()
    with pytest.warns(RuntimeWarning, match="skipped the embedding at step 16"):
        make_trainer([monitor], max_steps=36).fit(module, loader(32))
    assert module.global_step == 36
    assert scalar_series(load_events(str(tmp_path)), f"{TAG}/skipped") == {
        16: 1.0,
        32: 2.0,
        36: 3.0,
    }


def _budget_run(make_trainer, root, monkeypatch, **kwargs) -> tuple[list[int], float, float]:
    """960 one-second steps in 16-step epochs; embedding n samples costs 1e-4·n² fake seconds
    (embedding at every epoch end would cost ~6x the whole 2% budget). Returns the sample
    counts of the embeddings, the fake seconds they took and the counted training seconds."""
    clock = FakeClock()
    sizes: list[int] = []
    real = embedder_module.diffusion_map

    def timed(X, **kw):
        sizes.append(X.shape[0])
        clock.now += 1e-4 * X.shape[0] ** 2
        return real(X, **kw)

    monkeypatch.setattr(embedder_module, "diffusion_map", timed)
    monitor = DiffusionMapMonitor(every_n_steps=4, n_components=2, clock=clock, **kwargs)
    trainer = make_trainer([AdvanceClock(clock), monitor], max_steps=960, logger=False, root=root)
    trainer.fit(DigitsModule(hidden=4), loader(32))
    assert monitor.skipped == 0
    spent = sum(1e-4 * n**2 for n in sizes)
    return sizes, spent, trainer._landscape_coordinator.train_seconds


def test_epoch_end_embeddings_follow_the_budget_by_default(tmp_path, make_trainer, monkeypatch):
    sizes, spent, train = _budget_run(make_trainer, tmp_path / "auto", monkeypatch)
    assert train == pytest.approx(960 - 5)  # warm-up steps are not counted
    assert sizes[-1] == 241  # the end-of-fit embedding always runs, on every sample
    assert len(sizes) >= 4, sizes  # embeddings actually happen during training
    share = DiffusionMapMonitor().max_overhead  # the default, 2%
    assert spent <= share * train, sizes  # within the monitor's share
    assert spent >= 0.4 * share * train, sizes  # and the share is used, not wasted
    # No bursts: budget saved up is not spent at consecutive epoch ends. Between two
    # embeddings lies at least (nearly: the cost is predicted) cost / rate of training.
    for before, n in itertools.pairwise(sizes[:-1]):
        gap = 4 * (n - before)  # one-second steps; a sample every 4 steps
        assert gap >= 0.8 * 1e-4 * n**2 / (PLANNING_SHARE * share), sizes
    # An explicit schedule replaces the budget: one embedding per epoch, reproducibly.
    sizes, spent, train = _budget_run(
        make_trainer, tmp_path / "fixed", monkeypatch, embed_every_n_epochs=1
    )
    assert sizes == [16 * e // 4 + 1 for e in range(1, 61)]
    assert spent > 5 * share * train


def test_window_and_burn_in_select_the_samples(tmp_path, make_trainer):
    monitor = DiffusionMapMonitor(
        every_n_steps=1, n_components=2, burn_in_steps=4, window_steps=10, embed_every_n_epochs=None
    )
    make_trainer([monitor], max_steps=20).fit(DigitsModule(), loader(32))
    coords, steps, _, _ = monitor._last
    np.testing.assert_array_equal(steps, np.arange(11, 21))
    monitor = DiffusionMapMonitor(every_n_steps=1, n_components=2, burn_in_steps=4, max_points=8)
    make_trainer([monitor], max_steps=20, root=tmp_path / "b").fit(DigitsModule(), loader(32))
    coords, steps, _, _ = monitor._last
    np.testing.assert_array_equal(steps, np.arange(4, 21))  # 8 landmarks, the rest by Nyström
    assert np.all(np.isfinite(coords))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be a positive integer"),
        ({"embed_every_n_steps": 5, "every_n_steps": 2}, "must be a multiple of every_n_steps"),
        ({"sample": "activations"}, "sample must be 'parameters' or 'gradients'"),
        ({"n_neighbors": 1}, "n_neighbors must be an integer >= 2"),
        ({"alpha": 2}, r"alpha must be a number in \[0, 1\]"),
        ({"epsilon": 0}, "epsilon must be 'auto', 'median', 'local' or a positive number"),
        ({"burn_in_steps": -1}, "burn_in_steps must be an integer >= 0"),
        ({"max_points": 2}, "max_points must be an integer >= 8"),
        ({"bandwidth": 1}, r"unknown option\(s\) \['bandwidth'\]"),
    ],
)
def test_bad_configuration_raises_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionMapMonitor(**kwargs)


@pytest.mark.ddp
def test_ddp_spawn_rank_zero_records_and_nothing_deadlocks(tmp_path, make_trainer):
    trainer = make_trainer(
        [DiffusionMapMonitor(every_n_steps=1, n_components=3)],
        max_steps=8,
        devices=2,
        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120)),
        use_distributed_sampler=False,
    )
    trainer.fit(DigitsModule(hidden=12, dtype=torch.float64), DistributedDigits(16))
    stores = glob.glob(os.path.join(str(tmp_path), "**", "store.json"), recursive=True)
    assert len(stores) == 1  # rank 0 only
    traj = TrajectoryStore(os.path.dirname(stores[0]), 64 * 12 + 12 + 12 * 10 + 10).load()
    np.testing.assert_array_equal(traj.steps, np.arange(0, 9))
    acc = load_events(str(tmp_path))
    assert sorted(scalar_series(acc, f"{TAG}/eigenvalue_01")) == [8]
    assert scalar_series(acc, f"{TAG}/skipped") == {8: 0.0}


def test_figure_and_layout_helpers():
    import re

    from lightning_landscape.dashboard.diffusion import diffusion_layout, trajectory_figure

    fig = trajectory_figure(
        np.random.default_rng(0).random((10, 3)), np.arange(10), [0.9, 0.8, 0.5]
    )
    assert len(fig.axes) == 3  # two panels and the colour bar
    with pytest.raises(ValueError, match="coordinates must be"):
        trajectory_figure(np.zeros((10, 3)), np.arange(9), [0.9, 0.8, 0.5])
    with pytest.raises(ValueError, match="at least one finite row"):
        trajectory_figure(np.full((2, 1), np.nan), [0, 1], [0.5])
    charts = diffusion_layout()["landscape: diffusion"]
    regexes = [r for rs in charts.values() for r in rs]
    for tag in ("eigenvalue_03", "intrinsic_dim", "seconds", "skipped", "num_samples"):
        assert any(re.match(r, f"{TAG}/{tag}") for r in regexes), tag


def test_digits_example_runs(tmp_path, capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "digits_diffusion.py")
    spec = importlib.util.spec_from_file_location("digits_diffusion", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monitor = example.main(
        [
            "--logdir",
            str(tmp_path),
            "--max-steps",
            "60",
            "--every-n-steps",
            "2",
            "--burn-in-steps",
            "10",
            "--embed-every-n-epochs",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "31 parameter samples, 3 diffusion maps, 0 skipped" in out
    # The default bandwidth is the function's "auto": one global, or else a variable, kernel.
    assert monitor.last_result is not None and monitor.last_result.kernel in ("global", "variable")
    acc = load_events(str(tmp_path))
    assert "landscape/diffusion/intrinsic_dim" in acc.Tags()["scalars"]
