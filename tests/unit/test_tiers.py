"""hotslot.tiers: the enums the services compute with equal hotslot.common.v1's, name for name and value for value."""
from __future__ import annotations

import pytest

from hotslot.common.v1 import common_pb2
from hotslot.services.executor import records, slots
from hotslot.services.router import placement
from hotslot.tiers import PROTO_ENUMS, ExecutorState, LoadPhase, Tier, proto_members


@pytest.mark.parametrize("python_enum, prefix, values", PROTO_ENUMS, ids=lambda x: getattr(x, "__name__", ""))
def test_each_python_enum_equals_its_proto_enum_name_for_name(python_enum, prefix, values) -> None:
    assert {m.name: m.value for m in python_enum} == proto_members(prefix, values)


def test_the_python_enums_cover_every_proto_enum_they_mirror() -> None:
    assert {m.name: m.value for m in Tier} == {k.removeprefix("TIER_"): v for k, v in common_pb2.Tier.items()}
    assert {m.name: m.value for m in ExecutorState} == {
        k.removeprefix("EXECUTOR_STATE_"): v for k, v in common_pb2.ExecutorState.items()}
    assert {m.name: m.value for m in LoadPhase} == {
        k.removeprefix("LOAD_PHASE_"): v for k, v in common_pb2.LoadPhase.items()}


def test_executor_and_router_use_the_one_definition() -> None:
    assert slots.Tier is Tier and placement.Tier is Tier
    assert records.ExecutorState is ExecutorState and records.LoadPhase is LoadPhase


def test_labels_are_the_lower_case_names() -> None:
    assert Tier.LOCAL_DISK.label == "local_disk"
    assert LoadPhase.MATERIALIZE.label == "materialize"
    assert ExecutorState.DRAINING.label == "draining"
