"""Command line: ``python -m lightning_landscape {report,inpca} ...``.

``report RUN_DIR [--out report.html] [--csv DIR] [--steps S ...]`` writes one self-contained
HTML page of everything the monitors recorded in a run (read from its event files), and
optionally the scalars as one CSV per monitor.

``inpca`` embeds the predictions that ``InPCAMonitor`` saved in several runs jointly (Mao et al.,
PNAS 2024) and writes the result to TensorBoard as a run of its own, so ``tensorboard --logdir``
over the runs and ``OUT_DIR`` shows whether the configurations share one manifold.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _inpca(args: argparse.Namespace) -> int:
    from torch.utils.tensorboard import SummaryWriter

    from .dashboard.inpca import write_joint_inpca
    from .embeddings.joint import joint_inpca, resolve_runs
    from .sampling.predictions import ProbeMismatchError

    try:
        paths, names = resolve_runs(args.run_dirs)
        result = joint_inpca(paths, names=names, n_components=args.n_components)
    except (ProbeMismatchError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    writer = SummaryWriter(args.out)
    try:
        write_joint_inpca(writer, result)
    finally:
        writer.close()
    emb = result.embedding
    print(f"{len(names)} runs, {result.run.size} checkpoints -> {args.out}")
    for i, value in enumerate(emb.explained_stress_cumulative, 1):
        print(f"explained stress, top {i}: {value:.4f}")
    print(f"imaginary dimensions among the top {emb.coordinates.shape[1]}: {emb.n_imaginary}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .dashboard.report import read_run, write_csv, write_report

    try:
        record = read_run(args.run_dir)
        out = write_report(args.run_dir, args.out, steps=args.steps, record=record)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report of {', '.join(record.monitors)} -> {out}")
    if args.csv:
        for path in write_csv(record, args.csv):
            print(f"csv -> {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 on success, 2 on bad input)."""
    parser = argparse.ArgumentParser(prog="python -m lightning_landscape")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inpca", help="joint InPCA of several runs' saved predictions")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run or log directories")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="TensorBoard run to write")
    p.add_argument("--n-components", type=int, default=3, help="dimensions (default 3)")
    r = sub.add_parser("report", help="a self-contained HTML report of one run")
    r.add_argument("run_dir", metavar="RUN_DIR", help="run or log directory (event files)")
    r.add_argument("--out", default="landscape_report.html", help="HTML file to write")
    r.add_argument("--csv", metavar="DIR", help="also write the scalars as CSV files here")
    r.add_argument(
        "--steps", type=int, nargs="+", metavar="S", help="show figures nearest to these steps"
    )
    args = parser.parse_args(argv)
    if args.command == "report":
        return _report(args)
    if args.command == "inpca":
        if args.n_components < 1:
            parser.error(f"--n-components must be at least 1; got {args.n_components}")
        return _inpca(args)
    return 2  # pragma: no cover - argparse refuses unknown commands


if __name__ == "__main__":
    sys.exit(main())
