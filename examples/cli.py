"""Configure the monitors from a LightningCLI config file, or from the command line.

    python examples/cli.py fit --config examples/landscape_cli.yaml
    python examples/cli.py fit --config examples/landscape_cli.yaml \
        --trainer.callbacks+=lightning_landscape.InPCAMonitor --trainer.max_steps=200

The monitors are ordinary callbacks with typed arguments, so ``trainer.callbacks`` in the YAML
file lists them by class path with their ``init_args`` (``HessianSpectrumMonitor``'s options of
``hessian_spectrum``, such as ``tol`` or ``num_slq_probes``, included).
"""

from __future__ import annotations

import lightning as L
from _digits import DigitsClassifier, digits_loaders
from lightning.pytorch.cli import LightningCLI


class DigitsData(L.LightningDataModule):
    """scikit-learn's digits: a seeded training / validation split."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self):
        return digits_loaders(self.batch_size, self.seed)[0]

    def val_dataloader(self):
        return digits_loaders(self.batch_size, self.seed)[1]


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(DigitsClassifier, DigitsData, args=args, save_config_callback=None)


if __name__ == "__main__":
    main()
