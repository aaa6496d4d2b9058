"""LightningModules and loaders for the callback tests (importable by ddp_spawn children)."""

from __future__ import annotations

import atexit

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tests._reference import digits_data


class DigitsModule(L.LightningModule):
    """A plain classifier that logs in training_step (the monitor must silence that)."""

    def __init__(
        self,
        hidden: int = 16,
        lr: float = 0.2,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Linear(64, hidden), nn.Tanh()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, 10))
        self.net = nn.Sequential(*layers).to(dtype)
        self.lr = lr
        self.log_calls = 0
        self.step_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def log(self, *args, **kwargs) -> None:  # counts what reaches Lightning's logging
        self.log_calls += 1
        super().log(*args, **kwargs)

    def training_step(self, batch, batch_idx):
        self.step_calls += 1
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits_dataset(n: int = 512, dtype: torch.dtype = torch.float32) -> TensorDataset:
    X, y = digits_data(dtype)
    return TensorDataset(X[:n], y[:n])


def loader(
    batch_size: int = 32,
    *,
    shuffle: bool = False,
    n: int = 512,
    dtype: torch.dtype = torch.float32,
    distributed: bool = False,
) -> DataLoader:
    ds = digits_dataset(n, dtype)
    if distributed:
        sampler = DistributedSampler(ds, shuffle=False)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler)
    gen = torch.Generator().manual_seed(0) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)


class DistributedDigits(L.LightningDataModule):
    """Each rank gets an explicit DistributedSampler(shuffle=False); built in the worker."""

    def __init__(self, batch_size: int, n: int = 256, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.batch_size, self.n, self.dtype = batch_size, n, dtype

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        return loader(self.batch_size, n=self.n, dtype=self.dtype, distributed=world > 1)

    def setup(self, stage: str) -> None:
        # Lightning destroys the process group at exit for NCCL only. A gloo group left to the
        # interpreter's finalisation can abort a ddp_spawn worker after fit has returned
        # ("terminate called without an active exception": pytorch/pytorch#190489, #65231),
        # which failed one CI run in nine. Destroy it while the interpreter is whole.
        if torch.distributed.is_initialized():
            atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def nan_on_rank1_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy, NaN on rank 1 only (the skip decision must still be symmetric)."""
    x, y = batch
    loss = nn.functional.cross_entropy(model(x), y)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
        loss = loss * float("nan")
    return loss
