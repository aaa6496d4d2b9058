"""Fixed costs: fast_dev_run, short fits, the bounded end-of-fit measurement, progress lines,
files only under the log directory, and schedules that follow the fit's length."""

from __future__ import annotations

import itertools
import os
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_landscape import (
    DiffusionMapMonitor,
    GradientCovarianceMonitor,
    HessianSpectrumMonitor,
    InPCAMonitor,
)
from lightning_landscape.callbacks._fixed_costs import FIXED_COST_SHARE, QUIET_SECONDS, too_costly
from lightning_landscape.dashboard import writer as dashboard_writer
from tests._reference import cross_entropy_loss, dense_hessian
from tests.callbacks._clock import AdvanceClock, FakeClock, TimedDigits
from tests.callbacks._events import load_events, scalar_series
from tests.callbacks._models import DigitsModule, loader


@pytest.fixture(autouse=True)
def _fresh_notices():
    dashboard_writer._reset_warn_once()


def _files(root) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


def _four(clock=None, every_n_steps=None) -> list:
    every = {"every_n_steps": every_n_steps}
    return [
        HessianSpectrumMonitor(top_k=2, clock=clock, **every),
        GradientCovarianceMonitor(top_k=2, clock=clock, **every),
        DiffusionMapMonitor(clock=clock),
        InPCAMonitor(clock=clock, **every),
    ]


def test_too_costly_rule():
    fit = 100.0
    assert not too_costly(FIXED_COST_SHARE * fit, fit)  # at the share: affordable
    assert too_costly(FIXED_COST_SHARE * fit + 1, fit)
    assert not too_costly(QUIET_SECONDS * 0.99, 0.0)  # quiet costs are always paid
    assert too_costly(QUIET_SECONDS, 0.0)
    assert not too_costly(None, 1.0) and not too_costly(1e6, None)  # unknown: runs as before


def test_fast_dev_run_measures_and_writes_nothing(tmp_path, make_trainer, monkeypatch, said):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monitors = _four()
    module = DigitsModule()
    make_trainer(monitors, root=tmp_path / "root", fast_dev_run=True).fit(module, loader(32))
    assert module.step_calls == 1  # the fit ran its one step, the monitors stayed out
    assert [m.num_measurements for m in monitors] == [0, 0, 0, 0]
    assert monitors[2].store_dir is None and monitors[3]._store is None
    assert _files(tmp_path) == []
    assert sum(line.startswith("lightning_landscape: fast_dev_run") for line in said) == 1, said


