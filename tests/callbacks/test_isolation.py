"""A measurement leaves the module's own state as it found it (what training_step keeps on self).

Unit level: :func:`_context.isolated` against a module whose ``training_step``-like code
reassigns, adds, appends to and writes in place into its attributes. Fit level: final weights
bitwise equal with and without the monitor, on modules that carry state between steps
(Lightning's demo LSTM with its hidden state, a student with an EMA teacher and counters) and
on Lightning's demo modules.
"""

from __future__ import annotations

import pytest
import torch
import torchmetrics
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.demos.lstm import LightningLSTM, SimpleLSTM
from lightning.pytorch.demos.transformer import LightningTransformer, Transformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import HessianSpectrumMonitor
from lightning_landscape.callbacks import _context
from tests.callbacks._models import DigitsModule, loader

VOCAB = 16


class Stateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.teacher = nn.Linear(3, 2).requires_grad_(False)
        self.register_buffer("count", torch.zeros(()))
        self.total = torch.zeros(3)
        self.history: list[int] = [1]
        self.flags = {"seen": False}
        self.hidden = None
        self.metric = torchmetrics.MeanMetric()

    def step(self, x: torch.Tensor) -> torch.Tensor:
        self.hidden = x.detach() * 2
        self.new_attribute = 1
        self.total += x.sum(0).detach()
        self.count += 1
        self.history.append(len(self.history))
        self.flags["seen"] = True
        self.teacher.weight.data.mul_(0.5)
        self.lin.cached = "x"
        self.metric.update(x.sum())
        return self.lin(x).pow(2).sum()


def _snapshot(m: Stateful) -> dict:
    return {
        "hidden": m.hidden,
        "total": m.total.clone(),
        "count": m.count.clone(),
        "history": list(m.history),
        "flags": dict(m.flags),
        "teacher": m.teacher.weight.clone(),
        "metric": m.metric.compute().clone() if m.metric.update_count else None,
    }


def test_isolated_restores_reassigned_added_appended_and_in_place_state():
    torch.manual_seed(0)
    m = Stateful()
    x = torch.randn(4, 3)
    m.step(x)  # some state before the measurement
    m.__dict__.pop("new_attribute")
    del m.lin.cached
    before = _snapshot(m)
    ids = (id(m.total), id(m.history), id(m.flags), id(m.hidden))
    with _context.isolated(m, train_mode=False):
        for _ in range(3):
            m.step(torch.randn(4, 3))
    after = _snapshot(m)
    assert after["hidden"] is before["hidden"]
    for key in ("total", "count", "teacher", "metric"):
        assert torch.equal(after[key], before[key]), key
    assert after["history"] == before["history"] and after["flags"] == before["flags"]
    assert (id(m.total), id(m.history), id(m.flags), id(m.hidden)) == ids
    assert not hasattr(m, "new_attribute") and not hasattr(m.lin, "cached")
    assert m.metric.update_count == 1
    # The same steps without isolation do change it: the check above can fail.
    m.step(x)
    assert m.count.item() != before["count"].item() and len(m.history) != len(before["history"])


def _token_loader(n_batches: int = 6, batch: int = 4, length: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (n_batches * batch, length + 1), generator=gen)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch)


class SmallLSTM(LightningLSTM):
    """Lightning's demo LSTM (hidden state carried across batches on ``self``), smaller."""

    def __init__(self) -> None:
        super().__init__(vocab_size=VOCAB)
        torch.manual_seed(0)
        self.model = SimpleLSTM(vocab_size=VOCAB, ninp=8, nhid=8, nlayers=1, dropout=0.0)

    def prepare_data(self) -> None:  # the demo downloads WikiText-2: synthetic tokens here
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class SmallTransformer(LightningTransformer):
    def __init__(self) -> None:
        super().__init__(vocab_size=VOCAB)
        torch.manual_seed(0)
        self.model = Transformer(vocab_size=VOCAB, ninp=8, nhead=2, nhid=8, nlayers=1)

    def prepare_data(self) -> None:
        pass


class EMATeacher(DigitsModule):
    """A student distilled from an EMA teacher that training_step updates, with counters."""

    def __init__(self) -> None:
        super().__init__(hidden=8)
        self.teacher = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
        self.teacher.load_state_dict(self.net.state_dict())
        self.teacher.requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.seen = torch.zeros(())

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.net.parameters(), strict=True):
                t.data.mul_(0.9).add_(s.data, alpha=0.1)
            soft = self.teacher(x).softmax(-1)
        self.updates += 1
        self.seen += len(x)
        ce = nn.functional.cross_entropy(logits, y)
        kd = -(soft * logits.log_softmax(-1)).sum(-1).mean()
        return ce + (0.5 * kd if self.updates.item() > 2 else 0.0)


class Boring(BoringModel):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(32, 2)


def _boring_loader() -> DataLoader:
    return DataLoader(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)), 4)


CASES = {
    "lstm-hidden-state": (SmallLSTM, _token_loader),
    "ema-teacher": (EMATeacher, lambda: loader(32)),
    "demo-transformer": (SmallTransformer, _token_loader),
    "demo-boring": (Boring, _boring_loader),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_is_bitwise_unchanged_on_stateful_and_demo_modules(tmp_path, make_trainer, case):
    build, data = CASES[case]
    weights, monitors = [], []
    for with_monitor in (False, True):
        module = build()
        cbs = []
        if with_monitor:
            cbs = [
                HessianSpectrumMonitor(
                    every_n_steps=2, top_k=2, density=False, trace=False, max_iter=8
                )
            ]
        make_trainer(cbs, root=tmp_path / str(with_monitor), max_steps=6).fit(module, data())
        weights.append([p.detach().clone() for p in module.parameters()])
        weights[-1] += [b.detach().clone() for b in module.buffers()]
        monitors += cbs
    for a, b in zip(*weights, strict=True):
        assert torch.equal(a, b)
    # The monitor did measure (or, where the kernels have no double backward, skipped).
    assert monitors[0].num_measurements + monitors[0].skipped == 4
