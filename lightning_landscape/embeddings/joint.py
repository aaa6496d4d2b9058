"""Joint InPCA of several runs' saved predictions: do the configurations share one manifold?

Mao et al. (PNAS 2024) embed the prediction trajectories of many networks together and find them
on one low-dimensional manifold. :func:`joint_inpca` does that for runs recorded by
``InPCAMonitor`` (or any :class:`~lightning_landscape.sampling.predictions.PredictionStore`);
``python -m lightning_landscape inpca RUN_DIR ... --out OUT_DIR`` writes the result to
TensorBoard as its own run. numpy/torch only: no Lightning, no TensorBoard.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..sampling.predictions import LoadedRuns, find_stores, load_runs
from .inpca import InPCA, bhattacharyya_distances, inpca, progress_coordinate

__all__ = ["JointInPCA", "joint_inpca", "resolve_runs"]


@dataclass(frozen=True, eq=False)
class JointInPCA:
    """Result of :func:`joint_inpca`.

    Attributes:
        embedding: The :class:`~lightning_landscape.embeddings.inpca.InPCA` of all checkpoints.
        distances: (n_checkpoints, n_checkpoints) Bhattacharyya distances.
        run: (n_checkpoints,) run index of each checkpoint (into ``names``).
        step: (n_checkpoints,) optimizer step of each checkpoint.
        epoch: (n_checkpoints,) epoch of each checkpoint.
        loss: (n_checkpoints,) probe loss of each checkpoint (NaN if unknown).
        progress: (n_checkpoints,) progress coordinate of each checkpoint, from its own run's
            first checkpoint to the labels (NaN when targets are not labels).
        names: Run names.
    """

    embedding: InPCA
    distances: np.ndarray
    run: np.ndarray
    step: np.ndarray
    epoch: np.ndarray
    loss: np.ndarray
    progress: np.ndarray
    names: list[str]


def resolve_runs(run_dirs: Sequence[str]) -> tuple[list[str], list[str]]:
    """The prediction stores under each of ``run_dirs`` and a readable name for each.

    A run directory may hold several stores (e.g. ``lightning_logs`` with several versions):
    each is a run of its own, named by its path relative to the directory given.

    Raises:
        ValueError: If a directory does not exist or holds no store.
    """
    paths, names = [], []
    for run_dir in run_dirs:
        if not os.path.isdir(run_dir):
            raise ValueError(f"run directory {run_dir!r} does not exist")
        found = find_stores(run_dir)
        if not found:
            raise ValueError(
                f"no saved predictions under {run_dir!r} (InPCAMonitor writes them to "
                "<log_dir>/landscape_inpca/predictions)"
            )
        for store in found:
            rel = os.path.relpath(store, run_dir)
            base = os.path.basename(os.path.normpath(run_dir))
            paths.append(store)
            names.append(base if rel == "." else os.path.join(base, rel))
    return paths, names


def joint_inpca(
    stores: Sequence[str] | LoadedRuns,
    *,
    names: Sequence[str] | None = None,
    n_components: int = 3,
    block_size: int = 256,
    dtype: torch.dtype = torch.float64,
) -> JointInPCA:
    """Embed the checkpoints of several runs together.

    Cost: that of :func:`~lightning_landscape.embeddings.inpca.bhattacharyya_distances` on all
    checkpoints (T² · N · C / 2 for T checkpoints, N probe samples, C classes) plus one T × T
    eigendecomposition. Memory: all records in float32 (T · N · C · 4 bytes) plus one work
    copy in ``dtype`` (T · N · C · 8 bytes in float64) and the blocks.

    Args:
        stores: Prediction store directories (e.g. from :func:`resolve_runs`) or runs already
            loaded with :func:`~lightning_landscape.sampling.predictions.load_runs`.
        names: Run names (default: the store paths).
        n_components: Dimensions of the embedding.
        block_size: Models per block of the distance computation.
        dtype: Work dtype of the distances (float64; float32 halves the memory of the work
            copy, at about 1e-7 absolute error per distance).

    Returns:
        :class:`JointInPCA`.

    Raises:
        ProbeMismatchError: If the runs were probed on different samples.
        ValueError: On an empty list or fewer than two checkpoints in all.
    """
    runs = stores if isinstance(stores, LoadedRuns) else load_runs(list(stores), names)
    if runs.logp.shape[0] < 2:
        raise ValueError(
            f"joint InPCA needs at least 2 checkpoints in all; got {runs.logp.shape[0]}"
        )
    D = bhattacharyya_distances(runs.logp, log=True, block_size=block_size, dtype=dtype)
    emb = inpca(D, n_components=min(n_components, D.shape[0]))
    progress = np.full(runs.logp.shape[0], np.nan)
    targets = runs.targets
    if targets.ndim == 1 and np.issubdtype(targets.dtype, np.integer):
        for k in range(len(runs.names)):
            idx = np.flatnonzero(runs.run == k)
            first = idx[np.argmin(runs.step[idx])]
            progress[idx] = progress_coordinate(runs.logp[idx], runs.logp[first], targets, log=True)
    return JointInPCA(
        embedding=emb,
        distances=D,
        run=runs.run,
        step=runs.step,
        epoch=runs.epoch,
        loss=runs.loss,
        progress=progress,
        names=list(runs.names),
    )
