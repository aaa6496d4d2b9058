"""Top-k Hessian eigenvalues: lightning_landscape against its peers, same model, same data.

What is measured, in one run and one process per torch build:

* Problem: an MLP on ``sklearn.datasets.load_digits`` (pixels scaled to [0, 1], cross-entropy),
  at two sizes (64-32-10, about 2.4k parameters, and 64-96-64-10, about 13.1k parameters),
  trained for 200 SGD steps from a fixed seed so the Hessian is not the one at initialisation.
  The probe set is 4 fixed batches of 128 samples; the operator is the Hessian of the mean loss
  over those 512 samples, at the float32 weights.
* Exact reference: the dense Hessian in float64, built from ``torch.func`` HVP column blocks
  (``functional_call`` + ``jvp(grad)`` on blocks of identity columns, ``vmap``-ed), all its
  eigenvalues from LAPACK (``torch.linalg.eigvalsh``), in a child process, cached on disk by a
  hash of weights and data (``--cache-dir``).
* Ours: ``lightning_landscape.hessian_spectrum(..., top_k=10, density=False, trace=False)``
  at its defaults (float32): wall time, ``num_hvps``, max relative error of the top 10.
* hessian-eigenthings (PyPI ``hessian-eigenthings``, 1.0 API): its ``HessianOperator`` with
  ``lanczos`` and ``deflated_power_iteration``, at their defaults and then at the cheapest
  setting of a short sweep that reaches the target (chosen with the exact answer in hand, which
  favours the peer). HVPs are counted by wrapping the operator's ``matvec``.
* curvlinops (PyPI ``curvlinops-for-pytorch``): ``HessianLinearOperator(...).to_scipy()`` with
  ``scipy.sparse.linalg.eigsh(k=10, which="LA")``, swept over ``tol``. curvlinops pulls a
  different torch build, so it runs in its own virtual environment as a subprocess of this
  script (weights and probe data go through a temporary ``.pt`` file, results come back as
  JSON). It is skipped, with a message, when no such interpreter is found.
* HVP cost: one HVP with our ``HessianOperator`` (``matvec``, and ``matmat`` on a block of 8
  vectors, per vector) over the probe set, divided by one plain gradient evaluation
  (forward + backward) over the same batches; the one-time graph build (first product minus
  a later one) is reported apart. The peers' per-HVP times are shown beside it.

Timings: one warm-up call per library, then ``--repeats`` interleaved rounds (each round runs
every configuration once, so a change of machine load hits all methods alike); the reported
time is the median. Every method runs with the same ``torch.set_num_threads(--threads)``. On a
shared or busy 2-core machine use ``--threads 1``: two OpenMP threads on a contended machine
stall at barriers and give erratic timings. Targets: top 10 within 1e-4 relative error in no
more time than the fastest peer reaching the same accuracy, and one HVP at most 2.5 gradients.

Run (from the repository root, in an environment with the ``bench`` extra)::

    python benchmarks/hessian.py --curvlinops-python /path/to/venv-curv/bin/python
    python benchmarks/hessian.py --quick            # small model only, one round
    python benchmarks/hessian.py --json results.json

The curvlinops interpreter is found from ``--curvlinops-python``, else the environment variable
``LL_CURVLINOPS_PYTHON``, else ``../venv-curv/bin/python`` next to the repository.
See docs/benchmarks.md for the environments and the measured numbers.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TOP_K = 10
TARGET_REL_ERR = 1e-4
TARGET_HVP_OVER_GRAD = 2.5
NUM_PROBE_BATCHES = 4
PROBE_BATCH_SIZE = 128
TRAIN_STEPS = 200
SEED = 0
SIZES: dict[str, tuple[int, ...]] = {"small": (32,), "large": (96, 64)}

Batch = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- problem


def build_mlp(hidden: Sequence[int]) -> nn.Sequential:
    """64 -> hidden... -> 10 ReLU MLP."""
    layers: list[nn.Module] = []
    width = 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy on one ``(x, y)`` batch (the ``loss_fn(model, batch)`` convention)."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_problem(hidden: Sequence[int]) -> tuple[nn.Sequential, list[Batch]]:
    """Train an MLP briefly on digits; return it (eval mode) and the fixed probe batches."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x_all = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y_all = torch.tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(SEED)
    perm = torch.randperm(len(y_all), generator=gen)
    x_all, y_all = x_all[perm], y_all[perm]

    torch.manual_seed(SEED)
    model = build_mlp(hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = 64
    for step in range(TRAIN_STEPS):
        idx = torch.randint(0, len(y_all), (batch,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
        opt.step()
        del step
    model.eval()
    for p in model.parameters():
        p.grad = None

    n_probe = NUM_PROBE_BATCHES * PROBE_BATCH_SIZE
    xp, yp = x_all[:n_probe].clone(), y_all[:n_probe].clone()
    batches = list(zip(xp.split(PROBE_BATCH_SIZE), yp.split(PROBE_BATCH_SIZE), strict=True))
    return model, batches


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- helpers


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> tuple[float, Any]:
    """Median wall time of ``fn()`` over ``repeats`` calls (after ``warmup``), last result."""
    for _ in range(warmup):
        fn()
    times = []
    out = None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def max_rel_err(estimate: Sequence[float] | np.ndarray, exact: np.ndarray) -> float:
    """Max over the top k of |theta - lambda| / |lambda|, both sorted descending."""
    est = np.sort(np.asarray(estimate, dtype=np.float64))[::-1][: len(exact)]
    if len(est) < len(exact) or not np.all(np.isfinite(est)):
        return float("inf")
    return float(np.max(np.abs(est - exact) / np.abs(exact)))


def save_problem(
    path: Path, hidden: Sequence[int], model: nn.Module, batches: list[Batch], **kw: Any
) -> None:
    torch.save(
        {
            "hidden": list(hidden),
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "xs": [x for x, _ in batches],
            "ys": [y for _, y in batches],
            **kw,
        },
        path,
    )


def load_problem(path: str) -> tuple[nn.Sequential, list[Batch], dict[str, Any]]:
    cfg = torch.load(path, weights_only=True)
    model = build_mlp(cfg["hidden"])
    model.load_state_dict(cfg["state_dict"])
    model.eval()
    return model, list(zip(cfg["xs"], cfg["ys"], strict=True)), cfg


def run_worker(flag: str, payload: Path, out: Path) -> tuple[bool, str]:
    """Run this file as ``python hessian.py FLAG IN OUT`` with the interpreter in ``payload``."""
    cfg = torch.load(payload, weights_only=True)
    cmd = [cfg["python"], str(Path(__file__).resolve()), flag, str(payload), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.exists():
        return False, f"rc={proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"
    return True, ""


# --------------------------------------------------------------------------- exact reference


def exact_eigenvalues(model: nn.Module, batches: list[Batch], block: int = 512) -> np.ndarray:
    """All eigenvalues (ascending) of the float64 Hessian of the sample-weighted mean loss.

    Columns come in blocks from ``vmap`` over ``jvp(grad(f))`` (forward-over-reverse HVPs of
    the identity columns) at float64 copies of the weights; then a dense symmetric eigensolver
    (LAPACK ``syevd`` through ``torch.linalg.eigvalsh``). Memory: one ``D x D`` float64 matrix
    and LAPACK's copy of it.
    """
    from torch.func import functional_call, grad, jvp, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p.detach().to(torch.float64) for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    flat0 = torch.cat([p.reshape(-1) for p in params])
    dim = flat0.numel()
    data = [(x.to(torch.float64), y) for x, y in batches]
    total = float(sum(x.shape[0] for x, _ in data))

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        chunks = flat.split(sizes)
        p = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        out = flat.new_zeros(())
        for x, y in data:
            out = out + x.shape[0] * F.cross_entropy(functional_call(model, p, (x,)), y)
        return out / total

    g = grad(mean_loss)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return jvp(g, (flat0,), (v,))[1]

    hvps = vmap(hvp)
    hess = torch.empty(dim, dim, dtype=torch.float64)
    for start in range(0, dim, block):
        stop = min(start + block, dim)
        cols = torch.zeros(stop - start, dim, dtype=torch.float64)
        cols[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        with torch.no_grad():
            hess[start:stop] = hvps(cols)
    asym = float((hess - hess.T).abs().max() / hess.abs().max())
    if asym > 1e-10:
        raise RuntimeError(f"exact Hessian is not symmetric (relative asymmetry {asym:.1e})")
    hess += hess.T.clone()
    hess *= 0.5
    return torch.linalg.eigvalsh(hess).numpy()


def exact_worker(inp: str, outp: str) -> None:
    model, batches, cfg = load_problem(inp)
    torch.set_num_threads(int(cfg["threads"]))
    np.save(outp, exact_eigenvalues(model, batches))


def problem_key(model: nn.Module, batches: list[Batch]) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for x, y in batches:
        h.update(x.contiguous().numpy().tobytes())
        h.update(y.contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def exact_reference(
    hidden: Sequence[int], model: nn.Module, batches: list[Batch], args: argparse.Namespace
) -> tuple[np.ndarray, float, bool]:
    """All exact eigenvalues (ascending), seconds to build them, whether from the cache.

    Built in a child process: LAPACK's and numpy's thread pools would otherwise keep competing
    with torch's for the two cores and slow every timing that follows.
    """
    cache = None
    if args.cache_dir:
        cache = Path(args.cache_dir) / f"exact-{problem_key(model, batches)}.npy"
        if cache.exists():
            return np.load(cache), 0.0, True
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.pt", Path(tmp) / "out.npy"
        save_problem(inp, hidden, model, batches, threads=args.threads, python=sys.executable)
        t0 = time.perf_counter()
        ok, msg = run_worker("--exact-worker", inp, out)
        seconds = time.perf_counter() - t0
        if not ok:
            raise RuntimeError(f"exact reference failed: {msg}")
        eig = np.load(out)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, eig)
    return eig, seconds, False


# --------------------------------------------------------------------------- contenders
#
# A contender runs once and returns (eigenvalues, number of HVPs). All configurations of a size
# are timed in interleaved rounds (round r runs every configuration once), so a change of
# machine load during the run hits every method alike; the reported time is the median.


class Contender:
    def __init__(self, method: str, config: str, run: Callable[[], tuple[np.ndarray, int]]):
        self.method, self.config, self.run = method, config, run
        self.times: list[float] = []
        self.eigenvalues: np.ndarray | None = None
        self.hvps = 0
        self.error: str | None = None
        self.extra: dict[str, Any] = {}

    def once(self) -> None:
        if self.error is not None:
            return
        try:
            t0 = time.perf_counter()
            eig, hvps = self.run()
            self.times.append(time.perf_counter() - t0)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.extra["traceback"] = traceback.format_exc()
            return
        self.eigenvalues, self.hvps = np.asarray(eig, dtype=np.float64), int(hvps)

    def row(self, exact_top: np.ndarray | None) -> dict[str, Any]:
        row: dict[str, Any] = {"method": self.method, "config": self.config}
        if self.error is not None:
            return {**row, "error": self.error, **self.extra}
        row.update(
            seconds=statistics.median(self.times),
            times=self.times,
            hvps=self.hvps,
            eigenvalues=np.sort(self.eigenvalues)[::-1].tolist(),
            **self.extra,
        )
        if exact_top is not None:
            row["max_rel_err"] = max_rel_err(self.eigenvalues, exact_top)
        return row

    def reached(self, exact_top: np.ndarray | None) -> bool:
        row = self.row(exact_top)
        return row.get("max_rel_err", np.inf) <= TARGET_REL_ERR


def ours_contender(model: nn.Module, batches: list[Batch], **options: Any) -> Contender:
    try:
        import lightning_landscape

        spectrum_fn = lightning_landscape.hessian_spectrum
    except Exception as exc:
        c = Contender("ours hessian_spectrum", "defaults", lambda: (np.zeros(0), 0))
        c.error = f"lightning_landscape.hessian_spectrum not available: {exc!r}"
        return c

    def run() -> tuple[np.ndarray, int]:
        res = spectrum_fn(
            model, loss_fn, batches, top_k=TOP_K, density=False, trace=False, **options
        )
        c.extra.update(
            residuals=np.asarray(res.residuals, dtype=np.float64).tolist(),
            converged=bool(res.converged),
        )
        return np.asarray(res.eigenvalues), int(res.num_hvps)

    config = ", ".join(f"{k}={v:g}" for k, v in options.items()) + " (not default)"
    c = Contender("ours hessian_spectrum", config if options else "defaults", run)
    return c


def eigenthings_contenders(
    model: nn.Module, batches: list[Batch], quick: bool
) -> tuple[Any, list[list[Contender]]]:
    """hessian-eigenthings configurations as sweeps, each in ascending cost: tried in order
    until one reaches the target; the library default is always run."""
    import hessian_eigenthings as he

    dim = num_params(model)

    def runner(algo: Callable[[Any], Any]) -> Callable[[], tuple[np.ndarray, int]]:
        def run() -> tuple[np.ndarray, int]:
            op = he.HessianOperator(model, batches, loss_fn, full_dataset=True)
            inner = op.matvec
            count = [0]

            def counted(v: torch.Tensor) -> torch.Tensor:
                count[0] += 1
                return inner(v)

            op.matvec = counted  # lanczos and the deflated operators call op.matvec
            res = algo(op)
            return res.eigenvalues.detach().double().numpy(), count[0]

        return run

    # Each sweep is in ascending cost; the library default sits at its place in the order.
    lanczos = []
    steps = [15, 20, 40, 80] if quick else [12, 15, 20, 25, 30, 40, 60, 80, 100, 150, 200, 300]
    for m in steps:
        if m >= dim:
            break
        if m == 2 * TOP_K:
            config = "default (max_iter=2k=20)"
            algo = functools.partial(he.lanczos, k=TOP_K, which="LA", seed=SEED)
        else:
            # beyond 50 steps the library turns reorthogonalisation off by default; keep it on
            config = f"max_iter={m}, reorthogonalize"
            algo = functools.partial(
                he.lanczos, k=TOP_K, max_iter=m, which="LA", reorthogonalize=True, seed=SEED
            )
        lanczos.append(Contender("eigenthings lanczos", config, runner(algo)))
    power = []
    for it, tol in [(100, 1e-3), (100, 1e-4), (300, 1e-5), (1000, 1e-6)]:
        config = f"max_iter={it}, tol={tol:g}"
        if (it, tol) == (100, 1e-4):
            config = f"default ({config})"
        algo = functools.partial(
            he.deflated_power_iteration, k=TOP_K, max_iter=it, tol=tol, seed=SEED
        )
        power.append(Contender("eigenthings power_iter", config, runner(algo)))
    return he, [lanczos, power]


# --------------------------------------------------------------------------- curvlinops


def find_curvlinops_python(flag: str | None) -> str | None:
    if flag:
        return flag
    env = os.environ.get("LL_CURVLINOPS_PYTHON")
    if env:
        return env
    guess = Path(__file__).resolve().parents[2] / "venv-curv" / "bin" / "python"
    return str(guess) if guess.exists() else None


def curvlinops_worker(inp: str, outp: str) -> None:
    """Runs inside the curvlinops environment (no lightning_landscape, no sklearn there).

    Runs ``eigsh`` once per ``tol`` in the payload (stopping at the first that reaches the
    target when asked), after a warm-up product, and optionally times single products.
    """
    import curvlinops
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    model, batches, cfg = load_problem(inp)
    torch.set_num_threads(int(cfg["threads"]))
    exact_top = cfg["exact_top"].numpy() if cfg["exact_top"] is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    ce = nn.CrossEntropyLoss(reduction="mean")

    def make_op() -> Any:
        # check_deterministic=False: the safeguard costs extra passes; the data here is fixed
        return HessianLinearOperator(model, ce, params, batches, check_deterministic=False)

    count = [0]

    def counted_scipy(op: Any) -> LinearOperator:
        sp = op.to_scipy()

        def mv(x: np.ndarray) -> np.ndarray:
            count[0] += 1 if x.ndim == 1 else x.shape[1]
            return sp.matvec(x) if x.ndim == 1 else sp.matmat(x)

        return LinearOperator(sp.shape, matvec=mv, matmat=mv, dtype=sp.dtype)

    gen = torch.Generator().manual_seed(SEED)
    v = torch.randn(dim, generator=gen)
    vs = torch.randn(dim, 8, generator=gen)
    op = make_op()
    for _ in range(2):  # warm-up: a fresh process pays one-time costs on its first products
        op @ v
        op @ vs

    v0 = np.random.default_rng(SEED).standard_normal(dim)
    rows = []
    for tol in cfg["tols"]:
        count[0] = 0
        t0 = time.perf_counter()
        try:
            eig = eigsh(
                counted_scipy(make_op()),
                k=TOP_K,
                which="LA",
                tol=tol,
                v0=v0,
                return_eigenvectors=False,
            )
        except Exception as exc:
            rows.append({"tol": tol, "error": repr(exc)})
            continue
        seconds = time.perf_counter() - t0
        row = {"tol": tol, "seconds": seconds, "hvps": count[0], "eigenvalues": eig.tolist()}
        rows.append(row)
        if cfg["stop_at_target"] and exact_top is not None:
            if max_rel_err(eig, exact_top) <= TARGET_REL_ERR:
                break
    try:
        from importlib.metadata import version

        curv_version = version("curvlinops-for-pytorch")
    except Exception:
        curv_version = getattr(curvlinops, "__version__", "?")
    out: dict[str, Any] = {
        "version": curv_version,
        "torch": torch.__version__,
        "rows": rows,
    }
    if cfg["time_hvp"]:
        out["hvp_seconds"], _ = median_time(lambda: op @ v, 20, warmup=2)
        mm, _ = median_time(lambda: op @ vs, 10, warmup=1)
        out["matmat_seconds_per_vector"] = mm / 8
    Path(outp).write_text(json.dumps(out))


class CurvlinopsRounds:
    """The curvlinops configurations of one size, run one worker process per round."""

    TOLS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)

    def __init__(
        self,
        python: str,
        hidden: Sequence[int],
        model: nn.Module,
        batches: list[Batch],
        exact_top: np.ndarray | None,
        threads: int,
        quick: bool,
    ):
        self.python, self.hidden, self.model, self.batches = python, hidden, model, batches
        self.exact_top, self.threads = exact_top, threads
        self.tols: list[float] = list(self.TOLS if not quick else (1e-3, 1e-5))
        self.contenders: dict[float, Contender] = {}
        self.info: dict[str, Any] = {}
        self.error: str | None = None

    def round(self, first: bool, time_hvp: bool) -> None:
        if self.error is not None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            inp, out = Path(tmp) / "in.pt", Path(tmp) / "out.json"
            save_problem(
                inp,
                self.hidden,
                self.model,
                self.batches,
                python=self.python,
                threads=self.threads,
                tols=self.tols,
                stop_at_target=first,
                time_hvp=time_hvp,
                exact_top=None if self.exact_top is None else torch.tensor(self.exact_top),
            )
            ok, msg = run_worker("--curvlinops-worker", inp, out)
            if not ok:
                self.error = f"curvlinops worker failed ({self.python}): {msg}"
                return
            res = json.loads(out.read_text())
        self.info.update({k: v for k, v in res.items() if k != "rows"})
        for row in res["rows"]:
            c = self.contenders.setdefault(
                row["tol"],
                Contender("curvlinops + eigsh", f"tol={row['tol']:g}", lambda: (np.zeros(0), 0)),
            )
            if "error" in row:
                c.error = row["error"]
                continue
            c.times.append(row["seconds"])
            c.eigenvalues, c.hvps = np.asarray(row["eigenvalues"]), row["hvps"]
        if first:  # later rounds rerun exactly the configurations the first one ran
            self.tols = [t for t in self.tols if t in self.contenders]


# --------------------------------------------------------------------------- HVP cost


def hvp_costs(
    model: nn.Module, batches: list[Batch], block: int = 8, reps: int = 30
) -> dict[str, Any]:
    """Per-HVP time of our operator, graph-build cost, the peer's HVP, and a gradient's time.

    The gradient and the products are timed alternately (gradient, matvec, matmat, peer matvec,
    gradient, ...) so that a burst of machine load hits numerator and denominator alike.
    """
    out: dict[str, Any] = {}
    params = [p for p in model.parameters() if p.requires_grad]
    total = float(sum(x.shape[0] for x, _ in batches))
    dim = num_params(model)
    gen = torch.Generator().manual_seed(SEED)
    v = torch.randn(dim, generator=gen)
    vs = torch.randn(block, dim, generator=gen)

    def gradient() -> tuple[torch.Tensor, ...]:
        loss = sum(x.shape[0] * loss_fn(model, (x, y)) for x, y in batches) / total
        return torch.autograd.grad(loss, params)

    fns: dict[str, Callable[[], Any]] = {"gradient": gradient}
    try:
        import hessian_eigenthings as he

        op_he = he.HessianOperator(model, batches, loss_fn, full_dataset=True)
        fns["eigenthings_hvp"] = lambda: op_he.matvec(v)
    except Exception as exc:
        out["eigenthings_error"] = repr(exc)
    op: Any = None
    try:
        from lightning_landscape.linalg import HessianOperator

        op = HessianOperator(model, loss_fn, batches)
        fns["hvp"] = lambda: op.matvec(v)
        fns["matmat"] = lambda: op.matmat(vs)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()

    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(reps + 3):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= 3:  # the first rounds are warm-up
                times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    g = out["gradient_seconds"] = med["gradient"]
    if "eigenthings_hvp" in med:
        out["eigenthings_hvp_seconds"] = med["eigenthings_hvp"]
    if op is None:
        return out
    op.release()

    # one-time cost: constructor (builds and retains the first-order graph) + first product,
    # minus one later product; alternated with gradients as above
    builds, grads = [], []
    for _ in range(7):
        t0 = time.perf_counter()
        op = HessianOperator(model, loss_fn, batches)
        op.matvec(v)
        t1 = time.perf_counter()
        op.matvec(v)
        t2 = time.perf_counter()
        gradient()
        t3 = time.perf_counter()
        op.release()
        builds.append((t1 - t0) - (t2 - t1))
        grads.append(t3 - t2)
    build = statistics.median(builds)
    out.update(
        hvp_seconds=med["hvp"],
        matmat_block=block,
        matmat_seconds_per_vector=med["matmat"] / block,
        graph_build_seconds=build,
        hvp_over_gradient=med["hvp"] / g,
        matmat_per_vector_over_gradient=med["matmat"] / block / g,
        graph_build_over_gradient=build / statistics.median(grads),
    )
    return out


# --------------------------------------------------------------------------- one size


def run_size(name: str, hidden: tuple[int, ...], args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(SEED)
    model, batches = make_problem(hidden)
    dim = num_params(model)
    res: dict[str, Any] = {"hidden": list(hidden), "dim": dim, "notes": []}

    exact_top: np.ndarray | None = None
    if dim <= args.max_exact_dim:
        print(f"[{name}] D = {dim}: exact float64 Hessian ...", flush=True)
        eig, seconds, cached = exact_reference(hidden, model, batches, args)
        exact_top = np.sort(eig)[::-1][:TOP_K].copy()
        res.update(
            exact_top=exact_top.tolist(),
            exact_min=float(eig[0]),
            exact_trace=float(eig.sum()),
            exact_seconds=seconds,
            exact_cached=cached,
        )
    else:
        res["notes"].append(
            f"exact reference skipped (D = {dim} > --max-exact-dim {args.max_exact_dim}): "
            "no errors, accuracy targets not checked"
        )

    # warm-up (one-time library costs), then round 0 selects each sweep's configurations
    print(f"[{name}] round 1/{args.repeats} (warm-up, sweeps) ...", flush=True)
    ours = ours_contender(model, batches)
    ours.once()
    ours.times.clear()
    chosen: list[Contender] = [ours]
    # informative only (the targets use the defaults): a looser tolerance of our own
    for tol in args.ours_extra_tol:
        chosen.append(ours_contender(model, batches, tol=tol))
    sweeps: list[list[Contender]] = []
    try:
        he, sweeps = eigenthings_contenders(model, batches, args.quick)
        res["eigenthings_version"] = getattr(he, "__version__", "?")
        warm = next(c for c in sweeps[0] if c.config.startswith("default"))
        warm.once()
        warm.times.clear()
    except Exception as exc:
        res["notes"].append(f"hessian-eigenthings skipped: not importable ({exc!r})")

    py = find_curvlinops_python(args.curvlinops_python)
    curv: CurvlinopsRounds | None = None
    if py is None or not Path(py).exists():
        res["notes"].append(
            "curvlinops skipped: no interpreter found (pass --curvlinops-python or set "
            "LL_CURVLINOPS_PYTHON to a venv with curvlinops-for-pytorch; see docs/benchmarks.md)"
            + (f"; {py} does not exist" if py else "")
        )
    else:
        curv = CurvlinopsRounds(py, hidden, model, batches, exact_top, args.threads, args.quick)

    for c in chosen:
        c.once()
    for sweep in sweeps:
        for c in sweep:
            c.once()
            chosen.append(c)
            if c.reached(exact_top):
                break
        for c in sweep:  # the default always appears, even past the cheapest that reached
            if c.config.startswith("default") and c not in chosen:
                c.once()
                chosen.append(c)
    if curv is not None:
        curv.round(first=True, time_hvp=args.repeats == 1)
    for r in range(1, args.repeats):
        print(f"[{name}] round {r + 1}/{args.repeats} ...", flush=True)
        for c in chosen:
            c.once()
        if curv is not None:
            curv.round(first=False, time_hvp=r == args.repeats - 1)

    res["rows"] = [c.row(exact_top) for c in chosen]
    if curv is not None:
        if curv.error is not None:
            res["notes"].append(f"curvlinops skipped: {curv.error}")
        res["rows"] += [c.row(exact_top) for c in curv.contenders.values()]
        res["curvlinops_version"] = curv.info.get("version")
        res["curvlinops_torch"] = curv.info.get("torch")
        res["curvlinops_hvp_seconds"] = curv.info.get("hvp_seconds")
        res["curvlinops_matmat_seconds_per_vector"] = curv.info.get("matmat_seconds_per_vector")
        if curv.info.get("torch"):
            res["notes"].append(
                f"curvlinops {curv.info.get('version')} runs under torch {curv.info['torch']} "
                f"(its own venv); everything else under torch {torch.__version__}"
            )

    order = ["ours", "eigenthings lanczos", "eigenthings power_iter", "curvlinops"]
    res["rows"].sort(
        key=lambda r: (
            next(i for i, m in enumerate(order) if r["method"].startswith(m)),
            r.get("hvps", 0),
        )
    )
    print(f"[{name}] HVP cost ...", flush=True)
    res["hvp_cost"] = hvp_costs(model, batches)
    res["comparison"] = compare(res)
    return res


# --------------------------------------------------------------------------- report


def fmt(x: Any, spec: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not np.isfinite(x):
        return "inf"
    return format(x, spec)


def compare(res: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in res["rows"] if "error" not in r]
    ours = next(
        (r for r in rows if r["method"].startswith("ours") and r["config"] == "defaults"), None
    )
    peers = [r for r in rows if not r["method"].startswith("ours")]
    reached = [r for r in peers if r.get("max_rel_err", np.inf) <= TARGET_REL_ERR]
    out: dict[str, Any] = {"lines": []}
    lines = out["lines"]
    fastest = min(reached, key=lambda r: r["seconds"]) if reached else None
    if fastest is None:
        lines.append(f"no peer configuration reached max rel err <= {TARGET_REL_ERR:g}")
    else:
        out["fastest_peer"] = f"{fastest['method']} [{fastest['config']}]"
        out["fastest_peer_seconds"] = fastest["seconds"]
        lines.append(
            f"fastest peer at <= {TARGET_REL_ERR:g}: {out['fastest_peer']}: "
            f"{fastest['seconds']:.3f} s, {fastest['hvps']} HVPs, err {fastest['max_rel_err']:.1e}"
        )
    if ours is None:
        lines.append("ours: no result (see the error in the table)")
    else:
        err = ours.get("max_rel_err")
        out["ours_seconds"] = ours["seconds"]
        out["ours_max_rel_err"] = err
        met = err is not None and err <= TARGET_REL_ERR
        out["accuracy_target_met"] = met
        lines.append(
            f"ours: {ours['seconds']:.3f} s, {ours['hvps']} HVPs, err {fmt(err, '.1e')}"
            f" -> accuracy target {'MET' if met else 'MISSED'}"
        )
        if fastest is not None:
            ratio = ours["seconds"] / fastest["seconds"]
            out["time_ratio_vs_fastest_peer"] = ratio
            out["hvps_ratio_vs_fastest_peer"] = ours["hvps"] / max(1, fastest["hvps"])
            out["time_target_met"] = bool(ratio <= 1.0)
            lines.append(
                f"ours / fastest peer: time {ratio:.2f}x, HVPs "
                f"{out['hvps_ratio_vs_fastest_peer']:.2f}x -> time target "
                f"{'MET' if ratio <= 1.0 else 'MISSED'}"
            )
    hv = res.get("hvp_cost", {})
    if "hvp_over_gradient" in hv:
        met = hv["hvp_over_gradient"] <= TARGET_HVP_OVER_GRAD
        out["hvp_target_met"] = bool(met)
        lines.append(
            f"HVP / gradient: {hv['hvp_over_gradient']:.2f}x (matmat of {hv['matmat_block']}, "
            f"per vector: {hv['matmat_per_vector_over_gradient']:.2f}x) -> target <= "
            f"{TARGET_HVP_OVER_GRAD}: {'MET' if met else 'MISSED'}"
        )
    return out


def print_size_report(name: str, res: dict[str, Any]) -> None:
    print(f"\n## {name}: MLP 64-{'-'.join(map(str, res['hidden']))}-10, D = {res['dim']}\n")
    if res.get("exact_top") is not None:
        top = ", ".join(f"{x:.5g}" for x in res["exact_top"])
        how = "cached" if res.get("exact_cached") else f"built in {res['exact_seconds']:.0f} s"
        print(f"exact top-{TOP_K}: {top}  (lambda_min {res['exact_min']:.4g}; {how})\n")
    header = (
        f"| {'method':<24} | {'configuration':<34} | {'time (s)':>8} | {'HVPs':>5} "
        f"| {'max rel err':>11} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for row in res["rows"]:
        if "error" in row:
            print(f"| {row['method']:<24} | {row['config']:<34} | ERROR: {row['error']}")
            continue
        print(
            f"| {row['method']:<24} | {row['config']:<34} | {fmt(row['seconds'], '8.3f')} "
            f"| {row['hvps']:>5} | {fmt(row.get('max_rel_err'), '11.1e')} |"
        )
    print()
    for note in res.get("notes", []):
        print(f"note: {note}")

    hv = res.get("hvp_cost", {})
    g = hv.get("gradient_seconds")
    if g:
        print(f"\none gradient (forward+backward over the probe batches): {g * 1e3:.2f} ms")
        if "hvp_seconds" in hv:
            print(
                f"ours HVP, matvec: {hv['hvp_seconds'] * 1e3:.2f} ms = "
                f"{hv['hvp_over_gradient']:.2f} gradients"
            )
            print(
                f"ours HVP, matmat of {hv['matmat_block']}, per vector: "
                f"{hv['matmat_seconds_per_vector'] * 1e3:.2f} ms = "
                f"{hv['matmat_per_vector_over_gradient']:.2f} gradients"
            )
            print(
                f"ours one-time graph build (constructor + first product - later product): "
                f"{hv['graph_build_seconds'] * 1e3:.2f} ms = "
                f"{hv['graph_build_over_gradient']:.2f} gradients"
            )
        if "error" in hv:
            print(f"ours HVP timing ERROR: {hv['error']}")
        peers = (
            ("hessian-eigenthings HVP", hv.get("eigenthings_hvp_seconds")),
            ("curvlinops HVP, matvec", res.get("curvlinops_hvp_seconds")),
            (
                "curvlinops HVP, matmat of 8, per vector",
                res.get("curvlinops_matmat_seconds_per_vector"),
            ),
        )
        for label, s in peers:
            if s is not None:
                print(f"{label}: {s * 1e3:.2f} ms = {s / g:.2f} gradients")
    print()
    for line in res.get("comparison", {}).get("lines", []):
        print(line)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model only, 1 round")
    parser.add_argument("--json", metavar="OUT", help="write all results to this JSON file")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, every method")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=None)
    parser.add_argument("--max-exact-dim", type=int, default=15_000)
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get(
            "LL_BENCH_CACHE", str(Path.home() / ".cache" / "lightning_landscape" / "benchmarks")
        ),
        help="where exact eigenvalues are cached by a hash of weights and data ('' = off)",
    )
    parser.add_argument(
        "--ours-extra-tol",
        type=float,
        nargs="*",
        default=[1e-4],
        help="also time ours at these Lanczos tol values (informative rows, not the target)",
    )
    parser.add_argument("--curvlinops-python", default=None, help="python of the curvlinops venv")
    parser.add_argument("--curvlinops-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--exact-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.curvlinops_worker:
        curvlinops_worker(*args.curvlinops_worker)
        return 0
    if args.exact_worker:
        exact_worker(*args.exact_worker)
        return 0

    torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    sizes = args.sizes or (["small"] if args.quick else ["small", "large"])
    load0 = os.getloadavg()
    print(
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, load average {load0[0]:.1f}"
    )
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "targets": {"max_rel_err": TARGET_REL_ERR, "hvp_over_gradient": TARGET_HVP_OVER_GRAD},
        "load_average_start": load0[0],
        "sizes": {},
    }
    t0 = time.perf_counter()
    for name in sizes:
        results["sizes"][name] = run_size(name, SIZES[name], args)
    results["load_average_end"] = os.getloadavg()[0]
    results["total_seconds"] = time.perf_counter() - t0
    for name, res in results["sizes"].items():
        print_size_report(name, res)
    print(
        f"\ntotal {results['total_seconds']:.0f} s; load average {load0[0]:.1f} at start, "
        f"{results['load_average_end']:.1f} at end (2 cores: above ~2 the timings are contended)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
