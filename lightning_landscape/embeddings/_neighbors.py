"""k-nearest neighbours for the diffusion kernel: exact (blockwise torch) or pynndescent.

Exact search costs O(n² d) flops and O(b n) memory for row blocks of b points (a k-d tree, about
O(n log n), in up to :data:`KDTREE_MAX_DIM` dimensions, at any n); it is the default up to
:data:`EXACT_MAX_N` points, which covers typical trajectories (a few thousand samples) and needs
no compilation. Above it, pynndescent (approximate, O(n^1.14 d) empirically) is used; its
numba code is compiled on the first call in each process, which takes 40–60 s on a small CPU.
That first call is announced through :data:`logger` and a ``UserWarning`` so it never stalls
silently.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

__all__: list[str] = []

#: Up to this many points the neighbours are exact (torch, blockwise).
EXACT_MAX_N = 20_000

#: Up to this dimension the exact search uses a k-d tree (scipy) instead of the blockwise scan.
KDTREE_MAX_DIM = 16

#: Rows per block of the exact search (memory b × n doubles).
_BLOCK_BYTES = 64 * 2**20

logger = logging.getLogger("lightning_landscape.embeddings")

_pynndescent_warm = False


def exact_knn(
    X: np.ndarray, k: int, *, queries: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours in float64 (self included when ``queries`` is None).

    Args:
        X: (n, d) reference points.
        k: neighbours per query, ``k <= n``.
        queries: (m, d) query points; None queries ``X`` itself.

    Returns:
        ``(indices, sq_distances)``, both (m, k), sorted by distance, squared Euclidean distances.
    """
    if X.shape[1] <= KDTREE_MAX_DIM:
        # Low dimension: a k-d tree is exact and O(n log n), far below the O(n²) scan.
        from scipy.spatial import cKDTree

        tree = cKDTree(np.asarray(X, dtype=np.float64))
        qry = X if queries is None else queries
        d, ind = tree.query(
            np.asarray(qry, dtype=np.float64), k=k, workers=max(1, torch.get_num_threads())
        )
        d, ind = np.asarray(d).reshape(-1, k), np.asarray(ind, dtype=np.int64).reshape(-1, k)
        return ind, d * d
    # Centred first: ||x||² + ||y||² - 2 x·y cancels catastrophically for points far from the
    # origin and close to each other (a trajectory in parameter space).
    center = np.asarray(X, dtype=np.float64).mean(axis=0)
    ref = torch.from_numpy(np.ascontiguousarray(X - center, dtype=np.float64))
    qry = (
        ref
        if queries is None
        else torch.from_numpy(np.ascontiguousarray(queries - center, dtype=np.float64))
    )
    n, m = ref.shape[0], qry.shape[0]
    ref_sq = (ref * ref).sum(1)
    qry_sq = ref_sq if queries is None else (qry * qry).sum(1)
    block = max(1, min(m, _BLOCK_BYTES // (8 * max(n, 1))))
    idx = np.empty((m, k), dtype=np.int64)
    dist = np.empty((m, k), dtype=np.float64)
    for start in range(0, m, block):
        stop = min(m, start + block)
        d2 = qry_sq[start:stop, None] + ref_sq[None, :] - 2.0 * (qry[start:stop] @ ref.T)
        d2.clamp_(min=0.0)
        if queries is None:  # the self-distance is exactly zero, not a rounding residue
            rows = torch.arange(stop - start)
            d2[rows, rows + start] = 0.0
        vals, ind = torch.topk(d2, k, dim=1, largest=False, sorted=True)
        idx[start:stop] = ind.numpy()
        dist[start:stop] = vals.numpy()
    return idx, dist


def pynndescent_knn(X: np.ndarray, k: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k nearest neighbours of ``X`` among itself with pynndescent."""
    global _pynndescent_warm
    if not _pynndescent_warm:
        message = (
            f"diffusion_map: {X.shape[0]} points > exact_max_n; using pynndescent for the "
            "neighbours. Its first call in this process compiles numba code (40-60 s on a small "
            "CPU)."
        )
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    from pynndescent import NNDescent

    index = NNDescent(
        np.ascontiguousarray(X, dtype=np.float32),
        n_neighbors=k,
        metric="euclidean",
        random_state=seed,
        low_memory=True,
        compressed=True,
        verbose=False,
    )
    _pynndescent_warm = True
    ind, _ = index.neighbor_graph
    ind = np.asarray(ind, dtype=np.int64)
    # Distances recomputed in float64 (pynndescent works in float32).
    Xd = np.asarray(X, dtype=np.float64)
    d2 = np.empty(ind.shape, dtype=np.float64)
    step = max(1, _BLOCK_BYTES // (8 * k * X.shape[1]))
    for start in range(0, X.shape[0], step):
        diff = Xd[ind[start : start + step]] - Xd[start : start + step, None, :]
        d2[start : start + step] = np.einsum("ijk,ijk->ij", diff, diff)
    order = np.argsort(d2, axis=1, kind="stable")
    return np.take_along_axis(ind, order, 1), np.take_along_axis(d2, order, 1)


def knn(
    X: np.ndarray, k: int, *, method: str, exact_max_n: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of ``X`` among itself by ``method`` ("auto", "exact" or "pynndescent").

    "auto": exact when ``X`` has at most ``exact_max_n`` rows or at most
    :data:`KDTREE_MAX_DIM` columns, pynndescent otherwise.
    """
    # A k-d tree (low dimension) is exact and faster than pynndescent at any size.
    small = X.shape[0] <= exact_max_n or X.shape[1] <= KDTREE_MAX_DIM
    use_exact = method == "exact" or (method == "auto" and small)
    if use_exact:
        return exact_knn(X, k)
    return pynndescent_knn(X, k, seed=seed)
