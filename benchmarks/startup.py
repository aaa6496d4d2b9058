"""Fixed costs of the four monitors on short fits: ``fast_dev_run`` and a fit of a few steps.

What is measured: the wall time of ``Trainer.fit`` of Lightning's demo Transformer
(``benchmarks/models.py`` "transformer": 16 sequences of 32 Markov tokens a batch, SGD) with the
four monitors at their defaults (``HessianSpectrumMonitor()``, ``GradientCovarianceMonitor()``,
``DiffusionMapMonitor()``, ``InPCAMonitor()``) and without, under ``fast_dev_run=True`` and for
``--steps`` steps (24); each fit's measurement counts, the seconds charged to each monitor,
the diffusion embeddings made, the one-line notices the monitors gave, and every file a fit
wrote outside its logger's directory (the working directory and ``default_root_dir`` are two
other temporary folders). Seconds depend on the machine and its load; the counts and the file
list do not.

Run (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/startup.py             # fast_dev_run and 24 steps
    OMP_NUM_THREADS=1 python benchmarks/startup.py --steps 60
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import transformer

import lightning_landscape as ll

#: The lines of lightning_landscape (its monitors' names, or the package's).
NOTICES = ("lightning_landscape", "Hessian", "GradientCovariance", "DiffusionMap", "InPCA")


class DemoLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.problem = transformer(num_batches=32)
        self.net = self.problem.model.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self.problem.criterion(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(monitored: bool, **trainer_kw) -> dict:
    """One fit in fresh temporary folders: seconds, measurements, files outside the logs."""
    root = Path(tempfile.mkdtemp(prefix="startup_"))
    for sub in ("cwd", "root", "logs"):
        (root / sub).mkdir()
    os.chdir(root / "cwd")
    module = DemoLM()
    monitors = (
        [
            ll.HessianSpectrumMonitor(),
            ll.GradientCovarianceMonitor(),
            ll.DiffusionMapMonitor(),
            ll.InPCAMonitor(),
        ]
        if monitored
        else []
    )
    trainer = L.Trainer(
        accelerator="cpu",
        callbacks=monitors,
        logger=L.pytorch.loggers.TensorBoardLogger(str(root / "logs")),
        default_root_dir=str(root / "root"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **trainer_kw,
    )
    loader = DataLoader(module.problem.batches, batch_size=None)
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - t0
    outside = [
        str(Path(d, f).relative_to(root))
        for d, _, files in os.walk(root)
        for f in files
        if not Path(d).is_relative_to(root / "logs")
    ]
    coord = getattr(trainer, "_landscape_coordinator", None)
    return {
        "seconds": seconds,
        "charged": {k: round(v, 1) for k, v in (coord.spent if coord else {}).items()},
        "measurements": {type(m).__name__: m.num_measurements for m in monitors},
        "embeddings": sum(getattr(m, "num_embeddings", 0) for m in monitors),
        "outside_logs": outside,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith(NOTICES):
                lines.append(record.getMessage())

    import lightning_utilities.core.rank_zero as rank_zero

    rank_zero.log.addHandler(Keep())
    print(f"torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    for name, kw in (("fast_dev_run", {"fast_dev_run": True}), (f"{args.steps} steps", {})):
        kw = kw or {"max_steps": args.steps}
        for monitored in (False, True):
            lines.clear()
            out = fit(monitored, **kw)
            label = "four monitors" if monitored else "no monitor"
            print(f"{name:>12} {label:>13}: {out['seconds']:6.1f} s", out["measurements"])
            print(f"{'':>28}seconds charged to each monitor's budget: {out['charged']}")
            print(f"{'':>28}diffusion embeddings: {out['embeddings']}")
            print(f"{'':>28}files outside the log dir: {out['outside_logs'] or 'none'}")
            for line in lines:
                print(f"{'':>28}{line}")


if __name__ == "__main__":
    main()
