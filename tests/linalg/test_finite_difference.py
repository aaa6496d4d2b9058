"""Finite-difference Hessian-vector products and the automatic fallback to them.

References are exact: dense float64 Hessians from ``torch.func`` of the same function written
with twice-differentiable ops. The documented accuracy of a central difference with
``h = eps^(1/3) (1 + ||theta||) / ||v||`` is ``O(eps^(2/3)) ||H|| ||v||``; the tests hold it to
``eps^(2/3) ||H|| ||v||`` (constant 1; measured 0.1 on these models).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_landscape.linalg import HessianOperator, hessian_spectrum
from lightning_landscape.linalg.operators import finite_difference_step, missing_double_backward
from tests._reference import (
    cast_batch,
    cross_entropy_loss,
    dense_hessian,
    digits_batches,
    make_mlp,
    spectral_norm,
)

F64 = torch.float64
SIZES = [50, 30, 7]
TOL_EIG = 1e-9  # Lanczos tolerance (relative to ||H||) for the eigenvalue comparisons


def _fd_bound(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps ** (2.0 / 3.0)


def _assert_eigenvalues_close(theta: np.ndarray, H: Tensor) -> None:
    """Weyl: the finite-difference operator is H + E with ||E|| <= eps^(2/3) ||H||; Lanczos adds
    at most tol ||H|| on top."""
    exact = np.linalg.eigvalsh(H.numpy())[::-1][: len(theta)]
    bound = (TOL_EIG + _fd_bound(F64)) * spectral_norm(H)
    err = np.abs(np.asarray(theta) - exact).max()
    assert err <= bound, f"{theta} vs {exact}: {err:.2e} > {bound:.2e}"


def _vectors(num: int, dim: int, seed: int) -> Tensor:
    return torch.randn(num, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rel_errors(HV: Tensor, HV_ref: Tensor, V: Tensor, scale: float) -> Tensor:
    err = torch.linalg.vector_norm(HV.double() - HV_ref, dim=1)
    return err / (scale * torch.linalg.vector_norm(V, dim=1))


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bitwise_equal(model: nn.Module, state: dict[str, Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------
# Models whose second derivative autograd cannot take
# --------------------------------------------------------------------------------------------


class _NoBackward(torch.autograd.Function):
    """Scale by 3, with no backward: fine inside a backward, fatal inside a second one."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return 3.0 * x


