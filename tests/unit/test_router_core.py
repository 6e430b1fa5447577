"""Router core against fake executors and a fake registry (real subclasses of the downstream interfaces): placement
through the core, one retry on UNAVAILABLE and none on other failures, the bounded router queue, deadlines, streams,
registry passthrough and the cluster status."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from hotslot import errors
from hotslot.common.v1 import common_pb2
from hotslot.registry.v1 import registry_service_pb2 as registry_pb
from hotslot.services.router.core import EvictAnswer, EvictOutcome, Routed, RouterCore
from hotslot.services.router.downstream import (
    Evicted,
    ExecutorClient,
    ExecutorUnavailable,
    GenerateCall,
    ModelCatalog,
    ProgressEvent,
    ResultEvent,
    StreamEvent,
)
from hotslot.services.router.membership import ExecutorMembership
from hotslot.services.router.placement import GIB, ExecutorSnapshot, HeldModel, PlacementReason, Tier
from tests.support.router_fakes import FakeConnector

# -- fakes ---------------------------------------------------------------------------------------------------


@dataclass
class Sent:
    call: GenerateCall
    timeout_s: float | None


class FakeExecutor(ExecutorClient):
    """An executor whose status the test publishes and whose answers the test scripts: each entry of `script` is
    used by one call (an exception to raise, "hold" to wait for `release`, or anything else to succeed)."""

    def __init__(self, address: str, executor_id: str, *models: tuple[str, Tier]) -> None:
        self.address = address
        self.executor_id = executor_id
        self.models = [HeldModel(model_id, 1, tier, 100) for model_id, tier in models]
        self.capacity = 8
        self.version = 0
        self.sent: list[Sent] = []
        self.preloads: list[tuple[str, int]] = []
        self.preload_script: list[Any] = []
        self.evicts: list[tuple[str, int]] = []
        self.evict_script: list[Any] = []
        self.script: list[Any] = []
        self.release = asyncio.Event()
        self.holding = 0
        self._statuses: asyncio.Queue[ExecutorSnapshot | Exception] = asyncio.Queue()
        self.publish()

    def publish(self, *, ready: bool = True, depth: int = 0) -> None:
        self.version += 1
        self._statuses.put_nowait(
            ExecutorSnapshot(self.executor_id, self.address, ready, tuple(self.models), depth, self.capacity,
                             self.version, raw={"id": self.executor_id})
        )

    def break_stream(self) -> None:
        self._statuses.put_nowait(ExecutorUnavailable("stream broke"))

    async def watch_status(self) -> AsyncIterator[ExecutorSnapshot]:
        while True:
            item = await self._statuses.get()
            if isinstance(item, Exception):
                raise item
            yield item

    async def _answer(self, call: GenerateCall, timeout_s: float | None) -> Any:
        self.sent.append(Sent(call, timeout_s))
        action = self.script.pop(0) if self.script else "ok"
        if isinstance(action, Exception):
            raise action
        if action == "hold":
            self.holding += 1
            try:
                await self.release.wait()
            finally:
                self.holding -= 1
        return {"executor_id": self.executor_id, "request_id": call.request_id}

    async def generate(self, call: GenerateCall, timeout_s: float | None) -> Any:
        return await self._answer(call, timeout_s)

    async def generate_stream(self, call: GenerateCall, timeout_s: float | None) -> AsyncIterator[StreamEvent]:
        yield ProgressEvent("load", {"executor_id": self.executor_id, "phase": "queued"})
        yield ProgressEvent("step", {"executor_id": self.executor_id, "step": 1})
        yield ResultEvent(await self._answer(call, timeout_s))

    async def preload(self, model_id: str, revision: int, timeout_s: float | None) -> Any:
        self.preloads.append((model_id, revision))
        action = self.preload_script.pop(0) if self.preload_script else "ok"
        if isinstance(action, Exception):
            raise action
        return {"loaded": model_id, "by": self.executor_id}

    async def evict(self, model_id: str, revision: int, timeout_s: float | None) -> Evicted:
        self.evicts.append((model_id, revision))
        action = self.evict_script.pop(0) if self.evict_script else "ok"
        if isinstance(action, Exception):
            raise action
        if not any(m.model_id == model_id for m in self.models):
            raise errors.NotFound(f"model {model_id!r} is not held", reason=errors.Reason.MODEL_NOT_HELD)
        return Evicted(0, 100) if action == "in use" else Evicted(100, 0)


class FakeCatalog(ModelCatalog):
    def __init__(self, models: set[str]) -> None:
        self.models = models
        self.asked: list[str] = []
        self.down = False
        self.sizes: dict[str, int] = {}
        self.bases: dict[str, str] = {}
        """LoRA adapter id -> its base model id."""

    async def list_models(self, request: Any) -> Any:
        return {"models": sorted(self.models)}

    async def get_model(self, model_id: str, revision: int) -> Any:
        self.asked.append(model_id)
        if self.down:
            raise errors.Unavailable("registry at fake unreachable (UNAVAILABLE)")
        if model_id not in self.models:
            raise errors.NotFound(f"model {model_id!r} is not registered")
        base = self.bases.get(model_id, "")
        return registry_pb.Model(
            model_id=model_id, revision=1, manifest=common_pb2.Manifest(total_bytes=self.sizes.get(model_id, 0)),
            kind=common_pb2.MODEL_KIND_LORA_ADAPTER if base else common_pb2.MODEL_KIND_DIFFUSERS_PIPELINE,
            base_model_id=base,
        )


@dataclass
class Cluster:
    core: RouterCore
    membership: ExecutorMembership
    executors: dict[str, FakeExecutor]
    catalog: FakeCatalog
    tasks: list[asyncio.Task] = field(default_factory=list)

    def __getitem__(self, executor_id: str) -> FakeExecutor:
        return self.executors[executor_id]

    def start(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.append(task)
        return task


async def settle(condition: Callable[[], bool], steps: int = 200) -> None:
    """Lets the loop run until `condition` holds (a bounded number of steps; never a wall-clock wait)."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


