"""Router placement: tier preference, load with the router's own in-flight requests, exclusion and ties."""
from __future__ import annotations

import pytest

from hotslot.services.router.placement import (
    Candidate,
    ExecutorSnapshot,
    HeldModel,
    Placement,
    Tier,
    held_anywhere,
)


def executor(
    executor_id: str,
    *models: tuple[str, Tier] | tuple[str, Tier, int],
    depth: int = 0,
    capacity: int = 8,
    ready: bool = True,
    connected: bool = True,
    inflight: int = 0,
    sent: int = 0,
    revision: int = 1,
) -> Candidate:
    held = tuple(
        HeldModel(m[0], revision, m[1], m[2] if len(m) > 2 else 1000)  # type: ignore[misc]
        for m in models
    )
    snapshot = ExecutorSnapshot(executor_id, f"{executor_id}:1", ready, held, depth, capacity)
    return Candidate(snapshot, connected, inflight, sent)


@pytest.fixture
def placement() -> Placement:
    return Placement(max_inflight_per_executor=4)


def chosen(placement: Placement, model: str, candidates: list[Candidate], **kw) -> tuple[str, str] | None:
    choice = placement.choose(model, 0, candidates, **kw)
    return None if choice is None else (choice.candidate.executor_id, choice.reason)


def test_tiers_are_preferred_in_order_over_load(placement: Placement) -> None:
    cluster = [
        executor("idle"),
        executor("host", ("m", Tier.HOST), depth=3),
        executor("standby", ("m", Tier.STANDBY), depth=4),
        executor("active", ("m", Tier.ACTIVE), depth=5),
    ]
    assert chosen(placement, "m", cluster) == ("active", "active")
    assert chosen(placement, "m", cluster[:3]) == ("standby", "standby")
    assert chosen(placement, "m", cluster[:2]) == ("host", "host")
    assert chosen(placement, "m", cluster[:1]) == ("idle", "least-loaded")


def test_disk_tiers_do_not_count_and_best_tier_per_executor_wins(placement: Placement) -> None:
    cluster = [
        executor("a", ("m", Tier.LOCAL_DISK), depth=1),
        executor("b", ("m", Tier.BACKING_STORE), depth=2),
        executor("c", ("m", Tier.HOST), ("m", Tier.ACTIVE), depth=6),
    ]
    assert chosen(placement, "m", cluster[:2]) == ("a", "least-loaded")
    assert chosen(placement, "m", cluster) == ("c", "active")


def test_within_a_tier_the_least_loaded_relative_to_capacity_wins(placement: Placement) -> None:
    cluster = [
        executor("a", ("m", Tier.ACTIVE), depth=2, capacity=4),  # half full
        executor("b", ("m", Tier.ACTIVE), depth=3, capacity=12),  # a quarter full
    ]
    assert chosen(placement, "m", cluster) == ("b", "active")


def test_revision_zero_matches_any_revision_but_a_pinned_one_must_match(placement: Placement) -> None:
    cluster = [executor("a", ("m", Tier.ACTIVE), revision=2), executor("b")]
    assert chosen(placement, "m", cluster) == ("a", "active")
    assert placement.choose("m", 2, cluster).reason == "active"  # type: ignore[union-attr]
    choice = placement.choose("m", 1, cluster)
    assert choice is not None and choice.reason == "least-loaded"


def test_not_ready_disconnected_excluded_and_full_executors_are_skipped(placement: Placement) -> None:
    cluster = [
        executor("starting", ("m", Tier.ACTIVE), ready=False),
        executor("lost", ("m", Tier.ACTIVE), connected=False),
        executor("failed-before", ("m", Tier.ACTIVE)),
        executor("full-queue", ("m", Tier.STANDBY), depth=8, capacity=8),
        executor("router-bound", ("m", Tier.STANDBY), inflight=4),
        executor("free", depth=7, capacity=8),
    ]
    assert chosen(placement, "m", cluster, exclude={"failed-before"}) == ("free", "least-loaded")
    assert chosen(placement, "m", cluster[:5], exclude={"failed-before"}) is None
    # Without the room requirement (Preload) a full executor holding the model is still the best choice.
    assert chosen(placement, "m", cluster, exclude={"failed-before"}, need_room=False) == ("router-bound", "standby")


def test_executor_without_status_is_never_chosen(placement: Placement) -> None:
    assert placement.choose("m", 0, [Candidate(None, connected=True)]) is None


def test_requests_sent_since_the_last_status_count_as_load(placement: Placement) -> None:
    a, b = executor("a"), executor("b")
    picks = []
    for _ in range(6):
        choice = placement.choose("m", 0, [a, b])
        assert choice is not None
        picks.append(choice.candidate.executor_id)
        # What the router does when it sends: count it before any status says so.
        choice.candidate.inflight += 1
        choice.candidate.sent_since_status += 1
    assert picks == ["a", "b", "a", "b", "a", "b"]


def test_in_flight_floor_covers_a_status_that_already_reset_the_sent_count(placement: Placement) -> None:
    # a's status arrived (sent count reset) before it counted the router's 3 requests: they still weigh.
    a = executor("a", depth=0, inflight=3, sent=0)
    b = executor("b", depth=2, inflight=0)
    assert a.effective_depth == 3 and b.effective_depth == 2
    assert chosen(placement, "m", [a, b]) == ("b", "least-loaded")
    # Other routers' requests show only in the status depth.
    c = executor("c", depth=5, inflight=1, sent=1)
    assert c.effective_depth == 6


def test_router_bound_applies_when_the_executor_reports_no_capacity(placement: Placement) -> None:
    a = executor("a", capacity=0, inflight=3, sent=3)
    assert placement.has_room(a)
    a.inflight = 4
    assert not placement.has_room(a)
    # Load of an executor with no capacity is measured against the router's bound (4).
    assert placement.load(executor("x", depth=2, capacity=0)) == 0.5


def test_ties_go_to_fewest_held_bytes_then_smallest_id(placement: Placement) -> None:
    cluster = [
        executor("c", ("x", Tier.HOST, 500)),
        executor("b", ("y", Tier.HOST, 100)),
        executor("a", ("z", Tier.HOST, 100)),
    ]
    assert chosen(placement, "m", cluster) == ("a", "least-loaded")
    assert chosen(placement, "m", list(reversed(cluster))) == ("a", "least-loaded")
    assert chosen(placement, "m", cluster[:2]) == ("b", "least-loaded")


def test_held_anywhere_counts_only_live_executors_and_preferred_tiers() -> None:
    assert held_anywhere("m", 0, [executor("a", ("m", Tier.HOST))])
    assert not held_anywhere("m", 0, [executor("a", ("m", Tier.LOCAL_DISK))])
    assert not held_anywhere("m", 0, [executor("a", ("m", Tier.ACTIVE), connected=False)])
    assert not held_anywhere("m", 0, [Candidate(None, connected=True)])


def test_bound_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Placement(0)
