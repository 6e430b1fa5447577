"""The executor's caching resolver: a burst of requests costs one registry lookup, and while the registry is
unreachable a model the executor holds keeps serving on the last answer (one it does not hold is refused)."""
from __future__ import annotations

import pytest

from hotslot.errors import Unavailable
from hotslot.services.executor.downstream import ResolvedModel
from hotslot.services.executor.resolver import CachingResolver
from hotslot.services.executor.slots import ModelKey, SlotManager


class CountingRegistry:
    def __init__(self) -> None:
        self.calls = 0
        self.down = False

    async def resolve(self, model_id: str, revision: int) -> ResolvedModel:
        self.calls += 1
        if self.down:
            raise Unavailable("registry at fake unreachable (UNAVAILABLE)")
        return ResolvedModel(model_id, 1, "DIFFUSERS_PIPELINE", 10, "StableDiffusionPipeline")


def slot_manager() -> SlotManager:
    return SlotManager(active_budget_bytes=100, standby_budget_bytes=100, host_budget_bytes=100)


def resolver(registry: CountingRegistry, slots: SlotManager, cache_s: float) -> CachingResolver:
    return CachingResolver(registry, slots, cache_s, max_adapters=4)


async def test_a_burst_of_requests_costs_one_registry_lookup() -> None:
    registry = CountingRegistry()
    cached = resolver(registry, slot_manager(), cache_s=60)
    answers = [await cached.resolve("a", 0) for _ in range(5)]
    assert registry.calls == 1 and {a.revision for a in answers} == {1}


async def test_a_held_model_serves_on_the_last_answer_while_the_registry_is_down_and_others_are_refused() -> None:
    registry = CountingRegistry()
    slots = slot_manager()
    cached = resolver(registry, slots, cache_s=0)  # every call asks the registry
    await cached.resolve("held", 0)
    await cached.resolve("not-held", 0)
    slots.add_host(ModelKey("held", 1), object(), 10)
    registry.down = True
    assert (await cached.resolve("held", 0)).model_id == "held"
    with pytest.raises(Unavailable):
        await cached.resolve("not-held", 0)