@pytest.fixture
async def cluster():
    executors = [
        FakeExecutor("10.0.0.1:7000", "exec-a", ("alpha", Tier.ACTIVE), ("beta", Tier.HOST)),
        FakeExecutor("10.0.0.2:7000", "exec-b", ("beta", Tier.STANDBY)),
    ]
    membership = ExecutorMembership(
        FakeConnector(executors), static_targets=[e.address for e in executors], watch_backoff_s=0.01
    )
    catalog = FakeCatalog({"alpha", "beta", "cold"})
    core = RouterCore(
        membership, catalog, max_queue=1, max_inflight_per_executor=1, queue_timeout_s=30, retry_after_s=2.5
    )
    await membership.start()
    await settle(lambda: len(membership.placeable()) == 2)
    made = Cluster(core, membership, {e.executor_id: e for e in executors}, catalog)
    yield made
    for executor in executors:
        executor.release.set()
    for task in made.tasks:
        task.cancel()
    await asyncio.gather(*made.tasks, return_exceptions=True)
    await membership.close()


def call(model_id: str, request_id: str = "") -> GenerateCall:
    return GenerateCall(model_id, 0, params={"prompt": "a cat"}, request_id=request_id)


# -- placement through the core ------------------------------------------------------------------------------


async def test_generate_goes_to_the_best_tier_and_says_why(cluster: Cluster) -> None:
    routed = await cluster.core.generate(call("alpha", "r1"), None)
    assert routed.result == {"executor_id": "exec-a", "request_id": "r1"}
    assert (routed.attempted_executor_ids, routed.placement_reason) == (("exec-a",), PlacementReason.ACTIVE)
    routed = await cluster.core.generate(call("beta"), None)
    assert (routed.attempted_executor_ids, routed.placement_reason) == (("exec-b",), PlacementReason.STANDBY)
    assert routed.result["request_id"], "an empty request id is generated"
    routed = await cluster.core.generate(call("cold"), None)
    # Both idle: the one holding fewer bytes has more room to load it.
    assert (routed.attempted_executor_ids, routed.placement_reason) == (("exec-b",), PlacementReason.LOAD)
    assert [s.call.params for s in cluster["exec-b"].sent] == [{"prompt": "a cat"}] * 2


