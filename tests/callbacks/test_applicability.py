"""Defaults that cannot apply to a module are found at fit start, on the first probe batch.

A default that does not apply (no ``forward``, batches that are not ``(inputs, targets)``,
outputs that are not logits) switches that part of the monitor off with one warning naming what
to pass; the rest goes on and training is bitwise unchanged. An ``outputs_fn`` the user passed
that does not apply raises before the first step.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.lstm import LightningLSTM, SimpleLSTM
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import GradientCovarianceMonitor, InPCAMonitor
from lightning_landscape.dashboard.writer import _reset_warn_once
from tests.callbacks._events import load_events, scalar_series
from tests.callbacks._models import DigitsModule, digits_dataset, loader

VOCAB, SEQ = 12, 5


class SmallLSTM(LightningLSTM):
    """Lightning's LSTM demo, small: no ``forward`` (training_step calls ``self.model``) and a
    hidden state carried from one training step to the next."""

    def __init__(self) -> None:
        super().__init__(vocab_size=VOCAB)
        torch.manual_seed(0)
        self.model = SimpleLSTM(vocab_size=VOCAB, ninp=6, nhid=6, nlayers=1, dropout=0.0)

    def prepare_data(self) -> None:  # the demo downloads WikiText-2 here
        pass


def _lstm_loader() -> DataLoader:
    x = torch.randint(0, VOCAB, (48, SEQ), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, torch.roll(x, -1, dims=1)), batch_size=8)


def _lstm_outputs(model, batch):  # (B*T, V) log-probabilities and (B*T,) targets
    x, y = batch
    return model.model(x, model.model.init_hidden(x.size(0)))[0], y.reshape(-1)


def _weights(module: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in module.state_dict().values()]


def _ours(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "Monitor:" in str(w.message)]


def _fit(make_trainer, root, module, data, callbacks, max_steps=5):
    trainer = make_trainer(callbacks, max_steps=max_steps, root=root, log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, data)
    assert trainer.global_step == max_steps
    return _ours(record)


def test_lstm_without_forward_switches_the_default_parts_off(tmp_path, make_trainer):
    _reset_warn_once()
    L.seed_everything(0)
    plain = SmallLSTM()
    _fit(make_trainer, tmp_path / "plain", plain, _lstm_loader(), [])
    L.seed_everything(0)
    module = SmallLSTM()
    gradient = GradientCovarianceMonitor(every_n_steps=2, top_k=2)
    inpca = InPCAMonitor(every_n_steps=2)
    ours = _fit(make_trainer, tmp_path / "mon", module, _lstm_loader(), [gradient, inpca])
    # One line each, at fit start, saying what to pass; no skip warnings afterwards.
    assert len(ours) == 2, ours
    assert "GradientCovarianceMonitor" in ours[0] and "InPCAMonitor" in ours[1]
    assert all("outputs_fn=" in w for w in ours) and "loss_fn=" in ours[0]
    assert "forward" in ours[0] and "forward" in ours[1]
    assert gradient.num_measurements == gradient.skipped == 0
    assert inpca.skipped == 0 and inpca.num_measurements == 4  # geometry at 0, 2, 4, 5
    for a, b in zip(_weights(plain), _weights(module), strict=True):
        assert torch.equal(a, b)
    acc = load_events(str(tmp_path / "mon"))
    tags = acc.Tags()["scalars"]
    assert "landscape/gradient/train_grad_norm_sq" in tags  # the training-step signal goes on
    assert "landscape/gradient/trace" not in tags
    assert "landscape/inpca/progress" not in tags
    assert sorted(scalar_series(acc, "landscape/geometry/distance_from_init")) == [0, 2, 4, 5]


class DictBatches(DigitsModule):
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["x"]), batch["y"])


class TupleForward(DigitsModule):
    def forward(self, x):
        return self.net(x), x.norm(dim=1)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0])[0], batch[1])


class DictForward(DigitsModule):
    def forward(self, x):
        return {"logits": self.net(x)}

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0])["logits"], batch[1])


def _dict_loader() -> DataLoader:
    return DataLoader([{"x": x, "y": y} for x, y in digits_dataset(128)], batch_size=16)


@pytest.mark.parametrize(
    ("module_cls", "why"),
    [
        (DictBatches, "needs (inputs, targets) batches"),
        (TupleForward, "tuple"),
        (DictForward, "dict"),
    ],
)
def test_inapplicable_default_outputs_leave_the_rest_on(tmp_path, make_trainer, module_cls, why):
    _reset_warn_once()
    data = _dict_loader() if module_cls is DictBatches else loader(16, n=128)
    gradient = GradientCovarianceMonitor(every_n_steps=2, top_k=2, num_probe_batches=2)
    inpca = InPCAMonitor(every_n_steps=2, num_probe_batches=2, geometry=False)
    ours = _fit(make_trainer, tmp_path, module_cls(hidden=8), data, [gradient, inpca], 4)
    assert len(ours) == 1 and "InPCAMonitor" in ours[0] and "outputs_fn=" in ours[0], ours
    assert why in ours[0]
    # The per-sample gradients come from single-sample calls of training_step: outputs_fn is
    # not needed there, and the covariance is measured at 0, 2, 4.
    assert gradient.num_measurements == 3 and gradient.skipped == 0
    assert inpca.skipped == 0 and not inpca._predictions_enabled
    assert "landscape/inpca/progress" not in load_events(str(tmp_path)).Tags()["scalars"]


def test_a_users_outputs_fn_that_cannot_apply_raises_before_the_first_step(tmp_path, make_trainer):
    # Logits per token, not per sample: the per-sample losses have the wrong length.
    gradient = GradientCovarianceMonitor(every_n_steps=2, top_k=2, outputs_fn=_lstm_outputs)
    trainer = make_trainer([gradient], max_steps=4, root=tmp_path / "g")
    with pytest.raises(ValueError, match=r"outputs_fn must return .*per-sample losses"):
        trainer.fit(SmallLSTM(), _lstm_loader())
    assert trainer.global_step == 0
    inpca = InPCAMonitor(every_n_steps=2, outputs_fn=lambda model, batch: (model(batch[0]), None))
    trainer = make_trainer([inpca], max_steps=4, root=tmp_path / "i")
    with pytest.raises(ValueError, match=r"InPCAMonitor: outputs_fn must return"):
        trainer.fit(DigitsModule(hidden=8), loader(16, n=64))
    assert trainer.global_step == 0


def test_the_lstm_measured_with_the_outputs_fn_the_warning_asks_for(tmp_path, make_trainer):
    def per_sample_nll(logp, targets):  # token losses, averaged per sequence
        return nn.functional.nll_loss(logp, targets, reduction="none").reshape(-1, SEQ).mean(1)

    gradient = GradientCovarianceMonitor(
        every_n_steps=2, top_k=2, outputs_fn=_lstm_outputs, per_sample_loss_fn=per_sample_nll
    )
    ours = _fit(make_trainer, tmp_path, SmallLSTM(), _lstm_loader(), [gradient], 4)
    assert gradient.num_measurements == 3 and gradient.skipped == 0
    assert len(ours) == 1 and "per-sample gradients come from outputs_fn" in ours[0], ours


class NextToken(L.LightningModule):
    """A next-token model with a ``forward``: logits ``(B, T, V)`` (or flattened to
    ``(B*T, V)``, as Lightning's demos return them) for targets ``(B, T)``."""

    def __init__(self, flat: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.flat = flat
        self.embed, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)

    def forward(self, x):
        logits = self.head(torch.tanh(self.embed(x)))
        return logits.reshape(-1, VOCAB) if self.flat else logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("flat", [False, True])
def test_default_outputs_of_a_next_token_model_are_one_sample_per_position(
    tmp_path, make_trainer, flat
):
    """The default ``(model(batch[0]), batch[1])`` of a next-token model applies position by
    position (B*T samples a batch: each position's logits against its target), and the InPCA
    predictions are on, without a notice."""
    from lightning_landscape.callbacks import _context as ctx

    _reset_warn_once()
    module = NextToken(flat)
    x, y = next(iter(_lstm_loader()))
    logits, targets = ctx.default_outputs(module, (x, y))
    assert logits.shape == (x.numel(), VOCAB) and torch.equal(targets, y.reshape(-1))
    assert torch.equal(logits, module(x).reshape(-1, VOCAB))
    inpca = InPCAMonitor(every_n_steps=2, num_probe_batches=2)
    ours = _fit(make_trainer, tmp_path, module, _lstm_loader(), [inpca], 4)
    assert ours == [] and inpca._predictions_enabled and inpca.skipped == 0
    assert "landscape/inpca/progress" in load_events(str(tmp_path)).Tags()["scalars"]


def test_per_position_leaves_other_shapes_to_the_checks():
    from lightning_landscape.callbacks._context import per_position

    logits, labels = torch.zeros(6, 4), torch.zeros(6, dtype=torch.long)
    assert per_position(logits, labels) == (logits, labels)  # a classifier: as it is
    soft = torch.zeros(2, 3)  # float targets (soft labels): not positions
    assert per_position(torch.zeros(2, 3, 4), soft)[1] is soft
    odd = torch.zeros(2, 5, dtype=torch.long)  # 10 targets for 6 rows: left to the checks
    assert per_position(logits, odd) == (logits, odd)
