"""On-disk store of a run's predicted log-probabilities on a fixed probe set.

Layout of a store directory (format ``lightning_landscape.predictions``, version 1)::

    meta.json          format, version, n_samples, n_classes, dtype, created by
    probe_ids.npy      (n_samples,) unicode ids of the probe samples, in stored order
    targets.npy        (n_samples,) integer labels (or (n_samples, n_classes) distributions)
    step_000000123.npz one record per checkpoint: ``logp`` (n_samples, n_classes), ``step``,
                       ``epoch``, ``loss``

Every file is written to a temporary name and moved into place with ``os.replace`` (atomic on
POSIX and Windows), so a crash loses at most the record being written and never leaves a torn
one; a reopened store lists what is there and continues. Records are float32 log-probabilities
(``n_samples · n_classes · 4`` bytes each, compressed), so probabilities that underflow are kept.

Probe ids identify samples across runs (default: a hash of each sample's input and target, see
:func:`sample_ids`). Runs are embedded jointly only when their id sets agree; their records are
then aligned by id (:func:`load_runs`), so the order in which ranks gathered them does not matter.
Beside the parameter trajectory store (:mod:`lightning_landscape.sampling.store`): both are what
a run leaves on disk. numpy only: no Lightning, no TensorBoard.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LoadedRuns",
    "PredictionRecord",
    "PredictionStore",
    "ProbeMismatchError",
    "find_stores",
    "load_runs",
    "sample_ids",
]

FORMAT = "lightning_landscape.predictions"
FORMAT_VERSION = 1
_RECORD = re.compile(r"^step_(\d{9,})\.npz$")


class ProbeMismatchError(ValueError):
    """Runs whose probe samples differ cannot be embedded jointly."""


def sample_ids(inputs: ArrayLike, targets: ArrayLike | None = None) -> np.ndarray:
    """Content ids of samples: a BLAKE2b hash (16 hex digits) of each sample's bytes.

    Two runs that probe the same samples (same values, same dtype) get the same ids, whatever
    the order or the sharding across ranks.

    Args:
        inputs: (n_samples, ...) array; row i is sample i.
        targets: Optional (n_samples, ...) targets hashed along with the inputs.

    Returns:
        (n_samples,) array of id strings.
    """
    x = np.ascontiguousarray(np.asarray(inputs))
    n = x.shape[0]
    x = x.reshape(n, -1)
    y = None if targets is None else np.ascontiguousarray(np.asarray(targets)).reshape(n, -1)
    ids = []
    for i in range(n):
        h = hashlib.blake2b(digest_size=8)
        h.update(str(x.dtype).encode())
        h.update(x[i].tobytes())
        if y is not None:
            h.update(y[i].tobytes())
        ids.append(h.hexdigest())
    return np.array(ids)


@dataclass(frozen=True, eq=False)
class PredictionRecord:
    """One checkpoint's predictions.

    Attributes:
        step: Optimizer steps taken (``trainer.global_step``).
        epoch: Epoch at the measurement.
        logp: (n_samples, n_classes) float32 log-probabilities, in the store's sample order.
        loss: Mean cross-entropy on the probe set (NaN if unknown).
    """

    step: int
    epoch: int
    logp: np.ndarray
    loss: float


def _atomic_write(path: str, write: Any) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class PredictionStore:
    """A directory of prediction records (see the module docstring for the format).

    Open with :meth:`create` (new or resumed run) or :meth:`open` (read an existing one).

    Args:
        path: The store directory.
    """

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        meta = os.path.join(self.path, "meta.json")
        if not os.path.exists(meta):
            raise FileNotFoundError(f"no prediction store at {self.path} (missing meta.json)")
        with open(meta, encoding="utf-8") as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT:
            raise ValueError(
                f"{meta} is not a {FORMAT} store; got format {self.meta.get('format')!r}"
            )
        version = self.meta.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{meta} has format version {version!r}; this lightning_landscape reads versions "
                f"up to {FORMAT_VERSION} (upgrade the package)"
            )
        self.probe_ids = np.load(os.path.join(self.path, "probe_ids.npy"), allow_pickle=False)
        self.targets = np.load(os.path.join(self.path, "targets.npy"), allow_pickle=False)

    @property
    def n_samples(self) -> int:
        return int(self.meta["n_samples"])

    @property
    def n_classes(self) -> int:
        return int(self.meta["n_classes"])

    @classmethod
    def open(cls, path: str) -> PredictionStore:
        """Open an existing store for reading (and appending)."""
        return cls(path)

    @classmethod
    def create(
        cls, path: str, *, probe_ids: ArrayLike, targets: ArrayLike, n_classes: int
    ) -> PredictionStore:
        """Create a store, or reopen it when it exists with the same probe ids (resume).

        Args:
            path: The store directory (created).
            probe_ids: (n_samples,) sample ids (e.g. :func:`sample_ids`).
            targets: (n_samples,) labels or (n_samples, n_classes) target distributions.
            n_classes: Number of classes.

        Raises:
            ProbeMismatchError: If the store exists with other probe ids.
            ValueError: If the ids are not unique-length 1-D or the targets do not match.
        """
        ids = np.asarray(probe_ids).astype(str)
        tgt = np.asarray(targets)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"probe_ids must be a non-empty 1-D array; got shape {ids.shape}")
        if tgt.shape[0] != ids.shape[0]:
            raise ValueError(
                f"targets must have one entry per probe sample ({ids.shape[0]}); got {tgt.shape}"
            )
        if os.path.exists(os.path.join(path, "meta.json")):
            store = cls(path)
            if store.probe_ids.shape != ids.shape or not np.array_equal(store.probe_ids, ids):
                raise ProbeMismatchError(
                    f"the prediction store at {path} was written for other probe samples "
                    f"({store.n_samples} ids) than this run's ({ids.size}); use another directory"
                )
            return store
        os.makedirs(path, exist_ok=True)
        _atomic_write(os.path.join(path, "probe_ids.npy"), lambda f: np.save(f, ids))
        _atomic_write(os.path.join(path, "targets.npy"), lambda f: np.save(f, tgt))
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "n_samples": int(ids.size),
            "n_classes": int(n_classes),
            "dtype": "float32",
            "content": "log-probabilities",
        }
        _atomic_write(
            os.path.join(path, "meta.json"),
            lambda f: f.write(json.dumps(meta, indent=1).encode()),
        )
        return cls(path)

    # -- records ---------------------------------------------------------------------------
    def _record_path(self, step: int) -> str:
        return os.path.join(self.path, f"step_{int(step):09d}.npz")

    def steps(self) -> list[int]:
        """Steps of the stored records, ascending."""
        out = []
        for name in os.listdir(self.path):
            m = _RECORD.match(name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def append(
        self, step: int, logp: ArrayLike, *, epoch: int = 0, loss: float = float("nan")
    ) -> None:
        """Write one record atomically (a record for the same step is replaced).

        Args:
            step: Optimizer step.
            logp: (n_samples, n_classes) log-probabilities, in the store's sample order.
            epoch: Epoch.
            loss: Mean probe loss.

        Raises:
            ValueError: If ``logp`` has the wrong shape.
        """
        a = np.asarray(logp, dtype=np.float32)
        if a.shape != (self.n_samples, self.n_classes):
            raise ValueError(
                f"logp must have shape ({self.n_samples}, {self.n_classes}); got {a.shape}"
            )
        _atomic_write(
            self._record_path(step),
            lambda f: np.savez_compressed(
                f,
                logp=a,
                step=np.int64(step),
                epoch=np.int64(epoch),
                loss=np.float64(loss),
            ),
        )

    def read(self, step: int) -> PredictionRecord:
        """The record of ``step``."""
        with np.load(self._record_path(step), allow_pickle=False) as z:
            return PredictionRecord(
                step=int(z["step"]), epoch=int(z["epoch"]), logp=z["logp"], loss=float(z["loss"])
            )

    def records(self) -> list[PredictionRecord]:
        """All records, by step."""
        return [self.read(s) for s in self.steps()]

    def truncate(self, after_step: int) -> list[int]:
        """Delete records with step > ``after_step`` (a resume from an earlier checkpoint).

        Returns:
            The deleted steps.
        """
        gone = [s for s in self.steps() if s > after_step]
        for s in gone:
            os.remove(self._record_path(s))
        return gone


def find_stores(run_dir: str) -> list[str]:
    """Prediction stores under ``run_dir`` (the folder itself or any subfolder), sorted."""
    found = []
    for root, _dirs, files in os.walk(run_dir):
        if "meta.json" in files:
            try:
                with open(os.path.join(root, "meta.json"), encoding="utf-8") as f:
                    if json.load(f).get("format") == FORMAT:
                        found.append(root)
            except (OSError, ValueError):
                continue
    return sorted(found)


@dataclass(frozen=True, eq=False)
class LoadedRuns:
    """Several runs' records aligned on the same probe samples.

    Attributes:
        logp: (n_checkpoints, n_samples, n_classes) float32 log-probabilities, runs concatenated.
        run: (n_checkpoints,) index of each checkpoint's run in ``names``.
        step: (n_checkpoints,) steps.
        epoch: (n_checkpoints,) epochs.
        loss: (n_checkpoints,) probe losses.
        names: Run names (store paths).
        probe_ids: (n_samples,) the common sample order (the first run's).
        targets: The first run's targets in that order.
    """

    logp: np.ndarray
    run: np.ndarray
    step: np.ndarray
    epoch: np.ndarray
    loss: np.ndarray
    names: list[str]
    probe_ids: np.ndarray
    targets: np.ndarray


def load_runs(paths: Sequence[str], names: Sequence[str] | None = None) -> LoadedRuns:
    """Load several stores and align them on the first one's sample order.

    Args:
        paths: Store directories.
        names: Labels of the runs (default: the paths).

    Returns:
        :class:`LoadedRuns`.

    Raises:
        ProbeMismatchError: If the stores' probe id sets (or class counts) differ; the message
            names the runs and how many ids each lacks.
        ValueError: If no path is given or a store holds no record.
    """
    if not paths:
        raise ValueError("paths must name at least one prediction store; got none")
    labels = list(names) if names is not None else [os.fspath(p) for p in paths]
    stores = [PredictionStore.open(p) for p in paths]
    ref = stores[0]
    ref_ids = ref.probe_ids
    if len(set(ref_ids.tolist())) != ref_ids.size:
        raise ProbeMismatchError(f"{labels[0]}: probe ids are not unique")
    position = {pid: i for i, pid in enumerate(ref_ids.tolist())}
    blocks, run, step, epoch, loss = [], [], [], [], []
    for k, (store, label) in enumerate(zip(stores, labels, strict=True)):
        ids = store.probe_ids
        if store.n_classes != ref.n_classes:
            raise ProbeMismatchError(
                f"runs {labels[0]!r} and {label!r} predict different numbers of classes "
                f"({ref.n_classes} and {store.n_classes}); they cannot be embedded jointly"
            )
        if ids.size != ref_ids.size or set(ids.tolist()) != set(position):
            missing = len(set(position) - set(ids.tolist()))
            extra = len(set(ids.tolist()) - set(position))
            raise ProbeMismatchError(
                f"runs {labels[0]!r} and {label!r} were probed on different samples: {label!r} "
                f"lacks {missing} of {labels[0]!r}'s {ref_ids.size} probe ids and has {extra} "
                "others. Joint InPCA compares predictions sample by sample; record all runs on "
                "the same probe set (same data, same num_probe_batches, an unshuffled probe "
                "loader)."
            )
        order = np.array([position[i] for i in ids.tolist()])
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        records = store.records()
        if not records:
            raise ValueError(f"run {label!r} ({store.path}) holds no prediction record")
        for r in records:
            blocks.append(r.logp[inverse])
            run.append(k)
            step.append(r.step)
            epoch.append(r.epoch)
            loss.append(r.loss)
    return LoadedRuns(
        logp=np.stack(blocks),
        run=np.array(run),
        step=np.array(step),
        epoch=np.array(epoch),
        loss=np.array(loss),
        names=labels,
        probe_ids=ref_ids,
        targets=ref.targets,
    )
