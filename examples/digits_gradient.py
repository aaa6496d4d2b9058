"""Gradient noise and curvature on scikit-learn's digits: where does the gradient live?

    python examples/digits_gradient.py            # writes runs/digits_gradient/ (TensorBoard)
    tensorboard --logdir runs/digits_gradient --samples_per_plugin images=100

A one-hidden-layer MLP trained with SGD; a HessianSpectrumMonitor (top 10 eigenpairs) and a
GradientCovarianceMonitor (per-sample gradient covariance, noise scale, class structure) measure
the same fixed probe set (the first 4 training batches, 256 samples) every ``--every-n-steps``
steps, exactly (dense Gram route for the covariance, converged Lanczos for the Hessian). The
table printed at the end shows, per measurement step:

* the share of the mean probe gradient's squared norm inside the span of the top-10 Hessian
  eigenvectors (Gur-Ari, Roberts & Dyer 2018: gradient descent happens in a tiny subspace);
* the gradient noise scale ``B_simple = tr Σ / |g|²`` of the probe set;
* the share of the top Hessian eigenvalue explained by the between-class part of the
  Gauss–Newton term (Papyan 2019/2020), as ``λ1(B)/λ1(H)`` and as the Rayleigh quotient
  ``v1ᵀ B v1 / λ1(H)``, and the ratio of the top Gauss–Newton eigenvalue to the Hessian's.

Finishes in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import glob
import os

import lightning as L
from _digits import DigitsClassifier, digits_loader
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator

from lightning_landscape import GradientCovarianceMonitor, HessianSpectrumMonitor


def _series(logdir: str, tag: str) -> dict[int, float]:
    files = glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
    acc = event_accumulator.EventAccumulator(
        os.path.dirname(sorted(files)[-1]), size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in acc.Scalars(tag)}


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/digits_gradient")
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--every-n-steps", type=int, default=250)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, workers=True)
    hessian = HessianSpectrumMonitor(
        every_n_steps=args.every_n_steps, top_k=args.top_k, density=False, trace=False
    )
    gradient = GradientCovarianceMonitor(
        every_n_steps=args.every_n_steps, top_k=args.top_k, log_class_structure=True
    )
    logger = TensorBoardLogger(args.logdir, name="", version=None)
    trainer = L.Trainer(
        max_steps=args.max_steps,
        max_epochs=-1,
        accelerator="cpu",
        logger=logger,
        callbacks=[hessian, gradient],  # the Hessian monitor first: its eigenvectors are shared
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.logdir,
        log_every_n_steps=25,  # an epoch is 29 steps
    )
    trainer.fit(DigitsClassifier(hidden=(32,), lr=0.05), digits_loader(seed=args.seed))

    p = "landscape/gradient"
    tags = {
        "overlap": f"{p}/hessian_overlap",
        "noise_scale": f"{p}/noise_scale",
        "between_share": f"{p}/between_class_share_01",
        "between_rayleigh": f"{p}/between_class_rayleigh_share_01",
        "ggn": f"{p}/ggn_eigenvalue_01",
        "hessian": "landscape/hessian/eigenvalue_01",
    }
    data = {name: _series(logger.log_dir, tag) for name, tag in tags.items()}
    rows: dict[int, dict[str, float]] = {}
    print(
        f"{'step':>5}  {'|P_top g|²/|g|²':>15}  {'noise scale':>11}  "
        f"{'λ1(B)/λ1(H)':>11}  {'v1ᵀBv1/λ1(H)':>12}  {'λ1(G)/λ1(H)':>11}"
    )
    for step in sorted(data["overlap"]):
        row = {name: series.get(step, float("nan")) for name, series in data.items()}
        rows[step] = row
        print(
            f"{step:>5}  {row['overlap']:>15.1%}  {row['noise_scale']:>11.1f}  "
            f"{row['between_share']:>11.1%}  {row['between_rayleigh']:>12.1%}  "
            f"{row['ggn'] / row['hessian']:>11.3f}"
        )
    print(
        f"{hessian.num_measurements} Hessian and {gradient.num_measurements} gradient "
        f"measurements, {hessian.skipped + gradient.skipped} skipped; logs in {logger.log_dir}"
    )
    return rows


if __name__ == "__main__":
    main()
