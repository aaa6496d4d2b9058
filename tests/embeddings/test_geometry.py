"""Trajectory geometry without a Trainer, against float64 references written out by hand:
losses at given weights by ``torch.func.functional_call``, distances and cosines by their formulas,
mode connectivity and barrier by loops over the path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_landscape.embeddings.geometry import (
    GeometryTracker,
    flat_parameters,
    linear_path_losses,
    loss_at_weights,
    loss_barrier,
    mode_connectivity,
)
from tests._reference import cross_entropy_loss, digits_batches, param_slices


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10)).double()
    model[0].bias.requires_grad_(False)  # frozen parameters are not part of the vector
    return model.eval()


def _reference_loss(model: nn.Module, w: torch.Tensor, batches) -> float:
    """Sample-weighted mean cross-entropy at flat weights ``w``, by ``functional_call``."""
    params = {
        name: w[sl].view_as(dict(model.named_parameters())[name])
        for name, sl in param_slices(model).items()
    }
    total, count = 0.0, 0
    for x, y in batches:
        logits = functional_call(model, params, (x,))
        total += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        count += y.shape[0]
    return total / count


def test_flat_parameters_follow_named_parameters_and_skip_frozen():
    model = _model()
    w = flat_parameters(model)
    ref = torch.cat([p.reshape(-1) for p in model.parameters() if p.requires_grad])
    assert torch.equal(w, ref)
    assert w.numel() == 64 * 6 + 6 * 10 + 10
    w[0] += 1.0  # a copy: the model is untouched
    assert not torch.equal(w, flat_parameters(model))


def test_loss_at_weights_is_the_sample_weighted_mean_and_restores_the_weights():
    model = _model()
    batches = digits_batches([7, 20, 3], dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    w = flat_parameters(model) + 0.05 * torch.randn(
        flat_parameters(model).shape,
        generator=torch.Generator().manual_seed(1),
        dtype=torch.float64,
    )
    got = loss_at_weights(model, w, batches, cross_entropy_loss)
    assert got == pytest.approx(_reference_loss(model, w, batches), rel=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    # Two processes: reduce_fn adds the other shard's (loss sum, count).
    other = digits_batches([11], dtype=torch.float64)
    other_total = torch.tensor([_reference_loss(model, w, other) * 11, 11.0], dtype=torch.float64)
    got = loss_at_weights(
        model, w, batches, cross_entropy_loss, reduce_fn=lambda t: t + other_total
    )
    assert got == pytest.approx(_reference_loss(model, w, batches + other), rel=1e-12)


def test_loss_at_weights_restores_the_weights_when_the_loss_fails():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]

    def broken(m, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        loss_at_weights(
            model, flat_parameters(model) * 2, digits_batches([4], dtype=torch.float64), broken
        )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    nan_loss = lambda m, b: torch.tensor(float("nan"))  # noqa: E731
    with pytest.raises(FloatingPointError, match="non-finite probe loss on the linear path"):
        loss_at_weights(
            model, flat_parameters(model), digits_batches([4], dtype=torch.float64), nan_loss
        )


def test_linear_path_losses_match_interpolated_references():
    model = _model()
    batches = digits_batches([16, 16], dtype=torch.float64)
    w1 = flat_parameters(model)
    w2 = flat_parameters(_model(seed=3))
    ts = np.linspace(0, 1, 4)
    got = linear_path_losses(model, w1, w2, ts, batches, cross_entropy_loss)
    ref = [_reference_loss(model, (1 - t) * w1 + t * w2, batches) for t in ts]
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_mode_connectivity_and_barrier_by_hand():
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    losses = [1.0, 2.5, 3.0, 2.0, 2.0]
    # mean of the ends 1.5; gaps -1.0, -1.5, -0.5: the largest in magnitude is -1.5.
    assert mode_connectivity(losses, ts) == pytest.approx(-1.5)
    # chord 1.0, 1.25, 1.5, 1.75, 2.0: excesses 0, 1.25, 1.5, 0.25, 0.
    assert loss_barrier(losses, ts) == pytest.approx(1.5)
    assert loss_barrier([2.0, 1.0, 2.0], [0.0, 0.5, 1.0]) == 0.0  # a dip: the ends count
    assert mode_connectivity([2.0, 1.0, 2.0], [0.0, 0.5, 1.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ts must increase from 0 to 1 with at least 3 points"):
        loss_barrier([1.0, 2.0], [0.0, 1.0])
    with pytest.raises(ValueError, match=r"losses must have one value per t \(3\)"):
        loss_barrier([1.0, 2.0], [0.0, 0.5, 1.0])
    with pytest.raises(FloatingPointError, match="non-finite loss on the linear path"):
        loss_barrier([1.0, math.inf, 2.0], [0.0, 0.5, 1.0])


def _set(model: nn.Module, w: torch.Tensor) -> None:
    with torch.no_grad():
        for name, sl in param_slices(model).items():
            p = dict(model.named_parameters())[name]
            p.copy_(w[sl].view_as(p))


def test_tracker_follows_a_trajectory_and_survives_a_state_round_trip():
    model = _model()
    batches = digits_batches([24], dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    w0 = flat_parameters(model)
    ws = [
        w0 + 0.1 * k * torch.randn(w0.shape, generator=gen, dtype=torch.float64) for k in range(4)
    ]
    tracker = GeometryTracker(barrier_grid=5)
    ts = np.linspace(0, 1, 5)
    results = []
    for i, w in enumerate(ws):
        if i == 3:  # a resumed run: a fresh tracker from the saved state
            state = tracker.state_dict()
            tracker = GeometryTracker(barrier_grid=5)
            tracker.load_state_dict(state)
        _set(model, w)
        results.append(tracker.update(model, batches, cross_entropy_loss))
    for i, (w, r) in enumerate(zip(ws, results, strict=True)):
        assert r.distance_from_init == pytest.approx(float(torch.linalg.norm(w - w0)), rel=1e-12)
        if i >= 2:
            d1, d2 = w - ws[i - 1], ws[i - 1] - ws[i - 2]
            cos = float(d1 @ d2 / (torch.linalg.norm(d1) * torch.linalg.norm(d2)))
            assert r.cosine_successive_updates == pytest.approx(cos, rel=1e-12)
        else:
            assert r.cosine_successive_updates is None
        anchors = {"init": ws[0], "previous": ws[i - 1] if i else None}
        expected = {k: a for k, a in anchors.items() if a is not None and not torch.equal(a, w)}
        assert set(r.mode_connectivity) == set(r.barrier) == set(expected)
        for name, a in expected.items():
            losses = [_reference_loss(model, (1 - t) * w + t * a, batches) for t in ts]
            mean_end = 0.5 * (losses[0] + losses[-1])
            gaps = [mean_end - v for v in losses[1:-1]]
            assert r.mode_connectivity[name] == pytest.approx(
                gaps[int(np.argmax(np.abs(gaps)))], rel=1e-9, abs=1e-12
            )
            excess = [
                v - ((1 - t) * losses[0] + t * losses[-1]) for t, v in zip(ts, losses, strict=True)
            ]
            assert r.barrier[name] == pytest.approx(max(excess), rel=1e-9, abs=1e-12)
    assert torch.equal(tracker.w0, ws[0]) and torch.equal(tracker.w_prev, ws[-1])


def test_a_failed_update_leaves_the_state_where_it_was():
    model = _model()
    tracker = GeometryTracker(barrier_anchors=("init",))
    tracker.update(model, digits_batches([8], dtype=torch.float64), cross_entropy_loss)
    state = {k: None if v is None else v.clone() for k, v in tracker.state_dict().items()}
    _set(model, flat_parameters(model) + 1.0)
    nan_loss = lambda m, b: torch.tensor(float("nan"))  # noqa: E731
    with pytest.raises(FloatingPointError):
        tracker.update(model, digits_batches([8], dtype=torch.float64), nan_loss)
    for key, value in tracker.state_dict().items():
        assert (value is None and state[key] is None) or torch.equal(value, state[key])


def test_tracker_refuses_bad_arguments():
    with pytest.raises(ValueError, match="barrier_grid must be a positive integer; got 0"):
        GeometryTracker(barrier_grid=0)
    with pytest.raises(
        ValueError, match=r"barrier_grid must be at least 3 \(endpoints \+ one\); got 2"
    ):
        GeometryTracker(barrier_grid=2)
    with pytest.raises(ValueError, match="barrier_anchors must be a subset of"):
        GeometryTracker(barrier_anchors="init")
    with pytest.raises(ValueError, match="barrier_anchors must be a subset of"):
        GeometryTracker(barrier_anchors=("init", "start"))
