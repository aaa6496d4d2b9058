"""Out of memory on one rank of two (ddp_spawn, gloo): no hang, every rank skips, fit completes.

One fit, three injection points at real allocation and write call sites, installed inside the
spawned workers by :class:`OutOfMemory` (ddp_spawn pickles the callbacks; patches made in the
test process would not reach the workers):

* step 0, rank 1: moving the probe batches to the device (the capture at fit start and its
  retry at the step-0 measurement);
* step 2, rank 0: writing the eigenvalue scalars (only rank 0 logs);
* step 4, rank 1: a Hessian-vector product inside the Lanczos run, between collectives;
* step 6, rank 1: the same product raising something else than out of memory (a loss that fails
  on one shard only): it too joins the collective with a failure flag.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DDPStrategy

import lightning_landscape.callbacks._context as ctx
from lightning_landscape import HessianSpectrumMonitor
from lightning_landscape.linalg.operators import HessianOperator
from tests.callbacks._events import load_events, scalar_series
from tests.callbacks._models import DigitsModule, DistributedDigits

pytestmark = pytest.mark.ddp


def _oom(where: str) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"injected out of memory ({where})")


class OutOfMemory(Callback):
    """Installs the injections in the worker (setup) and writes each rank's counts (teardown)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.hits: list[str] = []

    def setup(self, trainer, pl_module, stage) -> None:
        self._undo: list[tuple[object, str, object]] = []
        rank = trainer.global_rank

        def patch(owner, name, make):
            real = getattr(owner, name)
            self._undo.append((owner, name, real))
            setattr(owner, name, make(real))

        def at(step: int, where: str, real, error=_oom):
            def fn(*args, **kwargs):
                if trainer.global_step == step:
                    self.hits.append(f"{where}@{step}")
                    raise error(where)
                return real(*args, **kwargs)

            return fn

        def bug(where: str) -> ValueError:
            return ValueError(f"injected failure of one shard's loss ({where})")

        if rank == 1:
            patch(ctx, "to_device", lambda real: at(0, "probe", real))
            patch(HessianOperator, "_local_matmat", lambda real: at(4, "hvp", real))
            patch(HessianOperator, "_local_matmat", lambda real: at(6, "bug", real, bug))
        else:
            logger = trainer.loggers[0]

            def log_metrics(real):
                def fn(metrics, step=None):
                    if step == 2 and "landscape/hessian/eigenvalue_01" in metrics:
                        self.hits.append("logging@2")
                        raise _oom("logging")
                    return real(metrics, step)

                return fn

            patch(logger, "log_metrics", log_metrics)

    def teardown(self, trainer, pl_module, stage) -> None:
        for owner, name, real in reversed(self._undo):
            setattr(owner, name, real)
        monitor = next(c for c in trainer.callbacks if isinstance(c, HessianSpectrumMonitor))
        counts = {
            "hits": self.hits,
            "skipped": monitor.skipped,
            "num_measurements": monitor.num_measurements,
            "global_step": trainer.global_step,
        }
        with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(counts, f)


def test_out_of_memory_on_one_rank_is_skipped_on_both_without_a_hang(tmp_path, make_trainer):
    monitor = HessianSpectrumMonitor(
        every_n_steps=2, top_k=2, num_probe_batches=2, density=False, trace=False
    )
    trainer = make_trainer(
        [OutOfMemory(str(tmp_path)), monitor],
        max_steps=8,
        devices=2,
        # A hang fails the test within two minutes instead of gloo's default thirty.
        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120)),
        use_distributed_sampler=False,
    )
    trainer.fit(DigitsModule(hidden=8, dtype=torch.float64), DistributedDigits(16, n=128))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["hits"] == ["logging@2"]
    # The capture, its retry, an HVP out of memory, an HVP that raised something else.
    assert ranks[1]["hits"] == ["probe@0", "probe@0", "hvp@4", "bug@6"]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 8
    # Step 0 (no probe set on rank 1) and steps 4 and 6 (the HVPs) skipped on both ranks; the
    # logging failure at step 2 is rank 0's alone (its measurement counted, its scalars skipped).
    assert ranks[1]["skipped"] == 3 and ranks[0]["skipped"] == 4
    assert ranks[0]["num_measurements"] == ranks[1]["num_measurements"] == 2  # steps 2 and 8
    acc = load_events(str(tmp_path))
    assert scalar_series(acc, "landscape/hessian/skipped") == {0: 1, 2: 2, 4: 3, 6: 4, 8: 4}
    assert sorted(scalar_series(acc, "landscape/hessian/eigenvalue_01")) == [8]
