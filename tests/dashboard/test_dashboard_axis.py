"""Signed-log map and the fixed spectrum axis."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from lightning_landscape.dashboard import SpectrumAxis, inverse_signed_log, signed_log


@pytest.mark.parametrize("tau", [1e-6, 0.37, 5.0])
def test_signed_log_round_trip(tau: float) -> None:
    x = np.concatenate([-np.logspace(9, -9, 50), [0.0], np.logspace(-9, 9, 50)]) * tau
    y = signed_log(x, tau)
    np.testing.assert_allclose(inverse_signed_log(y, tau), x, rtol=1e-12, atol=0)
    assert np.all(np.diff(y) > 0)  # strictly increasing
    np.testing.assert_array_equal(signed_log(-x, tau), -y)  # odd


def test_signed_log_units_are_decades_above_tau() -> None:
    tau = 0.5
    lam = tau * (10.0 ** np.arange(0, 6) - 1)
    np.testing.assert_allclose(signed_log(lam, tau), np.arange(0, 6), atol=1e-12)
    # Linear below tau: slope 1 / (tau ln 10).
    np.testing.assert_allclose(signed_log(1e-9, tau), 1e-9 / (tau * np.log(10)), rtol=1e-6)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_signed_log_rejects_bad_tau(tau: float) -> None:
    with pytest.raises(ValueError, match=r"tau must be a positive finite number; got"):
        signed_log([1.0], tau)
    with pytest.raises(ValueError, match=r"tau must be a positive finite number; got"):
        inverse_signed_log([1.0], tau)


def test_for_spectrum_defaults() -> None:
    axis = SpectrumAxis.for_spectrum(250.0)
    assert axis.tau == pytest.approx(0.25)
    assert axis.edges[0] == -8.0 and axis.edges[-1] == 8.0
    assert axis.edges.size == 322
    np.testing.assert_allclose(np.diff(axis.edges), 16 / 321)
    # One bin centred on zero, where the bulk peaks.
    middle = axis.edges.size // 2
    assert axis.edges[middle - 1] == pytest.approx(-axis.edges[middle])
    # Room for the top eigenvalue to grow 10^4-fold (and more).
    assert axis.lambda_limit == pytest.approx(0.25 * (1e8 - 1))
    assert axis.lambda_limit > 1e4 * 250.0


def test_for_spectrum_zero_scale_falls_back_to_unit_scale() -> None:
    axis = SpectrumAxis.for_spectrum(0.0, tau_fraction=1e-2)
    assert axis.tau == pytest.approx(1e-2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lambda_abs_max": -1.0}, r"lambda_abs_max must be a finite number >= 0; got -1.0"),
        ({"lambda_abs_max": float("nan")}, r"lambda_abs_max must be a finite number >= 0"),
        (
            {"lambda_abs_max": 1.0, "tau_fraction": 0.0},
            r"tau_fraction must be a positive finite number; got 0.0",
        ),
        ({"lambda_abs_max": 1.0, "num_bins": 0}, r"num_bins must be an integer >= 1; got 0"),
        ({"lambda_abs_max": 1.0, "num_bins": 2.5}, r"num_bins must be an integer >= 1; got 2.5"),
        (
            {"lambda_abs_max": 1.0, "half_width": -8},
            r"half_width must be a positive finite number; got -8",
        ),
    ],
)
def test_for_spectrum_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SpectrumAxis.for_spectrum(**kwargs)


def test_axis_validates_fields() -> None:
    with pytest.raises(ValueError, match=r"tau must be a positive finite number; got"):
        SpectrumAxis(tau=0.0, edges=np.linspace(-1, 1, 5))
    with pytest.raises(ValueError, match=r"edges must be strictly increasing; got \[0.0, 0.0"):
        SpectrumAxis(tau=1.0, edges=[0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"edges must be a 1-D array of at least 2 .*shape \(1,\)"):
        SpectrumAxis(tau=1.0, edges=[0.0])
    with pytest.raises(ValueError, match=r"edges must be finite"):
        SpectrumAxis(tau=1.0, edges=[0.0, np.inf])


def test_axis_is_immutable() -> None:
    axis = SpectrumAxis.for_spectrum(1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        axis.tau = 2.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        axis.edges[0] = 0.0


def test_to_dict_from_dict_round_trip() -> None:
    axis = SpectrumAxis.for_spectrum(3.7, tau_fraction=2e-3, num_bins=101, half_width=6.0)
    state = json.loads(json.dumps(axis.to_dict()))  # plain floats and lists only
    restored = SpectrumAxis.from_dict(state)
    assert restored.tau == axis.tau
    np.testing.assert_array_equal(restored.edges, axis.edges)
    with pytest.raises(ValueError, match=r"state must contain the keys 'tau' and 'edges'"):
        SpectrumAxis.from_dict({"tau": 1.0})
