"""Router placement of requests with LoRA adapters: the base is placed like any model (its tier decides), and among
executors holding it, one that holds the adapters too wins, because an adapter it lacks adds its load; adapters
parsed from the executor's status."""
from __future__ import annotations

from dataclasses import replace

from hotslot.common.v1 import common_pb2
from hotslot.executor.v1 import executor_service_pb2 as epb
from hotslot.services.router.clients import snapshot_from_proto
from hotslot.services.router.placement import (
    Candidate,
    CostEstimates,
    ExecutorSnapshot,
    HeldModel,
    Placement,
    PlacementReason,
    Tier,
    TierCost,
)

GIB = 1024**3
COSTS = CostEstimates(seconds_per_work_unit=0.04, seconds_per_request=0.1,
                      load_costs=(TierCost(Tier.HOST, 0.2, 0.1, 5), TierCost(Tier.LOCAL_DISK, 1.0, 2.0, 5)))


def executor(executor_id: str, base_tier: Tier | None, *adapters: str, backlog_s: float = 0.0) -> Candidate:
    models = (HeldModel("base", 1, base_tier, 2 * GIB),) if base_tier is not None else ()
    held = tuple(HeldModel(a, 1, Tier.HOST, 10 * 1024**2) for a in adapters)
    snapshot = ExecutorSnapshot(executor_id, f"{executor_id}:1", True, models, 0, 8, adapters=held,
                                costs=replace(COSTS, backlog_seconds=backlog_s))
    return Candidate(snapshot, True)


def chosen(candidates: list[Candidate], adapters: tuple[tuple[str, int], ...]) -> tuple[str, PlacementReason]:
    choice = Placement(4).choose("base", 0, candidates, adapters=adapters)
    assert choice is not None
    return choice.candidate.executor_id, choice.reason


def test_an_adapter_request_prefers_the_executor_holding_base_and_adapter() -> None:
    both = [executor("a", Tier.STANDBY), executor("b", Tier.STANDBY, "lora-x")]
    assert chosen(both, (("lora-x", 0),)) == ("b", PlacementReason.STANDBY)
    assert chosen(both, ()) == ("a", PlacementReason.STANDBY)  # without adapters the tie goes to the smaller id


def test_the_base_tier_comes_first_then_the_adapter() -> None:
    # The adapter alone (without the base) does not draw the request: the base's load costs far more.
    candidates = [executor("a", Tier.ACTIVE), executor("b", None, "lora-x")]
    assert chosen(candidates, (("lora-x", 0),)) == ("a", PlacementReason.ACTIVE)
    # A holder of the adapter wins unless its queue costs more than loading the adapter elsewhere.
    busy = [executor("a", Tier.ACTIVE), executor("b", Tier.ACTIVE, "lora-x", backlog_s=5.0)]
    assert chosen(busy, (("lora-x", 0),))[0] == "a"


def test_adapters_come_from_the_executor_status() -> None:
    status = epb.ExecutorStatus(executor_id="e", state=common_pb2.EXECUTOR_STATE_READY, adapters=[epb.HeldAdapter(
        model=common_pb2.ModelRef(model_id="lora-x", revision=2), base=common_pb2.ModelRef(model_id="base", revision=1),
        tier=common_pb2.TIER_ACTIVE, size_bytes=123)])
    snapshot = snapshot_from_proto(status, "e:1")
    assert snapshot.adapters == (HeldModel("lora-x", 2, Tier.ACTIVE, 123),)
    assert snapshot.holds_adapter("lora-x", 0) and not snapshot.holds_adapter("lora-y", 0)
    assert snapshot.models == ()  # adapters are not pipelines the router could place a base on
