"""Per-sample gradients: lightning_landscape against a plain loop and its peers, same run.

What is measured, in one process:

* Problem: MLPs on ``sklearn.datasets.load_digits`` (pixels scaled to [0, 1], cross-entropy), at
  two sizes (64-32-10, about 2.4k parameters, and 64-256-256-10, about 84k parameters), float32,
  eval mode; one batch of ``--batch`` samples (default 512).
* Methods, all giving the ``(N, D)`` matrix of per-sample gradients of the same loss:

  - ``loop``: one ``torch.autograd.grad`` per sample (the reference, and the baseline);
  - ``torch.func naive``: ``vmap(grad(f))`` over the whole batch in one call (unchunked);
  - ``ours``: ``lightning_landscape.linalg.covariance.per_sample_gradients`` at its default
    chunk size (``2**23 // D`` samples per vmapped call), calling the user's ``loss_fn`` on
    single samples through ``functional_call``;
  - ``opacus``: ``opacus.GradSampleModule`` (PyPI ``opacus``; per-layer hooks that form
    per-sample gradients from activations and backpropagated errors), one forward + backward,
    then ``p.grad_sample``. Skipped with a message when opacus is not importable.

  Each is checked against the loop (max abs difference relative to the largest entry).
* Covariance: ``gradient_covariance(top_k=10)`` on the same batch, Gram and Lanczos routes.
* Memory: the per-sample gradient block each method holds at once (``chunk * D`` numbers for
  ours, ``N * D`` for the others), and the peak resident memory of one call of ``ours`` and of
  ``torch.func naive`` above the memory before it, in fresh child processes (``--memory``;
  Linux only: ``VmHWM`` after resetting it through ``/proc/self/clear_refs``). Ours returns the
  full ``N x D`` matrix too (that is the benchmark's task); ``gradient_covariance`` only ever
  holds one chunk on its operator route.

Timings: one warm-up call, then the median of ``--repeats`` calls, methods interleaved per round,
all under the same ``torch.set_num_threads(--threads)``.

Run (from the repository root; opacus in the interpreter's environment, see docs)::

    python benchmarks/gradient.py                 # both sizes
    python benchmarks/gradient.py --quick         # small model, fewer repeats
    python benchmarks/gradient.py --memory        # also peak RSS in child processes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lightning_landscape.linalg.covariance import (
    CHUNK_ELEMENTS,
    gradient_covariance,
    per_sample_gradients,
)

SIZES = {"small": (32,), "large": (256, 256)}


def build(hidden: tuple[int, ...], batch: int, seed: int = 0) -> tuple[nn.Module, tuple]:
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.Tanh()]
        width = h
    layers.append(nn.Linear(width, 10))
    model = nn.Sequential(*layers).eval()
    X, y = load_digits(return_X_y=True)
    idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))[:batch]
    x = torch.tensor(X / 16.0, dtype=torch.float32)[idx]
    return model, (x, torch.tensor(y)[idx])


def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def loop(model: nn.Module, batch: tuple) -> torch.Tensor:
    params = list(model.parameters())
    x, y = batch
    rows = []
    for i in range(len(x)):
        g = torch.autograd.grad(loss_fn(model, (x[i : i + 1], y[i : i + 1])), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


def naive_func(model: nn.Module, batch: tuple) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    g = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(params, *batch)
    return torch.cat([g[k].reshape(len(batch[0]), -1) for k in params], dim=1)


def ours(model: nn.Module, batch: tuple) -> torch.Tensor:
    return per_sample_gradients(model, loss_fn, batch)


def make_opacus(model: nn.Module) -> Callable[[nn.Module, tuple], torch.Tensor] | None:
    try:
        from opacus import GradSampleModule
    except ImportError as err:
        print(f"  opacus not importable ({err}); skipped", flush=True)
        return None
    import copy

    # Opacus records activations only in train mode (no dropout or batch norm here: same output).
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="mean").train()

    def run(_: nn.Module, batch: tuple) -> torch.Tensor:
        x, y = batch
        for p in gsm.parameters():
            p.grad = None
            p.grad_sample = None
        loss = nn.functional.cross_entropy(gsm(x), y)
        loss.backward()
        n = len(x)
        # loss_reduction="mean": grad_sample holds the gradients of the per-sample losses.
        return torch.cat([p.grad_sample.reshape(n, -1) for p in gsm.parameters()], dim=1)

    return run


def median_time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def memory_child(method: str, size: str, batch: int) -> None:
    model, data = build(SIZES[size], batch)
    fn = {
        "ours": ours,
        "torch.func naive": naive_func,
        "covariance gram": lambda m, d: gradient_covariance(m, loss_fn, [d], method="gram"),
        "covariance lanczos": lambda m, d: gradient_covariance(m, loss_fn, [d], method="lanczos"),
    }[method]
    fn(model, data)  # warm-up: one-off allocations (vmap tracing, thread pools)
    # Reset the peak-RSS counter (Linux: write 5 to clear_refs), then read the peak of one call
    # above the resident memory before it.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fn(model, data)
    print(json.dumps({"peak_extra_MiB": (_status_kib("VmHWM") - before) / 1024}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_size(size: str, args: argparse.Namespace) -> dict[str, Any]:
    model, data = build(SIZES[size], args.batch)
    N = len(data[0])
    D = sum(p.numel() for p in model.parameters())
    chunk = max(1, CHUNK_ELEMENTS // D)
    print(f"[{size}] D = {D}, N = {N}, default chunk = {min(chunk, N)} samples", flush=True)
    methods: dict[str, Callable[[nn.Module, tuple], torch.Tensor]] = {
        "loop": loop,
        "torch.func naive": naive_func,
        "ours": ours,
    }
    peer = make_opacus(model)
    if peer is not None:
        methods["opacus"] = peer
    ref = loop(model, data)
    scale = float(ref.abs().max())
    errors = {}
    for name, fn in methods.items():  # warm-up and correctness
        errors[name] = float((fn(model, data) - ref).abs().max()) / scale
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            times[name].append(median_time(lambda fn=fn: fn(model, data)))
    rows = []
    base = statistics.median(times["loop"])
    held = {"loop": D, "torch.func naive": N * D, "ours": min(chunk, N) * D, "opacus": N * D}
    for name in methods:
        t = statistics.median(times[name])
        rows.append(
            {
                "method": name,
                "seconds": t,
                "samples_per_s": N / t,
                "speedup_vs_loop": base / t,
                "max_rel_err_vs_loop": errors[name],
                "grad_block_MiB": held[name] * 4 / 2**20,
            }
        )
    print(f"  {'method':<18}{'s/batch':>10}{'samples/s':>12}{'× loop':>8}{'rel err':>10}"
          f"{'block MiB':>11}")  # fmt: skip
    for r in rows:
        print(
            f"  {r['method']:<18}{r['seconds']:>10.4f}{r['samples_per_s']:>12.0f}"
            f"{r['speedup_vs_loop']:>8.1f}{r['max_rel_err_vs_loop']:>10.1e}"
            f"{r['grad_block_MiB']:>11.2f}"
        )
    cov = {}
    for method in ("gram", "lanczos"):
        gradient_covariance(model, loss_fn, [data], top_k=10, method=method)
        ts = [
            median_time(
                lambda m=method: gradient_covariance(model, loss_fn, [data], top_k=10, method=m)
            )
            for _ in range(args.repeats)
        ]
        res = gradient_covariance(model, loss_fn, [data], top_k=10, method=method)
        cov[method] = {"seconds": statistics.median(ts), "lambda_1": float(res.eigenvalues[0])}
        print(
            f"  gradient_covariance(top_k=10, method={method!r}): "
            f"{cov[method]['seconds']:.3f} s, λ1 = {cov[method]['lambda_1']:.6g}, "
            f"{res.num_products} products"
        )
    memory = {}
    if args.memory:
        for name in ("ours", "torch.func naive", "covariance gram", "covariance lanczos"):
            cmd = [sys.executable, __file__, "--memory-child", name, "--size", size]
            out = subprocess.run(
                [*cmd, "--batch", str(args.batch)],
                capture_output=True,
                text=True,
                check=True,
            )
            memory[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_MiB"]
            print(f"  peak extra RSS of one call, {name}: {memory[name]:.1f} MiB", flush=True)
    return {"size": size, "D": D, "N": N, "rows": rows, "covariance": cov, "memory": memory}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", default="small", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.size, args.batch)
        return
    if args.quick:
        args.repeats = 2
    print(f"torch {torch.__version__}, {args.threads} thread(s)", flush=True)
    results = [run_size(s, args) for s in (["small"] if args.quick else list(SIZES))]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