async def test_missing_model_id_is_refused_before_any_executor_is_called(cluster: Cluster) -> None:
    with pytest.raises(errors.InvalidArgument, match="model.model_id"):
        await cluster.core.generate(call(""), None)
    assert not cluster["exec-a"].sent and not cluster["exec-b"].sent


@pytest.mark.parametrize("request_id", ["abc\n2026-01-01T00:00:00Z INFO forged line", "x" * 100_000, "a b", "é"])
async def test_a_request_id_with_control_characters_or_too_long_is_refused(cluster: Cluster, request_id) -> None:
    with pytest.raises(errors.InvalidArgument, match="request_id") as refused:
        await cluster.core.generate(call("alpha", request_id), None)
    assert request_id not in refused.value.message
    assert not cluster["exec-a"].sent and not cluster["exec-b"].sent
    routed = await cluster.core.generate(call("alpha", "trace-1:retry_2.a-" + "z" * 110), None)
    assert routed.result["request_id"].startswith("trace-1:retry_2.a-")


async def test_unknown_model_is_not_found_from_the_registry_before_it_takes_a_slot(cluster: Cluster) -> None:
    with pytest.raises(errors.NotFound, match="'ghost' is not registered"):
        await cluster.core.generate(call("ghost"), None)
    assert not cluster["exec-a"].sent and not cluster["exec-b"].sent
    # Held models skip the registry; an unreachable registry leaves the decision to the executor.
    cluster.catalog.asked.clear()
    await cluster.core.generate(call("alpha"), None)
    assert cluster.catalog.asked == []
    cluster.catalog.down = True
    assert (await cluster.core.generate(call("ghost"), None)).placement_reason == PlacementReason.LOAD


# -- retries -------------------------------------------------------------------------------------------------


async def test_unavailable_is_retried_once_on_another_executor(cluster: Cluster) -> None:
    cluster["exec-a"].script = [ExecutorUnavailable("exec-a went away")]
    routed = await cluster.core.generate(call("alpha", "r2"), None)
    assert routed.attempted_executor_ids == ("exec-a", "exec-b")
    assert routed.result["executor_id"] == "exec-b"
    # exec-a, which holds it, is out of the running: exec-b loads it as if nobody held it.
    assert routed.placement_reason == PlacementReason.LOAD
    assert cluster["exec-b"].sent[0].call.request_id == "r2"
    assert all(link.inflight == 0 for link in cluster.membership.placeable())


async def test_second_failure_is_final_and_carries_the_executors_message(cluster: Cluster) -> None:
    cluster["exec-a"].script = [ExecutorUnavailable("a died")]
    cluster["exec-b"].script = [ExecutorUnavailable("b died too")]
    with pytest.raises(ExecutorUnavailable, match="b died too"):
        await cluster.core.generate(call("alpha"), None)
    assert len(cluster["exec-a"].sent) == 1 and len(cluster["exec-b"].sent) == 1


async def test_no_other_executor_raises_the_original_error(cluster: Cluster) -> None:
    cluster["exec-b"].publish(ready=False)
    await settle(lambda: not cluster.membership.placeable()[1].live)
    cluster["exec-a"].script = [ExecutorUnavailable("preloader down")]
    with pytest.raises(ExecutorUnavailable, match="preloader down"):
        await cluster.core.generate(call("alpha"), None)


