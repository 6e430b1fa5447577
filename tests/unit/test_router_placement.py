"""Router placement: the soonest estimated finish wins (queued work + load from the tier the model is in + service),
so a hot model spreads once its queue costs more than a load elsewhere and cold traffic consolidates; defaults when
an executor has measured nothing; the router's own traffic and the time since a status (a fake clock); exclusion,
room and deterministic ties."""
from __future__ import annotations

import pytest

from hotslot.router.v1 import router_service_pb2 as router_pb
from hotslot.services.router.placement import (
    DEFAULT_MODEL_BYTES,
    DEFAULT_WORK,
    GIB,
    Candidate,
    Choice,
    CostEstimates,
    ExecutorSnapshot,
    HeldModel,
    Placement,
    PlacementReason,
    QueuedRequest,
    RequestWork,
    Tier,
    TierCost,
    held_anywhere,
)

ACTIVE, STANDBY, HOST, LOAD, SPREAD = (
    PlacementReason.ACTIVE, PlacementReason.STANDBY, PlacementReason.HOST, PlacementReason.LOAD, PlacementReason.SPREAD
)
# Measured costs of the executors below: a default request (25 steps of 512x512) takes 25 x 0.04 + 0.1 = 1.1 s; a
# load from the node's disk 1 s + 2 s/GiB, so 5 s for a 2 GiB model; from host memory 0.2 s + 0.1 s/GiB.
MEASURED = dict(
    seconds_per_work_unit=0.04,
    seconds_per_request=0.1,
    load_costs=(
        TierCost(Tier.HOST, 0.2, 0.1, 5),
        TierCost(Tier.LOCAL_DISK, 1.0, 2.0, 5),
        TierCost(Tier.BACKING_STORE, 2.0, 8.0, 5),
    ),
)
SIZE = 2 * GIB


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
    backlog_s: float = 0.0,
    measured: bool = True,
    queue: tuple[QueuedRequest, ...] = (),
    status_at: float | None = None,
) -> Candidate:
    held = tuple(
        HeldModel(m[0], revision, m[1], m[2] if len(m) > 2 else SIZE)  # type: ignore[misc]
        for m in models
    )
    costs = CostEstimates(backlog_seconds=backlog_s, **(MEASURED if measured else {}))  # type: ignore[arg-type]
    snapshot = ExecutorSnapshot(executor_id, f"{executor_id}:1", ready, held, depth, capacity, queue=queue,
                                costs=costs)
    return Candidate(snapshot, connected, inflight, sent, status_at=status_at)


@pytest.fixture
def placement() -> Placement:
    return Placement(max_inflight_per_executor=4)


def chosen(placement: Placement, model: str, candidates: list[Candidate], **kw) -> tuple[str, PlacementReason] | None:
    choice = placement.choose(model, 0, candidates, **kw)
    return None if choice is None else (choice.candidate.executor_id, choice.reason)


def send(choice: Choice | None, model: str = "m") -> Candidate:
    """What the router does when it sends a request: count it, with its estimated work, before any status does."""
    assert choice is not None
    choice.candidate.count_sent(choice.estimate.work_s, (model, 0))
    return choice.candidate


# -- the policy ----------------------------------------------------------------------------------------------


def test_with_equal_queues_the_tiers_come_in_order(placement: Placement) -> None:
    cluster = [
        executor("idle"),
        executor("host", ("m", Tier.HOST)),
        executor("standby", ("m", Tier.STANDBY)),
        executor("active", ("m", Tier.ACTIVE)),
    ]
    assert chosen(placement, "m", cluster) == ("active", ACTIVE)
    assert chosen(placement, "m", cluster[:3]) == ("standby", STANDBY)
    assert chosen(placement, "m", cluster[:2]) == ("host", HOST)
    assert chosen(placement, "m", cluster[:1]) == ("idle", LOAD)


