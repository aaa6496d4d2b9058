"""Do differently-configured networks train along one manifold? Joint InPCA on digits.

    python examples/digits_inpca.py               # writes runs/digits_inpca/ (TensorBoard)
    tensorboard --logdir runs/digits_inpca --samples_per_plugin images=100

Trains several small classifiers on scikit-learn's digits (1,797 8x8 images, 10 classes) that
differ in width, depth, learning rate, optimiser and seed, each with an ``InPCAMonitor`` that
records its predictions on the same 512 probe samples at log-spaced steps (Mao et al., PNAS 2024).
Then embeds all trajectories jointly by InPCA, prints the explained stress of the top dimensions
and writes the joint embedding to TensorBoard as a run of its own (``<logdir>/joint``); the same
as ``python -m lightning_landscape inpca <logdir> --out <logdir>/joint``. About a minute on 2
CPU cores.
"""

from __future__ import annotations

import argparse
import os
import warnings

import lightning as L
import torch
from _digits import DigitsClassifier, digits_split
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from lightning_landscape import InPCAMonitor, joint_inpca, resolve_runs, write_joint_inpca

#: (name, hidden widths, optimiser, learning rate, seed)
CONFIGS = [
    ("mlp32_sgd", (32,), "sgd", 0.1, 0),
    ("mlp128_sgd", (128,), "sgd", 0.05, 1),
    ("mlp64x2_sgd", (64, 64), "sgd", 0.1, 2),
    ("mlp64_adam", (64,), "adam", 3e-3, 3),
    ("mlp16_sgd_slow", (16,), "sgd", 0.02, 4),
]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/digits_inpca")
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--per-decade", type=int, default=8, help="log-spaced records per decade")
    parser.add_argument("--runs", type=int, default=len(CONFIGS), help="use the first N configs")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    train, _ = digits_split(seed=0)
    # The same probe samples for every run (their ids are checked when embedding jointly).
    probe = DataLoader(TensorDataset(*train[:512]), batch_size=256)

    for name, hidden, optimizer, lr, seed in CONFIGS[: args.runs]:
        L.seed_everything(seed, verbose=False)
        trainer = L.Trainer(
            max_steps=args.max_steps,
            accelerator="cpu",
            logger=TensorBoardLogger(args.logdir, name=name, version=0),
            callbacks=[
                InPCAMonitor(
                    log_spaced_per_decade=args.per_decade,
                    probe_dataloader=probe,
                    num_probe_batches=2,
                )
            ],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=10,
        )
        loader = DataLoader(
            train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
        trainer.fit(DigitsClassifier(hidden, lr, optimizer), loader)

    run_dirs = [os.path.join(args.logdir, c[0]) for c in CONFIGS[: args.runs]]
    paths, names = resolve_runs(run_dirs)
    result = joint_inpca(paths, names=[os.path.basename(r) for r in run_dirs], n_components=3)
    out = os.path.join(args.logdir, "joint")
    writer = SummaryWriter(out)
    write_joint_inpca(writer, result)
    writer.close()

    emb = result.embedding
    print(f"joint InPCA of {len(names)} runs, {result.run.size} checkpoints")
    stress = {}
    for k, value in enumerate(emb.explained_stress_cumulative, 1):
        stress[f"top{k}"] = float(value)
        print(f"explained stress, top {k} dims: {value:.3f}")
    print(f"imaginary dimensions among the top 3: {emb.n_imaginary}")
    print(f"open with: tensorboard --logdir {args.logdir} --samples_per_plugin images=100")
    return stress


if __name__ == "__main__":
    main()
