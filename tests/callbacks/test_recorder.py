"""TrajectoryRecorder without a Trainer: the samples are the parameters (or their gradients),
non-finite ones are refused, a resume reopens the store cut back to the checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_landscape.callbacks._recorder import TrajectoryRecorder


def _module() -> nn.Module:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    module[1].weight.requires_grad_(False)  # frozen: not recorded
    return module


def _flat(tensors) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors]).numpy()


def _recorder(sample: str = "parameters") -> TrajectoryRecorder:
    return TrajectoryRecorder(sample=sample, sketch_dim=64, exact_max_params=1000, seed=0)


def test_samples_are_the_trainable_parameters(tmp_path):
    module, recorder = _module(), _recorder()
    assert recorder.record(module, step=0, epoch=0, loss=1.0) is None  # not open yet
    recorder.open(module, str(tmp_path / "store"))
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert recorder.param_names == ["0.weight", "0.bias", "1.bias", "2.weight", "2.bias"]
    expected = []
    for step in range(3):
        assert recorder.record(module, step=2 * step, epoch=0, loss=torch.tensor(0.5 * step))
        expected.append(_flat(trainable))
        with torch.no_grad():
            module[0].weight.add_(1.0)
    traj = recorder.load()
    np.testing.assert_array_equal(traj.vectors, np.stack(expected))
    np.testing.assert_array_equal(traj.steps, [0, 2, 4])
    np.testing.assert_array_equal(traj.losses, [0.0, 0.5, 1.0])
    assert recorder.rows == 3 and recorder.directory == str(tmp_path / "store")
    with torch.no_grad():
        module[2].bias.fill_(float("nan"))
    assert recorder.record(module, step=6, epoch=0, loss=1.0) is False
    assert len(recorder.load()) == 3


def test_gradient_samples_need_a_gradient(tmp_path):
    module, recorder = _module(), _recorder("gradients")
    recorder.open(module, str(tmp_path / "g"))
    assert recorder.record(module, step=0, epoch=0, loss=1.0) is None  # no .grad yet
    module(torch.randn(5, 3)).square().mean().backward()
    assert recorder.record(module, step=1, epoch=0, loss=1.0)
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    np.testing.assert_array_equal(recorder.load().vectors[0], _flat(grads))


def test_a_resume_reopens_the_store_cut_back_to_the_checkpoint(tmp_path):
    module, recorder = _module(), _recorder()
    recorder.open(module, str(tmp_path / "a"))
    for step in range(5):
        recorder.record(module, step=step, epoch=0, loss=1.0)
        if step == 2:
            checkpoint = recorder.state_dict()
    resumed = _recorder()
    resumed.load_state_dict(checkpoint)
    resumed.open(module, str(tmp_path / "unused"))
    assert resumed.directory == recorder.directory
    np.testing.assert_array_equal(resumed.load().steps, [0, 1, 2])
    # A checkpoint that counted more samples than the store holds: the store's count wins.
    ahead = _recorder()
    ahead.load_state_dict({**checkpoint, "store_rows": 7})
    with pytest.warns(RuntimeWarning, match="holds 3 samples, the checkpoint counted 7"):
        ahead.open(module, str(tmp_path / "unused"))
    assert ahead.rows == 3
    # The store has gone: a new one, with a notice.
    gone = _recorder()
    gone.load_state_dict({**checkpoint, "store_dir": str(tmp_path / "deleted")})
    with pytest.warns(RuntimeWarning, match="was not found; started a new one"):
        gone.open(module, str(tmp_path / "new"))
    assert gone.rows == 0 and len(gone.load()) == 0
    assert gone.directory == str(tmp_path / "new")


def test_resuming_with_another_model_raises(tmp_path):
    recorder = _recorder()
    recorder.open(_module(), str(tmp_path / "s"))
    other = _recorder()
    other.load_state_dict(recorder.state_dict())
    with pytest.raises(ValueError, match=r"parameters \['0.weight', '0.bias', '1.bias'\] of the"):
        other.open(nn.Linear(3, 2).requires_grad_(False), str(tmp_path / "t"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sample": "activations"}, "sample must be 'parameters' or 'gradients'"),
        ({"sketch_dim": 0}, "sketch_dim must be a positive integer"),
        ({"exact_max_params": -1}, "exact_max_params must be an integer >= 0"),
        ({"seed": True}, "seed must be an integer >= 0"),
    ],
)
def test_bad_options_raise(kwargs, match):
    options = {"sample": "parameters", "sketch_dim": 64, "exact_max_params": 10, "seed": 0}
    with pytest.raises(ValueError, match=match):
        TrajectoryRecorder(**{**options, **kwargs})
