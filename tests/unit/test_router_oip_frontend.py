"""The Open Inference Protocol front-end (oip_frontend.InferenceFrontend) on a real RouterCore with fake executors and a
fake registry (real subclasses of the downstream interfaces): readiness follows what executors hold, load and unload
go through Preload and Evict and wait for the executors' status, and a stream runs requests at once, answering a
failed one with an error while the others go on."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from hotslot import errors
from hotslot.common.v1 import common_pb2
from hotslot.executor.v1 import executor_service_pb2 as epb
from hotslot.registry.v1 import registry_service_pb2 as registry_pb
from hotslot.services.router import oip, oip_frontend
from hotslot.services.router.core import RouterCore
from hotslot.services.router.downstream import (
    Evicted,
    ExecutorClient,
    GenerateCall,
    ModelCatalog,
    ProgressEvent,
    ResultEvent,
    StreamEvent,
)
from hotslot.services.router.membership import ExecutorMembership
from hotslot.services.router.placement import ExecutorSnapshot, HeldModel, Tier
from tests.support.router_fakes import FakeConnector


class FakeExecutor(ExecutorClient):
    """Holds `models` ({model_id: tier}); Preload puts a model in standby and Evict drops it, each publishing a new
    status. `evict_error` makes Evict fail; `gate`, when set, holds every generation until it opens."""

    def __init__(self, address: str, executor_id: str, models: dict[str, Tier]) -> None:
        self.address = address
        self.executor_id = executor_id
        self.models = dict(models)
        self.version = 0
        self.evict_error: errors.HotslotError | None = None
        self.gate: asyncio.Event | None = None
        self.calls: list[GenerateCall] = []
        self._statuses: asyncio.Queue[ExecutorSnapshot] = asyncio.Queue()
        self.publish()

    def publish(self) -> None:
        self.version += 1
        held = tuple(HeldModel(model_id, 1, tier, 100) for model_id, tier in self.models.items())
        self._statuses.put_nowait(ExecutorSnapshot(self.executor_id, self.address, True, held, 0, 8, self.version))

    async def watch_status(self) -> AsyncIterator[ExecutorSnapshot]:
        while True:
            yield await self._statuses.get()

    def _result(self, call: GenerateCall) -> epb.GenerateResponse:
        return epb.GenerateResponse(
            images=[common_pb2.Image(data=b"\x89PNG " + call.params.prompt.encode(), width=64, height=64, seed=1)],
            model=common_pb2.ModelRef(model_id=call.model_id, revision=1),
            tier=common_pb2.TIER_ACTIVE,
            executor_id=self.executor_id,
            request_id=call.request_id,
        )

    async def generate(self, call: GenerateCall, timeout_s: float | None) -> Any:
        self.calls.append(call)
        return self._result(call)

    async def generate_stream(self, call: GenerateCall, timeout_s: float | None) -> AsyncIterator[StreamEvent]:
        self.calls.append(call)
        yield ProgressEvent("load", epb.LoadProgress(phase=common_pb2.LOAD_PHASE_QUEUED))
        if self.gate is not None:
            await self.gate.wait()
        yield ProgressEvent("step", epb.StepProgress(step=1, total_steps=1))
        yield ResultEvent(self._result(call))

    async def preload(self, model_id: str, revision: int, timeout_s: float | None) -> Any:
        self.models.setdefault(model_id, Tier.STANDBY)
        self.publish()
        return epb.PreloadResponse(model=common_pb2.ModelRef(model_id=model_id, revision=1))

    async def evict(self, model_id: str, revision: int, timeout_s: float | None) -> Evicted:
        if self.evict_error is not None:
            raise self.evict_error
        if self.models.pop(model_id, None) is None:
            raise errors.NotFound(f"model {model_id!r} is not held by executor {self.executor_id}")
        self.publish()
        return Evicted(100, 0)


class FakeCatalog(ModelCatalog):
    def __init__(self, models: list[str]) -> None:
        self.models = models

    async def list_models(self, request: registry_pb.ListModelsRequest) -> registry_pb.ListModelsResponse:
        # One model per page, to see the front-end follow next_page_token.
        start = int(request.page_token or 0)
        token = str(start + 1) if start + 1 < len(self.models) else ""
        return registry_pb.ListModelsResponse(
            models=[registry_pb.Model(model_id=self.models[start], revision=1)], next_page_token=token
        )

    async def get_model(self, model_id: str, revision: int) -> Any:
        if model_id not in self.models or revision > 1:
            raise errors.NotFound(f"model {model_id!r} is not registered")
        return registry_pb.Model(model_id=model_id, revision=1, kind=common_pb2.MODEL_KIND_DIFFUSERS_PIPELINE)


async def settle(condition: Callable[[], bool], steps: int = 200) -> None:
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


@pytest.fixture
async def setup():
    executors = [FakeExecutor("10.0.0.1:7000", "exec-a", {"alpha": Tier.ACTIVE}),
                 FakeExecutor("10.0.0.2:7000", "exec-b", {"beta": Tier.LOCAL_DISK})]
    membership = ExecutorMembership(FakeConnector(executors), static_targets=[e.address for e in executors])
    core = RouterCore(membership, FakeCatalog(["alpha", "beta", "gamma"]))
    frontend = oip_frontend.InferenceFrontend(core, server_version="1.2.3", status_wait_s=5.0)
    assert not frontend.server_ready()
    await membership.start()
    await settle(lambda: len(membership.placeable()) == 2)
    yield frontend, {e.executor_id: e for e in executors}
    await membership.close()


def ask(model: str, prompt: str = "a boat", request_id: str = "", **parameters: Any) -> oip.InferRequest:
    return oip.InferRequest(model, id=request_id, parameters={"prompt": prompt, **parameters})


async def test_readiness_follows_what_ready_executors_hold(setup):
    frontend, _ = setup
    assert frontend.server_ready() and frontend.server_live()
    assert await frontend.model_ready("alpha", "")
    assert await frontend.model_ready("alpha", "1")
    assert not await frontend.model_ready("beta", "")  # only on local disk: loads on the first request
    assert not await frontend.model_ready("no-such-model", "")
    index = await frontend.repository_index(ready_only=False)
    assert [(e.name, e.version, e.state) for e in index] == [
        ("alpha", "1", "READY"), ("beta", "1", "UNAVAILABLE"), ("gamma", "1", "UNAVAILABLE")
    ]
    assert [e.name for e in await frontend.repository_index(ready_only=True)] == ["alpha"]


async def test_load_preloads_and_returns_once_the_status_shows_the_model_held(setup):
    frontend, _ = setup
    await frontend.load("gamma", {}, None)
    assert await frontend.model_ready("gamma", "")  # no waiting: load waited for the status
    with pytest.raises(errors.InvalidArgument, match="config and file overrides are not supported"):
        await frontend.load("gamma", {"config": "{}"}, None)
    with pytest.raises(errors.NotFound):
        await frontend.load("no-such-model", {}, None)


async def test_unload_evicts_on_every_holder_and_returns_once_none_holds_it(setup):
    frontend, executors = setup
    await frontend.load("alpha", {"replicas": 2}, None)
    await settle(lambda: sorted(frontend.holders("alpha", 0)) == ["exec-a", "exec-b"])
    await frontend.unload("alpha", None)
    assert frontend.holders("alpha", 0) == []
    assert not await frontend.model_ready("alpha", "")
    await frontend.unload("alpha", None)  # held nowhere: nothing to do
    with pytest.raises(errors.NotFound):
        await frontend.unload("no-such-model", None)


async def test_unload_names_the_executors_that_refused(setup):
    frontend, executors = setup
    executors["exec-a"].evict_error = errors.FailedPrecondition("model 'alpha' is in use")
    with pytest.raises(errors.FailedPrecondition, match="executor exec-a: model 'alpha' is in use"):
        await frontend.unload("alpha", None)


async def test_infer_routes_the_parsed_request_and_answers_with_the_png(setup):
    frontend, executors = setup
    outcome = await frontend.infer(ask("alpha", "a lighthouse", request_id="r1", steps=3), None)
    (call,) = executors["exec-a"].calls
    assert (call.params.prompt, call.params.steps, call.request_id != "r1") == ("a lighthouse", 3, True)
    assert outcome.id == "r1"
    assert oip.decode_bytes_tensor(outcome.outputs[0].raw, "image") == [b"\x89PNG a lighthouse"]
    with pytest.raises(errors.NotFound):
        await frontend.infer(ask("no-such-model"), None)


async def test_a_stream_runs_requests_at_once_and_answers_a_failed_one_while_the_others_go_on(setup):
    frontend, executors = setup
    gate = executors["exec-a"].gate = asyncio.Event()
    requests: asyncio.Queue[oip.InferRequest | None] = asyncio.Queue()

    async def incoming() -> AsyncIterator[oip.InferRequest]:
        while (request := await requests.get()) is not None:
            yield request

    stream = frontend.infer_stream(incoming(), lambda: None)
    requests.put_nowait(ask("alpha", "first", request_id="1", progress=True))
    assert (await anext(stream)).parameters["load_phase"] == "queued"  # the first is held at its gate
    requests.put_nowait(ask("no-such-model", request_id="2"))
    requests.put_nowait(ask("alpha", "bad", request_id="3", steps=-1))
    failures = [await anext(stream), await anext(stream)]
    assert {(f.id, type(f.error)) for f in failures} == {("2", errors.NotFound), ("3", errors.InvalidArgument)}
    gate.set()
    step, image = await anext(stream), await anext(stream)
    assert (step.id, step.final, step.parameters["step"]) == ("1", False, 1)
    assert (image.id, image.final) == ("1", True)
    requests.put_nowait(ask("alpha", "no progress", request_id="4"))
    only = await anext(stream)
    assert (only.id, only.final) == ("4", True)  # without `progress`, the image alone
    requests.put_nowait(None)
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_an_unexpected_error_ends_the_stream(setup):
    frontend, executors = setup

    async def broken(call, timeout_s):
        raise RuntimeError("boom")
        yield  # an async generator

    executors["exec-a"].generate_stream = broken  # type: ignore[method-assign]

    async def incoming() -> AsyncIterator[oip.InferRequest]:
        yield ask("alpha")

    with pytest.raises(RuntimeError, match="boom"):
        async for _ in frontend.infer_stream(incoming(), lambda: None):
            pass


async def test_server_metadata_names_hotslot_and_its_extensions(setup):
    frontend, _ = setup
    assert frontend.server_metadata() == oip.ServerMetadata("hotslot", "1.2.3", ("model_repository", "parameters"))
    metadata = await frontend.model_metadata("alpha", "")
    assert (metadata.name, metadata.versions, metadata.platform) == ("alpha", ("1",), "diffusers")
    assert metadata.inputs == oip.INPUTS and metadata.outputs == oip.OUTPUTS
