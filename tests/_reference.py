"""Exact references for the numerical tests, independent of ``lightning_landscape``.

Nothing here imports the package under test: the dense Hessian is built with ``torch.func``
(forward-over-reverse on blocks of identity columns, in float64), spectra come from
``numpy.linalg.eigh`` and distances between spectral measures are integrated exactly.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

LossFn = Callable[[nn.Module, Any], Tensor]

# ---------------------------------------------------------------------------------------------
# Flat parameter vectors
# ---------------------------------------------------------------------------------------------


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters in ``named_parameters()`` order (the package's flat-vector layout)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_slices(model: nn.Module) -> dict[str, slice]:
    """Slice of each trainable parameter in the flat vector."""
    out: dict[str, slice] = {}
    start = 0
    for name, p in trainable_named_parameters(model):
        out[name] = slice(start, start + p.numel())
        start += p.numel()
    return out


def block_index(model: nn.Module, names: Sequence[str]) -> Tensor:
    """Flat indices of the named parameters, concatenated in the order given."""
    slices = param_slices(model)
    return torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for _, p in trainable_named_parameters(model))


def _first_tensor(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        batch = list(batch.values())
    for item in batch:
        if isinstance(item, Tensor):
            return item
    raise TypeError("batch holds no tensor")


def batch_size(batch: Any) -> int:
    return len(_first_tensor(batch))


def cast_batch(batch: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of a (possibly nested) batch cast to ``dtype``; the rest untouched."""
    if isinstance(batch, Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: cast_batch(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(cast_batch(v, dtype) for v in batch)
    return batch


class _LossModule(nn.Module):
    """Lets ``functional_call`` reparametrise a model that ``loss_fn`` calls as ``model(x)``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def _flat_loss(
    model: nn.Module, loss_fn: LossFn, batch: Any, dtype: torch.dtype
) -> tuple[Callable[[Tensor], Tensor], Tensor, list[tuple[str, torch.Size, int]]]:
    """Loss of one batch as a function of the flat float64 parameter vector."""
    copy_ = copy.deepcopy(model).to(dtype)
    wrapper = _LossModule(copy_, loss_fn)
    named = trainable_named_parameters(copy_)
    layout = [(f"model.{n}", p.shape, p.numel()) for n, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named]).to(dtype)
    batch = cast_batch(batch, dtype)

    def f(flat: Tensor) -> Tensor:
        tensors: dict[str, Tensor] = {}
        start = 0
        for name, shape, n in layout:
            tensors[name] = flat[start : start + n].view(shape)
            start += n
        return functional_call(wrapper, tensors, (batch,))

    return f, theta, layout


def reference_hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    V: Tensor,
    dtype: torch.dtype = torch.float64,
    *,
    block_size: int = 256,
) -> Tensor:
    r"""Rows of ``V`` times the Hessian of the sample-weighted mean loss, exactly in ``dtype``.

    .. math:: H = \frac{\sum_b n_b \nabla^2 L_b}{\sum_b n_b}

    with :math:`n_b` the length of the first tensor of batch :math:`b`. Products are
    forward-over-reverse, ``vmap(jvp(grad(f)))``, ``block_size`` rows at a time, on a ``dtype``
    copy of the model (parameters, buffers and floating batch tensors cast), with the math SDPA
    kernel so that attention is twice differentiable. The model itself is not touched.
    """
    batches = list(batches)
    sizes = [batch_size(b) for b in batches]
    total = float(sum(sizes))
    V = V.to(dtype)
    out = torch.zeros_like(V)
    with sdpa_kernel(SDPBackend.MATH):
        for batch, n_b in zip(batches, sizes, strict=True):
            f, theta, _ = _flat_loss(model, loss_fn, batch, dtype)
            grad_f = grad(f)

            def hvp(v: Tensor, grad_f: Callable[[Tensor], Tensor] = grad_f, theta: Tensor = theta):
                return jvp(grad_f, (theta,), (v,))[1]

            for start in range(0, V.shape[0], block_size):
                stop = min(V.shape[0], start + block_size)
                out[start:stop] += (n_b / total) * vmap(hvp)(V[start:stop])
    return out


def dense_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    dtype: torch.dtype = torch.float64,
    *,
    block_size: int = 256,
) -> Tensor:
    """Dense Hessian of the sample-weighted mean loss: :func:`reference_hvp` on identity columns."""
    dim = num_params(model)
    eye = torch.eye(dim, dtype=dtype)
    H = reference_hvp(model, loss_fn, batches, eye, dtype, block_size=block_size)
    # H is symmetric up to rounding; symmetrise so eigh sees exactly what we mean.
    return 0.5 * (H + H.T)


def dense_gradient(
    model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], dtype: torch.dtype = torch.float64
) -> tuple[Tensor, float]:
    """Gradient and value of the sample-weighted mean loss, in ``dtype``."""
    batches = list(batches)
    sizes = [batch_size(b) for b in batches]
    total = float(sum(sizes))
    g = torch.zeros(num_params(model), dtype=dtype)
    value = 0.0
    with sdpa_kernel(SDPBackend.MATH):
        for batch, n_b in zip(batches, sizes, strict=True):
            f, theta, _ = _flat_loss(model, loss_fn, batch, dtype)
            g += (n_b / total) * grad(f)(theta)
            value += (n_b / total) * float(f(theta))
    return g, value


def spectral_norm(A: Tensor, iters: int = 100) -> float:
    """``||A||_2`` of a symmetric matrix by power iteration (a cheap scale for tolerances)."""
    v = torch.ones(A.shape[0], dtype=A.dtype) / A.shape[0] ** 0.5
    norm = 0.0
    for _ in range(iters):
        w = A @ v
        norm = float(torch.linalg.vector_norm(w))
        if norm == 0.0:
            return 0.0
        v = w / norm
    return norm


# ---------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_numpy() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def digits_data(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """sklearn digits: X (1797, 64) scaled to [0, 1], y (1797,) long."""
    X, y = _digits_numpy()
    return torch.from_numpy(X.copy()).to(dtype), torch.from_numpy(y.copy())


def digits_batches(sizes: Sequence[int], dtype: torch.dtype = torch.float32) -> list[tuple]:
    """Consecutive digits batches of the given sizes (a fixed seeded permutation)."""
    X, y = digits_data(dtype)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(1234))
    out = []
    start = 0
    for s in sizes:
        idx = perm[start : start + s]
        out.append((X[idx], y[idx]))
        start += s
    if start > len(X):
        raise ValueError("not enough digits samples")
    return out


def cross_entropy_loss(model: nn.Module, batch: Any) -> Tensor:
    """``loss_fn(model, batch)``: mean cross-entropy of ``model(x)`` against ``y``."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def mse_sum_outputs_loss(model: nn.Module, batch: Any) -> Tensor:
    r"""Squared error summed over outputs, mean over samples: :math:`\frac1N\sum\|Wx-y\|^2`."""
    x, y = batch
    return (model(x) - y).pow(2).sum(dim=1).mean()


def make_mlp(activation: str = "tanh", seed: int = 0, hidden: int = 32) -> nn.Module:
    """64-hidden-10 MLP for digits."""
    torch.manual_seed(seed)
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    return nn.Sequential(nn.Linear(64, hidden), act(), nn.Linear(hidden, 10))


class SmallCNN(nn.Module):
    """Conv -> BatchNorm -> tanh -> avg-pool -> linear, on 1x8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x.view(-1, 1, 8, 8))
        h = F.avg_pool2d(torch.tanh(self.bn(h)), 2)
        return self.head(h.flatten(1))


def make_cnn(seed: int = 0, eval_mode: bool = True) -> nn.Module:
    """SmallCNN whose BatchNorm running statistics are non-trivial (a few train-mode passes)."""
    torch.manual_seed(seed)
    model = SmallCNN()
    X, _ = digits_data()
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(X[i * 100 : (i + 1) * 100])
    if eval_mode:
        model.eval()
    return model


class ResidualNet(nn.Module):
    """Linear -> [x + W2 tanh(W1 x)] -> tanh -> linear."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.block1 = nn.Linear(width, width)
        self.block2 = nn.Linear(width, width)
        self.out = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = h + self.block2(torch.tanh(self.block1(h)))
        return self.out(torch.tanh(h))


def make_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ResidualNet()


class TinyTransformer(nn.Module):
    """The 8 rows of a digit as 8 tokens -> one TransformerEncoderLayer -> mean pool -> linear."""

    def __init__(self, d_model: int = 16, nhead: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.pos = nn.Parameter(0.1 * torch.randn(8, d_model))
        self.encoder = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x.view(-1, 8, 8)) + self.pos
        return self.head(self.encoder(tokens).mean(dim=1))


def make_transformer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyTransformer().eval()


@functools.lru_cache(maxsize=4)
def _trained_mlp_state(seed: int, steps: int, lr: float) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    model = make_mlp("tanh", seed=seed)
    X, y = digits_data()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(X), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained_mlp(seed: int = 0, steps: int = 200, lr: float = 0.5) -> nn.Module:
    """Digits tanh MLP after ``steps`` seeded SGD steps (batch 64), float32 weights."""
    model = make_mlp("tanh", seed=seed)
    model.load_state_dict(_trained_mlp_state(seed, steps, lr))
    return model


class Quadratic(nn.Module):
    r"""A model whose only parameter is :math:`\theta`; loss :math:`\tfrac12\theta^TA\theta`."""

    def __init__(self, A: Tensor, theta: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("A", A)
        init = torch.zeros(A.shape[0], dtype=A.dtype) if theta is None else theta
        self.theta = nn.Parameter(init.clone())

    def forward(self, batch: Any = None) -> Tensor:
        return 0.5 * self.theta @ (self.A @ self.theta)


def quadratic_loss(model: nn.Module, batch: Any) -> Tensor:
    return model(batch)


# ---------------------------------------------------------------------------------------------
# Spectral measures
# ---------------------------------------------------------------------------------------------


def wasserstein1(nodes: Any, weights: Any, eigenvalues: Any) -> float:
    r"""Exact :math:`W_1` between :math:`\sum_j w_j\delta_{x_j}` and the empirical eigenvalue law.

    ``nodes``/``weights`` may be 2-D (one row per probe): the measure is then the average of the
    rows. Weights are normalised to total mass 1. :math:`W_1 = \int |F_\mu - F_\nu|\,dt`,
    integrated exactly between consecutive support points (both CDFs are step functions).
    """
    x = np.asarray(nodes, dtype=np.float64).reshape(-1)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if x.shape != w.shape:
        raise ValueError("nodes and weights must have the same shape")
    if np.any(w < 0):
        raise ValueError("weights must be non-negative")
    w = w / w.sum()
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    support = np.concatenate([x, lam])
    mass = np.concatenate([w, -np.full(lam.size, 1.0 / lam.size)])
    order = np.argsort(support, kind="stable")
    support, mass = support[order], mass[order]
    diff_cdf = np.cumsum(mass)[:-1]
    return float(np.sum(np.abs(diff_cdf) * np.diff(support)))


def grid_measure(grid: Any, density: Any) -> tuple[np.ndarray, np.ndarray]:
    """A density sampled on a grid as a discrete measure with trapezoid weights."""
    grid = np.asarray(grid, dtype=np.float64)
    density = np.asarray(density, dtype=np.float64)
    dx = np.diff(grid)
    w = np.zeros_like(grid)
    w[:-1] += 0.5 * dx * density[:-1]
    w[1:] += 0.5 * dx * density[1:]
    return grid, w


# ---------------------------------------------------------------------------------------------
# Matrices with known spectra
# ---------------------------------------------------------------------------------------------


def random_orthogonal(dim: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(R))).to(dtype)


def matrix_with_spectrum(
    eigenvalues: Any, seed: int | None = 0, dtype: torch.dtype = torch.float64
) -> Tensor:
    """``Q diag(eigenvalues) Q^T`` with a seeded Haar ``Q`` (``seed=None``: diagonal)."""
    lam = torch.as_tensor(np.asarray(eigenvalues, dtype=np.float64))
    if seed is None:
        return torch.diag(lam).to(dtype)
    Q = random_orthogonal(lam.numel(), seed)
    A = (Q * lam) @ Q.T
    return (0.5 * (A + A.T)).to(dtype)


def mp_edges(gamma: float) -> tuple[float, float]:
    """Marchenko–Pastur support of ZZ^T/n, Z (D x n) standard normal, gamma = D/n <= 1."""
    return (1 - math.sqrt(gamma)) ** 2, (1 + math.sqrt(gamma)) ** 2


def bbp_threshold(gamma: float) -> float:
    r"""Smallest additive spike :math:`\theta` that separates from the MP bulk of ZZ^T/n.

    For :math:`W + \theta ee^T` the outlier solves :math:`G(z) = 1/\theta` with
    :math:`G(z)=\int d\mu_{MP}(x)/(z-x)`; :math:`G(\lambda_+) = 1/(\sqrt\gamma(1+\sqrt\gamma))`.
    """
    return math.sqrt(gamma) * (1 + math.sqrt(gamma))


def mp_outlier_location(spike: float, gamma: float) -> float:
    """Limit position of the outlier produced by an additive spike above the BBP threshold."""
    # G(z) = (z - 1 + gamma - sqrt((z - 1 - gamma)^2 - 4 gamma)) / (2 gamma z) = 1 / spike.
    lo, hi = mp_edges(gamma)[1], spike + 10.0 + 10.0 * gamma
    target = 1.0 / spike

    def G(z: float) -> float:
        return (z - 1 + gamma - math.sqrt((z - 1 - gamma) ** 2 - 4 * gamma)) / (2 * gamma * z)

    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if G(mid) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class SpikedMatrix:
    A: Tensor  # (D, D) float64
    eigenvalues: np.ndarray  # exact, descending
    n_outliers: int
    mp_edge: float  # theoretical upper edge of the bulk
    gamma: float
    spikes: tuple[float, ...]


def spiked_matrix(
    dim: int = 1000,
    spikes: Sequence[float] = (4.0, 6.0, 9.0),
    *,
    gamma: float = 0.5,
    seed: int = 0,
) -> SpikedMatrix:
    r"""``diag(spikes, 0, ..., 0) + Z Z^T / n`` with Z (dim x n) standard normal, n = dim / gamma.

    The bulk follows Marchenko–Pastur on :math:`[(1-\sqrt\gamma)^2, (1+\sqrt\gamma)^2]`; every spike
    must exceed the BBP threshold :math:`\sqrt\gamma(1+\sqrt\gamma)` by a wide margin, so the
    number of outliers is ``len(spikes)``. The count is verified on the exact spectrum.
    """
    thr = bbp_threshold(gamma)
    if min(spikes) < 2.0 * thr:
        raise ValueError("spikes must exceed twice the BBP threshold")
    n = round(dim / gamma)
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(dim, n, generator=gen, dtype=torch.float64)
    A = Z @ Z.T / n
    A[range(len(spikes)), range(len(spikes))] += torch.tensor(spikes, dtype=torch.float64)
    A = 0.5 * (A + A.T)
    lam = np.linalg.eigvalsh(A.numpy())[::-1].copy()
    edge = mp_edges(gamma)[1]
    r = len(spikes)
    # The outliers sit far above the edge, the bulk's largest eigenvalue fluctuates around it.
    gap_ok = lam[r - 1] > edge + 0.5 * (min(mp_outlier_location(s, gamma) for s in spikes) - edge)
    if not gap_ok or lam[r] > 1.05 * edge:
        raise AssertionError("spiked matrix does not have the intended outlier structure")
    return SpikedMatrix(A, lam, r, edge, gamma, tuple(float(s) for s in spikes))
