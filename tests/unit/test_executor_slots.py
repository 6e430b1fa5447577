"""SlotManager: tier transitions, byte budgets, LRU order, and reference counts that protect models in use."""
from __future__ import annotations

import pytest

from hotslot.errors import NotFound, ResourceExhausted
from hotslot.services.executor.slots import ModelKey, SlotManager, Tier

MB = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1
        return self.t


def manager(standby=10 * MB, host=20 * MB, active=10 * MB):
    demoted, evicted = [], []
    slots = SlotManager(
        active_budget_bytes=active, standby_budget_bytes=standby, host_budget_bytes=host,
        on_demote=lambda e: demoted.append(e.key.model_id), on_evict=lambda e: evicted.append(e.key.model_id),
        clock=Clock(),
    )
    return slots, demoted, evicted


def key(name: str) -> ModelKey:
    return ModelKey(name, 1)


def standby(slots: SlotManager, name: str, size=6 * MB):
    entry = slots.add_host(key(name), weights=object(), size_bytes=size)
    slots.set_standby(entry, pipeline=f"pipe-{name}")
    slots.release(entry)
    return entry


def host(slots: SlotManager, name: str, size=6 * MB):
    entry = slots.add_host(key(name), weights=object(), size_bytes=size)
    slots.release(entry)
    return entry


def test_swap_is_a_pointer_assignment_and_previous_active_goes_to_standby() -> None:
    slots, demoted, _ = manager(standby=20 * MB)
    a, b = standby(slots, "a"), standby(slots, "b")
    slots.activate(a)
    assert slots.active is a and a.tier == Tier.ACTIVE and b.tier == Tier.STANDBY
    previous = slots.activate(b)
    assert previous is a and a.tier == Tier.STANDBY and a.pipeline == "pipe-a"
    assert slots.used(Tier.ACTIVE) == 6 * MB and slots.used(Tier.STANDBY) == 6 * MB
    assert demoted == []


def test_standby_over_budget_demotes_least_recently_used_to_host() -> None:
    slots, demoted, evicted = manager(standby=10 * MB)
    a = standby(slots, "a")
    b = standby(slots, "b")  # a + b = 12 MB > 10 MB: a (older) drops to host
    assert (a.tier, b.tier) == (Tier.HOST, Tier.STANDBY)
    assert a.pipeline is None and a.weights is not None
    assert demoted == ["a"] and evicted == []


def test_host_over_budget_evicts_least_recently_used() -> None:
    slots, _, evicted = manager(standby=1, host=13 * MB)
    host(slots, "a")
    host(slots, "b")
    host(slots, "c")
    assert evicted == ["a"] and slots.get(key("a")) is None
    assert slots.used(Tier.HOST) == 12 * MB


def test_referenced_models_are_never_demoted_or_evicted() -> None:
    slots, _, evicted = manager(standby=1, host=7 * MB)
    a = slots.add_host(key("a"), object(), 6 * MB)  # acquired: in use
    b = slots.add_host(key("b"), object(), 6 * MB)  # over budget, but both are in use
    assert slots.used(Tier.HOST) == 12 * MB
    slots.release(b)  # b is free now, a is not: b goes
    assert slots.get(key("a")) is a
    assert evicted == ["b"]
    slots.release(a)
    assert slots.evict(key("a")) is True and evicted == ["b", "a"]


def test_evict_of_a_model_in_use_marks_it_and_drops_it_when_its_last_request_ends() -> None:
    slots, _, evicted = manager()
    a = slots.add_host(key("a"), object(), 6 * MB)  # acquired by the request that loads it
    slots.set_standby(a, "pipe")
    slots.activate(a)
    slots.acquire(a)  # a second request
    assert slots.evict(key("a")) is False
    assert a.evicting and slots.get(key("a")) is a and evicted == []
    assert [m.evicting for m in slots.held()] == [True]
    slots.release(a)
    assert slots.get(key("a")) is a, "still in use by one request"
    slots.release(a)
    assert slots.get(key("a")) is None and slots.active is None and evicted == ["a"]
    with pytest.raises(NotFound):
        slots.evict(key("a"))


def test_standby_that_cannot_fit_stays_host_and_reports_it() -> None:
    slots, _, _ = manager(standby=5 * MB)
    a = host(slots, "a")
    slots.acquire(a)
    assert slots.set_standby(a, "pipe") is False
    assert a.tier == Tier.HOST and a.pipeline is None
    slots.activate(a, pipeline="pipe")  # a waiting request may still run it directly
    assert slots.active is a and a.tier == Tier.ACTIVE


