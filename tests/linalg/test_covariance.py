"""gradient_covariance against per-sample gradients computed one sample at a time in float64 and a
dense covariance matrix."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from torch import nn

from lightning_landscape.linalg.covariance import gradient_covariance
from tests._reference import cross_entropy_loss, digits_batches, make_mlp


def _loop_gradients(model: nn.Module, batches) -> torch.Tensor:
    """Per-sample gradients by a python loop over single-sample calls."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for x, y in batches:
        for i in range(len(x)):
            loss = cross_entropy_loss(model, (x[i : i + 1], y[i : i + 1]))
            grads = torch.autograd.grad(loss, params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _dense(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    gbar = G.mean(0)
    Gc = G - gbar
    S = Gc.T @ Gc / len(G)
    return S, gbar, torch.linalg.eigvalsh(S).flip(0).numpy()


@pytest.fixture(scope="module")
def problem():
    model = make_mlp(hidden=8, seed=3).double().eval()
    with torch.no_grad():  # a confident wrong class: the mean gradient stands out of the noise
        model[2].bias[0] += 4.0
    batches = digits_batches([20, 13], torch.float64)  # two batches of different sizes
    G = _loop_gradients(model, batches)
    return model, batches, G


@pytest.mark.parametrize("method", ["gram", "lanczos"])
@pytest.mark.parametrize("per_sample", ["vmap", "outputs"])
def test_matches_loop_reference(problem, method, per_sample):
    model, batches, G = problem
    S, gbar, exact = _dense(G)
    N = len(G)
    r = gradient_covariance(
        model,
        cross_entropy_loss,
        batches,
        top_k=6,
        method=method,
        per_sample=per_sample,
        return_eigenvectors=True,
        chunk_size=7,
    )
    assert r.method == method and r.per_sample == per_sample
    assert r.num_samples == N and r.num_params == G.shape[1]
    np.testing.assert_allclose(r.eigenvalues, exact[:6], rtol=1e-10)
    trace = float(((G - gbar) ** 2).sum()) / N
    gnorm2 = float(gbar @ gbar)
    assert r.trace == pytest.approx(trace, rel=1e-12)
    assert r.mean_gradient_norm == pytest.approx(math.sqrt(gnorm2), rel=1e-12)
    assert r.noise_scale == pytest.approx(trace / gnorm2, rel=1e-12)
    assert gnorm2 > trace / (N - 1)
    unbiased = (N / (N - 1)) * trace / (gnorm2 - trace / (N - 1))
    assert r.noise_scale_unbiased == pytest.approx(unbiased, rel=1e-12)
    with torch.no_grad():
        losses = [cross_entropy_loss(model, (x[i : i + 1], y[i : i + 1])) for x, y in batches
                  for i in range(len(x))]  # fmt: skip
    loss = float(torch.stack(losses).mean())
    assert r.loss == pytest.approx(loss, rel=1e-12)
    # Eigenvectors: unit, and S v = lambda v with the dense matrix.
    V = r.eigenvectors
    assert V is not None and V.shape == (6, G.shape[1])
    lam = torch.as_tensor(r.eigenvalues)
    assert float(torch.linalg.norm(V @ S - lam[:, None] * V)) <= 1e-7 * exact[0]
    torch.testing.assert_close(V @ V.T, torch.eye(6, dtype=V.dtype), atol=1e-8, rtol=0)
    torch.testing.assert_close(r.gradient, gbar, atol=1e-14, rtol=1e-12)
    if method == "lanczos":
        assert r.converged and r.num_products > 0
        assert np.all(np.abs(r.eigenvalues - exact[:6]) <= r.residuals + 1e-12 * exact[0])


def test_auto_picks_gram_for_small_problems_and_lanczos_above_limit(problem):
    model, batches, G = problem
    exact = _dense(G)[2]
    small = gradient_covariance(model, cross_entropy_loss, batches, top_k=3)
    big = gradient_covariance(model, cross_entropy_loss, batches, top_k=3, gram_max_elements=10)
    assert small.method == "gram" and big.method == "lanczos"
    assert small.eigenvectors is None and small.gradient is None
    # Values only: Lanczos stops when the error bound is below tol * ||Sigma|| (tol = 1e-8).
    np.testing.assert_allclose(big.eigenvalues, exact[:3], rtol=1e-7)


def test_top_k_beyond_rank_gives_zeros_and_noisy_mean_gives_nan_unbiased_scale():
    model = make_mlp(hidden=4, seed=1).double()
    batches = digits_batches([5], torch.float64)
    G = _loop_gradients(model, batches)
    exact = _dense(G)[2]
    r = gradient_covariance(model, cross_entropy_loss, batches, top_k=8)
    np.testing.assert_allclose(r.eigenvalues[:4], exact[:4], rtol=1e-10)
    assert np.all(np.abs(r.eigenvalues[4:]) <= 1e-12 * exact[0])  # rank <= N - 1 = 4
    # At initialisation the noise swamps the mean: the unbiased signal estimate is negative.
    model = make_mlp(hidden=8, seed=3).double()
    batches = digits_batches([20, 13], torch.float64)
    S, gbar, _ = _dense(_loop_gradients(model, batches))
    assert float(gbar @ gbar) <= float(torch.trace(S)) / 32
    r = gradient_covariance(model, cross_entropy_loss, batches, top_k=2)
    assert math.isnan(r.noise_scale_unbiased) and np.isfinite(r.noise_scale)


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.fc = nn.Linear(64, 6)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.bn(self.fc(x))))