def test_a_short_queue_keeps_the_model_where_it_is_held(placement: Placement) -> None:
    # 3 s of queue on the holder beats a 5 s load on the idle executor.
    cluster = [executor("holder", ("m", Tier.ACTIVE), depth=3, backlog_s=3.0), executor("idle")]
    choice = placement.choose("m", 0, cluster)
    assert choice is not None and (choice.candidate.executor_id, choice.reason) == ("holder", ACTIVE)
    assert (choice.estimate.queued_s, choice.estimate.load_s) == (3.0, 0.0)
    assert choice.estimate.service_s == pytest.approx(1.1)


def test_a_long_queue_spreads_the_model_to_an_executor_that_loads_it_sooner(placement: Placement) -> None:
    cluster = [executor("holder", ("m", Tier.ACTIVE), depth=6, backlog_s=6.0), executor("idle")]
    choice = placement.choose("m", 0, cluster)
    assert choice is not None and (choice.candidate.executor_id, choice.reason) == ("idle", SPREAD)
    assert choice.estimate.load_s == pytest.approx(5.0)  # from the node's disk: 1 s + 2 GiB x 2 s/GiB
    # Spreading to an executor that holds it in host memory is cheaper still, and says so.
    with_host = [*cluster, executor("warm", ("m", Tier.HOST), depth=1, backlog_s=1.0)]
    assert chosen(placement, "m", with_host) == ("warm", HOST)


def test_a_burst_fills_the_holder_until_its_queue_costs_more_than_a_load_then_spreads(placement: Placement) -> None:
    placement.max_inflight_per_executor = 32
    holder, idle = executor("holder", ("m", Tier.ACTIVE), capacity=32), executor("idle", capacity=32)
    picks = [send(placement.choose("m", 0, [holder, idle])).executor_id for _ in range(8)]
    # 1.1 s each on the holder until five queued (5.5 s) cost more than the idle one's 5 s load; the requests after
    # the one that spread share that load, and follow it.
    assert picks == ["holder"] * 5 + ["idle"] * 3
    assert idle.inflight_models == {("m", 0): picks.count("idle")}


def test_cold_traffic_goes_where_it_finishes_soonest_and_then_stays(placement: Placement) -> None:
    a, b = executor("a", ("x", Tier.ACTIVE), depth=2, backlog_s=2.0), executor("b", depth=1, backlog_s=1.0)
    first = placement.choose("cold", 0, [a, b])
    assert first is not None and (first.candidate.executor_id, first.reason) == ("b", LOAD)
    assert first.estimate.finish_s == pytest.approx(1.0 + 5.0 + 1.1)  # a: 2 + 5 + 1.1
    send(first, "cold")
    # The next one finds its load under way on b: no second load, and the queued one is shared, so it follows
    # the first there although a, without the credit, would finish it 0.1 s sooner.
    second = placement.choose("cold", 0, [a, b])
    assert second is not None and (second.candidate.executor_id, second.reason) == ("b", LOAD)
    assert (second.estimate.load_s, second.estimate.shared_load_s) == (0.0, pytest.approx(5.0))
    assert second.estimate.finish_s == pytest.approx(1.0 + 6.1 + 1.1)
    # Once b reports the model held, later traffic stays there while its queue is short.
    b.status_received(ExecutorSnapshot("b", "b:1", True, (HeldModel("cold", 1, Tier.ACTIVE, SIZE),), 1,
                                       8, costs=CostEstimates(backlog_seconds=1.1, **MEASURED)), None)  # type: ignore[arg-type]
    b.count_finished(first.estimate.work_s, ("cold", 0), before_next_status=False)
    assert chosen(placement, "cold", [a, b]) == ("b", ACTIVE)


def test_followers_of_a_cold_request_stay_until_their_queue_costs_more_than_a_second_load(
    placement: Placement,
) -> None:
    placement.max_inflight_per_executor = 32
    a, b = executor("a", capacity=32), executor("b", capacity=32)
    picks = [
        (choice.candidate.executor_id, choice.reason)
        for choice in (placement.choose("cold", 0, [a, b]) for _ in range(8))
        if send(choice, "cold")
    ]
    # a pays the 5 s load once; the 1.1 s requests queue behind it there while their queue is shorter than a second
    # load: the sixth would wait for five (5.5 s) against a 5 s load on the idle b, which becomes a second replica
    # (SPREAD: a is loading it) and shares its own load with the next ones in turn.
    assert picks == [("a", LOAD)] * 5 + [("b", SPREAD)] * 3
    assert (a.inflight_models, b.inflight_models) == ({("cold", 0): 5}, {("cold", 0): 3})


