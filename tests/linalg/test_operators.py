"""HessianOperator and MatrixOperator against exact float64 Hessians built with torch.func."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from lightning_landscape.linalg import HessianOperator, HVPFailedError, MatrixOperator
from tests._reference import (
    block_index,
    cast_batch,
    cross_entropy_loss,
    dense_gradient,
    dense_hessian,
    digits_batches,
    make_cnn,
    make_mlp,
    make_resnet,
    make_transformer,
    reference_hvp,
    spectral_norm,
)
from tests._tolerances import tolerances

F64 = torch.float64
TOL = tolerances(F64)
SIZES = [50, 30, 7]  # unequal on purpose: the mean is sample-weighted, not batch-weighted


def _batches64(sizes: list[int] = SIZES) -> list[tuple[Tensor, Tensor]]:
    return [cast_batch(b, F64) for b in digits_batches(sizes)]


def _vectors(num: int, dim: int, seed: int = 0) -> Tensor:
    return torch.randn(num, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _assert_products_close(HV: Tensor, HV_ref: Tensor, scale: float, tol: float) -> None:
    """Each row: ||Hv - H_ref v|| <= tol * scale * ||v|| (scale ~ ||H||, V has unit-ish rows)."""
    assert HV.shape == HV_ref.shape
    assert HV.dtype == HV_ref.dtype
    err = torch.linalg.vector_norm(HV - HV_ref, dim=-1).max().item()
    assert err <= tol * scale, f"HVP error {err:.3e} > {tol:.1e} * {scale:.3e}"


@pytest.fixture(scope="module")
def mlp64() -> tuple[nn.Module, list, Tensor]:
    model = make_mlp("tanh", seed=0).double()
    batches = _batches64()
    return model, batches, dense_hessian(model, cross_entropy_loss, batches)


# --------------------------------------------------------------------------------------------
# Exact products
# --------------------------------------------------------------------------------------------


def test_matvec_and_matmat_equal_dense_hessian(mlp64) -> None:
    model, batches, H = mlp64
    op = HessianOperator(model, cross_entropy_loss, batches)
    D = H.shape[0]
    assert op.dim == D
    assert op.dtype == F64
    assert op.device == torch.device("cpu")
    V = _vectors(5, D) / D**0.5
    scale = spectral_norm(H) * torch.linalg.vector_norm(V, dim=1).max().item()
    _assert_products_close(op.matvec(V[0]), H @ V[0], scale, TOL.matvec)
    _assert_products_close(op.matmat(V), V @ H, scale, TOL.matvec)
    _assert_products_close(op @ V[0], H @ V[0], scale, TOL.matvec)
    # op @ X with X of shape (D, B): columns are vectors, as for a matrix.
    _assert_products_close(op @ V[:3].T, H @ V[:3].T, scale, TOL.matvec)
    # The batched product is the stack of single products.
    single = torch.stack([op.matvec(v) for v in V])
    _assert_products_close(op.matmat(V), single, scale, TOL.matvec)


def test_unequal_batches_are_weighted_by_sample_count(mlp64) -> None:
    model, batches, H = mlp64
    # The same 87 samples as one batch: the Hessian of the mean loss over all samples.
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    H_one = dense_hessian(model, cross_entropy_loss, [(x, y)])
    scale = spectral_norm(H_one)
    assert torch.linalg.matrix_norm(H - H_one).item() <= TOL.matvec * scale
    # The batch-weighted mean (each batch counts 1/3) is a different matrix: the test can tell.
    H_b = sum(dense_hessian(model, cross_entropy_loss, [b]) for b in batches) / len(batches)
    assert torch.linalg.matrix_norm(H_b - H_one).item() > 1e4 * TOL.matvec * scale

    op = HessianOperator(model, cross_entropy_loss, batches)
    V = _vectors(4, H.shape[0], seed=1) / H.shape[0] ** 0.5
    _assert_products_close(op.matmat(V), V @ H_one, scale, TOL.matvec)
    op_one = HessianOperator(model, cross_entropy_loss, [(x, y)])
    _assert_products_close(op.matmat(V), op_one.matmat(V), scale, TOL.matvec)


def test_gradient_and_loss_are_the_sample_weighted_mean(mlp64) -> None:
    model, batches, _ = mlp64
    op = HessianOperator(model, cross_entropy_loss, batches)
    g_ref, loss_ref = dense_gradient(model, cross_entropy_loss, batches)
    g = op.gradient()
    assert g.shape == g_ref.shape
    assert (
        torch.linalg.vector_norm(g - g_ref).item()
        <= TOL.matvec * torch.linalg.vector_norm(g_ref).item()
    )
    assert abs(op.loss() - loss_ref) <= TOL.matvec * abs(loss_ref)
    assert op.num_hvps == 0  # first-order quantities are not Hessian-vector products


@pytest.mark.parametrize("retain_graph", [True, False, "auto"])
def test_retain_graph_settings_give_the_same_products(mlp64, retain_graph) -> None:
    model, batches, H = mlp64
    op = HessianOperator(model, cross_entropy_loss, batches, retain_graph=retain_graph)
    V = _vectors(3, H.shape[0], seed=2) / H.shape[0] ** 0.5
    scale = spectral_norm(H)
    first = op.matmat(V)
    _assert_products_close(first, V @ H, scale, TOL.matvec)
    # Products are repeatable: the retained graph is not consumed by a product.
    _assert_products_close(op.matmat(V), first, scale, TOL.matvec)
    op.release()
    _assert_products_close(op.matmat(V), first, scale, TOL.matvec)
    # The model is left without gradients in .grad.
    assert all(p.grad is None for p in model.parameters())


def test_retained_and_recomputed_graph_agree(mlp64) -> None:
    model, batches, H = mlp64
    V = _vectors(4, H.shape[0], seed=3) / H.shape[0] ** 0.5
    a = HessianOperator(model, cross_entropy_loss, batches, retain_graph=True).matmat(V)
    b = HessianOperator(model, cross_entropy_loss, batches, retain_graph=False).matmat(V)
    scale = spectral_norm(H)
    _assert_products_close(a, b, scale, TOL.matvec)


@pytest.mark.parametrize("as_pairs", [True, False])
def test_params_block_is_the_diagonal_block(mlp64, as_pairs) -> None:
    model, batches, H = mlp64
    names = ["0.bias", "2.weight"]  # non-adjacent, in named_parameters() order
    named = dict(model.named_parameters())
    params = [(n, named[n]) for n in names] if as_pairs else [named[n] for n in names]
    op = HessianOperator(model, cross_entropy_loss, batches, params=params)
    idx = block_index(model, names)
    H_gg = H[idx][:, idx]
    assert op.dim == len(idx) == 32 + 320
    V = _vectors(3, op.dim, seed=4) / op.dim**0.5
    scale = spectral_norm(H_gg)
    _assert_products_close(op.matmat(V), V @ H_gg, scale, TOL.matvec)
    _assert_products_close(op.matvec(V[0]), H_gg @ V[0], scale, TOL.matvec)


def test_block_method_is_the_diagonal_block(mlp64) -> None:
    model, batches, H = mlp64
    op = HessianOperator(model, cross_entropy_loss, batches)
    sub = op.block(["2.weight", "2.bias"])
    idx = block_index(model, ["2.weight", "2.bias"])
    H_gg = H[idx][:, idx]
    V = _vectors(2, sub.dim, seed=5) / sub.dim**0.5
    scale = spectral_norm(H_gg)
    _assert_products_close(sub.matmat(V), V @ H_gg, scale, TOL.matvec)
    assert sub.num_hvps == 2


def test_frozen_parameters_are_left_out() -> None:
    model = make_mlp("tanh", seed=1).double()
    model[0].weight.requires_grad_(False)
    batches = _batches64([40, 9])
    H = dense_hessian(model, cross_entropy_loss, batches)  # trainable parameters only
    op = HessianOperator(model, cross_entropy_loss, batches)
    assert op.dim == H.shape[0] == 32 + 330
    V = _vectors(2, op.dim, seed=6) / op.dim**0.5
    scale = spectral_norm(H)
    _assert_products_close(op.matmat(V), V @ H, scale, TOL.matvec)


class _UnreachedHead(nn.Module):
    """An MLP with a parameter the loss never reaches (its Hessian rows are zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp("tanh", seed=3)
        self.unused = nn.Parameter(torch.ones(17))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@pytest.mark.parametrize("retain_graph", [True, False])
def test_products_written_into_a_given_buffer_equal_the_dense_hessian(retain_graph) -> None:
    """``matmat(V, out=buf)`` writes every entry of the product: a buffer full of nan (as a
    reused one may hold) gives the dense Hessian's product, zeros where the loss does not reach
    the parameters; a buffer that does not fit is ignored."""
    model = _UnreachedHead().double()
    batches = _batches64([40, 9])
    H = dense_hessian(model, cross_entropy_loss, batches)
    op = HessianOperator(model, cross_entropy_loss, batches, retain_graph=retain_graph)
    assert op.accepts_out and op.dim == H.shape[0]
    assert next(model.parameters()) is model.unused
    V = _vectors(3, op.dim, seed=8) / op.dim**0.5
    scale = spectral_norm(H)
    for rows in (1, 3):
        buf = torch.full((rows, op.dim), float("nan"), dtype=F64)
        HV = op.matmat(V[:rows], out=buf)
        assert HV.data_ptr() == buf.data_ptr()  # written in place, not a new tensor
        assert bool(torch.isfinite(HV).all())
        assert bool((HV[:, :17] == 0).all())  # ``unused`` comes first in parameters()
        _assert_products_close(HV, V[:rows] @ H, scale, TOL.matvec)
    X = V[:1].clone()  # the input itself is never written into
    HX = op.matmat(X, out=X)
    assert HX.data_ptr() != X.data_ptr() and torch.equal(X, V[:1])
    _assert_products_close(HX, V[:1] @ H, scale, TOL.matvec)
    wrong = torch.full((2, op.dim), float("nan"), dtype=F64)  # a shape that does not fit
    HV = op.matmat(V[:1], out=wrong)
    assert HV.data_ptr() != wrong.data_ptr() and bool(torch.isnan(wrong).all())
    _assert_products_close(HV, V[:1] @ H, scale, TOL.matvec)


def test_num_hvps_counts_vectors() -> None:
    model = make_mlp("relu", seed=2).double()
    batches = _batches64([20, 11])
    for op in (
        HessianOperator(model, cross_entropy_loss, batches),
        MatrixOperator(torch.eye(2410, dtype=F64)),
    ):
        assert op.num_hvps == 0
        V = _vectors(5, op.dim, seed=7)
        op.matvec(V[0])
        assert op.num_hvps == 1
        op.matmat(V)
        assert op.num_hvps == 6
        _ = op @ V[0]
        assert op.num_hvps == 7
        _ = op @ V[:3].T
        assert op.num_hvps == 10


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


def test_cnn_with_batchnorm_in_eval_mode() -> None:
    model = make_cnn(seed=0, eval_mode=True).double()
    bn = model.bn
    # Running statistics were updated by train-mode passes: eval mode uses them, not batch stats.
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches64()
    H = dense_hessian(model, cross_entropy_loss, batches)
    op = HessianOperator(model, cross_entropy_loss, batches)
    V = _vectors(3, op.dim, seed=8) / op.dim**0.5
    scale = spectral_norm(H)
    _assert_products_close(op.matmat(V), V @ H, scale, TOL.matvec)
    assert not model.training and not bn.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k


def test_residual_network() -> None:
    model = make_resnet(seed=0).double()
    batches = _batches64()
    H = dense_hessian(model, cross_entropy_loss, batches)
    op = HessianOperator(model, cross_entropy_loss, batches)
    V = _vectors(3, op.dim, seed=9) / op.dim**0.5
    scale = spectral_norm(H)
    _assert_products_close(op.matmat(V), V @ H, scale, TOL.matvec)


def _sdpa_state() -> tuple:
    b = torch.backends.cuda
    return (
        b.flash_sdp_enabled(),
        b.mem_efficient_sdp_enabled(),
        b.math_sdp_enabled(),
        b.cudnn_sdp_enabled(),
        tuple(torch._C._get_sdp_priority_order()),
    )


def _set_sdpa_state(state: tuple) -> None:
    b = torch.backends.cuda
    b.enable_flash_sdp(state[0])
    b.enable_mem_efficient_sdp(state[1])
    b.enable_math_sdp(state[2])
    b.enable_cudnn_sdp(state[3])


@pytest.fixture(scope="module")
def transformer_case() -> tuple[nn.Module, list, Tensor, Tensor]:
    # The dense Hessian of the transformer is slow to build; its exact products with a few
    # vectors (the same torch.func forward-over-reverse, in float64) are the reference.
    model = make_transformer(seed=0).double()
    batches = _batches64([12, 7, 3])
    V = _vectors(3, sum(p.numel() for p in model.parameters()), seed=10)
    V = V / V.shape[1] ** 0.5
    return model, batches, V, reference_hvp(model, cross_entropy_loss, batches, V)


# Flash attention is on by default and is the CPU kernel sdpa picks; its backward has no
# derivative, so a double-backward HVP breaks unless the operator switches to the math kernel.
@pytest.mark.parametrize(
    "user_state",
    [None, (True, True, False, True)],  # torch defaults; a user who turned the math kernel off
    ids=["defaults", "math-disabled"],
)
def test_transformer_encoder_uses_math_attention_and_restores_settings(
    transformer_case, user_state
) -> None:
    model, batches, V, HV_ref = transformer_case
    saved = _sdpa_state()
    try:
        if user_state is not None:
            _set_sdpa_state(user_state)
        before = _sdpa_state()
        op = HessianOperator(model, cross_entropy_loss, batches)
        assert _sdpa_state() == before
        HV = op.matmat(V)
        assert _sdpa_state() == before
        op_re = HessianOperator(model, cross_entropy_loss, batches, retain_graph=False)
        HV_re = op_re.matmat(V[:1])
        assert _sdpa_state() == before
    finally:
        _set_sdpa_state(saved)
    scale = torch.linalg.vector_norm(HV_ref, dim=1).max().item()
    _assert_products_close(HV, HV_ref, scale, TOL.matvec)
    _assert_products_close(HV_re, HV_ref[:1], scale, TOL.matvec)
    assert not model.training


def test_float32_model_products_to_float32_accuracy() -> None:
    model = make_mlp("tanh", seed=3)  # float32 weights
    batches = digits_batches(SIZES)
    H = dense_hessian(model, cross_entropy_loss, batches)  # float64 reference, same weights
    op = HessianOperator(model, cross_entropy_loss, batches)
    assert op.dtype == torch.float32
    V = _vectors(3, op.dim, seed=11) / op.dim**0.5
    HV = op.matmat(V.float())
    assert HV.dtype == torch.float32
    scale = spectral_norm(H)
    tol32 = tolerances(torch.float32)
    _assert_products_close(HV.double(), V @ H, scale, tol32.rounding(op.dim))


def test_dtype_argument_computes_a_float32_model_in_float64() -> None:
    """spec_core.md: HessianOperator(..., dtype=None); dtype=float64 on float32 weights."""
    model = make_mlp("tanh", seed=3)  # float32 weights
    batches = digits_batches(SIZES)  # float32 inputs
    H = dense_hessian(model, cross_entropy_loss, batches)
    op = HessianOperator(model, cross_entropy_loss, batches, dtype=F64)
    assert op.dtype == F64
    V = _vectors(3, op.dim, seed=16) / op.dim**0.5
    _assert_products_close(op.matmat(V), V @ H, spectral_norm(H), TOL.matvec)
    assert model[0].weight.dtype == torch.float32


def test_reduce_fn_two_identical_ranks_give_the_same_hessian(mlp64) -> None:
    """A sum over two ranks holding the same shard is the same mean loss: the same H."""
    model, batches, H = mlp64
    op = HessianOperator(model, cross_entropy_loss, batches, reduce_fn=lambda t: 2 * t)
    V = _vectors(3, H.shape[0], seed=12) / H.shape[0] ** 0.5
    scale = spectral_norm(H)
    _assert_products_close(op.matmat(V), V @ H, scale, TOL.matvec)
    g_ref, loss_ref = dense_gradient(model, cross_entropy_loss, batches)
    assert torch.allclose(op.gradient(), g_ref, rtol=0, atol=TOL.matvec)
    assert op.loss() == pytest.approx(loss_ref, rel=TOL.matvec)


# --------------------------------------------------------------------------------------------
# MatrixOperator
# --------------------------------------------------------------------------------------------


def test_matrix_operator() -> None:
    gen = torch.Generator().manual_seed(13)
    A = torch.randn(40, 40, generator=gen, dtype=F64)
    A = A + A.T
    op = MatrixOperator(A)
    assert (op.dim, op.dtype, op.device) == (40, F64, torch.device("cpu"))
    V = _vectors(4, 40, seed=14)
    assert torch.allclose(op.matvec(V[0]), A @ V[0], rtol=0, atol=TOL.matvec * 40)
    assert torch.allclose(op.matmat(V), V @ A, rtol=0, atol=TOL.matvec * 40)
    assert torch.allclose(op @ V.T, A @ V.T, rtol=0, atol=TOL.matvec * 40)
    assert op.num_hvps == 1 + 4 + 4


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_operator_errors(mlp64) -> None:
    model, batches, _ = mlp64
    with pytest.raises(ValueError, match="retain_graph"):
        HessianOperator(model, cross_entropy_loss, batches, retain_graph="sometimes")
    with pytest.raises(ValueError, match="loss_fn"):
        HessianOperator(model, "not callable", batches)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batches"):
        HessianOperator(model, cross_entropy_loss, [])
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="params"):
        HessianOperator(frozen, cross_entropy_loss, batches)
    with pytest.raises(ValueError, match="params"):
        HessianOperator(model, cross_entropy_loss, batches, params=[nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="params"):
        HessianOperator(frozen, cross_entropy_loss, batches, params=list(frozen.parameters()))
    with pytest.raises(ValueError, match="batch_size_fn"):
        HessianOperator(model, cross_entropy_loss, batches, batch_size_fn=lambda b: 0)
    with pytest.raises(ValueError, match="batch_size_fn"):
        HessianOperator(model, lambda m, b: m(b["x"]).sum(), [{"x": 1.0}])
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        HessianOperator(model, lambda m, b: m(b[0]), batches)

    op = HessianOperator(model, cross_entropy_loss, batches)
    with pytest.raises(ValueError, match="V must have shape"):
        op.matmat(torch.zeros(2, op.dim + 1, dtype=F64))
    with pytest.raises(ValueError, match="v must be 1-D"):
        op.matvec(torch.zeros(1, op.dim, dtype=F64))
    with pytest.raises(ValueError, match="operand must be 1-D or 2-D"):
        _ = op @ torch.zeros(1, op.dim, 1, dtype=F64)
    with pytest.raises(ValueError, match="names"):
        op.block(["no.such.parameter"])
    with pytest.raises(ValueError, match="A must be a square matrix"):
        MatrixOperator(torch.zeros(3, 4))


def test_failure_on_another_rank_raises_on_every_rank(mlp64) -> None:
    """The failure flag travels with the all-reduced product (fake rank 1 ran out of memory)."""
    model, batches, _ = mlp64
    D = sum(p.numel() for p in model.parameters())

    def reduce_other_rank_failed(t: Tensor) -> Tensor:
        t = t.clone()
        if t.numel() > D:  # a packed product: [products..., failed flag]
            t[-1] += 1.0
        return t

    op = HessianOperator(model, cross_entropy_loss, batches, reduce_fn=reduce_other_rank_failed)
    with pytest.raises(HVPFailedError, match="on another rank"):
        op.matvec(torch.ones(D, dtype=F64))


def test_any_failure_of_a_product_still_joins_the_collective(mlp64, monkeypatch) -> None:
    """Not only out of memory: a product that raises on this rank (a loss_fn that fails on
    its shard only) still takes part in the all-reduce, so the other ranks do not wait."""
    model, batches, _ = mlp64
    D = sum(p.numel() for p in model.parameters())
    packed_calls = []

    def reduce_(t: Tensor) -> Tensor:
        if t.numel() > D:
            packed_calls.append(float(t[-1]))
        return t

    op = HessianOperator(model, cross_entropy_loss, batches, reduce_fn=reduce_)

    def boom(V: Tensor) -> Tensor:
        raise ValueError("this shard's loss failed")

    monkeypatch.setattr(op, "_local_matmat", boom)
    with pytest.raises(HVPFailedError, match="here: ValueError: this shard's loss failed"):
        op.matvec(torch.ones(D, dtype=F64))
    assert packed_calls == [1.0]  # joined the collective, carrying the failure flag


def test_graph_that_does_not_fit_on_another_rank_falls_back_to_recomputing(mlp64) -> None:
    model, batches, H = mlp64

    def reduce_(t: Tensor) -> Tensor:
        # The graph-build failure flag is the one-element 0.0 (the sample count is 87):
        # fake a rank 1 that could not hold the graph.
        return t + 1.0 if t.numel() == 1 and t.item() == 0.0 else t

    with pytest.warns(RuntimeWarning, match="did not fit in memory"):
        op = HessianOperator(model, cross_entropy_loss, batches, reduce_fn=reduce_)
    assert not op.retains_graph
    V = _vectors(2, H.shape[0], seed=15) / H.shape[0] ** 0.5
    _assert_products_close(op.matmat(V), V @ H, spectral_norm(H), TOL.matvec)
