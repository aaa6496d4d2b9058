"""HessianSpectrumMonitor's forwarded options: names from the core's signature, values checked by
the core's own checker at construction, and the values reach the core."""

from __future__ import annotations

import pytest
import torch

from lightning_landscape import HessianSpectrumMonitor
from tests._reference import cross_entropy_loss
from tests.callbacks._models import DigitsModule, loader


def test_misspelt_option_suggests_the_name_and_lists_the_named_arguments():
    with pytest.raises(
        ValueError,
        match=r"unknown option\(s\) \['topk'\] for HessianSpectrumMonitor "
        r"\(did you mean `top_k`\?\); allowed: \[.*'every_n_steps'.*'slq_steps'.*'top_k'",
    ):
        HessianSpectrumMonitor(topk=5)
    with pytest.raises(ValueError, match=r"did you mean `num_trace_probes`\?"):
        HessianSpectrumMonitor(num_trace_probe=8)


def test_an_option_the_monitor_sets_itself_is_refused():
    with pytest.raises(ValueError, match="`reduce_fn` is set by HessianSpectrumMonitor itself"):
        HessianSpectrumMonitor(reduce_fn=lambda x: x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tol": -1}, "tol must be a positive finite number; got -1"),
        ({"top_k": 3, "max_iter": 2}, "max_iter must be an integer >= top_k=3; got 2"),
        ({"num_trace_probes": 1}, r"num_trace_probes must be None \(adaptive\) or an integer >= 2"),
        ({"slq_steps": 0}, r"slq_steps must be None \(adaptive\) or a positive integer; got 0"),
        ({"retain_graph": "no"}, "retain_graph must be True, False or 'auto'; got 'no'"),
        ({"dtype": torch.int32}, "dtype must be a floating torch.dtype or None"),
        ({"batch_size_fn": 4}, "batch_size_fn must be callable or None; got 4"),
        ({"density": "yes"}, "density must be a bool; got 'yes'"),
        ({"seed": "0"}, "seed must be an integer; got '0'"),
        ({"log_histogram": 1}, "log_histogram must be a bool; got 1"),
        ({"log_figure": None}, "log_figure must be a bool; got None"),
        ({"keep_eigenvectors": "yes"}, "keep_eigenvectors must be a bool; got 'yes'"),
    ],
)
def test_a_bad_forwarded_value_fails_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianSpectrumMonitor(**kwargs)


def test_a_valid_forwarded_option_reaches_the_core():
    monitor = HessianSpectrumMonitor(
        top_k=2, trace=False, num_slq_probes=2, slq_steps=12, dtype=torch.float64
    )
    assert monitor.spectrum_kwargs == {
        "num_slq_probes": 2,
        "slq_steps": 12,
        "dtype": torch.float64,
    }
    torch.manual_seed(0)
    module = DigitsModule(hidden=6).eval()
    it = iter(loader(32))
    batches = [next(it), next(it)]
    result = monitor._compute(module, batches, cross_entropy_loss, None).result
    # One row of quadrature nodes per probe, slq_steps nodes each.
    assert result.ritz_nodes.shape == (2, 12)
    assert result.eigenvectors is None
