"""The prediction trajectory of one run: predictions on a fixed probe set, checkpoint by
checkpoint, and their growing InPCA embedding (Mao et al., PNAS 2024).

:func:`predict_shard` computes one process's log-probabilities on its probe batches,
:func:`gather_predictions` joins the processes' shards (a ``gather_fn`` passed in, so this module
knows nothing of the distributed backend) and drops the duplicates that DistributedSampler
padding makes, and :class:`PredictionTrajectory` keeps the checkpoints recorded so far with their
Bhattacharyya distance matrix, grown by one row per checkpoint. torch and numpy only: no
Lightning, no TensorBoard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..sampling.predictions import PredictionRecord, sample_ids
from .inpca import (
    InPCA,
    bhattacharyya_distances,
    cross_bhattacharyya_distances,
    inpca,
    progress_coordinate,
)

__all__ = [
    "PredictionSummary",
    "PredictionTrajectory",
    "ProbePredictions",
    "gather_predictions",
    "predict_shard",
]

OutputsFn = Callable[[nn.Module, Any], tuple[Tensor, Tensor]]
GatherFn = Callable[[Tensor], Tensor]


def _shape(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _id_tensor(x: Any, y: Tensor, batch_index: int, device: torch.device) -> Tensor:
    """64-bit content ids of a batch's samples (inputs and label), as an int64 tensor."""
    if isinstance(x, Tensor) and x.ndim >= 1 and x.shape[0] == y.shape[0]:
        hexes = sample_ids(x.detach().cpu().numpy(), y.detach().cpu().numpy())
    else:  # no input tensor to hash: the position in the probe set stands in
        idx = np.stack([np.full(y.shape[0], batch_index), np.arange(y.shape[0])], axis=1)
        hexes = sample_ids(idx, y.detach().cpu().numpy())
    vals = np.array([int(h, 16) for h in hexes], dtype=np.uint64).view(np.int64)
    return torch.as_tensor(vals, device=device)


def _check_outputs(logits: Any, y: Any) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise ValueError(f"logits must be an (n, C) tensor; got {_shape(logits)}")
    if (
        not isinstance(y, Tensor)
        or y.ndim != 1
        or y.shape[0] != logits.shape[0]
        or y.is_floating_point()
    ):
        raise ValueError(
            f"targets must be n integer labels; got {_shape(y)} for logits {tuple(logits.shape)}"
        )


def predict_shard(
    model: nn.Module, batches: Sequence[Any], outputs_fn: OutputsFn
) -> tuple[Tensor, Tensor, Tensor]:
    """One process's predictions on its probe batches.

    Cost: one forward pass per batch (no graph). Memory: n · C float64 numbers for n samples.

    Args:
        model: The module, in the mode the caller chose (eval for deterministic predictions).
        batches: Probe batches.
        outputs_fn: ``outputs_fn(model, batch) -> (logits, targets)``, logits (n, C), integer
            targets (n,).

    Returns:
        ``(logp, targets, ids)`` on the model's device: float64 log-probabilities (n, C), int64
        labels (n,) and int64 content ids (n,): a hash of each sample's input (``batch[0]`` of a
        tuple or list batch) and label, else of its position in the probe set and label.

    Raises:
        ValueError: If ``outputs_fn`` returns anything but (n, C) logits and n integer labels
            (``outputs_fn``'s own errors pass through: the caller decides they mean "does not
            apply").
    """
    logps, targets, ids = [], [], []
    with torch.no_grad():
        for batch in batches:
            logits, y = outputs_fn(model, batch)
            _check_outputs(logits, y)
            logps.append(torch.log_softmax(logits.double(), dim=-1))
            targets.append(y.long())
            x = batch[0] if isinstance(batch, (list, tuple)) else None
            ids.append(_id_tensor(x, y, len(ids), logits.device))
    return torch.cat(logps), torch.cat(targets), torch.cat(ids)


@dataclass(frozen=True, eq=False)
class ProbePredictions:
    """One checkpoint's predictions on the whole probe set (all processes).

    Attributes:
        logp: (N, C) float32 log-probabilities.
        targets: (N,) integer labels.
        ids: (N,) sample ids, 16 hex digits each.
    """

    logp: np.ndarray
    targets: np.ndarray
    ids: np.ndarray

    @property
    def loss(self) -> float:
        """Mean cross-entropy on the probe set."""
        return float(-np.mean(self.logp[np.arange(self.targets.size), self.targets]))

    @property
    def accuracy(self) -> float:
        """Share of probe samples whose most probable class is the label."""
        return float(np.mean(self.logp.argmax(axis=1) == self.targets))


