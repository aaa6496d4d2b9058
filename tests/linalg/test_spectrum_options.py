"""check_spectrum_options: the rules of hessian_spectrum's options, callable on their own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_landscape import hessian_spectrum
from lightning_landscape._checks import keyword_options
from lightning_landscape.linalg._spectrum_options import _RULES, check_spectrum_options

BAD = [
    ({"top_k": 0}, "top_k must be a positive integer; got 0"),
    ({"which": "LM"}, r"which must be 'LA' \(largest\) or 'SA' \(smallest\); got 'LM'"),
    ({"tol": -1}, "tol must be a positive finite number; got -1"),
    ({"tol": float("nan")}, "tol must be a positive finite number; got nan"),
    ({"top_k": 4, "max_iter": 3}, "max_iter must be an integer >= top_k=4; got 3"),
    (
        {"num_slq_probes": 0},
        r"num_slq_probes must be None \(adaptive\) or a positive integer; got 0",
    ),
    ({"slq_steps": 2.5}, r"slq_steps must be None \(adaptive\) or a positive integer; got 2.5"),
    (
        {"num_trace_probes": 1},
        r"num_trace_probes must be None \(adaptive\) or an integer >= 2; got 1",
    ),
    ({"max_basis_bytes": 0}, "max_basis_bytes must be a positive integer or None; got 0"),
    ({"warm_start": [1.0]}, "warm_start must be None, a HessianSpectrum or a .k, D. tensor"),
    ({"retain_graph": "yes"}, "retain_graph must be True, False or 'auto'; got 'yes'"),
    ({"dtype": torch.int64}, "dtype must be a floating torch.dtype or None; got torch.int64"),
]


@pytest.mark.parametrize(("options", "match"), BAD)
def test_bad_option_is_refused_with_the_message_of_the_core(options, match):
    with pytest.raises(ValueError, match=match):
        check_spectrum_options(**options)
    # hessian_spectrum gives the same message: it calls this checker.
    model = nn.Linear(3, 1).double()
    batch = (torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64))

    def loss_fn(m, b):
        return nn.functional.mse_loss(m(b[0]), b[1])

    with pytest.raises(ValueError, match=match):
        hessian_spectrum(model, loss_fn, [batch], **{"top_k": 2, **options})


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"density": "yes"}, "density must be a bool; got 'yes'"),
        ({"trace": 1}, "trace must be a bool; got 1"),
        (
            {"return_eigenvectors": None},
            "return_eigenvectors must be True, False or 'ritz'; got None",
        ),
        ({"seed": 1.5}, "seed must be an integer; got 1.5"),
        ({"groups": 5}, "groups must be None, 'layer' or a mapping; got 5"),
        ({"reduce_fn": 3}, "reduce_fn must be callable or None; got 3"),
        ({"batch_size_fn": "len"}, "batch_size_fn must be callable or None; got 'len'"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1 or None; got 0"),
    ],
)
def test_options_the_core_takes_on_trust_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        check_spectrum_options(**options)


def test_good_options_pass():
    check_spectrum_options(
        top_k=3,
        which="SA",
        density=False,
        trace=True,
        seed=7,
        tol=1e-3,
        max_iter=None,
        num_slq_probes=2,
        slq_steps=10,
        num_trace_probes=2,
        groups={"a": ["w"]},
        return_eigenvectors=True,
        params=None,
        retain_graph=False,
        reduce_fn=None,
        batch_size_fn=len,
        dtype=torch.float64,
    )
    check_spectrum_options(top_k=3, max_iter=3)
    check_spectrum_options(num_slq_probes=None, slq_steps=None, num_trace_probes=None)
    check_spectrum_options(warm_start=torch.zeros(2, 3), max_basis_bytes=None)
    check_spectrum_options(groups="layer")
    check_spectrum_options()


def test_every_option_of_hessian_spectrum_has_a_rule():
    # A new option of the core needs a rule here, or a monitor would forward it unchecked.
    options = set(keyword_options(hessian_spectrum)) - {"params"}
    assert options <= set(_RULES) | {"max_iter"}, sorted(options - set(_RULES))


def test_an_option_without_a_rule_is_left_to_the_core():
    check_spectrum_options(params=object())
