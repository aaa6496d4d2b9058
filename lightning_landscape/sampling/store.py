"""On-disk trajectory store: samples appended as they are taken, reloaded on resume.

Layout of a store directory:

- ``store.json``: ``{"version": 1, "dim": d, "dtype": "float64", ...}`` written once;
- ``vectors.bin``: the samples, row after row, ``d`` little-endian float64 each;
- ``meta.csv``: one line per sample, ``step,epoch,loss``, after a header line.

:meth:`TrajectoryStore.append` writes the vector first and then its metadata line, and flushes
both to the operating system (``fsync=True`` also forces them to the disk), so a crashed process
loses at most the sample being written. Opening a store drops an incomplete tail (a vector
without its line, a line without its newline). :meth:`TrajectoryStore.truncate` cuts the store
back to a given number of samples: a run resumed from a checkpoint truncates to the count saved
in that checkpoint, so the samples taken after it (which training will redo) are not duplicated
and none before it are missing.

Memory: nothing is held in memory between calls but the two files' append handles (opened at the
first append, closed by :meth:`TrajectoryStore.close` or a cut); :meth:`TrajectoryStore.load`
reads n × d numbers.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Trajectory", "TrajectoryStore"]

_VERSION = 1
_HEADER = "step,epoch,loss\n"


@dataclass(frozen=True, eq=False)
class Trajectory:
    """Samples read back from a :class:`TrajectoryStore`.

    Attributes:
        vectors: (n, d) float64 samples in the order they were taken.
        steps: (n,) int64 optimizer step of each sample.
        epochs: (n,) int64 epoch of each sample.
        losses: (n,) float64 training loss at each sample (NaN if unknown).
    """

    vectors: np.ndarray
    steps: np.ndarray
    epochs: np.ndarray
    losses: np.ndarray

    def __len__(self) -> int:
        return int(self.steps.size)


class TrajectoryStore:
    """Append-only store of fixed-length float64 vectors with (step, epoch, loss) metadata.

    Args:
        directory: folder of the store (created if missing).
        dim: length of every vector.
        info: extra JSON-serialisable facts saved in ``store.json`` (e.g. the sketch's seed);
            an existing store with a different ``dim``, or different ``info`` when ``info`` is
            given, is refused (None: take the existing store's).
        fsync: also force every append to the disk (slower; survives power loss).

    Raises:
        ValueError: On a bad ``dim``, or an existing store in ``directory`` that does not match.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        dim: int,
        *,
        info: dict[str, Any] | None = None,
        fsync: bool = False,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim <= 0:
            raise ValueError(f"dim must be a positive integer; got {dim!r}")
        self.directory = os.fspath(directory)
        self.dim = int(dim)
        self.fsync = bool(fsync)
        self.info = dict(info or {})
        check_info = info is not None
        self._row_bytes = 8 * self.dim
        self._files: tuple[Any, Any] | None = None  # append handles: no open() per sample
        os.makedirs(self.directory, exist_ok=True)
        header = {"version": _VERSION, "dim": self.dim, "dtype": "float64", "info": self.info}
        head_path = os.path.join(self.directory, "store.json")
        if os.path.exists(head_path):
            with open(head_path, encoding="utf-8") as f:
                existing = json.load(f)
            if not check_info:
                self.info = dict(existing.get("info", {}))
            if existing.get("dim") != self.dim or existing.get("info", {}) != json.loads(
                json.dumps(self.info)
            ):
                raise ValueError(
                    f"directory {self.directory!r} holds a store with dim={existing.get('dim')} "
                    f"and info={existing.get('info')}; got dim={self.dim} and info={self.info}"
                )
        else:
            with open(head_path, "w", encoding="utf-8") as f:
                json.dump(header, f)
        self._vec_path = os.path.join(self.directory, "vectors.bin")
        self._meta_path = os.path.join(self.directory, "meta.csv")
        if not os.path.exists(self._meta_path):
            with open(self._meta_path, "w", encoding="utf-8") as f:
                f.write(_HEADER)
        if not os.path.exists(self._vec_path):
            open(self._vec_path, "wb").close()
        self._rows = self._repair()

    # -- reading -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._rows

    def _meta_lines(self) -> list[str]:
        with open(self._meta_path, encoding="utf-8") as f:
            text = f.read()
        lines = text.split("\n")
        # The last element is "" after a final newline, or an incomplete line: drop it.
        return lines[1:-1] if lines and lines[0] + "\n" == _HEADER else []

    def _repair(self) -> int:
        """Drop an incomplete tail left by a crash; return the number of complete samples."""
        lines = self._meta_lines()
        vec_rows = os.path.getsize(self._vec_path) // self._row_bytes
        rows = min(len(lines), vec_rows)
        self._cut(rows, lines)
        return rows

    def _cut(self, rows: int, lines: list[str]) -> None:
        self.close()
        with open(self._vec_path, "r+b") as f:
            f.truncate(rows * self._row_bytes)
        with open(self._meta_path, "w", encoding="utf-8") as f:
            f.write(_HEADER + "".join(line + "\n" for line in lines[:rows]))

    def load(self) -> Trajectory:
        """All complete samples."""
        n = self._rows
        vectors = np.fromfile(self._vec_path, dtype="<f8", count=n * self.dim).reshape(n, self.dim)
        lines = self._meta_lines()[:n]
        steps = np.array([int(x.split(",")[0]) for x in lines], dtype=np.int64)
        epochs = np.array([int(x.split(",")[1]) for x in lines], dtype=np.int64)
        losses = np.array([float(x.split(",")[2]) for x in lines], dtype=np.float64)
        return Trajectory(vectors=vectors, steps=steps, epochs=epochs, losses=losses)

    # -- writing -----------------------------------------------------------------------------
    def append(self, vector: Any, *, step: int, epoch: int = 0, loss: float = math.nan) -> None:
        """Append one sample and flush it.

        Raises:
            ValueError: If ``vector`` does not have ``dim`` finite-or-not float entries.
            OSError: If a write fails (disk full); the store is left with the samples before.
        """
        v = np.ascontiguousarray(np.asarray(vector, dtype="<f8").reshape(-1))
        if v.size != self.dim:
            raise ValueError(f"vector must have dim={self.dim} entries; got {v.size}")
        loss_text = repr(float(loss)) if loss is not None else "nan"
        meta_bytes = os.path.getsize(self._meta_path)
        if self._files is None:
            # Opening both files at every sample cost more than writing them.
            self._files = (open(self._vec_path, "ab"), open(self._meta_path, "a", encoding="utf-8"))
        vec, meta = self._files
        try:
            vec.write(v.tobytes())
            vec.flush()
            if self.fsync:
                os.fsync(vec.fileno())
            meta.write(f"{int(step)},{int(epoch)},{loss_text}\n")
            meta.flush()
            if self.fsync:
                os.fsync(meta.fileno())
        except BaseException:
            # A partial row (disk full, an interrupt) would shift every later row: drop the
            # handles with whatever their buffers still hold, then cut both files back to the
            # samples before (shortening a file needs no free space).
            self._discard_files()
            os.truncate(self._vec_path, self._rows * self._row_bytes)
            os.truncate(self._meta_path, meta_bytes)
            raise
        self._rows += 1

    def close(self) -> None:
        """Close the append handles (the next :meth:`append` reopens them)."""
        files, self._files = self._files, None
        for f in files or ():
            f.close()

    def _discard_files(self) -> None:
        """Close the handles after a failed write; a buffer that cannot be flushed is lost
        (the caller cuts the files back), never written later."""
        files, self._files = self._files, None
        for f in files or ():
            with contextlib.suppress(OSError):
                f.close()

    def __del__(self) -> None:
        if getattr(self, "_files", None) is not None:
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": None}  # open files do not pickle

    def truncate(self, rows: int) -> None:
        """Keep the first ``rows`` samples (a resumed run cuts back to its checkpoint).

        Raises:
            ValueError: If ``rows`` is negative or more than the store holds.
        """
        if isinstance(rows, bool) or not isinstance(rows, numbers.Integral) or rows < 0:
            raise ValueError(f"rows must be an integer >= 0; got {rows!r}")
        if rows > self._rows:
            raise ValueError(
                f"rows must be at most the {self._rows} samples in the store; got {rows}"
            )
        if rows < self._rows:
            self._cut(int(rows), self._meta_lines())
            self._rows = int(rows)
