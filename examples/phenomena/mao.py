"""Mao et al. 2024: the training runs of different networks explore one low-dimensional manifold.

    python examples/phenomena/mao.py              # 6 runs of 800 steps on digits
    python examples/phenomena/mao.py --quick      # 2 runs of 60 steps (a few seconds)

Mao et al. ("The training process of many deep networks explores the same low-dimensional
manifold", PNAS 121, 2024) represent each
checkpoint by its predicted probabilities on the training samples, compare checkpoints by the
per-sample Bhattacharyya distance and embed all the trajectories jointly by intensive PCA
(InPCA); the top 3 dimensions explain about 76% of the stress for their networks (many
architectures and settings of image classifiers).

Here: tanh MLPs of different widths, depths, learning rates, optimisers and seeds trained on
scikit-learn's digits (1,500 training images, 10 classes), each recording its predictions on the
same 512 training images at log-spaced steps; ``bhattacharyya_distances`` and ``inpca`` of all
checkpoints together, with and without the ideal prediction ``P*`` (the one-hot labels), and of
each run alone. Columns: explained stress of the top 1, 2 and 3 dimensions, the share of the
eigenvalues' absolute mass ``Σ|λ|`` in the top 3, and the number of imaginary (negative-eigenvalue)
dimensions among the top 3.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import mlp, print_table
from _digits import digits_split

import lightning_landscape as ll

#: (name, hidden width, depth, optimiser, learning rate, seed)
CONFIGS = [
    ("w32 sgd", 32, 1, "sgd", 0.1, 0),
    ("w128 sgd", 128, 1, "sgd", 0.05, 1),
    ("w64x2 sgd", 64, 2, "sgd", 0.1, 2),
    ("w64 adam", 64, 1, "adam", 3e-3, 3),
    ("w16 sgd slow", 16, 1, "sgd", 0.02, 4),
    ("w256x2 adam", 256, 2, "adam", 1e-3, 5),
]
HEADERS = [
    "embedding",
    "points",
    "stress top1",
    "top2",
    "top3",
    "|λ| top3",
    "imaginary",
    "paper top3",
]


def log_spaced(steps: int, per_decade: int = 8) -> list[int]:
    """Step 0 and about ``per_decade`` steps per decade up to ``steps``."""
    grid = np.unique(
        np.round(np.logspace(0, np.log10(steps), 1 + int(per_decade * np.log10(steps))))
    )
    return [0, *(int(s) for s in grid)]


def run(config: tuple, X, y, probe: torch.Tensor, steps: int) -> np.ndarray:
    """Log-probabilities on ``probe`` at the log-spaced steps of one training run."""
    _, width, depth, optimizer, lr, seed = config
    model = mlp(64, width, 10, depth=depth, seed=seed)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    record, out = set(log_spaced(steps)), []
    for step in range(steps + 1):
        if step in record:
            with torch.no_grad():
                out.append(torch.log_softmax(model(probe), dim=1).numpy())
        idx = torch.randint(len(X), (64,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    return np.stack(out)


def embed(name: str, logp: np.ndarray) -> dict:
    fit = ll.inpca(ll.bhattacharyya_distances(logp, log=True), n_components=3)
    s = fit.explained_stress_cumulative
    mass = np.abs(fit.eigenvalues)
    return {
        "embedding": name,
        "points": len(logp),
        "stress top1": float(s[0]),
        "top2": float(s[1]),
        "top3": float(s[2]),
        "|λ| top3": float(mass[:3].sum() / mass.sum()),
        "imaginary": int(fit.n_imaginary),
        "paper top3": "≈ 0.76 (their nets)",
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 runs of 60 steps (smoke test)")
    args = parser.parse_args(argv)
    configs, steps = (CONFIGS[:2], 60) if args.quick else (CONFIGS, 800)
    train_set, _ = digits_split(seed=0)
    X, y = train_set.tensors
    probe, labels = X[:512], y[:512]
    runs = [run(c, X, y, probe, steps) for c in configs]
    with np.errstate(divide="ignore"):  # P*: log 0 = -inf off the label, which log=True allows
        truth = np.log(np.eye(10)[labels.numpy()])[None]
    rows = [
        embed(f"joint, {len(runs)} runs", np.concatenate(runs)),
        embed(f"joint, {len(runs)} runs + P*", np.concatenate([*runs, truth])),
    ]
    single = [embed(c[0], r) for c, r in zip(configs, runs, strict=True)]
    rows.append({**single[0], "embedding": "each run alone (mean)", "points": len(runs[0])})
    for key in ("stress top1", "top2", "top3", "|λ| top3"):
        rows[-1][key] = float(np.mean([r[key] for r in single]))
    rows[-1]["imaginary"] = max(r["imaginary"] for r in single)
    print_table(HEADERS, [[r[h] for h in HEADERS] for r in rows])
    return rows


if __name__ == "__main__":
    main()
