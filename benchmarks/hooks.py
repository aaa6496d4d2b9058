"""Per-step cost of the monitors' Lightning hooks, timed inside a real fit.

The shared budget times the monitors' per-step hook bodies itself (one call in
``HOOK_SAMPLE_EVERY``) and charges Lightning's dispatch of each hook at ``DISPATCH_SECONDS``
(``lightning_landscape/callbacks/_schedule.py``). This script measures that cost with far less
noise than comparing fit times: it wraps Lightning's ``_call_callback_hooks`` and times every
per-step hook call of a fit of the digits MLP of ``benchmarks/overhead.py`` (every callback's
share of that hook together), for no callback, a plain no-op ``Callback()`` (what a callback
that leaves Lightning's no-op hooks in place costs), each monitor alone (measurements placed out
of the way: ``every_n_steps`` beyond the fit, so only the step-0 one runs, outside the hooks
timed here) and all four together. It reports the median per call of each hook and their sum per
step, less that of no callback.

What it leaves out: a callback's cost outside its hooks (none for these monitors, apart from the
measurements the budget times) and effects on the training step itself (caches), which only the
fit-time ratio of ``benchmarks/overhead.py`` sees.

Run (from the repository root)::

    python benchmarks/hooks.py                    # small model, 2,000 steps, 4 repeats (~1 min)
    python benchmarks/hooks.py --size large --steps 3000
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead

#: The hooks Lightning calls at every training step.
STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)
FAR = 10**9  # every_n_steps beyond any fit: only the step-0 measurement


def _configs() -> dict[str, Callable[[], list[Any]]]:
    import lightning.pytorch as pl

    import lightning_landscape as ll

    return {
        "no callback": list,
        "Callback() (no-op)": lambda: [pl.Callback()],
        "HessianSpectrumMonitor": lambda: [ll.HessianSpectrumMonitor(every_n_steps=FAR)],
        "GradientCovarianceMonitor": lambda: [ll.GradientCovarianceMonitor(every_n_steps=FAR)],
        "DiffusionMapMonitor": lambda: [ll.DiffusionMapMonitor()],
        "InPCAMonitor": lambda: [ll.InPCAMonitor(every_n_steps=FAR)],
        "all four": lambda: [
            ll.HessianSpectrumMonitor(every_n_steps=FAR),
            ll.GradientCovarianceMonitor(every_n_steps=FAR),
            ll.DiffusionMapMonitor(),
            ll.InPCAMonitor(every_n_steps=FAR),
        ],
    }


def timed_fit(hidden: Sequence[int], steps: int, callbacks: list[Any]) -> dict[str, float]:
    """Median seconds per call of each per-step hook over one fit (all callbacks together)."""
    import lightning.pytorch as pl
    from lightning.pytorch.trainer import call

    calls: dict[str, list[float]] = {h: [] for h in STEP_HOOKS}
    original = call._call_callback_hooks

    def timed(trainer: Any, hook_name: str, *args: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        original(trainer, hook_name, *args, **kwargs)
        if hook_name in calls:
            calls[hook_name].append(time.perf_counter() - t0)

    pl.seed_everything(overhead.SEED, verbose=False)
    module = overhead.make_module(hidden)
    call._call_callback_hooks = timed
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = overhead.make_trainer(steps, callbacks, tmp)
            trainer.fit(module, train_dataloaders=overhead.make_loader())
    finally:
        call._call_callback_hooks = original
    return {h: statistics.median(v) for h, v in calls.items() if v}


def dispatch_loop(callbacks: list[Any], n: int = 20000) -> float:
    """Seconds per step of Lightning's dispatch of the five per-step hooks other than
    ``on_train_batch_end`` (whose monitor code needs a running fit) to ``callbacks``, in a tight
    loop: the best of five rounds of ``n`` steps, far steadier than timing inside a fit."""
    import lightning.pytorch as pl
    from lightning.pytorch.trainer import call

    trainer = pl.Trainer(
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = overhead.make_module((32,))
    trainer.strategy._lightning_module = module
    module.trainer = trainer
    hook = call._call_callback_hooks
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            hook(trainer, "on_train_batch_start", None, 0)
            hook(trainer, "on_before_backward", None)
            hook(trainer, "on_after_backward")
            hook(trainer, "on_before_optimizer_step", None)
            hook(trainer, "on_before_zero_grad", None)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--size", choices=sorted(overhead.SIZES), default="small")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=4, help="fits per configuration")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    hidden = overhead.SIZES[args.size]
    print(
        f"torch {torch.__version__}, {args.threads} threads, model 64-"
        + "-".join(map(str, hidden))
        + f"-10, {args.steps} steps, {args.repeats} fits per configuration",
        flush=True,
    )
    timed_fit(hidden, 100, [])  # warm-up: imports, first-call costs
    configs = _configs()
    fits: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    # Round-robin, so that a change of the machine's speed (10-40% here, for minutes) hits every
    # configuration alike; per hook, the smallest of the repeats' medians (load only adds time).
    for _ in range(args.repeats):
        for name, make in configs.items():
            fits[name].append(timed_fit(hidden, args.steps, make()))
    results = {
        name: {h: min(f[h] for f in runs) for h in STEP_HOOKS} for name, runs in fits.items()
    }
    base = sum(results["no callback"].values())
    short = [h.removeprefix("on_") for h in STEP_HOOKS]
    print("\nmedian µs per call of each hook (every callback of the fit together):")
    print(
        f"| {'callbacks':<26} | " + " | ".join(f"{s:>20}" for s in short) + " | per step | extra |"
    )
    print("|" + "|".join("-" * n for n in (28, *([22] * len(short)), 10, 8)) + "|")
    for name, per_hook in results.items():
        total = sum(per_hook.values())
        cells = " | ".join(f"{per_hook[h] * 1e6:>20.2f}" for h in STEP_HOOKS)
        print(f"| {name:<26} | {cells} | {total * 1e6:>8.2f} | {(total - base) * 1e6:>+5.1f} |")
    print("\nextra = µs a step beyond no callback (median calls: periodic work, charged where")
    print("it runs, is left out).")
    print("\nLightning's dispatch of the five hooks other than on_train_batch_end, tight loop:")
    base_loop = dispatch_loop([])
    print(f"| {'callbacks':<26} | µs a step | extra |")
    print("|" + "|".join("-" * n for n in (28, 11, 7)) + "|")
    for name, make in configs.items():
        t = dispatch_loop(make())
        print(f"| {name:<26} | {t * 1e6:>9.2f} | {(t - base_loop) * 1e6:>+5.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
