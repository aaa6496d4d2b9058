"""The bounded end-of-fit embedding of DiffusionMapMonitor: predicted against measured seconds.

What is measured: a random-walk trajectory of ``--n`` samples (7,000) of ``--d`` numbers (2,410,
the parameters of a small MLP), in a real trajectory store. One embedding of the first
``--n-last`` samples (6,000) is timed as the monitor times it (loading and fitting, then
aligning and writing histogram, figure and projector to TensorBoard): that is the "last
embedding" the prediction scales. Then, for each allowed number of seconds in ``--allowed``,
the end-of-fit plan (``callbacks/_diffusion_plan.end_plan``) is made for all ``--n`` samples and
run the same way: the landmarks, Nyström or not, predicted and measured seconds, and how far the
coordinates are from the full embedding's (relative Frobenius distance on the embedded rows,
after rotating onto the full one as the monitor aligns successive embeddings).

Run (from the repository root; ``OMP_NUM_THREADS=1`` on a busy machine)::

    python benchmarks/diffusion_end.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from lightning_landscape.callbacks._diffusion_plan import EmbedCost, end_plan
from lightning_landscape.dashboard.diffusion import write_diffusion_embedding
from lightning_landscape.embeddings.trajectory import TrajectoryEmbedder
from lightning_landscape.sampling.store import TrajectoryStore


def embed(store_dir, d, n, writer, step, *, landmarks=None, nystrom=True):
    """One embedding of the first ``n`` stored samples, as the monitor makes it: returns the
    coordinates, their rows, the units of the cost model and (fit, write) seconds."""
    t0 = time.perf_counter()
    traj = TrajectoryStore(store_dir, d).load()
    embedder = TrajectoryEmbedder()
    rows = np.arange(n)
    if not nystrom:
        rows = rows[embedder.landmarks(n, max_points=landmarks)]
    coords, result = embedder.fit(traj.vectors[rows], max_points=landmarks)
    fit = time.perf_counter() - t0
    t1 = time.perf_counter()
    meta = {k: getattr(traj, k)[rows].tolist() for k in ("steps", "epochs", "losses")}
    write_diffusion_embedding(
        writer, step, result.eigenvalues, coords, traj.steps[rows], prefix="end",
        any_logger=True, histogram=True, figure=True, projector=meta,
    )  # fmt: skip
    writer.flush()
    units = embedder.cost(rows.size, max_points=landmarks)
    return coords, rows, result.eigenvalues, units, fit, time.perf_counter() - t1


def distance(coords, rows, eigenvalues, full):
    """Relative distance to the full embedding on ``rows``, after the monitor's alignment."""
    embedder = TrajectoryEmbedder()
    embedder.previous = (np.arange(full.shape[0]), full)
    aligned = embedder.align(coords, rows, eigenvalues)
    return float(np.linalg.norm(aligned - full[rows]) / np.linalg.norm(full[rows]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=7000)
    parser.add_argument("--n-last", type=int, default=6000)
    parser.add_argument("--d", type=int, default=2410)
    parser.add_argument("--allowed", type=float, nargs="+", default=[1e9, 2.0, 1.0, 0.5, 0.2])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        store = TrajectoryStore(os.path.join(root, "store"), args.d)
        x = rng.standard_normal(args.d)
        for i in range(args.n):
            x = x + 0.01 * rng.standard_normal(args.d) / np.sqrt(1 + i / 100)
            store.append(x, step=10 * i, loss=1.0 / (1 + i))
        writer = SummaryWriter(os.path.join(root, "tb"))
        # Warm-up (imports, the first figure, first touches of the large arrays: the first
        # embedding of a process takes up to twice as long), then the timed one.
        embed(store.directory, args.d, args.n_last, writer, 0)
        *_, units, fit, write = embed(store.directory, args.d, args.n_last, writer, 1)
        cost = EmbedCost(fit, units, write, args.n_last)
        print(f"last embedding ({args.n_last} samples): fit {fit:.2f} s, write {write:.2f} s")
        full = None
        for step, allowed in enumerate(args.allowed, 2):
            plan = end_plan(TrajectoryEmbedder(), args.n, cost, allowed)
            coords, rows, eig, _, fit, write = embed(
                store.directory, args.d, args.n, writer, step, landmarks=plan.landmarks,
                nystrom=plan.nystrom,
            )  # fmt: skip
            full = coords if full is None else full
            print(
                f"allowed {allowed:g} s: {plan.landmarks} landmarks, nystrom={plan.nystrom}, "
                f"predicted {plan.seconds:.2f} s, measured {fit + write:.2f} s "
                f"(fit {fit:.2f}, write {write:.2f}), distance to full "
                f"{distance(coords, rows, eig, full):.3f}"
            )


if __name__ == "__main__":
    main()