def test_files_stay_under_the_log_directory(tmp_path, make_trainer, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monitors = _four(every_n_steps=5)  # a schedule, not the budget: every monitor measures
    logger = TensorBoardLogger(save_dir=str(tmp_path / "logs"), name="run")
    trainer = make_trainer(monitors, logger=logger, root=tmp_path / "root")
    trainer.fit(DigitsModule(), loader(32))
    assert all(m.num_measurements > 0 for m in monitors)
    files = _files(tmp_path)
    assert files and all(f.startswith(os.path.join("logs", "run", "version_0")) for f in files)
    kinds = {f.split(os.sep)[3] for f in files}
    assert {"landscape_probes", "landscape_diffusion", "landscape_inpca"} <= kinds, kinds


def test_resume_finds_the_probe_set_under_the_first_runs_logs(tmp_path):
    def trainer(steps, callbacks):
        return L.Trainer(
            max_steps=steps,
            accelerator="cpu",
            callbacks=callbacks,
            logger=TensorBoardLogger(save_dir=str(tmp_path / "logs"), name="run"),
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(tmp_path / "root"),
        )

    kw = {"every_n_steps": 4, "top_k": 2, "density": False, "trace": False}
    first = HessianSpectrumMonitor(**kw)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4)
    trainer(4, [first, ckpt]).fit(DigitsModule(), loader(32, shuffle=True))
    assert first.probe_dir == str(tmp_path / "logs" / "run" / "version_0" / "landscape_probes")
    second = HessianSpectrumMonitor(**kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(8, [second]).fit(
            DigitsModule(), loader(32, shuffle=True), ckpt_path=ckpt.best_model_path
        )
    assert not [w for w in caught if "probe set" in str(w.message)]
    assert second.probe_dir == first.probe_dir and second.num_measurements == 1 + 2


def test_budget_monitor_stays_off_in_a_fit_too_short_for_it(make_trainer, said):
    clock = FakeClock()
    hessian = HessianSpectrumMonitor(top_k=2, clock=clock)
    diffusion = DiffusionMapMonitor(clock=clock)
    module = TimedDigits(clock, seconds=0.2)
    make_trainer([hessian, diffusion], max_steps=12).fit(module, loader(32))
    # The smallest end-of-fit measurement: 6·top_k Lanczos products, two gradients each, on
    # the first of the 4 probe batches, against 12 steps of one batch: about 6 s for 2.4 s.
    assert hessian.num_measurements == 0 and hessian._off == "short fit"
    assert diffusion.num_measurements > 0  # recording costs nothing a priori: it stays on
    notices = [line for line in said if "off for this fit" in line]
    assert len(notices) == 1 and "HessianSpectrumMonitor" in notices[0], said
    assert "on its first probe batch only (of 4)" in notices[0]


def test_budget_monitor_stays_on_when_its_smallest_end_of_fit_form_fits(make_trainer, said):
    # 100 steps: 10 s of training. Top-k on all 4 probe batches (about 26 s with the per-batch
    # spread) is more than the fit affords, on the first batch alone (about 3 s) it is not.
    clock = FakeClock()
    hessian = HessianSpectrumMonitor(top_k=2, clock=clock)
    make_trainer([hessian], max_steps=100).fit(TimedDigits(clock, seconds=0.1), loader(32))
    assert hessian._off is None and hessian.num_measurements >= 1, said
    assert not [line for line in said if "off for this fit" in line]


def test_end_of_fit_measurement_shrinks_and_long_ones_say_so(tmp_path, make_trainer, said):
    clock = FakeClock()
    monitor = HessianSpectrumMonitor(top_k=2, every_n_steps=100, clock=clock, retain_graph=False)
    module = TimedDigits(clock, seconds=0.3)
    make_trainer([monitor], max_steps=12).fit(module, loader(32))
    # Step 0: the full measurement (density, trace), a minute of fake time. Step 12: predicted
    # as much, over half of the 3.6 s of training: the top-k only, and as that is still over
    # half, on the first of the 4 probe batches (announced: predicted over 5 s).
    assert monitor.num_measurements == 2 and monitor.density and monitor.trace
    acc = load_events(str(tmp_path))
    assert set(scalar_series(acc, "landscape/hessian/trace")) == {0}
    assert set(scalar_series(acc, "landscape/hessian/eigenvalue_01")) == {0, 12}
    H = dense_hessian(module, cross_entropy_loss, list(itertools.islice(loader(32), 1)))
    top = torch.linalg.eigvalsh(H).flip(0)[:2].numpy()
    assert monitor.last_eigenvalues == pytest.approx(top, rel=1e-5)
    reduced = (
        "eigenvalues only, without density, trace, per-batch lambda_max, on its first probe "
        "batch only (of 4)"
    )
    assert sum(reduced in line for line in said) == 1, said
    # Step 0 was not announced (no prediction yet) but reported; step 12 both.
    assert [line.split(": ")[1].split(" at step")[0] for line in said if " step " in line] == [
        "measured the Hessian spectrum (top-2, density, trace)",
        "measuring the Hessian spectrum (top-2)",
        "measured the Hessian spectrum (top-2)",
    ], said


class _AdamDigits(DigitsModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("adam", [False, True])
def test_the_reduced_hessian_measurement_leaves_out_every_extra_run(make_trainer, adam):
    """Top-k only means the top-k Lanczos run alone: no density, trace, per-batch runs, nor
    (with Adam) the preconditioned run; the SGD line costs no product and stays. Each is given
    back afterwards."""
    monitor = HessianSpectrumMonitor(top_k=2, every_n_steps=1)
    module = _AdamDigits() if adam else DigitsModule()
    make_trainer([monitor], max_steps=2).fit(module, loader(32))
    full = monitor._gradient_equivalents()
    with monitor._reduced() as what:
        assert not (monitor.density or monitor.trace or monitor.log_batch_spread)
        assert monitor.log_sharpness is not adam
        assert ("Adam's preconditioned sharpness" in what) is adam
        assert what.startswith("the top-k eigenvalues only, without density, trace, per-batch")
        # The a-priori guess follows: the top-k run alone (6 top_k products, 2 gradients each).
        assert monitor._gradient_equivalents() == 2.0 * (6 * 2 + 2) + 2.0 < full
    assert monitor.density and monitor.trace and monitor.log_batch_spread
    assert monitor.log_sharpness
    monitor.density = monitor.trace = monitor.log_batch_spread = monitor.log_sharpness = False
    assert monitor._reduced() is None  # top-k only already


def test_end_of_fit_measurement_the_budget_cannot_afford_shrinks(tmp_path, make_trainer, said):
    """A budget monitor whose measurement never fitted its share (0.04% of 1,000 one-second
    steps) gets no mid-fit measurement; at the end the whole one would take several times what
    is left (though far under half the fit): the reduced one runs, and one line says why."""
    clock = FakeClock()
    kw = {"top_k": 2, "clock": clock}
    monitor = HessianSpectrumMonitor(retain_graph=False, max_overhead=0.0004, **kw)
    gradient = GradientCovarianceMonitor(max_overhead=0.002, **kw)
    module = TimedDigits(clock, seconds=0.005)  # every loss evaluation: 5 fake ms
    trainer = make_trainer([monitor, gradient, AdvanceClock(clock)], max_steps=1000)
    trainer.fit(module, loader(32))
    coord = trainer._landscape_coordinator
    acc = load_events(str(tmp_path))
    assert set(scalar_series(acc, "landscape/hessian/eigenvalue_01")) == {1000}
    assert "landscape/hessian/trace" not in acc.Tags()["scalars"]  # top-k only
    # The top-k alone is still over the budget's room: on the first probe batch.
    H = dense_hessian(module, cross_entropy_loss, list(itertools.islice(loader(32), 1)))
    top = torch.linalg.eigvalsh(H).flip(0)[:2].numpy()
    assert monitor.last_eigenvalues == pytest.approx(top, rel=1e-5)
    lines = [line for line in said if "monitor's budget" in line]
    assert len(lines) == 1 and not [line for line in said if "fit so far" in line], said
    assert "HessianSpectrumMonitor" in lines[0] and "top-k eigenvalues only" in lines[0]
    assert "on its first probe batch only (of 4)" in lines[0]
    # The gradient monitor (cheap here: measured all along) has a reduced form too: its first
    # probe batch only, the probe set given back afterwards (after the fit it is released).
    assert set(scalar_series(acc, "landscape/gradient/num_samples").values()) == {128.0}
    probe = gradient._probe = list(itertools.islice(loader(32), 4))
    with gradient._reduced() as what:
        assert gradient._probe == probe[:1] and "first probe batch only (of 4)" in what
    assert gradient._probe is probe
    assert coord.train_seconds > 900  # about 1,000 s of training: the whole was not too long


def test_quick_measurements_are_silent(make_trainer, said):
    # On the fake clock every loss evaluation takes 10 ms, whatever the machine's load: each
    # measurement takes well under QUIET_SECONDS.
    clock = FakeClock()
    monitor = HessianSpectrumMonitor(top_k=2, every_n_steps=4, clock=clock)
    make_trainer([monitor], max_steps=8).fit(TimedDigits(clock, seconds=0.01), loader(32))
    assert monitor.num_measurements == 3 and 0 < monitor.last_cost < 5
    assert not [line for line in said if "Hessian" in line], said


def test_short_fit_records_enough_for_a_diffusion_map(make_trainer):
    monitor = DiffusionMapMonitor(log_projector=False, log_figure=False)
    make_trainer([monitor], max_steps=60).fit(DigitsModule(), loader(32))
    # 60 // (2 · (6 + 2)) = 3: steps 0, 3, …, 60; at the default 10 only 7 < 8 samples.
    assert monitor.every_n_steps == 3 and monitor.recorder.rows == 21
    assert monitor.last_result is not None and monitor.num_embeddings >= 1
    assert monitor.requested_every_n_steps is None  # the next fit adapts again


def test_too_few_samples_are_announced_at_fit_start(make_trainer):
    monitor = DiffusionMapMonitor(every_n_steps=10, log_projector=False, log_figure=False)
    with pytest.warns(UserWarning, match="this fit of 60 steps will record 7 samples"):
        make_trainer([monitor], max_steps=60).fit(DigitsModule(), loader(32))
    assert monitor.every_n_steps == 10 and monitor.last_result is None


class _ValDigits(DigitsModule):
    def validation_step(self, batch, batch_idx):
        self.validated = True


def test_sanity_checking_measures_nothing(make_trainer):
    module = _ValDigits()
    monitor = HessianSpectrumMonitor(top_k=2, every_n_steps=4, density=False, trace=False)
    steps = []
    original = monitor._measure

    def spy(trainer, pl_module, step):
        steps.append((step, trainer.sanity_checking))
        original(trainer, pl_module, step)

    monitor._measure = spy
    trainer = make_trainer([monitor], max_steps=8, logger=False, num_sanity_val_steps=2)
    trainer.fit(module, loader(32), loader(32, n=64))
    assert module.validated and steps == [(0, False), (4, False), (8, False)]


@pytest.mark.parametrize(("limit", "route"), [(None, "gram"), (1, "lanczos")])
def test_gradient_cost_guess_assumes_the_route_auto_takes(make_trainer, limit, route):
    kw = {} if limit is None else {"gram_max_elements": limit}
    monitor = GradientCovarianceMonitor(top_k=2, **kw)
    make_trainer([monitor], max_steps=8).fit(DigitsModule(), loader(32))
    # 128 probe samples x 1210 parameters: under the default Gram limit, over a limit of 1.
    assert monitor._route == route and monitor.num_measurements == 1
    assert monitor._gradient_equivalents() == 4.0 + (3.0 * 6 * 2 if route == "lanczos" else 0)


def test_progress_lines_go_through_a_live_progress_bar(make_trainer, capsys, said):
    clock = FakeClock()
    monitor = HessianSpectrumMonitor(
        top_k=2, every_n_steps=100, clock=clock, retain_graph=False, log_figure=False
    )
    trainer = make_trainer([monitor], max_steps=4, logger=False, enable_progress_bar=True)
    trainer.fit(TimedDigits(clock, seconds=0.3), loader(32))
    out = capsys.readouterr().out
    # Step 0 comes before the bar exists: rank_zero_info. The end of fit, while the bar is
    # live: its print (tqdm.write, to stdout).
    step0 = "measured the Hessian spectrum (top-2, density, trace) at step 0 in"
    assert any(step0 in line for line in said), said
    assert "measuring the Hessian spectrum (top-2) at step 4" in out
    assert "measured the Hessian spectrum (top-2) at step 4" in out
    assert not [line for line in said if "at step 4" in line], said


def test_budget_embedding_waits_for_samples_in_silence(make_trainer):
    """Mid-fit, an embedding on the budget that finds fewer samples than it needs waits without
    a warning (the window is still filling: nothing for the user to do); the end of fit embeds."""
    clock = FakeClock()
    kw = {"log_projector": False, "log_figure": False, "clock": clock}
    monitor = DiffusionMapMonitor(every_n_steps=25, **kw)
    module = TimedDigits(clock, seconds=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([monitor, AdvanceClock(clock)], max_steps=200).fit(module, loader(32))
    assert not [w for w in caught if "waits for more" in str(w.message)], caught
    assert monitor.last_result is not None and monitor.last_embedded_step == 200


def test_probe_gradient_is_timed_once_for_monitors_that_share_its_shape(
    tmp_path, make_trainer, monkeypatch
):
    """The a-priori cost guesses time a probe gradient per batch; monitors whose probe batches
    have the same shapes, mode and loss reuse the first one's timing (a few gradients each on a
    large model), a monitor with its own loss times its own."""
    from lightning_landscape.callbacks import _base

    calls: list[str] = []
    real = _base.LandscapeMonitor._time_probe_gradient

    def counted(self, pl_module):
        calls.append(type(self).__name__)
        return real(self, pl_module)

    monkeypatch.setattr(_base.LandscapeMonitor, "_time_probe_gradient", counted)
    monitors = [HessianSpectrumMonitor(top_k=2), GradientCovarianceMonitor(top_k=2), InPCAMonitor()]
    make_trainer(monitors, max_steps=12).fit(DigitsModule(), loader(32))
    assert calls == ["HessianSpectrumMonitor"], calls
    times = {m._batch_seconds for m in monitors}
    assert len(times) == 1 and next(iter(times)) > 0  # one timing, the same for all three

    calls.clear()
    own = HessianSpectrumMonitor(top_k=2, loss_fn=cross_entropy_loss)
    shared = GradientCovarianceMonitor(top_k=2)
    make_trainer([own, shared], max_steps=12, root=tmp_path / "b").fit(DigitsModule(), loader(32))
    assert sorted(calls) == ["GradientCovarianceMonitor", "HessianSpectrumMonitor"], calls


def test_hessian_cost_guess_times_one_product(make_trainer, monkeypatch):
    """The Hessian monitor's a-priori cost counts each product at its timed cost over the timed
    probe gradient (one batch each, fake seconds), not at an assumed two gradients: the guess of
    a model whose products cost 9 gradients is 4.5x that of the assumed 2 in its products."""
    from lightning_landscape.callbacks import _base

    clock = FakeClock()

    class SlowProducts(_base.HessianOperator):
        def matvec(self, v):
            clock.now += 0.9
            return super().matvec(v)

    monkeypatch.setattr(_base, "HessianOperator", SlowProducts)
    kw = {"log_batch_spread": False, "log_sharpness": False, "clock": clock}
    monitor = HessianSpectrumMonitor(top_k=2, **kw)
    make_trainer([monitor], max_steps=12).fit(TimedDigits(clock, seconds=0.1), loader(32))
    assert monitor._batch_seconds == pytest.approx(0.1)  # one training_step per probe batch
    assert monitor._product_seconds == pytest.approx(0.9)
    timed = monitor._gradient_equivalents()
    monitor._product_seconds = None  # unknown: two gradients a product
    assumed = monitor._gradient_equivalents()
    graph = 2.0  # the one graph of the run, two gradients, whatever the products cost
    assert (timed - graph) / (assumed - graph) == pytest.approx(4.5)


@pytest.mark.parametrize("hvp", ["auto", "finite_difference"])
def test_hessian_cost_guess_times_the_product_the_measurement_uses(make_trainer, hvp):
    """The timed product is the one the measurement will compute: with ``hvp="finite_difference"``
    two gradients (two ``training_step`` calls, 0.1 fake seconds each); an exact product reuses
    the retained graph and calls the loss not at all."""
    clock = FakeClock()
    monitor = HessianSpectrumMonitor(top_k=2, clock=clock, hvp=hvp)
    make_trainer([monitor], max_steps=12).fit(TimedDigits(clock, seconds=0.1), loader(32))
    expected = 0.2 if hvp == "finite_difference" else 0.0
    assert monitor._product_seconds == pytest.approx(expected, abs=1e-9)


def test_inpca_cost_guess_counts_only_the_paths_it_will_walk(make_trainer):
    """The first InPCA measurement joins no path (no anchor is set yet): its guess is one probe
    forward, not the barrier grid's forward passes to every anchor, so the step-0
    measurement of a slow model is not announced as a long one. Later guesses count a path to
    each anchor, and the progress lines name what is measured."""
    monitor = InPCAMonitor(barrier_grid=7)
    one_forward = 1 / 3 + 0.5
    assert monitor._gradient_equivalents() == pytest.approx(one_forward)
    make_trainer([monitor], max_steps=4).fit(DigitsModule(), loader(32))
    assert monitor._tracker.w0 is not None and monitor._tracker.w_prev is not None
    assert monitor._gradient_equivalents() == pytest.approx((1 + 7 * 2) / 3 + 0.5)
    assert monitor._what() == "the probe predictions and the trajectory geometry"
    assert InPCAMonitor(geometry=False)._what() == "the probe predictions"
