"""per_sample_gradients against per-sample gradients computed one sample at a time in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_landscape.linalg.covariance as covariance_module
from lightning_landscape.linalg import per_sample_gradients
from lightning_landscape.linalg.per_sample import per_sample_gradients as direct
from lightning_landscape.linalg.per_sample import per_sample_problems
from tests._reference import cross_entropy_loss, digits_batches, make_mlp


def _loop_rows(model: nn.Module, batch, *, inside_batch: bool = False) -> torch.Tensor:
    """One gradient per sample by a python loop: of its own loss, or (``inside_batch``) of its
    term of the per-sample losses of the whole batch (batch norm in train mode)."""
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = batch
    rows = []
    for i in range(len(x)):
        if inside_batch:
            loss = nn.functional.cross_entropy(model(x), y, reduction="none")[i]
        else:
            loss = cross_entropy_loss(model, (x[i : i + 1], y[i : i + 1]))
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _outputs(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    return model(batch[0]), batch[1]


@pytest.mark.parametrize("per_sample", ["vmap", "outputs", "auto"])
def test_matches_loop_in_chunks(per_sample):
    model = make_mlp(hidden=8, seed=3).double().eval()
    (batch,) = digits_batches([20], torch.float64)
    rows = per_sample_gradients(
        model, cross_entropy_loss, batch, chunk_size=3, per_sample=per_sample, outputs_fn=_outputs
    )
    torch.testing.assert_close(rows, _loop_rows(model, batch), atol=1e-14, rtol=1e-12)


def test_gram_route_writes_the_rows_into_its_matrix_and_matches_the_loop(monkeypatch):
    """The covariance's Gram route has the vmap path write each chunk of per-sample gradients
    straight into its (N, D) matrix: the rows are the loop's, and no chunk is copied again."""
    model = make_mlp(hidden=8, seed=3).double().eval()
    batches = digits_batches([7, 6], torch.float64)
    seen: list[torch.Tensor] = []
    real = covariance_module._centre_and_gram

    def spy(G):
        seen.append(G.clone())
        return real(G)

    monkeypatch.setattr(covariance_module, "_centre_and_gram", spy)
    copies = []
    real_setitem = torch.Tensor.__setitem__

    def counting(self, key, value):
        if isinstance(value, torch.Tensor) and value.dim() == 2 and self.dim() == 2:
            copies.append(value.shape)
        return real_setitem(self, key, value)

    monkeypatch.setattr(torch.Tensor, "__setitem__", counting)
    covariance_module.gradient_covariance(
        model, cross_entropy_loss, batches, method="gram", per_sample="vmap", chunk_size=4
    )
    monkeypatch.undo()
    expected = torch.cat([_loop_rows(model, b) for b in batches])
    torch.testing.assert_close(seen[0], expected, atol=1e-14, rtol=1e-12)
    # Only the first chunk (computed while choosing the path) is copied in; the rest are
    # written in place: chunks of 4 over batches of 7 and 6 make 4 chunks, 1 copy.
    assert len(copies) == 1, copies


def test_batchnorm_in_train_mode_takes_the_outputs_path_with_a_notice():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 10))
    model = model.double().train()
    (batch,) = digits_batches([10], torch.float64)
    with pytest.warns(RuntimeWarning, match="outputs_fn"):
        rows = per_sample_gradients(model, cross_entropy_loss, batch, outputs_fn=_outputs)
    reference = _loop_rows(model, batch, inside_batch=True)
    torch.testing.assert_close(rows, reference, rtol=1e-10, atol=1e-13)


def test_restricted_parameters_and_the_old_import_path():
    model = make_mlp(hidden=4, seed=1).double()
    (batch,) = digits_batches([5], torch.float64)
    last = list(model[2].parameters())
    rows = per_sample_gradients(model, cross_entropy_loss, batch, params=last)
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in last))
    torch.testing.assert_close(rows, _loop_rows(model, batch), atol=1e-14, rtol=1e-12)
    # Moved out of linalg/covariance.py; still importable from there.
    assert covariance_module.per_sample_gradients is direct is per_sample_gradients


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"per_sample": "loop"}, "per_sample must be 'auto', 'vmap' or 'outputs'; got 'loop'"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer or None; got 0"),
        ({"params": []}, "params: no trainable parameters"),
    ],
)
def test_bad_options_raise(kwargs, match):
    model = make_mlp(hidden=4, seed=1).double()
    (batch,) = digits_batches([5], torch.float64)
    with pytest.raises(ValueError, match=match):
        per_sample_gradients(model, cross_entropy_loss, batch, **kwargs)


class _NoForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)


def test_per_sample_problems_names_the_path_that_fails():
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    mlp = nn.Linear(4, 3)

    def loss(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    assert per_sample_problems(mlp, loss, (x, y)) == {"vmap": None, "outputs": None}
    # No forward: single-sample calls through the submodule work, the default outputs do not.
    no_forward = _NoForward()

    def sub_loss(model, batch):
        return nn.functional.cross_entropy(model.lin(batch[0]), batch[1])

    got = per_sample_problems(no_forward, sub_loss, (x, y))
    assert got["vmap"] is None and got["outputs"].startswith("NotImplementedError")
    # A dict batch: the default outputs need (inputs, targets); no loss_fn: no vmap path.
    got = per_sample_problems(mlp, None, {"x": x, "y": y})
    assert got["vmap"] == "no loss_fn" and "(inputs, targets)" in got["outputs"]
    # Logits per token: the per-sample losses have the wrong length.
    got = per_sample_problems(
        mlp, loss, (x, y), outputs_fn=lambda m, b: (m(b[0]).repeat(2, 1), b[1].repeat(2))
    )
    assert got["vmap"] is None and "vector of the 6 per-sample losses" in got["outputs"]
    # .grad is never written.
    assert all(p.grad is None for p in [*mlp.parameters(), *no_forward.parameters()])


class _Attention(nn.Module):
    """One attention layer: ``scaled_dot_product_attention`` on CPU has no vmap batching rule
    for its flash kernel, so torch loops over it and warns "performance drop"."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.head = nn.Linear(6, 18), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)  # (n, heads=1, T, d)
        out = nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1)
        return self.head(out.mean(dim=-2))


def test_vmap_fallback_notice_of_torch_is_not_passed_on(recwarn):
    """Where vmap loops over an operator it has no batching rule for, the applicability check
    (on the kernels the measurement will use) and the per-sample gradients (the loop's) give
    no "performance drop" warning from torch: nothing a user can act on, and the
    measurement is timed anyway."""
    model = _Attention().eval()
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(5, 4, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen))
    assert per_sample_problems(model, cross_entropy_loss, batch)["vmap"] is None
    rows = per_sample_gradients(model, cross_entropy_loss, batch, per_sample="vmap")
    torch.testing.assert_close(rows, _loop_rows(model, batch), atol=1e-5, rtol=1e-4)
    assert not [w for w in recwarn if "performance drop" in str(w.message)]
