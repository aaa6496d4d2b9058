"""HessianSpectrumMonitor's warm start, subspace overlap and per-batch λ_max spread, with a real
Trainer, read back from the event file: the overlap equals the one of the dense eigenvectors of
two known Hessians, the per-batch spread that of dense per-batch Hessians, and training stays
bitwise unchanged."""

from __future__ import annotations

import functools

import lightning as L
import numpy as np
import pytest
import torch

from lightning_landscape import HessianSpectrumMonitor
from lightning_landscape.linalg.spectrum import subspace_overlap
from tests._reference import cross_entropy_loss, dense_hessian, random_orthogonal
from tests.callbacks._events import load_events, scalar_series
from tests.callbacks._models import DigitsModule, loader

SPECTRUM = torch.tensor([3.0, 2.8, 2.6, *np.linspace(2.4, 0.01, 197)], dtype=torch.float64)


class _SwitchingQuadratic(L.LightningModule):
    """Loss ½θᵀAθ, A = A1 before step ``switch`` and A2 from it on (the monitor measures the
    module's own training_step, so it sees the switch too)."""

    def __init__(self, A1: torch.Tensor, A2: torch.Tensor, switch: int) -> None:
        super().__init__()
        self.register_buffer("A1", A1)
        self.register_buffer("A2", A2)
        self.switch = switch
        self.theta = torch.nn.Parameter(torch.ones(A1.shape[0], dtype=A1.dtype))

    def training_step(self, batch, batch_idx):
        A = self.A1 if self.trainer.global_step < self.switch else self.A2
        return 0.5 * self.theta @ (A @ self.theta)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _top(A: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.eigh(A).eigenvectors[:, -k:].T


def _hessians() -> tuple[torch.Tensor, torch.Tensor]:
    """Two Hessians with the same eigenvalues, the second's eigenvectors turned a little."""
    Q1 = random_orthogonal(SPECTRUM.numel(), seed=1)
    gen = torch.Generator().manual_seed(2)
    Q2 = torch.linalg.qr(Q1 + 0.1 * torch.randn(Q1.shape, generator=gen, dtype=Q1.dtype)).Q
    return (Q1 * SPECTRUM) @ Q1.T, (Q2 * SPECTRUM) @ Q2.T


@pytest.mark.parametrize("density", [False, True])  # warm-started run / cold run beside vectors
def test_logged_overlap_equals_the_dense_eigenvectors_overlap(tmp_path, make_trainer, density):
    A1, A2 = _hessians()
    U1, U2 = _top(A1, 3), _top(A2, 3)
    cos = torch.linalg.svdvals(U1 @ U2.T)
    expected = float((cos**2).mean())
    assert 0.05 < expected < 0.95  # a real change, neither nothing nor everything
    monitor = HessianSpectrumMonitor(
        every_n_steps=2, top_k=3, num_probe_batches=1, density=density, trace=False, tol=1e-12,
        num_slq_probes=1, slq_steps=20,
    )  # fmt: skip
    make_trainer([monitor], max_steps=6).fit(_SwitchingQuadratic(A1, A2, 3), loader(8))
    acc = load_events(str(tmp_path))
    overlap = scalar_series(acc, "landscape/hessian/subspace_overlap")
    assert sorted(overlap) == [2, 4, 6]  # from the second measurement on
    assert overlap[2] == pytest.approx(1.0, abs=1e-8)
    assert overlap[4] == pytest.approx(expected, abs=1e-7)  # logged as float32
    assert overlap[6] == pytest.approx(1.0, abs=1e-8)


def test_every_warm_start_hands_over_the_previous_vectors(tmp_path, make_trainer, monkeypatch):
    # Step 4 sees the turned Hessian: the run itself notices after one product (the first
    # vector's residual) and runs Lanczos from the vectors' sum; the monitor keeps no memory of
    # the turn, and the overlap logged at 6 is that of the three vectors of step 4 (the Hessian
    # did not change from 4 to 6: 1).
    import lightning_landscape.callbacks.hessian as module

    rows, real = [], module.hessian_spectrum

    @functools.wraps(real)  # the monitor reads the options it forwards from the signature
    def spy(*args, **kwargs):
        warm = kwargs.get("warm_start")
        rows.append(None if warm is None else warm.shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "hessian_spectrum", spy)
    A1, A2 = _hessians()
    monitor = HessianSpectrumMonitor(
        every_n_steps=2, top_k=3, num_probe_batches=1, density=False, trace=False, tol=1e-12
    )
    make_trainer([monitor], max_steps=6).fit(_SwitchingQuadratic(A1, A2, 3), loader(8))
    assert rows == [None, 3, 3, 3]
    overlap = scalar_series(load_events(str(tmp_path)), "landscape/hessian/subspace_overlap")
    assert overlap[4] < 0.95
    assert overlap[6] == pytest.approx(1.0, abs=1e-8)


def test_warm_start_saves_products_and_can_be_switched_off(tmp_path, make_trainer):
    A1, A2 = _hessians()
    hvps = {}
    for warm in (True, False):
        monitor = HessianSpectrumMonitor(
            every_n_steps=2, top_k=3, num_probe_batches=1, density=False, trace=False,
            warm_start=warm, keep_eigenvectors=True,  # both converge their vectors
        )  # fmt: skip
        root = tmp_path / str(warm)
        make_trainer([monitor], max_steps=6, root=root).fit(
            _SwitchingQuadratic(A1, A2, 3), loader(8)
        )
        acc = load_events(str(root))
        hvps[warm] = scalar_series(acc, "landscape/hessian/num_hvps")
        tags = acc.Tags()["scalars"]
        assert ("landscape/hessian/subspace_overlap" in tags) == warm
        assert monitor._previous is None or warm
    assert hvps[True][0] == hvps[False][0]  # the first measurement is cold either way
    # Steps 2 and 6: the Hessian did not change since the last measurement, the warm run starts
    # inside its top 3 (the weights moved, but a quadratic's Hessian does not depend on them).
    for step in (2, 6):
        assert hvps[True][step] < 0.8 * hvps[False][step]


def test_per_batch_spread_matches_dense_per_batch_hessians(tmp_path, make_trainer):
    torch.manual_seed(0)
    module = DigitsModule(hidden=6)
    monitor = HessianSpectrumMonitor(
        every_n_steps=5, top_k=2, num_probe_batches=3, density=False, trace=False,
        batch_max_hvps=80, log_sharpness=False,
    )  # fmt: skip
    make_trainer([monitor], max_steps=5).fit(module, loader(32))
    it = iter(loader(32))
    module.eval()
    exact = np.array(
        [
            np.linalg.eigvalsh(dense_hessian(module, cross_entropy_loss, [next(it)]).numpy())[-1]
            for _ in range(3)
        ]
    )
    assert exact.std() > 1e-3 * exact.mean()  # the batches differ: the spread has teeth
    acc = load_events(str(tmp_path))
    logged = {
        k: scalar_series(acc, f"landscape/hessian/lambda_max_batch_{k}")[5]
        for k in ("mean", "min", "max", "std")
    }
    assert logged["mean"] == pytest.approx(exact.mean(), rel=1e-4)
    assert logged["min"] == pytest.approx(exact.min(), rel=1e-4)
    assert logged["max"] == pytest.approx(exact.max(), rel=1e-4)
    assert logged["std"] == pytest.approx(exact.std(ddof=1), rel=1e-3)


def test_the_per_batch_cap_bounds_the_products_and_reads_low_by_its_residual(
    tmp_path, make_trainer
):
    hvps, logged = {}, {}
    for spread in (True, False):
        torch.manual_seed(0)
        module = DigitsModule(hidden=6)
        monitor = HessianSpectrumMonitor(
            every_n_steps=5, top_k=2, num_probe_batches=3, density=False, trace=False,
            batch_max_hvps=6, log_sharpness=False, log_batch_spread=spread,
        )  # fmt: skip
        root = tmp_path / str(spread)
        make_trainer([monitor], max_steps=5, root=root).fit(module, loader(32))
        acc = load_events(str(root))
        hvps[spread] = scalar_series(acc, "landscape/hessian/num_hvps")[5]
        if spread:
            logged = {
                k: scalar_series(acc, f"landscape/hessian/lambda_max_batch_{k}")[5]
                for k in ("max", "residual")
            }
    assert 0 < hvps[True] - hvps[False] <= 3 * 6  # the products are counted, and capped
    it = iter(loader(32))
    module.eval()
    exact = max(
        np.linalg.eigvalsh(dense_hessian(module, cross_entropy_loss, [next(it)]).numpy())[-1]
        for _ in range(3)
    )
    # A Ritz value is a lower bound; the residual bounds how far below it reads.
    assert exact - logged["residual"] <= logged["max"] <= exact * (1 + 1e-6)


def test_adam_fit_with_every_option_on_is_bitwise_unchanged(tmp_path, make_trainer):
    class AdamDigits(DigitsModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=0.01)

    def run(with_monitor: bool) -> list[torch.Tensor]:
        L.seed_everything(1)
        module = AdamDigits(dropout=0.3)
        cbs = [HessianSpectrumMonitor(every_n_steps=3, top_k=3, density=False)]
        trainer = make_trainer(
            root=tmp_path / str(with_monitor), callbacks=cbs if with_monitor else [], max_steps=7
        )
        trainer.fit(module, loader(32, shuffle=True))
        if with_monitor:
            acc = load_events(str(tmp_path / "True"))
            for tag in ("preconditioned_sharpness", "subspace_overlap", "lambda_max_batch_std"):
                assert sorted(scalar_series(acc, f"landscape/hessian/{tag}")) != [], tag
        state = trainer.optimizers[0].state_dict()["state"]
        return [p.detach().clone() for p in module.parameters()] + [
            s["exp_avg_sq"].clone() for s in state.values()
        ]

    for a, b in zip(run(False), run(True), strict=True):
        assert torch.equal(a, b)


def test_subspace_overlap_helper_against_principal_angles():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    B = A + 0.3 * torch.randn(3, 20, generator=gen, dtype=torch.float64)
    QA, QB = torch.linalg.qr(A.T).Q, torch.linalg.qr(B.T).Q
    expected = float((torch.linalg.svdvals(QA.T @ QB) ** 2).mean())
    assert subspace_overlap(A, B) == pytest.approx(expected, abs=1e-12)
    assert subspace_overlap(A, 2 * A) == pytest.approx(1.0, abs=1e-12)  # scale-free
    assert subspace_overlap(A, torch.linalg.qr(A.T, mode="complete").Q[:, 3:6].T) < 1e-12


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="warm_start must be a bool; got 1"):
        HessianSpectrumMonitor(warm_start=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log_batch_spread must be a bool"):
        HessianSpectrumMonitor(log_batch_spread="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_max_hvps must be an integer >= 2; got 1"):
        HessianSpectrumMonitor(batch_max_hvps=1)