def test_a_request_queued_for_the_model_means_its_load_is_already_counted(placement: Placement) -> None:
    loading = (QueuedRequest("m", 1),)  # loading there
    a = executor("a", depth=1, backlog_s=5.5, queue=loading)
    b = executor("b", depth=1, backlog_s=1.0)
    choice = placement.choose("m", 0, [a, b])
    # a: 5.5 + 0 + 1.1 = 6.6; b: 1 + 5 + 1.1 = 7.1.
    assert choice is not None and (choice.candidate.executor_id, choice.reason) == ("a", LOAD)


def test_the_requests_own_work_counts(placement: Placement) -> None:
    costs = CostEstimates(**MEASURED)  # type: ignore[arg-type]
    big = RequestWork(steps=50, width=1024, height=1024, num_images=2)
    assert costs.service_seconds(big) == pytest.approx(50 * 4 * 2 * 0.04 + 0.1)
    # The executor's own defaults stand in for zeros.
    small = CostEstimates(default_steps=4, default_width=64, default_height=64, **MEASURED)  # type: ignore[arg-type]
    assert small.service_seconds(DEFAULT_WORK) == pytest.approx(4 * 64 * 64 / 512**2 * 0.04 + 0.1)
    # A big request sent to a busy holder still pays only the queue; the work itself is the same everywhere.
    cluster = [executor("holder", ("m", Tier.ACTIVE), backlog_s=4.0, depth=4), executor("idle")]
    assert chosen(placement, "m", cluster, work=big) == ("holder", ACTIVE)


def test_defaults_stand_in_for_costs_an_executor_has_not_measured(placement: Placement) -> None:
    zero = CostEstimates()
    assert zero.service_seconds(DEFAULT_WORK) == pytest.approx(1.35)  # 25 steps x 0.05 s + 0.1 s
    assert zero.load_seconds(Tier.LOCAL_DISK, 2 * GIB) == pytest.approx(3.0)
    assert zero.load_seconds(Tier.HOST, 2 * GIB) == pytest.approx(1.5)
    assert zero.load_seconds(Tier.STANDBY, 2 * GIB) == 0.0
    # With no backlog reported, the queue depth counts default requests: 2 waiting (2.7 s) stay ahead of a 3 s
    # load, 3 (4.05 s) do not.
    idle = executor("idle", measured=False)
    assert chosen(placement, "m", [executor("h", ("m", Tier.ACTIVE), depth=2, measured=False), idle]) == ("h", ACTIVE)
    assert chosen(placement, "m", [executor("h", ("m", Tier.ACTIVE), depth=3, measured=False), idle]) == ("idle", SPREAD)