def test_active_is_never_evicted_by_budget_pressure() -> None:
    slots, _, evicted = manager(standby=1, host=1)
    a = slots.add_host(key("a"), object(), 6 * MB)
    slots.activate(a, pipeline="pipe")
    slots.release(a)
    host(slots, "b")
    assert slots.active is a and evicted == ["b"]


def test_model_larger_than_active_budget_is_refused_up_front() -> None:
    slots, _, _ = manager(active=5 * MB)
    with pytest.raises(ResourceExhausted, match="active budget"):
        slots.check_fits(key("big"), 6 * MB)


def test_evict_unknown_is_not_found_and_held_lists_tiers() -> None:
    slots, _, _ = manager(standby=20 * MB)
    a, b = standby(slots, "a"), standby(slots, "b")
    slots.activate(b)
    assert [(h.key.model_id, h.tier) for h in slots.held()] == [("b", Tier.ACTIVE), ("a", Tier.STANDBY)]
    with pytest.raises(NotFound):
        slots.evict(key("zzz"))
    assert {u.tier: u.used_bytes for u in slots.usage()} == {Tier.ACTIVE: 6 * MB, Tier.STANDBY: 6 * MB, Tier.HOST: 0}
    assert a.tier == Tier.STANDBY


# -- the tier machine (slots.TRANSITIONS) -----------------------------------------------------------------------------
def test_tier_machine_table_lists_the_documented_transitions() -> None:
    from hotslot.services.executor.slots import ADAPTER_TRANSITIONS, NOT_HELD, TRANSITIONS, Move

    assert TRANSITIONS == {
        (NOT_HELD, Tier.HOST): Move.LOAD, (Tier.HOST, Tier.STANDBY): Move.MATERIALIZE,
        (Tier.HOST, Tier.ACTIVE): Move.ACTIVATE, (Tier.STANDBY, Tier.ACTIVE): Move.ACTIVATE,
        (Tier.ACTIVE, Tier.STANDBY): Move.SWAP_OUT, (Tier.STANDBY, Tier.HOST): Move.DEMOTE,
        (Tier.HOST, NOT_HELD): Move.DROP, (Tier.STANDBY, NOT_HELD): Move.DROP, (Tier.ACTIVE, NOT_HELD): Move.DROP,
    }
    assert ADAPTER_TRANSITIONS == {(NOT_HELD, Tier.HOST): Move.LOAD, (Tier.HOST, NOT_HELD): Move.DROP}
    # No executor holds a model on disk: those tiers are where loads come from.
    held = {t for pair in TRANSITIONS for t in pair if t is not None}
    assert held == {Tier.ACTIVE, Tier.STANDBY, Tier.HOST}


def test_a_transition_the_table_lacks_raises_and_changes_nothing() -> None:
    from hotslot.services.executor.slots import IllegalTransition, Move, check_transition

    slots, _, _ = manager()
    entry = standby(slots, "a")
    slots.activate(entry)
    with pytest.raises(IllegalTransition, match="from ACTIVE to STANDBY by materialize"):
        slots.set_standby(entry, pipeline="other")  # ACTIVE -> STANDBY only when another model is swapped in
    assert slots.tier_of(key("a")) == Tier.ACTIVE and slots.active is entry and entry.pipeline == "pipe-a"
    with pytest.raises(IllegalTransition):
        check_transition(Tier.HOST, Tier.LOCAL_DISK, Move.DEMOTE)
    with pytest.raises(IllegalTransition):
        check_transition(None, Tier.ACTIVE, Move.LOAD)  # a load lands in HOST first


def test_an_adapter_stays_in_the_host_tier() -> None:
    from hotslot.services.executor.slots import IllegalTransition

    slots, _, evicted = manager()
    adapter = slots.add_host(key("lora"), weights=object(), size_bytes=MB, base=key("base"))
    with pytest.raises(IllegalTransition, match="adapters stay in the host tier"):
        slots.set_standby(adapter, pipeline="p")
    assert slots.tier_of(key("lora")) == Tier.HOST and adapter.pipeline is None
    slots.release(adapter)
    assert slots.evict(key("lora")) and evicted == ["lora"]