class _FusedCube(torch.autograd.Function):
    """x**3 with a hand-written backward whose own backward does not exist (a "fused kernel")."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)  # type: ignore[attr-defined]
        return x * x * x

    @staticmethod
    def backward(ctx: object, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return _NoBackward.apply(x * x * g)


class CubeMLP(nn.Module):
    """64 -> 16 -> cube -> 10; ``fused=True`` computes the cube with :class:`_FusedCube`."""

    def __init__(self, fused: bool, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fused = fused
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        z = 0.3 * self.fc1(x)
        z = _FusedCube.apply(z) if self.fused else z**3
        return self.fc2(z)


class FlashAttentionNet(nn.Module):
    """One self-attention layer over 8 pixel tokens; ``flash=True`` calls the CPU flash kernel."""

    def __init__(self, flash: bool, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.flash = flash
        self.embed = nn.Linear(8, 8)
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.reshape(-1, 8, 8))
        q, k, v = self.qkv(h).reshape(-1, 8, 3, 2, 4).permute(2, 0, 3, 1, 4)
        if self.flash:
            a = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        return self.head((h + a.transpose(1, 2).reshape(-1, 8, 8)).reshape(-1, 64))


def _pair(kind: str) -> tuple[nn.Module, nn.Module]:
    """(model autograd cannot differentiate twice, the same function in plain ops)."""
    if kind == "custom_function":
        fused, plain = CubeMLP(fused=True), CubeMLP(fused=False)
    else:
        fused, plain = FlashAttentionNet(flash=True), FlashAttentionNet(flash=False)
    plain.load_state_dict(fused.state_dict())
    return fused.double().eval(), plain.double().eval()


def _batches64() -> list:
    return [cast_batch(b, F64) for b in digits_batches(SIZES)]


# --------------------------------------------------------------------------------------------
# Accuracy of the products
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_finite_difference_products_match_the_dense_hessian(dtype: torch.dtype) -> None:
    model = make_mlp("tanh", seed=0).to(dtype)
    batches = [cast_batch(b, dtype) for b in digits_batches(SIZES)]
    H = dense_hessian(model, cross_entropy_loss, batches)  # float64, same weights
    op = HessianOperator(model, cross_entropy_loss, batches, hvp="finite_difference")
    assert op.hvp == "finite_difference" and not op.retains_graph
    V = _vectors(4, op.dim, seed=1)
    V[1] *= 1e-3  # the step scales with 1/||v||: a short vector is as accurate
    HV = op.matmat(V.to(dtype))
    assert HV.dtype == dtype
    rel = _rel_errors(HV, V @ H, V, spectral_norm(H))
    assert rel.max().item() <= _fd_bound(dtype), f"{rel.tolist()} > {_fd_bound(dtype):.2e}"
    # ... and it is a finite difference, not an exact product in disguise: the error is there.
    if dtype == torch.float32:
        assert rel.max().item() > torch.finfo(dtype).eps


def test_zero_vector_gives_zero_product() -> None:
    model = make_mlp("tanh", seed=0).double()
    op = HessianOperator(model, cross_entropy_loss, _batches64(), hvp="finite_difference")
    assert torch.equal(op.matvec(torch.zeros(op.dim, dtype=F64)), torch.zeros(op.dim, dtype=F64))


def test_products_written_into_a_given_buffer_are_finite_differences_too() -> None:
    """``matmat(V, out=buf)`` on the finite-difference path writes every row of a nan-filled
    buffer (as a reused one may hold): zero for a zero row, the difference quotient elsewhere,
    equal to the products into a fresh tensor."""
    model = make_mlp("tanh", seed=0).double()
    batches = _batches64()
    op = HessianOperator(model, cross_entropy_loss, batches, hvp="finite_difference")
    V = _vectors(3, op.dim, seed=4)
    V[1] = 0.0
    buf = torch.full_like(V, float("nan"))
    HV = op.matmat(V, out=buf)
    assert HV.data_ptr() == buf.data_ptr()  # written in place
    assert torch.equal(HV[1], torch.zeros(op.dim, dtype=F64))
    assert torch.equal(HV, op.matmat(V))
    H = dense_hessian(model, cross_entropy_loss, batches)
    rel = _rel_errors(HV[[0, 2]], V[[0, 2]] @ H, V[[0, 2]], spectral_norm(H))
    assert rel.max().item() <= _fd_bound(F64)


def test_step_follows_the_documented_formula() -> None:
    eps = torch.finfo(torch.float32).eps
    assert finite_difference_step(torch.float32, 3.0, 2.0) == pytest.approx(
        eps ** (1 / 3) * 4.0 / 2.0, rel=1e-12
    )


def test_finite_differences_with_reduce_fn_two_identical_ranks() -> None:
    model = make_mlp("tanh", seed=0).double()
    batches = _batches64()
    H = dense_hessian(model, cross_entropy_loss, batches)
    op = HessianOperator(
        model, cross_entropy_loss, batches, hvp="finite_difference", reduce_fn=lambda t: 2 * t
    )
    V = _vectors(2, op.dim, seed=2)
    rel = _rel_errors(op.matmat(V), V @ H, V, spectral_norm(H))
    assert rel.max().item() <= _fd_bound(F64)


# --------------------------------------------------------------------------------------------
# Weights restored bitwise; cost counted
# --------------------------------------------------------------------------------------------


def test_weights_are_restored_bitwise_and_moved_meanwhile() -> None:
    model = make_mlp("tanh", seed=0)  # float32: the original weights are shifted in place
    batches = digits_batches(SIZES)
    before = _state(model)
    seen: list[Tensor] = []

    def loss_fn(m: nn.Module, batch: tuple) -> Tensor:
        seen.append(m[0].weight.detach().clone())
        return cross_entropy_loss(m, batch)

    op = HessianOperator(model, loss_fn, batches, hvp="finite_difference")
    assert op.model is model
    op.matmat(_vectors(3, op.dim, seed=3).float())
    assert _bitwise_equal(model, before)
    assert any(not torch.equal(w, before["0.weight"]) for w in seen)  # it did perturb them
    # Each product is two probe-set gradients: 3 products x 2 x 3 batches, one product counted
    # per vector in num_hvps.
    assert len(seen) == 3 * 2 * len(SIZES)
    assert op.num_hvps == 3


def test_weights_are_restored_bitwise_when_a_gradient_raises() -> None:
    model = make_mlp("tanh", seed=0)
    before = _state(model)
    calls = [0]

    def loss_fn(m: nn.Module, batch: tuple) -> Tensor:
        calls[0] += 1
        if calls[0] == 5:  # inside the second product's "+h" gradient
            raise ValueError("loss failed mid-product")
        return cross_entropy_loss(m, batch)

    op = HessianOperator(model, loss_fn, digits_batches([20, 20]), hvp="finite_difference")
    with pytest.raises(ValueError, match="loss failed mid-product"):
        op.matmat(_vectors(2, op.dim, seed=4).float())
    assert _bitwise_equal(model, before)


def test_spectrum_num_hvps_counts_finite_difference_products() -> None:
    model = make_mlp("tanh", seed=0).double()
    calls = [0]

    def loss_fn(m: nn.Module, batch: tuple) -> Tensor:
        calls[0] += 1
        return cross_entropy_loss(m, batch)

    batches = _batches64()
    res = hessian_spectrum(
        model,
        loss_fn,
        batches,
        top_k=3,
        density=False,
        trace=False,
        tol=TOL_EIG,
        hvp="finite_difference",
    )
    # One first-order pass for the loss, then two gradients per product.
    assert calls[0] == len(SIZES) * (1 + 2 * res.num_hvps)
    H = dense_hessian(model, cross_entropy_loss, batches)
    _assert_eigenvalues_close(res.eigenvalues, H)


# --------------------------------------------------------------------------------------------
# hvp="auto": double backward, then finite differences when autograd says it cannot
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("custom_function", "must implement either the backward or vjp"),
        ("flash_attention", "derivative for aten::_scaled_dot_product_flash_attention_for_cpu"),
    ],
)
def test_auto_falls_back_to_finite_differences_with_one_notice(kind: str, reason: str) -> None:
    fused, plain = _pair(kind)
    batches = _batches64()
    H = dense_hessian(plain, cross_entropy_loss, batches)
    opts = dict(top_k=3, density=False, trace=False, seed=0, tol=TOL_EIG)
    before = _state(fused)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = hessian_spectrum(fused, cross_entropy_loss, batches, **opts)
    notices = [w for w in caught if "double backward is not available" in str(w.message)]
    assert len(notices) == 1, [str(w.message) for w in caught]
    assert reason in str(notices[0].message)
    assert issubclass(notices[0].category, RuntimeWarning)
    assert _bitwise_equal(fused, before)
    _assert_eigenvalues_close(auto.eigenvalues, H)
    explicit = hessian_spectrum(fused, cross_entropy_loss, batches, hvp="finite_difference", **opts)
    np.testing.assert_allclose(auto.eigenvalues, explicit.eigenvalues, rtol=1e-12)


def test_auto_operator_records_the_reason_and_products_match() -> None:
    fused, plain = _pair("flash_attention")
    batches = _batches64()
    H = dense_hessian(plain, cross_entropy_loss, batches)
    op = HessianOperator(fused, cross_entropy_loss, batches)
    assert op.hvp == "exact" and op.retains_graph
    V = _vectors(3, op.dim, seed=5)
    with pytest.warns(RuntimeWarning, match="double backward is not available"):
        HV = op.matmat(V)
    assert op.hvp == "finite_difference" and not op.retains_graph
    assert "_scaled_dot_product_flash_attention_for_cpu_backward" in (op.fallback_reason or "")
    rel = _rel_errors(HV, V @ H, V, spectral_norm(H))
    assert rel.max().item() <= _fd_bound(F64)
    assert op.num_hvps == 3


def test_exact_raises_autograd_error() -> None:
    fused, _ = _pair("custom_function")
    op = HessianOperator(fused, cross_entropy_loss, _batches64(), hvp="exact")
    with pytest.raises(NotImplementedError, match="must implement either the backward or vjp"):
        op.matvec(_vectors(1, op.dim, seed=6)[0])


def test_auto_does_not_hide_other_errors() -> None:
    model = make_mlp("tanh", seed=0).double()

    def loss_fn(m: nn.Module, batch: tuple) -> Tensor:
        raise RuntimeError("some unrelated failure")

    # retain_graph=False: the constructor calls no loss; the product meets the error.
    op = HessianOperator(model, loss_fn, _batches64(), retain_graph=False)
    with pytest.raises(RuntimeError, match="some unrelated failure"):
        op.matvec(_vectors(1, op.dim, seed=7)[0])
    assert op.hvp == "exact"


def test_missing_double_backward_is_precise() -> None:
    assert missing_double_backward(RuntimeError("derivative for aten::foo is not implemented"))
    assert missing_double_backward(
        RuntimeError(
            "Trying to backward through ns.op.default but no autograd formula was registered."
        )
    )
    assert missing_double_backward(
        RuntimeError(
            "trying to differentiate twice a function that was marked with @once_differentiable"
        )
    )
    assert not missing_double_backward(RuntimeError("CUDA out of memory"))
    assert not missing_double_backward(ValueError("derivative for aten::foo is not implemented"))
    assert not missing_double_backward(RuntimeError("element 0 of tensors does not require grad"))


def test_hvp_argument_is_validated() -> None:
    model = make_mlp("tanh", seed=0).double()
    with pytest.raises(ValueError, match="hvp must be 'exact', 'finite_difference' or 'auto'"):
        HessianOperator(model, cross_entropy_loss, _batches64(), hvp="fd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hvp must be"):
        hessian_spectrum(model, cross_entropy_loss, _batches64(), hvp="double")  # type: ignore
