"""What the digits examples share: scikit-learn's digits as tensors and loaders, and a plain MLP.

The data is real and ships with scikit-learn (1,797 8x8 images, 10 classes), so the examples run
offline. The classifier is an ordinary LightningModule: nothing in it refers to the monitors,
which is the point of a drop-in callback.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsClassifier", "digits_loader", "digits_loaders", "digits_split"]


def _digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def digits_split(seed: int = 0, num_train: int = 1500) -> tuple[TensorDataset, TensorDataset]:
    """A seeded split into ``num_train`` training samples and the rest for validation."""
    X, y = _digits_tensors()
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    train, val = perm[:num_train], perm[num_train:]
    return TensorDataset(X[train], y[train]), TensorDataset(X[val], y[val])


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader (seeded by ``seed_everything``) and a validation loader."""
    train, val = digits_split(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True),
        DataLoader(val, batch_size=256),
    )


def digits_loader(batch_size: int = 64, seed: int = 0) -> DataLoader:
    """All 1,797 samples, shuffled by a generator of its own (runs are reproducible)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(*_digits_tensors()), batch_size=batch_size, shuffle=True, generator=gen
    )


class DigitsClassifier(L.LightningModule):
    """An MLP with tanh activations, trained by SGD with momentum (or Adam).

    Args:
        hidden: widths of the hidden layers.
        lr: learning rate.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
    """

    def __init__(
        self, hidden: Sequence[int] = (64, 64), lr: float = 0.1, optimizer: str = "sgd"
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = 64
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self(x).argmax(-1) == y).float().mean()
        self.log("val/acc", acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
