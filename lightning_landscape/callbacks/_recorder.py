"""The parameter trajectory on disk: samples of a module's weights (or gradients) along training.

Trainer-independent (torch, the sketch and the store; no Lightning): the diffusion monitor
decides when to record and checkpoints :meth:`TrajectoryRecorder.state_dict`, so that a resumed
run reopens the same store, cut back to the checkpoint's count.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch

from .._checks import check_positive_int
from ..sampling.sketch import ParameterSketch
from ..sampling.store import Trajectory, TrajectoryStore

__all__: list[str] = []


class TrajectoryRecorder:
    """Appends sketches of a module's trainable parameters, or of their gradients, to a store.

    The parameter set (``named_parameters()`` order, trainable ones, buffers excluded) is fixed
    when the recorder is first opened. Cost per sample: O(D) for D parameters (the sketch
    recomputes its hashes on the parameters' device), 8·d bytes on disk for d =
    ``sketch.output_dim``; nothing is kept in memory.

    Args:
        sample: ``"parameters"`` or ``"gradients"`` (the ``.grad`` of each parameter).
        sketch_dim: sketch size above ``exact_max_params`` parameters.
        exact_max_params: up to this many parameters the samples are exact.
        seed: seeds the sketch.

    Raises:
        ValueError: On an option out of range (the message names it and the value).

    Attributes:
        param_names: the recorded parameters (None before the first :meth:`open`).
        directory: the store's folder (None before the first :meth:`open`).
        rows: samples in the store.
    """

    def __init__(self, *, sample: str, sketch_dim: int, exact_max_params: int, seed: int) -> None:
        if sample not in ("parameters", "gradients"):
            raise ValueError(f"sample must be 'parameters' or 'gradients'; got {sample!r}")
        check_positive_int("sketch_dim", sketch_dim)
        for name, value in (("exact_max_params", exact_max_params), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
        self.sample = sample
        self.sketch_dim = sketch_dim
        self.exact_max_params = exact_max_params
        self.seed = seed
        self.param_names: list[str] | None = None
        self.directory: str | None = None
        self.rows = 0
        # Opened in open(), dropped in close() (ddp_spawn pickles the monitor: no open files).
        self.sketch: ParameterSketch | None = None
        self._store: TrajectoryStore | None = None

    @property
    def is_open(self) -> bool:
        return self._store is not None

    def open(self, module: torch.nn.Module, new_directory: str) -> None:
        """Open the store: a resumed recorder (``directory`` set) reopens its own and cuts it
        back to ``rows``; otherwise, or if it has gone, a new one in ``new_directory``.

        Raises:
            ValueError: If a recorded parameter is not in ``module``.
        """
        if self.param_names is None:
            self.param_names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        missing = [n for n in self.param_names if n not in params]
        if missing:
            raise ValueError(
                f"DiffusionMapMonitor: parameters {missing[:3]} of the recorded trajectory are "
                "not in the module; resume with the same model"
            )
        self.sketch = ParameterSketch(
            [params[n].numel() for n in self.param_names],
            dim=self.sketch_dim,
            seed=self.seed,
            exact_max_params=self.exact_max_params,
        )
        resumed = self.directory is not None
        if resumed and os.path.isdir(str(self.directory)):
            directory = str(self.directory)
        else:
            if resumed:
                warnings.warn(
                    f"DiffusionMapMonitor: the trajectory store {self.directory} was not found; "
                    "started a new one, so the samples before the resume are missing.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            directory = new_directory
            self.rows = 0
        self._store = TrajectoryStore(
            directory, self.sketch.output_dim, info={"sample": self.sample, **self.sketch.state()}
        )
        self._cut_back()
        self.directory = os.path.abspath(directory)

    def _cut_back(self) -> None:
        """Drop the samples taken after the checkpoint (training redoes them)."""
        assert self._store is not None
        if len(self._store) > self.rows:
            self._store.truncate(self.rows)
        elif len(self._store) < self.rows:
            warnings.warn(
                f"DiffusionMapMonitor: the trajectory store holds {len(self._store)} samples, the "
                f"checkpoint counted {self.rows} (the unsaved tail of a crash is lost).",
                RuntimeWarning,
                stacklevel=2,
            )
            self.rows = len(self._store)

    def record(self, module: torch.nn.Module, *, step: int, epoch: int, loss: Any) -> bool | None:
        """Append one sample taken at ``step``; ``loss`` (a float or a 1-element tensor, read
        only now) is stored beside it.

        Returns:
            True if a sample was appended; False if it was not finite (nothing appended); None
            if there was nothing to record (not open, or no gradient yet with
            ``sample="gradients"``).
        """
        if self._store is None or self.sketch is None or self.param_names is None:
            return None
        params = dict(module.named_parameters())
        tensors = [params[n] for n in self.param_names]
        if self.sample == "gradients":
            if all(p.grad is None for p in tensors):
                return None  # no gradient yet (step 0) or frozen
            tensors = [p.grad if p.grad is not None else torch.zeros_like(p) for p in tensors]
        vector = self.sketch(tensors)
        if not np.all(np.isfinite(vector)):
            return False
        self._store.append(vector, step=step, epoch=epoch, loss=float(loss))
        self.rows = len(self._store)
        return True

    def load(self) -> Trajectory:
        """All samples so far (reads n × d numbers)."""
        assert self._store is not None
        return self._store.load()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        self._store = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "store_dir": self.directory,
            "store_rows": self.rows,
            "param_names": self.param_names,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.directory = state.get("store_dir")
        self.rows = int(state.get("store_rows", 0))
        self.param_names = state.get("param_names")
