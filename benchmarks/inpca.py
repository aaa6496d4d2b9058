"""Time and peak memory of the blockwise Bhattacharyya distances behind InPCA.

What is measured: :func:`lightning_landscape.embeddings.inpca.bhattacharyya_distances` on
predictions of shape (n_models, n_samples, n_classes) = 2,000 × 10,000 × 10 by default (the issue's
target: 2,000 checkpoints of a 10-class classifier on 10,000 probe samples), float32 softmax
outputs of random logits (the cost does not depend on the values), followed by
:func:`~lightning_landscape.embeddings.inpca.inpca` of the result. Reported: wall time of each
step, the process's peak resident memory (``ru_maxrss``) before and after, the size of the input,
and a spot check of 20 random entries against a float64 direct computation.

Run (from the repository root)::

    python benchmarks/inpca.py                         # the full 2,000 × 10,000 × 10 case
    python benchmarks/inpca.py --n-models 500          # a quicker look
    python benchmarks/inpca.py --device cuda           # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np
import torch

from lightning_landscape.embeddings.inpca import bhattacharyya_distances, inpca


def _peak_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-models", type=int, default=2000)
    parser.add_argument("--n-samples", type=int, default=10000)
    parser.add_argument("--n-classes", type=int, default=10)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log", action="store_true", help="pass log-probabilities instead")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.n_models, args.n_samples, args.n_classes)
    P = torch.empty(shape, dtype=torch.float32)
    for i in range(0, args.n_models, 100):  # built in slices: no float64 temporary
        z = torch.randn((min(100, args.n_models - i), *shape[1:]), generator=gen) * 2.0
        P[i : i + 100] = torch.log_softmax(z, -1) if args.log else torch.softmax(z, -1)
    P = P.to(args.device)
    input_mib = P.numel() * P.element_size() / 2**20
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = _peak_mib()

    t0 = time.perf_counter()
    D = bhattacharyya_distances(P, log=args.log, block_size=args.block_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_dist = time.perf_counter() - t0
    peak = _peak_mib()
    t0 = time.perf_counter()
    emb = inpca(D, n_components=3)
    t_inpca = time.perf_counter() - t0

    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(20):
        u, v = rng.integers(0, args.n_models, size=2)
        pu, pv = P[u].double().cpu(), P[v].double().cpu()
        if args.log:
            pu, pv = pu.exp(), pv.exp()
        ref = float(-torch.log((pu * pv).sqrt().sum(-1)).mean()) if u != v else 0.0
        worst = max(worst, abs(D[u, v] - ref))

    out = {
        "shape": list(shape),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "input_MiB": round(input_mib, 1),
        "distances_seconds": round(t_dist, 2),
        "inpca_seconds": round(t_inpca, 2),
        "peak_rss_before_MiB": round(base, 1),
        "peak_rss_after_MiB": round(peak, 1),
        "extra_peak_MiB": round(peak - base, 1),
        "max_abs_error_vs_float64_20_entries": float(f"{worst:.3g}"),
        "explained_stress_top3": [round(float(x), 4) for x in emb.explained_stress_cumulative],
    }
    if args.device.startswith("cuda"):
        out["cuda_peak_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main(sys.argv[1:])