def test_the_executors_measured_costs_decide_over_the_defaults(placement: Placement) -> None:
    # The holder has 2.5 s queued and has measured no loads. A load from the disk takes 3 s by default (1 s + 1 s/GiB),
    # so the model stays; an idle executor that measured its disk loads at 0.5 s + 0.5 s/GiB (1.5 s) finishes
    # sooner, and gets it.
    service = dict(seconds_per_work_unit=0.04, seconds_per_request=0.1)
    holder = Candidate(ExecutorSnapshot("holder", "h:1", True, (HeldModel("m", 1, Tier.ACTIVE, SIZE),), 2, 8,
                                        costs=CostEstimates(backlog_seconds=2.5, **service)), True)  # type: ignore[arg-type]
    unmeasured = Candidate(ExecutorSnapshot("idle", "idle:1", True, (), 0, 8, costs=CostEstimates(**service)), True)  # type: ignore[arg-type]
    fast_disk = CostEstimates(load_costs=(TierCost(Tier.LOCAL_DISK, 0.5, 0.5, 3),), **service)  # type: ignore[arg-type]
    measured = Candidate(ExecutorSnapshot("idle", "idle:1", True, (), 0, 8, costs=fast_disk), True)
    assert chosen(placement, "m", [holder, unmeasured]) == ("holder", ACTIVE)
    assert placement.choose("m", 0, [unmeasured]).estimate.load_s == pytest.approx(3.0)  # type: ignore[union-attr]
    assert chosen(placement, "m", [holder, measured]) == ("idle", SPREAD)
    assert placement.choose("m", 0, [measured]).estimate.load_s == pytest.approx(1.5)  # type: ignore[union-attr]
    # Measured service time counts too: at 0.2 s a unit, a default request takes 5.1 s.
    slow = CostEstimates(seconds_per_work_unit=0.2, seconds_per_request=0.1)
    assert slow.service_seconds(DEFAULT_WORK) == pytest.approx(5.1)
    # A tier the executor does not report falls back to the router's default; an unmeasured value it reports
    # (samples 0: the executor's own default) comes before that.
    assert fast_disk.load_seconds(Tier.HOST, 2 * GIB) == pytest.approx(1.5)
    own_default = CostEstimates(load_costs=(TierCost(Tier.HOST, 0.1, 0.0, 0),))
    assert own_default.load_seconds(Tier.HOST, 2 * GIB) == pytest.approx(0.1)


def test_an_executor_that_measured_nothing_borrows_the_other_executors_measurements(placement: Placement) -> None:
    # On a slow device (0.5 s a unit: 12.6 s a default request) the holder has one request queued. An executor
    # that has run nothing would look 10x faster with the router's defaults (1.35 s) and draw the request to a
    # second load; it is priced like the measured ones instead, and the model stays.
    slow = dict(seconds_per_work_unit=0.5, seconds_per_request=0.1,
                load_costs=(TierCost(Tier.LOCAL_DISK, 1.0, 2.0, 4),))
    holder = Candidate(ExecutorSnapshot("holder", "h:1", True, (HeldModel("m", 1, Tier.ACTIVE, SIZE),), 1, 8,
                                        costs=CostEstimates(backlog_seconds=3.0, **slow)), True)  # type: ignore[arg-type]
    fresh = Candidate(ExecutorSnapshot("fresh", "f:1", True, (), 0, 8), True)
    choice = placement.choose("m", 0, [holder, fresh])
    assert choice is not None and (choice.candidate.executor_id, choice.reason) == ("holder", ACTIVE)
    ranked = {c.candidate.executor_id: c.estimate for c in placement.rank("m", 0, [holder, fresh])}
    assert ranked["fresh"].service_s == pytest.approx(12.6)
    assert ranked["fresh"].load_s == pytest.approx(5.0)  # the holder's measured disk cost, too
    # Alone (nobody measured anything) it falls back to the defaults.
    assert placement.choose("m", 0, [fresh]).estimate.service_s == pytest.approx(1.35)  # type: ignore[union-attr]
    # Its own measurements, once it has some, win over the others'.
    fresh.status_received(ExecutorSnapshot("fresh", "f:1", True, (), 0, 8, costs=CostEstimates(
        seconds_per_work_unit=0.04, seconds_per_request=0.1, load_costs=(TierCost(Tier.LOCAL_DISK, 0.5, 0.5, 1),))), None)
    ranked = {c.candidate.executor_id: c.estimate for c in placement.rank("m", 0, [holder, fresh])}
    assert (ranked["fresh"].service_s, ranked["fresh"].load_s) == (pytest.approx(1.1), pytest.approx(1.5))
    assert chosen(placement, "m", [holder, fresh]) == ("fresh", SPREAD)