def gather_predictions(
    logp: Tensor, targets: Tensor, ids: Tensor, *, gather_fn: GatherFn | None = None
) -> ProbePredictions:
    """Join the processes' shards of :func:`predict_shard` into one probe set.

    A sample seen by several processes (DistributedSampler pads the last shards with repeats)
    is kept once, at its first position in rank order.

    Args:
        logp: (n, C) log-probabilities of this process.
        targets: (n,) labels.
        ids: (n,) int64 ids.
        gather_fn: Concatenates a tensor's first axis over all processes in rank order (shards
            may differ in length); every process must call it alike. None: one process.

    Returns:
        :class:`ProbePredictions`.

    Raises:
        FloatingPointError: If a log-probability is NaN or +inf (on every process alike: the
            check runs after the gather).
    """
    if gather_fn is not None:
        logp, targets, ids = gather_fn(logp), gather_fn(targets), gather_fn(ids)
    if not torch.isfinite(logp).all():
        raise FloatingPointError("non-finite predictions (NaN or inf logits)")
    sid = ids.cpu().numpy()
    _, first = np.unique(sid, return_index=True)
    keep = np.sort(first)
    return ProbePredictions(
        logp=logp.cpu().numpy()[keep].astype(np.float32),
        targets=targets.cpu().numpy()[keep],
        ids=np.array([f"{v & 0xFFFFFFFFFFFFFFFF:016x}" for v in sid[keep].tolist()]),
    )


@dataclass(frozen=True, eq=False)
class PredictionSummary:
    """The trajectory after its latest checkpoint.

    Attributes:
        num_checkpoints: Checkpoints recorded.
        probe_loss: Mean cross-entropy of the latest checkpoint on the probe set.
        probe_accuracy: Its accuracy.
        progress: Its progress coordinate from the first checkpoint to the labels
            (:func:`~lightning_landscape.embeddings.inpca.progress_coordinate`).
        embedding: InPCA of all checkpoints (None with fewer than 2).
        steps: (num_checkpoints,) step of each checkpoint.
        epochs: (num_checkpoints,) epoch of each.
        losses: (num_checkpoints,) probe loss of each.
    """

    num_checkpoints: int
    probe_loss: float
    probe_accuracy: float
    progress: float
    embedding: InPCA | None
    steps: np.ndarray
    epochs: np.ndarray
    losses: np.ndarray


class PredictionTrajectory:
    """A run's checkpoints in memory: predictions, metadata and Bhattacharyya distances.

    Memory: T · N · C float32 numbers for T checkpoints, N probe samples, C classes, and the
    T × T distance matrix. Cost of :meth:`append`: T · N · C (one new row of distances).
    """

    def __init__(self) -> None:
        self.logps: list[np.ndarray] = []
        self.steps: list[int] = []
        self.epochs: list[int] = []
        self.losses: list[float] = []
        self.targets: np.ndarray | None = None
        self.distances: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.logps)

    @classmethod
    def from_records(
        cls, records: Sequence[PredictionRecord], targets: np.ndarray
    ) -> PredictionTrajectory:
        """Rebuild a trajectory from stored records (a resumed run); cost T² · N · C / 2."""
        out = cls()
        out.targets = targets
        for r in records:
            out.logps.append(r.logp)
            out.steps.append(r.step)
            out.epochs.append(r.epoch)
            out.losses.append(r.loss)
        if len(records) >= 2:
            out.distances = bhattacharyya_distances(
                np.stack(out.logps), log=True, dtype=torch.float64
            )
        elif records:
            out.distances = np.zeros((1, 1))
        return out

    def append(self, step: int, epoch: int, predictions: ProbePredictions) -> None:
        """Record one checkpoint and grow the distance matrix by its row.

        Raises:
            FloatingPointError: If the probe set changed size (InPCA needs a fixed one).
        """
        logp = predictions.logp
        if self.logps and self.logps[0].shape != logp.shape:
            raise FloatingPointError(
                "the probe set changed size during the run; InPCA needs a fixed probe set"
            )
        n = len(self.logps)
        row = np.zeros(0)
        if n:
            row = cross_bhattacharyya_distances(
                logp[None], np.stack(self.logps), log=True, dtype=torch.float64
            )[0]
        D = np.zeros((n + 1, n + 1))
        if self.distances is not None and n:
            D[:n, :n] = self.distances
        D[n, :n] = D[:n, n] = row
        self.distances = D
        self.targets = predictions.targets
        self.logps.append(logp)
        self.steps.append(step)
        self.epochs.append(epoch)
        self.losses.append(predictions.loss)

    def summary(self, n_components: int) -> PredictionSummary:
        """Scalars of the latest checkpoint and the InPCA of all (``n_components`` dimensions at
        most). Cost: one T × T eigendecomposition and T · N · C for the progress coordinate.

        Raises:
            ValueError: If the trajectory is empty.
        """
        if not self.logps or self.targets is None:
            raise ValueError("summary needs at least one checkpoint; got an empty trajectory")
        logp, y, n = self.logps[-1], self.targets, len(self.logps)
        embedding = None
        if self.distances is not None and self.distances.shape[0] >= 2:
            embedding = inpca(self.distances, n_components=min(n_components, n))
        return PredictionSummary(
            num_checkpoints=n,
            probe_loss=float(-np.mean(logp[np.arange(y.size), y])),
            probe_accuracy=float(np.mean(logp.argmax(axis=1) == y)),
            progress=float(progress_coordinate(logp, self.logps[0], y, log=True)),
            embedding=embedding,
            steps=np.array(self.steps),
            epochs=np.array(self.epochs),
            losses=np.array(self.losses),
        )