def test_batchnorm_train_mode_falls_back_to_per_sample_losses_with_a_notice():
    model = _BNNet().double().train()
    batches = digits_batches([12, 10], torch.float64)
    # Reference: gradient of each sample's loss inside its full batch (batch statistics).
    params = list(model.parameters())
    rows = []
    for x, y in batches:
        for i in range(len(x)):
            losses = nn.functional.cross_entropy(model(x), y, reduction="none")
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[i], params)]))
    G = torch.stack(rows)
    exact = _dense(G)[2]
    for method in ("gram", "lanczos"):
        with pytest.warns(RuntimeWarning, match="outputs_fn"):
            r = gradient_covariance(model, cross_entropy_loss, batches, top_k=4, method=method)
        assert r.per_sample == "outputs"
        np.testing.assert_allclose(r.eigenvalues, exact[:4], rtol=1e-9)
    with pytest.raises(ValueError, match="outputs_fn"):
        gradient_covariance(model, cross_entropy_loss, batches, per_sample="vmap")


class _ThreadGroup:
    """A sum-all-reduce among threads: what a process group does, inside one process.

    torch.func transforms are not thread-safe, so only one thread computes at a time: a thread
    holds ``baton`` except while it waits inside a collective.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list[torch.Tensor | None] = [None] * size
        self.barrier = threading.Barrier(size)
        self.baton = threading.Lock()

    def reduce_fn(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.baton.release()
            self.barrier.wait()
            total = sum(s for s in self.slots if s is not None)
            self.barrier.wait()
            self.baton.acquire()
            return total.clone()

        return reduce


def test_data_parallel_shards_equal_one_process(problem):
    model, batches, G = problem
    _, gbar, exact = _dense(G)
    (x0, y0), (x1, y1) = batches
    shards = [[(x0[:10], y0[:10]), (x1[:7], y1[:7])], [(x0[10:], y0[10:]), (x1[7:], y1[7:])]]
    group = _ThreadGroup(2)
    results: list = [None, None]

    def work(rank: int) -> None:
        with group.baton:
            results[rank] = gradient_covariance(
                model,
                cross_entropy_loss,
                shards[rank],
                top_k=5,
                reduce_fn=group.reduce_fn(rank),
                return_eigenvectors=True,
            )

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for r in results:
        assert r is not None and r.method == "lanczos" and r.num_samples == len(G)
        np.testing.assert_allclose(r.eigenvalues, exact[:5], rtol=1e-10)
        trace = float(((G - gbar) ** 2).sum()) / len(G)
        assert r.trace == pytest.approx(trace, rel=1e-12)
        assert r.noise_scale == pytest.approx(trace / float(gbar @ gbar), rel=1e-12)
    torch.testing.assert_close(results[0].eigenvectors, results[1].eigenvectors)


def test_dtype_option_upcasts_a_float32_model(problem):
    _, batches, G = problem
    exact = _dense(G)[2]
    model32 = make_mlp(hidden=8, seed=3).eval()
    with torch.no_grad():
        model32[2].bias[0] += 4.0
    batches32 = [(x.float(), y) for x, y in batches]
    r = gradient_covariance(model32, cross_entropy_loss, batches32, top_k=3, dtype=torch.float64)
    # The float32 weights differ from the float64 ones by rounding only.
    np.testing.assert_allclose(r.eigenvalues, exact[:3], rtol=1e-5)
    assert next(model32.parameters()).dtype == torch.float32


def test_non_finite_loss_raises_floating_point_error(problem):
    model, batches, _ = problem

    def nan_loss(m, b):
        return cross_entropy_loss(m, b) * float("nan")

    for method in ("gram", "lanczos"):
        with pytest.raises(FloatingPointError, match="not finite"):
            gradient_covariance(model, nan_loss, batches, method=method, per_sample="vmap")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_infinite_per_sample_gradient_with_finite_loss_raises(problem, dtype):
    # The Gram route checks only the Gram matrix's diagonal: an infinite entry of one gradient
    # (d sqrt(u)/du at u = 0) must still reach it through the centring.
    model, batches, _ = problem
    model = make_mlp(hidden=8, seed=3).to(dtype).eval()
    batches = [(x.to(dtype), y) for x, y in batches]

    def kinked_loss(m, b):
        w = m[0].weight[0, 0]
        return cross_entropy_loss(m, b) + torch.sqrt(w - w.detach())

    assert math.isfinite(float(kinked_loss(model, batches[0])))
    with pytest.raises(FloatingPointError, match="not finite"):
        gradient_covariance(model, kinked_loss, batches, method="gram", per_sample="vmap")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "top_k must be a positive integer; got 0"),
        ({"top_k": 10**9}, "top_k must be at most the dimension"),
        ({"method": "svd"}, "method must be 'auto', 'gram' or 'lanczos'; got 'svd'"),
        ({"per_sample": "loop"}, "per_sample must be 'auto', 'vmap' or 'outputs'; got 'loop'"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer or None; got 0"),
        ({"gram_max_elements": -1}, "gram_max_elements must be a non-negative integer"),
        ({"dtype": torch.int64}, "dtype must be a floating torch.dtype"),
        ({"method": "gram", "reduce_fn": lambda t: t}, "method='gram' is single-process only"),
    ],
)
def test_bad_options_raise(problem, kwargs, match):
    model, batches, _ = problem
    with pytest.raises(ValueError, match=match):
        gradient_covariance(model, cross_entropy_loss, batches, **kwargs)


def test_empty_batches_and_bad_loss_fn_raise(problem):
    model, batches, _ = problem
    with pytest.raises(ValueError, match="batches must hold at least one batch"):
        gradient_covariance(model, cross_entropy_loss, [])
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        gradient_covariance(model, "ce", batches)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss_fn is required with per_sample='vmap'"):
        gradient_covariance(model, None, batches, per_sample="vmap")


def test_covariance_route_follows_the_documented_rule():
    from lightning_landscape.linalg.covariance import covariance_route

    assert covariance_route(10, 100, gram_max_elements=1000) == "gram"
    assert covariance_route(10, 101, gram_max_elements=1000) == "lanczos"
    assert covariance_route(10, 100, gram_max_elements=1000, distributed=True) == "lanczos"
    assert covariance_route(10**6, 10**6, method="gram") == "gram"


def test_lanczos_stops_once_the_krylov_space_holds_the_whole_range():
    """Σ of N samples has rank <= N - 1, so no Krylov space has more than N dimensions: a run
    whose tolerance cannot be met (tol=1e-300 here; in float32, rounding) stops after N + 1 products
    (it used to run to its default 120 steps on restarts in the null space), exact."""
    model = make_mlp(hidden=4, seed=1).double()
    batches = digits_batches([5], torch.float64)
    exact = _dense(_loop_gradients(model, batches))[2]
    r = gradient_covariance(
        model, cross_entropy_loss, batches, top_k=3, method="lanczos", tol=1e-300
    )
    assert r.num_products == 5 + 1
    np.testing.assert_allclose(r.eigenvalues, exact[:3], rtol=1e-10)
    # top_k beyond the rank: the nonzero eigenvalues, then zeros.
    r = gradient_covariance(model, cross_entropy_loss, batches, top_k=8, method="lanczos")
    np.testing.assert_allclose(r.eigenvalues[:4], exact[:4], rtol=1e-10)
    assert np.all(np.abs(r.eigenvalues[4:]) <= 1e-12 * exact[0])
