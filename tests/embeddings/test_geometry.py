"""Trajectory geometry and linear-path barriers against hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_landscape.embeddings.geometry import (
    linear_path,
    loss_barrier,
    trajectory_geometry,
    update_cosine,
)
from tests._tolerances import tolerances

EPS = tolerances(torch.float64).eps


def test_distances_and_cosines_of_a_hand_computed_trajectory():
    # Updates (3, 0), (3, 4), (0, 0), (-3, -4): the zero update has no cosine and is skipped as
    # "the previous update" of the next one, which is compared with (3, 4).
    w = np.array([[0.0, 0.0], [3.0, 0.0], [6.0, 4.0], [6.0, 4.0], [3.0, 0.0]])
    geo = trajectory_geometry(w)
    np.testing.assert_allclose(
        geo.distance_from_init, [0.0, 3.0, np.sqrt(52.0), np.sqrt(52.0), 3.0]
    )
    np.testing.assert_allclose(geo.distance_travelled, [0.0, 3.0, 8.0, 8.0, 13.0])
    cos = geo.cosine_successive_updates
    assert np.isnan(cos[:2]).all() and np.isnan(cos[3])
    np.testing.assert_allclose(cos[[2, 4]], [9.0 / 15.0, -1.0], rtol=4 * EPS)
    # A tensor trajectory gives the same numbers.
    again = trajectory_geometry(torch.tensor(w))
    np.testing.assert_array_equal(again.distance_travelled, geo.distance_travelled)


def test_update_cosine_for_arrays_and_tensors():
    assert update_cosine(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(2**-0.5)
    got = update_cosine(torch.tensor([0.0, 2.0]), torch.tensor([0.0, -5.0], dtype=torch.float32))
    assert got == pytest.approx(-1.0)
    assert update_cosine(np.zeros(2), np.ones(2)) is None
    assert update_cosine(torch.ones(2), torch.zeros(2)) is None


def test_barrier_of_a_concave_path_is_its_height_above_the_chord():
    # L(w) = 5 - ||w||^2 from (-1, 0) to (1, 0): L(t) = 5 - (2t - 1)^2, ends at 4, top 5 at t = 1/2.
    def loss(w):
        return 5.0 - float(w @ w)

    path = linear_path(loss, np.array([-1.0, 0.0]), np.array([1.0, 0.0]), num_points=5)
    np.testing.assert_array_equal(path.ts, [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(path.losses, [4.0, 4.75, 5.0, 4.75, 4.0])
    assert path.barrier == pytest.approx(1.0, rel=4 * EPS)
    # Uneven ends (2 and 6): a linear term adds as much to the chord as to the path, so the
    # height above the chord is still 4t(1 - t), 1 at t = 1/2.
    tilted = linear_path(
        lambda w: loss(w) + 2.0 * float(w[0]), np.array([-1.0, 0.0]), np.array([1.0, 0.0])
    )
    assert tilted.losses[0] == pytest.approx(2.0) and tilted.losses[-1] == pytest.approx(6.0)
    assert tilted.barrier == pytest.approx(1.0, rel=4 * EPS)


def test_a_convex_quadratic_has_no_barrier():
    # L(w) = ||w||^2 from 0 to (2, 0): L(t) = 4t^2 lies under the chord 4t, touching it at the ends.
    start, end = torch.zeros(2, dtype=torch.float64), torch.tensor([2.0, 0.0], dtype=torch.float64)
    path = linear_path(lambda w: float(w @ w), start, end, num_points=3)
    np.testing.assert_allclose(path.losses, [0.0, 1.0, 4.0])
    assert path.barrier == 0.0
    assert loss_barrier([0.0, 1.0, 4.0], [0.0, 0.5, 1.0]) == 0.0


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: trajectory_geometry(np.zeros(3)),
            ValueError,
            r"points must be a non-empty \(n, D\)",
        ),
        (lambda: trajectory_geometry(np.full((2, 2), np.nan)), ValueError, "points must be finite"),
        (lambda: loss_barrier([1.0, 2.0], [0.0, 1.0]), ValueError, "ts must increase from 0 to 1"),
        (lambda: loss_barrier([1.0, 2.0], [0.0, 0.5, 1.0]), ValueError, "one value per t"),
        (
            lambda: loss_barrier([1.0, np.nan, 2.0], [0.0, 0.5, 1.0]),
            FloatingPointError,
            "non-finite loss",
        ),
        (
            lambda: linear_path(float, np.zeros(2), np.ones(2), num_points=2),
            ValueError,
            "num_points must be an integer >= 3",
        ),
        (
            lambda: linear_path(float, np.zeros(2), np.ones(3)),
            ValueError,
            "start and end must have the same shape",
        ),
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()
