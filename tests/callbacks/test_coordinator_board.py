"""The coordinator's result board and the dependency order of monitors, without a Trainer."""

from __future__ import annotations

from lightning_landscape.callbacks._schedule import (
    HESSIAN_EIGENPAIRS,
    Coordinator,
    dependency_order,
)


def test_latest_is_the_last_publication_of_that_step():
    coord = Coordinator()
    assert coord.latest("x") is None and coord.latest("x", 3) is None
    coord.publish("x", 3, "a")
    coord.publish("x", 5, "b")
    assert coord.latest("x") == "b"
    assert coord.latest("x", 5) == "b"
    assert coord.latest("x", 3) is None  # replaced: only the latest result is held
    coord.withdraw("x")
    assert coord.latest("x") is None and coord.latest("x", 5) is None
    coord.withdraw("x")  # withdrawing nothing is fine


def test_requests_are_read_by_name():
    coord = Coordinator()
    assert not coord.requested(HESSIAN_EIGENPAIRS)
    coord.request(HESSIAN_EIGENPAIRS)
    coord.request(HESSIAN_EIGENPAIRS)
    assert coord.requested(HESSIAN_EIGENPAIRS) and not coord.requested("other")
    # Shared results are per fit: the checkpointed state carries none of them.
    coord.publish(HESSIAN_EIGENPAIRS, 0, object())
    assert set(coord.state_dict()) == {"train_seconds", "counted_steps", "spent", "hook_seconds"}


class _CB:
    def __init__(self, name: str, provides=(), uses=()) -> None:
        self.name, self.provides, self.uses = name, provides, uses

    def __repr__(self) -> str:
        return self.name


def _names(callbacks) -> list[str]:
    return [c.name for c in callbacks]


def test_dependency_order_moves_providers_before_their_first_user():
    user = _CB("gradient", uses=("h",))
    provider = _CB("hessian", provides=("h",))
    a, b, ckpt = _CB("a"), _CB("b"), _CB("checkpoint")
    assert _names(dependency_order([a, user, b, provider, ckpt])) == [
        "a",
        "hessian",
        "gradient",
        "b",
        "checkpoint",
    ]
    # Already in order, or nothing to order: the same order (a new list).
    given = [a, provider, user, b]
    out = dependency_order(given)
    assert out == given and out is not given
    assert dependency_order([a, b]) == [a, b]
    # Two users, one provider: it goes before the first user.
    user2 = _CB("gradient2", uses=("h",))
    assert _names(dependency_order([user, user2, provider])) == ["hessian", "gradient", "gradient2"]


def test_dependency_order_handles_chains_and_other_names():
    low = _CB("low", provides=("x",))
    mid = _CB("mid", provides=("y",), uses=("x",))
    top = _CB("top", uses=("y",))
    other = _CB("other", uses=("z",))  # nobody provides z: left in place
    assert _names(dependency_order([top, other, mid, low])) == ["low", "mid", "top", "other"]
