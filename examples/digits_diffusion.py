"""Train an MLP on scikit-learn's digits and embed its parameter trajectory with diffusion maps.

    python examples/digits_diffusion.py             # writes runs/digits_diffusion/ (TensorBoard)
    tensorboard --logdir runs/digits_diffusion --samples_per_plugin images=100

The parameters (about 9k, so sketched to 4,096 numbers by a seeded sparse JL map) are sampled
every few SGD steps and stored beside the logs; every 5 epochs (an explicit schedule: this run is
so short, about 2 s of training, that the monitor's default 5% time budget would afford only the
end-of-fit embedding; ``--embed-every-n-epochs auto`` shows that) the diffusion map of the samples
after a short burn-in is logged: its spectrum (scalars and histogram), the intrinsic
dimension of the trajectory, a figure of the first two coordinates coloured by step, and the
coordinates with step/epoch/loss in the TensorBoard projector. Finishes in well under a minute
on 2 CPU cores.
"""

from __future__ import annotations

import argparse

import lightning as L
import numpy as np
from _digits import DigitsClassifier, digits_loader
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_landscape import DiffusionMapMonitor


def main(argv: list[str] | None = None) -> DiffusionMapMonitor:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/digits_diffusion")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--every-n-steps", type=int, default=4)
    parser.add_argument("--burn-in-steps", type=int, default=40)
    parser.add_argument(
        "--embed-every-n-epochs",
        default="5",
        help="a number of epochs, or 'auto' (at epoch ends when the 5%% budget affords it)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop early (smoke tests)")
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, workers=True)
    embed = args.embed_every_n_epochs
    monitor = DiffusionMapMonitor(
        every_n_steps=args.every_n_steps,
        burn_in_steps=args.burn_in_steps,
        n_components=6,
        embed_every_n_epochs=embed if embed == "auto" else int(embed),
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(args.logdir, name="", version=None),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.logdir,
    )
    trainer.fit(DigitsClassifier(hidden=(64, 64), lr=0.1), digits_loader(seed=args.seed))

    result = monitor.last_result
    print(
        f"{monitor.num_measurements} parameter samples, {monitor.num_embeddings} diffusion maps, "
        f"{monitor.skipped} skipped"
    )
    if result is not None:
        rates = -np.log(np.clip(result.eigenvalues, 1e-300, None))
        print(f"final diffusion eigenvalues: {np.array2string(result.eigenvalues, precision=5)}")
        print(
            f"decay-rate ratios -log λk / -log λ1: {np.array2string(rates / rates[0], precision=2)}"
        )
        print(f"intrinsic dimension (BGH): {result.intrinsic_dim:.2f}; ε = {result.epsilon:.3g}")
    print(f"TensorBoard: tensorboard --logdir {args.logdir} --samples_per_plugin images=100")
    return monitor


if __name__ == "__main__":
    main()