@pytest.mark.parametrize(
    "failure",
    [
        errors.InvalidArgument("params.steps: must be between 1 and 150"),
        errors.NotFound("model 'alpha' revision 9 does not exist"),
        errors.DeadlineExceeded("Deadline Exceeded"),
        errors.Cancelled("cancelled"),
        errors.ResourceExhausted("executor queue is full", retry_after_s=0.5),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_other_failures_are_not_retried(cluster: Cluster, failure: errors.HotslotError) -> None:
    cluster["exec-a"].script = [failure]
    with pytest.raises(type(failure)) as raised:
        await cluster.core.generate(call("alpha"), None)
    assert raised.value is failure
    assert not cluster["exec-b"].sent
    assert cluster.membership.placeable()[0].inflight == 0


async def test_retries_can_be_turned_off(cluster: Cluster) -> None:
    cluster.core.retry_attempts = 0
    cluster["exec-a"].script = [ExecutorUnavailable("gone")]
    with pytest.raises(ExecutorUnavailable):
        await cluster.core.generate(call("alpha"), None)
    assert not cluster["exec-b"].sent


# -- streams -------------------------------------------------------------------------------------------------


async def collect(events: AsyncIterator[Any]) -> list[Any]:
    return [event async for event in events]


async def test_stream_forwards_progress_then_the_routed_result(cluster: Cluster) -> None:
    events = await collect(cluster.core.generate_stream(call("beta"), None))
    assert [e.kind for e in events[:-1]] == ["load", "step"]
    assert isinstance(events[-1], Routed) and events[-1].attempted_executor_ids == ("exec-b",)


async def test_stream_broken_before_its_result_is_retried_and_progress_starts_over(cluster: Cluster) -> None:
    cluster["exec-b"].script = [ExecutorUnavailable("exec-b died mid-denoise")]
    events = await collect(cluster.core.generate_stream(call("beta"), None))
    progress = [(e.kind, e.payload["executor_id"]) for e in events[:-1]]
    assert progress == [("load", "exec-b"), ("step", "exec-b"), ("load", "exec-a"), ("step", "exec-a")]
    assert events[-1].attempted_executor_ids == ("exec-b", "exec-a")
    assert events[-1].result["executor_id"] == "exec-a"


async def test_stream_closed_by_the_client_frees_its_slot(cluster: Cluster) -> None:
    events = cluster.core.generate_stream(call("alpha"), None)
    assert (await anext(events)).kind == "load"
    assert cluster.membership.placeable()[0].inflight == 1
    await events.aclose()
    assert cluster.membership.placeable()[0].inflight == 0


# -- the bounded queue and deadlines -------------------------------------------------------------------------


async def test_full_executors_queue_requests_then_refuse_with_a_retry_hint(cluster: Cluster) -> None:
    a, b = cluster["exec-a"], cluster["exec-b"]
    a.script, b.script = ["hold"], ["hold"]
    first = cluster.start(cluster.core.generate(call("alpha", "first"), None))
    second = cluster.start(cluster.core.generate(call("beta", "second"), None))
    await settle(lambda: a.holding == 1 and b.holding == 1)
    waiting = cluster.start(cluster.core.generate(call("alpha", "waiting"), None))
    await settle(lambda: cluster.core.cluster_status().router_queue_depth == 1)

    with pytest.raises(errors.ResourceExhausted, match="router queue is full") as refused:
        await cluster.core.generate(call("alpha", "refused"), None)
    assert refused.value.retry_after_s == 2.5

    a.release.set()
    assert (await first).result["request_id"] == "first"
    routed = await waiting
    assert routed.attempted_executor_ids == ("exec-a",) and routed.router_queue_s > 0
    b.release.set()
    await second
    assert cluster.core.cluster_status().router_queue_depth == 0
    assert [link.inflight for link in cluster.membership.placeable()] == [0, 0]


async def test_waiting_request_that_is_cancelled_leaves_the_queue(cluster: Cluster) -> None:
    cluster["exec-a"].script, cluster["exec-b"].script = ["hold"], ["hold"]
    cluster.start(cluster.core.generate(call("alpha"), None))
    cluster.start(cluster.core.generate(call("beta"), None))
    await settle(lambda: cluster["exec-a"].holding == 1 and cluster["exec-b"].holding == 1)
    waiting = cluster.start(cluster.core.generate(call("alpha"), None))
    await settle(lambda: cluster.core.cluster_status().router_queue_depth == 1)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert cluster.core.cluster_status().router_queue_depth == 0
    cluster["exec-a"].release.set()
    await settle(lambda: cluster.membership.placeable()[0].inflight == 0)


async def test_deadline_is_passed_on_and_ends_a_wait_in_the_queue(cluster: Cluster) -> None:
    await cluster.core.generate(call("alpha"), 5.0)
    sent = cluster["exec-a"].sent[-1].timeout_s
    assert sent is not None and 0 < sent <= 5.0
    await cluster.core.generate(call("alpha"), None)
    assert cluster["exec-a"].sent[-1].timeout_s is None

    cluster["exec-a"].script, cluster["exec-b"].script = ["hold"], ["hold"]
    cluster.start(cluster.core.generate(call("alpha"), None))
    cluster.start(cluster.core.generate(call("beta"), None))
    await settle(lambda: cluster["exec-a"].holding == 1 and cluster["exec-b"].holding == 1)
    with pytest.raises(errors.DeadlineExceeded, match="waited for an executor"):
        await cluster.core.generate(call("alpha"), 0.01)
    cluster.core.queue_timeout_s = 0.01
    with pytest.raises(errors.ResourceExhausted, match="no executor had room") as refused:
        await cluster.core.generate(call("alpha"), None)
    assert refused.value.retry_after_s == 2.5


async def test_a_deadline_already_past_never_reaches_an_executor(cluster: Cluster) -> None:
    with pytest.raises(errors.DeadlineExceeded):
        await cluster.core.generate(call("alpha"), -1.0)
    assert not cluster["exec-a"].sent
    assert cluster.membership.placeable()[0].inflight == 0


# -- no executor, preload, passthrough, status ---------------------------------------------------------------


async def test_no_ready_executor_is_unavailable_and_waiters_are_told_when_the_last_one_leaves(
    cluster: Cluster,
) -> None:
    cluster["exec-a"].script, cluster["exec-b"].script = ["hold"], ["hold"]
    cluster.start(cluster.core.generate(call("alpha"), None))
    cluster.start(cluster.core.generate(call("beta"), None))
    await settle(lambda: cluster["exec-a"].holding == 1 and cluster["exec-b"].holding == 1)
    waiting = cluster.start(cluster.core.generate(call("alpha"), None))
    await settle(lambda: cluster.core.cluster_status().router_queue_depth == 1)
    cluster["exec-a"].break_stream()
    cluster["exec-b"].publish(ready=False)
    with pytest.raises(errors.Unavailable, match="no executor is ready"):
        await waiting
    with pytest.raises(errors.Unavailable, match="no executor is ready"):
        await cluster.core.generate(call("alpha"), None)


async def test_preload_uses_placement_and_ignores_queue_room(cluster: Cluster) -> None:
    cluster["exec-b"].script = ["hold"]
    busy = cluster.start(cluster.core.generate(call("beta"), None))
    await settle(lambda: cluster["exec-b"].holding == 1)
    preloaded = await cluster.core.preload("beta", 0, 0, None)
    assert preloaded.executor_id == "exec-b" and cluster["exec-b"].preloads == [("beta", 0)]
    assert [r.executor_id for r in preloaded.replicas] == ["exec-b"]
    assert preloaded.result == {"loaded": "beta", "by": "exec-b"}
    # exec-b has a request in flight (its queue is longer): the cold model goes to the idle exec-a.
    assert (await cluster.core.preload("cold", 0, 1, None)).executor_id == "exec-a"
    with pytest.raises(errors.NotFound):
        await cluster.core.preload("ghost", 0, 0, None)
    with pytest.raises(errors.InvalidArgument, match="model.model_id"):
        await cluster.core.preload("", 0, 0, None)
    cluster["exec-b"].release.set()
    await busy


async def test_preload_replicas_load_on_that_many_executors_holders_first(cluster: Cluster) -> None:
    # beta is in standby on exec-b and in host memory on exec-a: both hold it, the better tier first.
    preloaded = await cluster.core.preload("beta", 0, 2, None)
    assert [r.executor_id for r in preloaded.replicas] == ["exec-b", "exec-a"]
    assert [r.result["by"] for r in preloaded.replicas] == ["exec-b", "exec-a"]
    assert preloaded.executor_id == "exec-b"
    # More replicas than executors: every live one, each once.
    preloaded = await cluster.core.preload("cold", 0, 5, None)
    assert sorted(r.executor_id for r in preloaded.replicas) == ["exec-a", "exec-b"]
    assert cluster["exec-a"].preloads.count(("cold", 0)) == cluster["exec-b"].preloads.count(("cold", 0)) == 1
    # A not-ready executor is not live: it gets no replica.
    cluster["exec-b"].publish(ready=False)
    await settle(lambda: not cluster.membership.placeable()[1].live)
    assert [r.executor_id for r in (await cluster.core.preload("alpha", 0, 2, None)).replicas] == ["exec-a"]
    with pytest.raises(errors.InvalidArgument, match="replicas"):
        await cluster.core.preload("alpha", 0, -1, None)
    assert ("alpha", 0) not in cluster["exec-b"].preloads


async def test_preload_of_an_adapter_goes_to_the_executors_holding_its_base(cluster: Cluster) -> None:
    cluster.catalog.models.add("lora-x")
    cluster.catalog.bases["lora-x"] = "beta"  # beta: standby on exec-b, host memory on exec-a
    preloaded = await cluster.core.preload("lora-x", 0, 1, None)
    assert [r.executor_id for r in preloaded.replicas] == ["exec-b"]
    assert cluster["exec-b"].preloads == [("lora-x", 0)] and cluster["exec-a"].preloads == []
    preloaded = await cluster.core.preload("lora-x", 0, 2, None)
    assert [r.executor_id for r in preloaded.replicas] == ["exec-b", "exec-a"]
    # alpha (active on exec-a only) as a base: its adapters go to exec-a.
    cluster.catalog.models.add("lora-y")
    cluster.catalog.bases["lora-y"] = "alpha"
    assert (await cluster.core.preload("lora-y", 0, 1, None)).executor_id == "exec-a"


async def test_preload_replica_that_fails_unavailable_is_retried_elsewhere_or_left_out(cluster: Cluster) -> None:
    cluster["exec-a"].preload_script = [ExecutorUnavailable("exec-a went away")]
    # One replica: exec-a (holding alpha) fails, exec-b takes it.
    preloaded = await cluster.core.preload("alpha", 0, 1, None)
    assert [r.executor_id for r in preloaded.replicas] == ["exec-b"]
    # Two replicas, one executor fails and none is left for it: the other is the answer.
    cluster["exec-a"].preload_script = [ExecutorUnavailable("exec-a went away")]
    preloaded = await cluster.core.preload("alpha", 0, 2, None)
    assert [r.executor_id for r in preloaded.replicas] == ["exec-b"]
    # Any other failure is the answer.
    cluster["exec-b"].preload_script = [errors.ResourceExhausted("no room for it")]
    with pytest.raises(errors.ResourceExhausted, match="no room"):
        await cluster.core.preload("alpha", 0, 2, None)
    # Every replica failing unavailable: the error.
    cluster["exec-a"].preload_script = [ExecutorUnavailable("a down")]
    cluster["exec-b"].preload_script = [ExecutorUnavailable("b down")]
    with pytest.raises(ExecutorUnavailable):
        await cluster.core.preload("alpha", 0, 2, None)


async def test_the_registrys_size_prices_the_load_of_a_model_nobody_holds(cluster: Cluster) -> None:
    cluster.catalog.sizes["cold"] = 8 * GIB
    await cluster.core.generate(call("cold"), None)
    assert cluster.core._model_bytes[("cold", 0)] == 8 * GIB
    choice = cluster.core.placement.choose(
        "cold", 0, cluster.membership.placeable(), size_bytes=cluster.core._model_bytes[("cold", 0)]
    )
    assert choice is not None and choice.estimate.load_s == pytest.approx(1.0 + 8.0)  # the default disk cost


# -- evict ---------------------------------------------------------------------------------------------------


async def test_evict_asks_every_executor_holding_the_model_and_lists_each_answer(cluster: Cluster) -> None:
    cluster["exec-b"].evict_script = ["in use"]
    answers = await cluster.core.evict("beta", 0, "", None)
    assert answers == [
        EvictAnswer("exec-a", EvictOutcome.EVICTED, freed_bytes=100),
        EvictAnswer("exec-b", EvictOutcome.MARKED, pending_bytes=100),
    ]
    # Only the holders are asked; nobody holding it is an empty answer, not an error.
    assert await cluster.core.evict("alpha", 0, "", None) == [EvictAnswer("exec-a", EvictOutcome.EVICTED, 100)]
    assert cluster["exec-b"].evicts == [("beta", 0)]
    assert await cluster.core.evict("cold", 0, "", None) == []


async def test_evict_lists_a_failing_executor_instead_of_failing_the_call(cluster: Cluster) -> None:
    cluster["exec-a"].evict_script = [ExecutorUnavailable("executor at 10.0.0.1:7000 went away")]
    cluster["exec-b"].evict_script = [errors.NotFound("model 'beta' is not held")]
    answers = await cluster.core.evict("beta", 0, "", None)
    assert [(a.executor_id, a.outcome, a.message) for a in answers] == [
        ("exec-a", EvictOutcome.FAILED, "executor at 10.0.0.1:7000 went away"),
        ("exec-b", EvictOutcome.NOT_HELD, "model 'beta' is not held"),
    ]


async def test_evict_on_one_named_executor_returns_its_errors(cluster: Cluster) -> None:
    assert await cluster.core.evict("beta", 0, "exec-b", None) == [EvictAnswer("exec-b", EvictOutcome.EVICTED, 100)]
    assert cluster["exec-a"].evicts == []
    with pytest.raises(errors.NotFound) as held:
        await cluster.core.evict("alpha", 0, "exec-b", None)
    assert held.value.reason == errors.Reason.MODEL_NOT_HELD
    with pytest.raises(errors.NotFound) as unknown:
        await cluster.core.evict("alpha", 0, "exec-z", None)
    assert unknown.value.reason == errors.Reason.EXECUTOR_NOT_FOUND
    with pytest.raises(errors.InvalidArgument, match="model.model_id"):
        await cluster.core.evict("", 0, "", None)


async def test_catalog_calls_pass_through_and_need_a_registry(cluster: Cluster) -> None:
    assert await cluster.core.list_models({}) == {"models": ["alpha", "beta", "cold"]}
    assert (await cluster.core.get_model("alpha", 0)).model_id == "alpha"
    with pytest.raises(errors.NotFound, match="'ghost'"):
        await cluster.core.get_model("ghost", 0)
    cluster.core.catalog = None
    with pytest.raises(errors.Unavailable, match="REGISTRY_ADDRESS"):
        await cluster.core.list_models({})


async def test_cluster_status_lists_connected_executors_by_id_and_the_unreachable(cluster: Cluster) -> None:
    status = cluster.core.cluster_status()
    assert status.executors == [{"id": "exec-a"}, {"id": "exec-b"}]
    assert status.unreachable_addresses == [] and status.router_queue_depth == 0
    cluster["exec-a"].break_stream()
    await settle(lambda: len(cluster.membership.placeable()) == 1)
    status = cluster.core.cluster_status()
    assert status.executors == [{"id": "exec-b"}] and status.unreachable_addresses == ["10.0.0.1:7000"]
    # The watch reconnects (backoff) and the executor is back.
    cluster["exec-a"].publish()
    for _ in range(100):
        if len(cluster.membership.placeable()) == 2:
            break
        await asyncio.sleep(0.01)
    assert cluster.core.cluster_status().unreachable_addresses == []
