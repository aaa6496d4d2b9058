"""Train an MLP on scikit-learn's digits with the landscape monitors attached.

    python examples/digits_landscape.py            # writes runs/digits/ (TensorBoard)
    tensorboard --logdir runs/digits --samples_per_plugin images=100

Real data shipped with scikit-learn (1,797 8x8 images, 10 classes), a plain LightningModule that
knows nothing about the monitors, and a fixed schedule so that runs are comparable:

* HessianSpectrumMonitor: top eigenvalues, density (histogram and figure), trace, per layer;
* GradientCovarianceMonitor: per-sample gradient covariance, noise scale, and how much of the
  gradient lies in the top Hessian subspace (it shares the Hessian monitor's eigenvectors);
* DiffusionMapMonitor: the parameters every 10 steps, embedded by diffusion maps at each epoch
  end (spectrum, intrinsic dimension, projector coordinates);
* InPCAMonitor: the prediction trajectory embedded by InPCA, and the trajectory geometry
  (distance from initialisation, cosine of successive updates, loss barriers).

Finishes in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse

import lightning as L
from _digits import DigitsClassifier, digits_loaders
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_landscape import (
    DiffusionMapMonitor,
    GradientCovarianceMonitor,
    HessianSpectrumMonitor,
    InPCAMonitor,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/digits")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--every-n-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop early (smoke tests)")
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, workers=True)
    train_loader, val_loader = digits_loaders(seed=args.seed)
    # In any order: the gradient monitor reuses the Hessian monitor's eigenvectors.
    hessian = HessianSpectrumMonitor(every_n_steps=args.every_n_steps, groups="layer")
    gradient = GradientCovarianceMonitor(every_n_steps=args.every_n_steps)
    trajectory = DiffusionMapMonitor(every_n_steps=10)
    predictions = InPCAMonitor(every_n_steps=max(1, args.every_n_steps // 2))
    monitors = [hessian, gradient, trajectory, predictions]
    trainer = L.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accelerator="cpu",
        logger=TensorBoardLogger(args.logdir, name="", version=None),
        callbacks=list(monitors),  # Lightning appends its own callbacks to the list
        enable_checkpointing=False,
        default_root_dir=args.logdir,
        log_every_n_steps=10,
    )
    trainer.fit(DigitsClassifier(hidden=(64, 64), lr=0.1), train_loader, val_loader)
    print(
        f"{hessian.num_measurements} Hessian, {gradient.num_measurements} gradient, "
        f"{predictions.num_measurements} InPCA measurements; "
        f"{trajectory.num_measurements} trajectory samples, "
        f"{trajectory.num_embeddings} diffusion "
        f"{'embedding' if trajectory.num_embeddings == 1 else 'embeddings'}; "
        f"{sum(m.skipped for m in monitors)} skipped; logs in {trainer.logger.log_dir}\n"
        f"open them with: tensorboard --logdir {args.logdir} --samples_per_plugin images=100"
    )


if __name__ == "__main__":
    main()