def test_model_size_comes_from_a_holder_then_the_caller_then_the_default(placement: Placement) -> None:
    a = executor("a", depth=1, backlog_s=1.0, measured=False)
    holder = executor("h", ("m", Tier.HOST, GIB // 2), depth=9, backlog_s=20.0, measured=False)
    # The size a holder reports prices the load on a: 1 s + 0.5 GiB x 1 s/GiB.
    assert placement.choose("m", 0, [a, holder]).estimate.load_s == pytest.approx(1.5)  # type: ignore[union-attr]
    assert placement.choose("n", 0, [a], size_bytes=4 * GIB).estimate.load_s == pytest.approx(5.0)  # type: ignore[union-attr]
    default = placement.choose("n", 0, [a]).estimate.load_s  # type: ignore[union-attr]
    assert default == pytest.approx(1.0 + DEFAULT_MODEL_BYTES / GIB)


def test_disk_tiers_price_the_load_but_do_not_count_as_held(placement: Placement) -> None:
    cluster = [
        executor("nfs", ("m", Tier.BACKING_STORE)),
        executor("disk", ("m", Tier.LOCAL_DISK)),
    ]
    assert chosen(placement, "m", cluster) == ("disk", LOAD)
    assert placement.choose("m", 0, cluster[:1]).estimate.load_s == pytest.approx(18.0)  # type: ignore[union-attr]
    assert not held_anywhere("m", 0, cluster)


# -- the router's own traffic and time ---------------------------------------------------------------------


def test_time_since_the_status_drains_the_reported_backlog(placement: Placement) -> None:
    holder = executor("holder", ("m", Tier.ACTIVE), depth=8, capacity=16, backlog_s=9.0, status_at=100.0)
    idle = executor("idle", status_at=100.0)
    assert chosen(placement, "m", [holder, idle], now=100.0) == ("idle", SPREAD)
    assert placement.choose("m", 0, [holder], now=100.0).estimate.queued_s == 9.0  # type: ignore[union-attr]
    # 7 s later (the executor sent nothing new) only 2 s of it are left: the holder is sooner again.
    assert chosen(placement, "m", [holder, idle], now=107.0) == ("holder", ACTIVE)
    assert placement.choose("m", 0, [holder], now=107.0).estimate.queued_s == 2.0  # type: ignore[union-attr]
    # Without a clock (or a status time) the backlog is taken as reported.
    assert holder.queued_seconds(None) == 9.0
    assert holder.queued_seconds(200.0) == 0.0
    # What the router sent since the status does not drain: the executor may not have started it.
    holder.sent_work_s = 4.0
    assert holder.queued_seconds(200.0) == 4.0


def test_in_flight_work_is_a_floor_when_a_status_already_reset_the_sent_work(placement: Placement) -> None:
    # a's status arrived (sent work reset) before a counted the router's requests: they still weigh.
    a = executor("a", ("m", Tier.ACTIVE), inflight=3)
    a.inflight_work_s = 6.0
    b = executor("b", ("m", Tier.ACTIVE), depth=2, backlog_s=2.0)
    assert a.queued_seconds(None) == 6.0
    assert chosen(placement, "m", [a, b]) == ("b", ACTIVE)


def test_a_finished_request_stops_counting(placement: Placement) -> None:
    a = executor("a")
    a.count_sent(2.5, ("m", 0))
    a.count_sent(2.5, ("m", 0))
    assert (a.inflight, a.sent_since_status, a.sent_work_s, a.inflight_work_s) == (2, 2, 5.0, 5.0)
    a.count_finished(2.5, ("m", 0), before_next_status=True)
    assert (a.inflight, a.sent_since_status, a.sent_work_s, a.inflight_work_s) == (1, 1, 2.5, 2.5)
    assert a.will_load("m", 0)
    a.count_finished(2.5, ("m", 0), before_next_status=False)
    assert (a.inflight, a.sent_since_status, a.inflight_work_s) == (0, 1, 0.0)
    assert not a.will_load("m", 0) and a.inflight_models == {}


# -- eligibility and ties ------------------------------------------------------------------------------------


def test_revision_zero_matches_any_revision_but_a_pinned_one_must_match(placement: Placement) -> None:
    cluster = [executor("a", ("m", Tier.ACTIVE), revision=2), executor("b")]
    assert chosen(placement, "m", cluster) == ("a", ACTIVE)
    assert placement.choose("m", 2, cluster).reason == ACTIVE  # type: ignore[union-attr]
    choice = placement.choose("m", 1, cluster)
    assert choice is not None and choice.reason == LOAD


def test_not_ready_disconnected_excluded_and_full_executors_are_skipped(placement: Placement) -> None:
    cluster = [
        executor("starting", ("m", Tier.ACTIVE), ready=False),
        executor("lost", ("m", Tier.ACTIVE), connected=False),
        executor("failed-before", ("m", Tier.ACTIVE)),
        executor("full-queue", ("m", Tier.STANDBY), depth=8, capacity=8),
        executor("router-bound", ("m", Tier.STANDBY), inflight=4),
        executor("free", depth=7, capacity=8),
    ]
    # Excluded and not live, the holders do not count: loading on "free" is LOAD, not SPREAD.
    assert chosen(placement, "m", cluster[:3] + cluster[5:], exclude={"failed-before"}) == ("free", LOAD)
    assert chosen(placement, "m", cluster, exclude={"failed-before"}) == ("free", SPREAD)
    assert chosen(placement, "m", cluster[:5], exclude={"failed-before"}) is None
    # Without the room requirement (Preload) a full executor holding the model is still the best choice.
    assert chosen(placement, "m", cluster, exclude={"failed-before"}, need_room=False) == ("router-bound", STANDBY)


def test_executor_without_status_is_never_chosen(placement: Placement) -> None:
    assert placement.choose("m", 0, [Candidate(None, connected=True)]) is None


def test_router_bound_applies_when_the_executor_reports_no_capacity(placement: Placement) -> None:
    a = executor("a", capacity=0, inflight=3, sent=3)
    assert placement.has_room(a)
    a.inflight = 4
    assert not placement.has_room(a)
    # Other routers' requests show only in the status depth; the router's own in flight are a floor.
    assert executor("c", depth=5, inflight=1, sent=1).effective_depth == 6
    assert executor("d", depth=0, inflight=3, sent=0).effective_depth == 3


def test_ties_go_to_the_better_tier_then_fewest_held_bytes_then_smallest_id(placement: Placement) -> None:
    assert chosen(placement, "m", [executor("s", ("m", Tier.STANDBY)), executor("t", ("m", Tier.ACTIVE))]) == (
        "t", ACTIVE
    )
    cluster = [
        executor("c", ("x", Tier.HOST, 500)),
        executor("b", ("y", Tier.HOST, 100)),
        executor("a", ("z", Tier.HOST, 100)),
    ]
    assert chosen(placement, "m", cluster) == ("a", LOAD)
    assert chosen(placement, "m", list(reversed(cluster))) == ("a", LOAD)
    assert chosen(placement, "m", cluster[:2]) == ("b", LOAD)


def test_rank_lists_every_eligible_executor_soonest_first(placement: Placement) -> None:
    cluster = [executor("idle"), executor("busy", ("m", Tier.ACTIVE), depth=8, backlog_s=30.0, capacity=16),
               executor("host", ("m", Tier.HOST), depth=1, backlog_s=1.0)]
    assert [c.candidate.executor_id for c in placement.rank("m", 0, cluster)] == ["host", "idle", "busy"]


def test_held_anywhere_counts_only_live_executors_and_held_tiers() -> None:
    assert held_anywhere("m", 0, [executor("a", ("m", Tier.HOST))])
    assert not held_anywhere("m", 0, [executor("a", ("m", Tier.LOCAL_DISK))])
    assert not held_anywhere("m", 0, [executor("a", ("m", Tier.ACTIVE), connected=False)])
    assert not held_anywhere("m", 0, [Candidate(None, connected=True)])


def test_reasons_mirror_the_contract_enum() -> None:
    assert {r.name: int(r) for r in PlacementReason} == {
        name.removeprefix("PLACEMENT_REASON_"): value for name, value in router_pb.PlacementReason.items()
    }
    assert PlacementReason.SPREAD.label == "spread"


def test_bound_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Placement(0)
