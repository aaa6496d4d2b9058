"""The gradient noise scale without a Trainer: GradientNoiseTracker against a float64 loop over the
same formulas, the two-batch estimator against E|g_B|^2 = |G|^2 + tr(Sigma)/B, and the shared
noise-scale formula on its edge cases."""

from __future__ import annotations

import math
import os
import socket
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from lightning_landscape import GradientNoiseTracker
from lightning_landscape.linalg import noise_scale, two_batch_estimate
from tests._tolerances import tolerances

SHAPES = [(3, 4), (4,), (2, 2, 2)]


def _steps(num: int, dtype: torch.dtype, seed: int = 0) -> list[tuple[list[torch.Tensor], int]]:
    """Synthetic per-step gradients (three tensors) and batch sizes; steps 5 and 11 are not
    finite (a skipped GradScaler step), step 17 has gradients on two tensors only."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for t in range(num):
        grads = [torch.randn(s, generator=gen, dtype=dtype) * (1 + t / 10) for s in SHAPES]
        if t == 5:
            grads[1][0] = math.inf
        if t == 11:
            grads[2][1, 0, 0] = math.nan
        if t == 17:
            grads = grads[:2]
        steps.append((grads, int(torch.randint(4, 33, (1,), generator=gen))))
    return steps


def _reference(steps, beta: float, world: int, accumulate: int) -> dict[str, float]:
    """The tracker's formulas by a loop in float64: bias-corrected EMAs of |g|^2 over the finite
    steps and of 1/B over all steps."""
    num = w = inv = inv_w = nonfinite = 0.0
    for grads, b in steps:
        sq = sum(float(g.double().pow(2).sum()) for g in grads)
        inv = beta * inv + (1 - beta) / (b * world * accumulate)
        inv_w = beta * inv_w + (1 - beta)
        if not math.isfinite(sq):
            nonfinite += 1
            continue
        num, w = beta * num + (1 - beta) * sq, beta * w + (1 - beta)
    return {"norm_sq": num / w, "inv_batch": inv / inv_w, "nonfinite": nonfinite}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("buffer_rows", [256, 3])  # 3: the buffer fills and folds mid-run
def test_tracker_matches_loop_reference(dtype, buffer_rows):
    beta, world, accumulate, trace, n = 0.8, 2, 3, 7.5, 40
    steps = _steps(30, dtype)
    tracker = GradientNoiseTracker(beta, buffer_rows=buffer_rows)
    for grads, b in steps:
        tracker.update(grads, batch_size=b, world_size=world, accumulation=accumulate)
    ref = _reference(steps, beta, world, accumulate)
    got = tracker.compute(trace=trace, num_samples=n)
    assert got is not None
    # Per-tensor norms are taken in the gradients' dtype, the rest in float64.
    rel = 16 * tolerances(dtype).eps
    assert got.grad_norm_sq == pytest.approx(ref["norm_sq"], rel=rel)
    assert got.num_nonfinite_steps == ref["nonfinite"] == 2
    assert got.noise_scale == pytest.approx(trace / ref["norm_sq"], rel=rel)
    trace_pop = n / (n - 1) * trace
    signal = ref["norm_sq"] - trace_pop * ref["inv_batch"]
    assert signal > 0
    assert got.noise_scale_unbiased == pytest.approx(trace_pop / signal, rel=rel)
    assert got.grad_norm_sq_local is None and got.trace_two_batch is None
    # Without a trace: the averages only.
    bare = tracker.compute()
    assert bare is not None and bare.noise_scale is None and bare.noise_scale_unbiased is None


def test_state_round_trip_folds_the_buffer_and_continues():
    steps = _steps(20, torch.float64, seed=1)
    whole = GradientNoiseTracker(0.9)
    for grads, b in steps:
        whole.update(grads, batch_size=b)
    first = GradientNoiseTracker(0.9)
    for grads, b in steps[:8]:
        first.update(grads, batch_size=b)
    state = first.state_dict()  # folds the 8 buffered steps
    assert state["ema"]["weight"] > 0 and state["ema_inv_weight"] > 0
    resumed = GradientNoiseTracker(0.9)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    for grads, b in steps[8:]:
        resumed.update(grads, batch_size=b)
    a, b = whole.compute(trace=1.0, num_samples=10), resumed.compute(trace=1.0, num_samples=10)
    assert a is not None and b is not None
    for field in ("grad_norm_sq", "num_nonfinite_steps", "noise_scale", "noise_scale_unbiased"):
        assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-14), field


def test_no_gradients_no_batch_size_and_release():
    tracker = GradientNoiseTracker(0.5)
    tracker.update([], batch_size=8)  # no parameter has a gradient: nothing recorded
    assert tracker.compute() is None
    g = [torch.full((4,), 0.5, dtype=torch.float64)]  # |g|^2 = 1
    tracker.update(g, batch_size=None)
    got = tracker.compute(trace=2.0, num_samples=5)
    assert got is not None and got.grad_norm_sq == pytest.approx(1.0, rel=1e-15)
    assert got.noise_scale == pytest.approx(2.0, rel=1e-15)
    assert math.isnan(got.noise_scale_unbiased)  # no batch size seen: no 1/B
    tracker.update(g, batch_size=4)
    tracker.release()  # a new fit: the unfolded step is dropped, the averages stay
    got = tracker.compute()
    assert got is not None and got.grad_norm_sq == pytest.approx(1.0, rel=1e-15)
    assert tracker.state_dict()["ema_inv_weight"] == pytest.approx(0.5)


def test_noise_scale_formula_and_edge_cases():
    s = noise_scale(3.0, 2.0, num_samples=4, inv_batch=0.25)
    trace_pop = 4 / 3 * 3.0
    assert s.simple == 1.5
    assert s.unbiased == pytest.approx(trace_pop / (2.0 - trace_pop / 4), rel=1e-15)
    # The probe set's own mean gradient (B = N): the textbook |g|^2 - tr(Sigma)/(N - 1).
    s = noise_scale(3.0, 2.0, num_samples=4, inv_batch=1 / 4)
    assert s.unbiased == pytest.approx(4 / 3 * 3.0 / (2.0 - 3.0 / 3), rel=1e-15)
    assert noise_scale(3.0, 0.0, num_samples=4, inv_batch=0.25).simple == math.inf
    assert math.isnan(noise_scale(3.0, 0.5, num_samples=4, inv_batch=0.25).unbiased)  # noisy
    assert math.isnan(noise_scale(3.0, 2.0, num_samples=1, inv_batch=0.25).unbiased)
    assert math.isnan(noise_scale(3.0, 2.0, num_samples=None, inv_batch=0.25).unbiased)
    assert math.isnan(noise_scale(3.0, 2.0, num_samples=4, inv_batch=None).unbiased)


def test_two_batch_estimate_inverts_the_expected_norms_exactly():
    G2, trace = 0.7, 12.0
    small, big = 8, 64
    est = two_batch_estimate(
        G2 + trace / small, G2 + trace / big, inv_batch_small=1 / small, inv_batch_big=1 / big
    )
    eps = tolerances(torch.float64).eps
    assert est.trace == pytest.approx(trace, rel=64 * eps)
    assert est.norm_sq == pytest.approx(G2, rel=64 * eps * trace / G2)
    assert est.noise_scale == pytest.approx(trace / G2, rel=64 * eps * trace / G2)
    # The noise swamps the signal: no noise scale.
    low = two_batch_estimate(20.0, 1.0, inv_batch_small=1.0, inv_batch_big=0.1)
    assert low.norm_sq < 0 and math.isnan(low.noise_scale)


def test_two_batch_estimate_on_gaussian_gradients():
    """Per-sample gradients g_i ~ N(G, Sigma); |g_B|^2 averaged over many batches of each size.
    Converges to tr(Sigma) and |G|^2 within a few standard errors."""
    D, small, big, draws = 16, 4, 32, 4000
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(D, generator=gen, dtype=torch.float64)
    A = torch.randn(D, D, generator=gen, dtype=torch.float64) / math.sqrt(D)
    Sigma = A @ A.T
    moments = {}
    for B in (small, big):
        z = torch.randn(draws, B, D, generator=gen, dtype=torch.float64)
        g_B = (G + z @ A.T).mean(dim=1)
        sq = g_B.pow(2).sum(dim=1).numpy()
        moments[B] = (sq.mean(), sq.std(ddof=1) / math.sqrt(draws))
        exact = float(G @ G) + float(torch.trace(Sigma)) / B
        assert abs(moments[B][0] - exact) <= 5 * moments[B][1]
    est = two_batch_estimate(
        moments[small][0], moments[big][0], inv_batch_small=1 / small, inv_batch_big=1 / big
    )
    gap = 1 / small - 1 / big
    se_trace = math.hypot(moments[small][1], moments[big][1]) / gap
    se_norm = math.hypot(moments[small][1] / big, moments[big][1] / small) / gap
    assert abs(est.trace - float(torch.trace(Sigma))) <= 5 * se_trace
    assert abs(est.norm_sq - float(G @ G)) <= 5 * se_norm
    assert se_trace < 0.1 * float(torch.trace(Sigma))  # the test has power


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": 1.0}, r"decay must be in \(0, 1\); got 1.0"),
        ({"decay": True}, r"decay must be in \(0, 1\); got True"),
        ({"buffer_rows": 0}, "buffer_rows must be a positive integer or None; got 0"),
    ],
)
def test_bad_tracker_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientNoiseTracker(**kwargs)


def test_two_batch_estimate_needs_a_smaller_small_batch():
    with pytest.raises(ValueError, match="inv_batch_small must be greater than inv_batch_big"):
        two_batch_estimate(1.0, 1.0, inv_batch_small=0.1, inv_batch_big=0.1)


def test_attach_ddp_refuses_a_plain_module():
    with pytest.raises(ValueError, match="model must be a DistributedDataParallel wrapper"):
        GradientNoiseTracker().attach_ddp(nn.Linear(2, 2), torch.device("cpu"))


# -- the comm hook, in two processes (no Lightning) ------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Linear(5, 3).double()
        ddp = nn.parallel.DistributedDataParallel(model)
        tracker = GradientNoiseTracker(0.7)
        tracker.attach_ddp(ddp, torch.device("cpu"))
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
        rows = []
        for _ in range(4):
            x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
            local = torch.autograd.grad(model(x).pow(2).mean(), list(model.parameters()))
            ddp.zero_grad()
            ddp(x).pow(2).mean().backward()
            grads = [p.grad for p in model.parameters()]
            tracker.update(grads, batch_size=6, world_size=world)
            rows.append([sum(float(g.pow(2).sum()) for g in gs) for gs in (local, grads)])
        got = tracker.compute()
        assert got is not None
        fields = [got.grad_norm_sq, got.grad_norm_sq_local, got.trace_two_batch]
        torch.save({"rows": rows, "got": fields}, os.path.join(out, f"rank{rank}.pt"))
        del ddp  # the reducer and its comm hook go before the process group they use
    finally:
        torch.distributed.destroy_process_group()
    # Results are on disk (the parent checks both ranks' files): leave without the interpreter's
    # teardown, where gloo's threads can abort a spawned worker after its work is done
    # ("terminate called without an active exception", pytorch/pytorch#190489). A failure above
    # raises before this line and is reported as one.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.ddp
def test_comm_hook_reads_each_rank_before_the_average():
    world = 2
    with tempfile.TemporaryDirectory() as out:
        # spawn, not fork: a child forked from a parent whose thread pools (OpenMP, W&B's
        # service) are running can deadlock on a lock held by a thread it did not inherit.
        args = (world, _free_port(), out)
        mp.start_processes(_ddp_worker, args=args, nprocs=world, start_method="spawn")
        res = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]
    local = np.mean([np.array(r["rows"])[:, 0] for r in res], axis=0)  # mean over ranks
    big = np.array(res[0]["rows"])[:, 1]
    w = s_loc = s_big = 0.0
    for a, b in zip(local, big, strict=True):
        w, s_loc, s_big = 0.7 * w + 0.3, 0.7 * s_loc + 0.3 * a, 0.7 * s_big + 0.3 * b
    small, large = s_loc / w, s_big / w
    trace = (small - large) / (1 / 6 - 1 / 12)
    for r in res:  # every rank computes the same
        np.testing.assert_allclose(r["got"], [large, small, trace], rtol=1e-12)
