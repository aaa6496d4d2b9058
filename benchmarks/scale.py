"""Cost of one Hessian measurement on realistic models, ours vs hessian-eigenthings and PyHessian.

For each model of ``benchmarks/models.py`` and each method, one fresh subprocess (with a timeout,
so that a failure or an out-of-memory kill does not end the suite) builds the seeded model and
probe batches, times one plain gradient over the probe set (median of 3, after a warm-up), then
runs one measurement and reports:

* ``HVPs`` and ``seconds`` of the measurement, and ``grad-eq`` = seconds / one gradient over the
  same probe set (the unit that transfers between machines);
* peak memory: the process's resident-set high-water mark (``ru_maxrss``; a fresh process per run,
  read by the parent as ``RUSAGE_CHILDREN`` too when the child dies) on CPU, or
  ``torch.cuda.max_memory_allocated`` on GPU; and the baseline after building model and data;
* for our methods, the memory model of the Lanczos bases (``lanczos_memory``) under the storage
  plan the run gets (full basis, or thick restart with its cap over the default budget of half
  the available memory) for the default step limit ``m`` and for the steps used.

Methods: ``ours-topk`` = ``hessian_spectrum(top_k=K, density=False, trace=False)``;
``ours-default`` = ``hessian_spectrum()`` at its defaults (top 10, density, trace);
``ours-fd`` = ``ours-topk`` with ``hvp="finite_difference"``; ``eigenthings`` =
hessian-eigenthings' ``lanczos(k=K, which="LA")`` at its defaults (``max_iter=2k``) on its
``HessianOperator`` over the full probe set; ``pyhessian`` = PyHessian's
``hessian(...).eigenvalues(top_n=K)`` at its defaults (power iteration with deflation,
``maxIter=100``, ``tol=1e-3``) over the probe set as its dataloader. Peers are imported, run and
counted (their product method wrapped), never copied. Where a peer fails the table says how.

Runs expected to need more than 8 GB are skipped, and recorded as not run, when the machine has
less than 14 GB available (``--min-free-gb``) or less than they need: the machine may be shared.

    python benchmarks/scale.py --device cpu --threads 1 --models resnet transformer lstm
    python benchmarks/scale.py --device cuda --models mlp20m mlp100m
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["ours-topk", "ours-default", "ours-fd", "eigenthings", "pyhessian"]
DEFAULT_MODELS = ["resnet", "transformer", "lstm", "mlp20m", "mlp100m"]


# --------------------------------------------------------------------------- worker


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _gradient_seconds(problem: Any, device: str) -> float:
    import torch

    params = [p for p in problem.model.parameters() if p.requires_grad]

    def grad() -> None:
        total = sum(len(b[0]) for b in problem.batches)
        loss = sum(problem.loss_fn(problem.model, b) * len(b[0]) / total for b in problem.batches)
        torch.autograd.grad(loss, params)
        _sync(device)

    grad()  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _run_ours(problem: Any, method: str, top_k: int) -> dict[str, Any]:
    from lightning_landscape.linalg import hessian_spectrum

    opts: dict[str, Any] = {"top_k": top_k, "density": False, "trace": False}
    if method == "ours-default":
        opts = {}
    if method == "ours-fd":
        opts["hvp"] = "finite_difference"
    res = hessian_spectrum(problem.model, problem.loss_fn, problem.batches, **opts)
    return {
        "eigenvalues": res.eigenvalues.tolist(),
        "num_hvps": res.num_hvps,
        "converged": bool(res.converged),
        "trace": res.trace,
    }


def _run_eigenthings(problem: Any, top_k: int, device: str) -> dict[str, Any]:
    import hessian_eigenthings as he

    op = he.HessianOperator(problem.model, problem.batches, problem.loss_fn, full_dataset=True)
    inner, count = op.matvec, [0]

    def counted(v: Any) -> Any:
        count[0] += 1
        return inner(v)

    op.matvec = counted
    res = he.lanczos(op, k=top_k, which="LA", seed=0)
    return {
        "eigenvalues": sorted(res.eigenvalues.detach().double().cpu().tolist(), reverse=True),
        "num_hvps": count[0],
    }


def _run_pyhessian(problem: Any, top_k: int, device: str) -> dict[str, Any]:
    from pyhessian import hessian

    comp = hessian(
        problem.model, problem.criterion, dataloader=problem.batches, cuda=device == "cuda"
    )
    inner, count = comp.dataloader_hv_product, [0]

    def counted(v: Any) -> Any:
        count[0] += 1
        return inner(v)

    comp.dataloader_hv_product = counted
    values, _ = comp.eigenvalues(top_n=top_k)
    return {"eigenvalues": sorted(map(float, values), reverse=True), "num_hvps": count[0]}


def _storage_plan(dim: int, top_k: int, dtype: Any, trace: bool) -> Any:
    """The storage plan our eigenvalue run gets on this machine now (full basis, or thick
    restart over the default budget of half the available memory)."""
    import torch

    from lightning_landscape.linalg.lanczos import default_max_iter, plan_storage

    m = default_max_iter(top_k, dim)
    return plan_storage(
        dim, 2 * m + 1, top_k=top_k, op_dtype=dtype, device=torch.device("cpu"),
        keep_products=trace,
    )  # fmt: skip


def _memory_model(plan: Any, dim: int, steps: int, top_k: int, trace: bool) -> int:
    """Bytes of our Lanczos bases after ``steps`` eigenvalue steps under ``plan``."""
    from lightning_landscape.linalg.lanczos import lanczos_memory

    return lanczos_memory(
        dim, steps, top_k=top_k, dtype=plan.dtype, max_basis_rows=plan.max_rows,
        keep_products=trace,
    )  # fmt: skip


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from benchmarks.models import build

    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    sizes = {k: spec[k] for k in ("num_batches", "batch_size") if spec.get(k)}
    problem = build(spec["model"], quick=spec["quick"], seed=0, **sizes)
    problem.model.to(device)
    problem.batches = [tuple(t.to(device) for t in b) for b in problem.batches]
    out: dict[str, Any] = {"num_params": problem.num_params, "samples": problem.num_samples}
    out["description"] = problem.description
    out["gradient_seconds"] = _gradient_seconds(problem, device)
    out["baseline_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        out["baseline_cuda_mb"] = torch.cuda.memory_allocated() / 2**20
    method, top_k = spec["method"], spec["top_k"]
    k, trace = (10, True) if method == "ours-default" else (top_k, False)
    dtype = next(problem.model.parameters()).dtype
    plan = _storage_plan(problem.num_params, k, dtype, trace)
    _sync(device)
    t0 = time.perf_counter()
    if method.startswith("ours"):
        res = _run_ours(problem, method, top_k)
    elif method == "eigenthings":
        res = _run_eigenthings(problem, top_k, device)
    else:
        res = _run_pyhessian(problem, top_k, device)
    _sync(device)
    out.update(res)
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if method.startswith("ours"):
        D, m_default = problem.num_params, min(problem.num_params, max(4 * k, 120))
        out["basis_cap"] = plan.max_rows
        mb = _memory_model(plan, D, m_default, k, trace) / 2**20
        out["memory_model_default_mb"] = mb
        used = min(out["num_hvps"], m_default)
        out["memory_model_used_mb"] = _memory_model(plan, D, used, k, trace) / 2**20
    return out


# --------------------------------------------------------------------------- parent


def available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def expected_gb(model: str, quick: bool, top_k: int = 5) -> float:
    """Rough peak of a run: weights, gradient, graph and working vectors (~8 vectors of D
    float32) plus ~3 top_k basis vectors (our bounded basis: top_k + 5; eigenthings: 2 top_k
    Lanczos vectors and top_k Ritz vectors)."""
    params = {"mlp20m": 20e6, "mlp100m": 100e6}.get(model)
    if params is None:
        return 2.0
    if quick:
        params = params / 10
    return params * 4 * (8 + 3 * top_k) / 2**30


def run_one(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        res = json.loads(lines[-1])
        res["status"] = res.get("status", "ok")
        return res
    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
    killed = proc.returncode < 0 and -proc.returncode == 9
    return {
        "status": ("killed (out of memory?)" if killed else "failed: " + err[:300]),
        "wall_seconds": wall,
        "children_maxrss_mb": max(after, before) / 1024,
    }


def fmt(x: Any, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]], device: str) -> str:
    mem = "peak GPU (MiB)" if device == "cuda" else "peak RSS (MiB)"
    head = (
        f"| model | D | samples | method | HVPs | seconds | grad-eq | grad-eq / HVP | grad (s) "
        f"| {mem} | baseline (MiB) | bases model: default m / used (MiB) | λ₁ | λ_k | status |\n"
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    out = [head]
    for r in rows:
        ok = r.get("status") == "ok"
        peak = r.get("peak_cuda_mb" if device == "cuda" else "peak_rss_mb")
        base = r.get("baseline_cuda_mb" if device == "cuda" else "baseline_rss_mb")
        grad_eq = r["seconds"] / r["gradient_seconds"] if ok else None
        model_mb = "—"
        if ok and r.get("memory_model_default_mb") is not None:
            model_mb = f"{r['memory_model_default_mb']:.0f} / {r['memory_model_used_mb']:.0f}"
            if r.get("basis_cap"):
                model_mb += f" (cap {r['basis_cap']})"
        eig = r.get("eigenvalues") if ok else None
        per_hvp = grad_eq / r["num_hvps"] if ok and r.get("num_hvps") else None
        out.append(
            f"| {r['model']} | {fmt(r.get('num_params'), ',')} | {fmt(r.get('samples'), 'd')} "
            f"| {r['method']} | {fmt(r.get('num_hvps'), 'd')} | {fmt(r.get('seconds'), '.1f')} "
            f"| {fmt(grad_eq, '.0f')} | {fmt(per_hvp, '.2f')} "
            f"| {fmt(r.get('gradient_seconds'), '.3f')} | {fmt(peak, '.0f')} | {fmt(base, '.0f')} "
            f"| {model_mb} | {fmt(eig[0] if eig else None, '.4g')} "
            f"| {fmt(eig[-1] if eig else None, '.4g')} | {r['status']} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--quick", action="store_true", help="small probe sets (and MLPs 1/10)")
    ap.add_argument("--num-batches", type=int, default=None, help="probe batches (override)")
    ap.add_argument("--batch-size", type=int, default=None, help="samples a batch (override)")
    ap.add_argument("--min-free-gb", type=float, default=14.0)
    ap.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    ap.add_argument(
        "--table", nargs="+", type=Path, help="only print the table of these --out files"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.table:
        rows = [json.loads(ln) for f in args.table for ln in f.read_text().splitlines() if ln]
        print(table(rows, rows[0]["device"] if rows else args.device))
        return 0
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    rows = []
    for model in args.models:
        for method in args.methods:
            spec = {
                "model": model,
                "method": method,
                "device": args.device,
                "top_k": args.top_k,
                "threads": args.threads,
                "quick": args.quick,
                "num_batches": args.num_batches,
                "batch_size": args.batch_size,
            }
            need, free = expected_gb(model, args.quick, args.top_k), available_gb()
            if args.device == "cpu" and need > 8 and (free < args.min_free_gb or need > free):
                res = {"status": f"not run: needs ~{need:.0f} GB, {free:.1f} GB available"}
            else:
                res = run_one(spec, args.timeout)
            row = {**spec, **res}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print()
    print(table(rows, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
