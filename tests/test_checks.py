"""The shared validators and the option forwarding of monitors (lightning_landscape._checks)."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_landscape._checks import (
    check_bool,
    check_callable,
    check_choice,
    check_fraction,
    check_int,
    check_nonempty_str,
    check_positive_float,
    check_positive_int,
    forward_options,
    keyword_options,
)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: check_positive_int("top_k", 0), "top_k must be a positive integer; got 0"),
        (lambda: check_positive_int("top_k", True), "top_k must be a positive integer; got True"),
        (lambda: check_positive_int("top_k", 2.0), "top_k must be a positive integer; got 2.0"),
        (
            lambda: check_positive_int("every_n_steps", -1, allow_none=True),
            "every_n_steps must be a positive integer or None; got -1",
        ),
        (lambda: check_int("seed", "a"), "seed must be an integer; got 'a'"),
        (
            lambda: check_int("max_classes", 1, minimum=2),
            "max_classes must be an integer >= 2; got 1",
        ),
        (
            lambda: check_int("max_iter", 3, minimum=10, what="top_k=10"),
            "max_iter must be an integer >= top_k=10; got 3",
        ),
        (
            lambda: check_int("window", -1, minimum=0, allow_none=True),
            "window must be an integer >= 0 or None; got -1",
        ),
        (
            lambda: check_fraction("max_overhead", 1.5),
            r"max_overhead must be a fraction in \(0, 1\); got 1.5",
        ),
        (
            lambda: check_fraction("noise_ema", 0, what="a decay"),
            r"noise_ema must be a decay in \(0, 1\); got 0",
        ),
        (lambda: check_fraction("max_overhead", True), r"in \(0, 1\); got True"),
        (lambda: check_positive_float("tol", -1), "tol must be a positive finite number; got -1"),
        (
            lambda: check_positive_float("tol", float("inf")),
            "tol must be a positive finite number; got inf",
        ),
        (
            lambda: check_positive_float("sigma", "x", allow_none=True),
            "sigma must be a positive finite number or None; got 'x'",
        ),
        (lambda: check_nonempty_str("tag", ""), "tag must be a non-empty string; got ''"),
        (lambda: check_nonempty_str("tag", 3), "tag must be a non-empty string; got 3"),
        (lambda: check_bool("train_mode", "yes"), "train_mode must be a bool; got 'yes'"),
        (lambda: check_bool("train_mode", 1), "train_mode must be a bool; got 1"),
        (
            lambda: check_callable("loss_fn", 3, call="loss_fn(model, batch)"),
            r"loss_fn must be callable as loss_fn\(model, batch\); got 3",
        ),
        (
            lambda: check_callable("outputs_fn", 3, allow_none=True),
            "outputs_fn must be callable or None; got 3",
        ),
        (
            lambda: check_choice("method", "qr", ("auto", "gram", "lanczos")),
            "method must be 'auto', 'gram' or 'lanczos'; got 'qr'",
        ),
        (
            lambda: check_choice("retain_graph", 1, (True, False, "auto")),
            "retain_graph must be True, False or 'auto'; got 1",
        ),
        (lambda: check_choice("mode", "b", ("a",)), "mode must be 'a'; got 'b'"),
    ],
)
def test_validators_name_the_argument_the_rule_and_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_validators_return_the_accepted_value():
    assert check_positive_int("k", np.int64(3)) == 3
    assert type(check_positive_int("k", np.int64(3))) is int
    assert check_positive_int("k", None, allow_none=True) is None
    assert check_int("seed", -4) == -4
    assert check_int("n", 2, minimum=2) == 2
    assert check_int("n", None, minimum=2, allow_none=True) is None
    assert check_fraction("f", np.float32(0.25)) == 0.25
    assert check_positive_float("tol", 1) == 1.0
    assert check_positive_float("tol", None, allow_none=True) is None
    assert check_bool("b", False) is False
    assert check_nonempty_str("tag", "a/b") == "a/b"
    assert check_callable("f", len) is len
    assert check_callable("f", None, allow_none=True) is None
    assert check_choice("r", True, (True, False, "auto")) is True
    assert check_choice("r", "auto", (True, False, "auto")) == "auto"


def _core(model, loss_fn, batches, *, top_k=10, tol=1e-6, slq_steps=80, reduce_fn=None):
    return None


class _Monitor:
    def __init__(self, *, top_k: int = 10, every_n_steps: int | None = None, **kwargs):
        pass


def test_keyword_options_are_the_keyword_only_parameters():
    assert keyword_options(_core) == ["top_k", "tol", "slq_steps", "reduce_fn"]


def test_forward_options_passes_the_core_options_through():
    opts = {"tol": 1e-3, "slq_steps": 20}
    out = forward_options(_core, opts, owner=_Monitor, exclude=("top_k", "reduce_fn"))
    assert out == opts
    assert out is not opts
    assert forward_options(_core, {}, owner=_Monitor, exclude=()) == {}


def test_forward_options_suggests_the_closest_name_and_lists_every_allowed_one():
    with pytest.raises(
        ValueError,
        match=r"unknown option\(s\) \['slq_stepz'\] for _Monitor \(did you mean `slq_steps`\?\); "
        r"allowed: \['every_n_steps', 'slq_steps', 'tol', 'top_k'\]",
    ):
        forward_options(_core, {"slq_stepz": 5}, owner=_Monitor, exclude=("top_k", "reduce_fn"))
    # The monitor's own named arguments are suggested too.
    with pytest.raises(ValueError, match=r"did you mean `top_k`\?"):
        forward_options(_core, {"topk": 5}, owner=_Monitor, exclude=("top_k", "reduce_fn"))


def test_forward_options_says_which_options_the_monitor_sets_itself():
    with pytest.raises(
        ValueError, match=r"\['reduce_fn'\] .*`reduce_fn` is set by _Monitor itself"
    ):
        forward_options(_core, {"reduce_fn": print}, owner=_Monitor, exclude=("reduce_fn",))


def test_forward_options_without_a_close_name_gives_no_suggestion():
    with pytest.raises(ValueError, match=r"\['zzz'\] for Owner; allowed: \['extra', 'tol'\]"):
        forward_options(
            _core,
            {"zzz": 1},
            owner="Owner",
            exclude=("top_k", "slq_steps", "reduce_fn"),
            named=("extra",),
        )


def test_check_positive_int_accepts_its_words_and_names_them_in_the_error():
    from lightning_landscape._checks import check_positive_int

    assert check_positive_int("n", "auto", also=("auto",)) == "auto"
    assert check_positive_int("n", None, allow_none=True, also=("auto",)) is None
    with pytest.raises(ValueError, match=r"n must be a positive integer, 'auto' or None; got 'x'"):
        check_positive_int("n", "x", allow_none=True, also=("auto",))
    with pytest.raises(ValueError, match="got 'auto'"):
        check_positive_int("n", "auto")
