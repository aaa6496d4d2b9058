"""TrajectoryStore: appends survive a crash up to the unsaved tail; resume cuts back to the
checkpoint without gaps or duplicates."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from lightning_landscape.sampling.store import TrajectoryStore


def _fill(store: TrajectoryStore, steps) -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((len(steps), store.dim))
    for s, v in zip(steps, rows, strict=True):
        store.append(v, step=s, epoch=s // 10, loss=1.0 / (s + 1))
    return rows


def test_append_and_load_round_trip(tmp_path):
    store = TrajectoryStore(tmp_path / "t", 5)
    rows = _fill(store, [0, 3, 6])
    store.append(np.ones(5), step=9)  # loss unknown
    traj = TrajectoryStore(tmp_path / "t", 5).load()  # a fresh reader sees everything
    assert len(traj) == 4
    np.testing.assert_array_equal(traj.vectors[:3], rows)
    np.testing.assert_array_equal(traj.steps, [0, 3, 6, 9])
    np.testing.assert_array_equal(traj.epochs, [0, 0, 0, 0])
    np.testing.assert_array_equal(traj.losses[:3], [1.0, 0.25, 1 / 7])
    assert math.isnan(traj.losses[3])


def test_crash_loses_only_the_unsaved_tail(tmp_path):
    store = TrajectoryStore(tmp_path / "t", 4)
    rows = _fill(store, [0, 1, 2])
    # A crash in the middle of the next append: half a vector, no metadata line.
    with open(os.path.join(store.directory, "vectors.bin"), "ab") as f:
        f.write(np.arange(2, dtype="<f8").tobytes())
    reopened = TrajectoryStore(tmp_path / "t", 4)
    assert len(reopened) == 3
    np.testing.assert_array_equal(reopened.load().vectors, rows)
    # A crash after the vector, before the newline of its metadata line.
    reopened.append(np.zeros(4), step=3)
    with open(os.path.join(store.directory, "vectors.bin"), "ab") as f:
        f.write(np.ones(4, dtype="<f8").tobytes())
    with open(os.path.join(store.directory, "meta.csv"), "a") as f:
        f.write("4,0,0.5")
    again = TrajectoryStore(tmp_path / "t", 4)
    np.testing.assert_array_equal(again.load().steps, [0, 1, 2, 3])
    again.append(np.full(4, 7.0), step=4)
    traj = TrajectoryStore(tmp_path / "t", 4).load()
    np.testing.assert_array_equal(traj.steps, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(traj.vectors[4], np.full(4, 7.0))


def test_resume_truncates_to_the_checkpoint_without_gaps_or_duplicates(tmp_path):
    store = TrajectoryStore(tmp_path / "t", 3)
    _fill(store, [0, 5, 10, 15, 20])  # checkpoint after step 10 (3 rows), crash after 20
    resumed = TrajectoryStore(tmp_path / "t", 3)
    resumed.truncate(3)
    _fill(resumed, [15, 20, 25])  # training redoes steps 11..25
    steps = TrajectoryStore(tmp_path / "t", 3).load().steps
    np.testing.assert_array_equal(steps, [0, 5, 10, 15, 20, 25])


def test_mismatched_store_and_bad_arguments_raise(tmp_path):
    TrajectoryStore(tmp_path / "t", 3, info={"seed": 0})
    with pytest.raises(ValueError, match="holds a store with dim=3"):
        TrajectoryStore(tmp_path / "t", 4, info={"seed": 0})
    with pytest.raises(ValueError, match="holds a store"):
        TrajectoryStore(tmp_path / "t", 3, info={"seed": 1})
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        TrajectoryStore(tmp_path / "u", 0)
    store = TrajectoryStore(tmp_path / "t", 3, info={"seed": 0})
    with pytest.raises(ValueError, match="vector must have dim=3 entries; got 2"):
        store.append(np.zeros(2), step=0)
    with pytest.raises(ValueError, match="rows must be at most the 0 samples"):
        store.truncate(1)
    with pytest.raises(ValueError, match="rows must be an integer >= 0"):
        store.truncate(-1)


def test_appends_through_kept_handles_survive_pickling_cuts_and_close(tmp_path):
    """The append handles stay open between samples: a pickled copy (ddp_spawn), a cut back
    and a close each leave the store holding exactly what was appended, in order."""
    import pickle

    store = TrajectoryStore(tmp_path / "s", dim=3)
    rows = [np.arange(3.0) + 10 * i for i in range(5)]
    for i, row in enumerate(rows[:3]):
        store.append(row, step=i, loss=0.5 * i)
    # Readable while the handles are open: every append is flushed.
    np.testing.assert_array_equal(store.load().vectors, np.stack(rows[:3]))
    copy = pickle.loads(pickle.dumps(store))
    assert copy._files is None and len(copy) == 3
    store.truncate(2)  # closes the handles before cutting the files
    store.append(rows[3], step=3, loss=1.5)
    store.close()
    store.append(rows[4], step=4, loss=2.0)  # reopens
    store.close()
    reopened = TrajectoryStore(tmp_path / "s", dim=3)
    out = reopened.load()
    np.testing.assert_array_equal(out.vectors, np.stack([rows[0], rows[1], rows[3], rows[4]]))
    np.testing.assert_array_equal(out.steps, [0, 1, 3, 4])
    np.testing.assert_array_equal(out.losses, [0.0, 0.5, 1.5, 2.0])
