"""Real executors stopped with SIGTERM while a request is still loading (the preloader's reads are capped so the
load outlasts the shutdown grace): the request is ended with UNAVAILABLE and a RetryInfo detail before the grace
runs out (not "Cancelling all calls"), and through a router with a second executor the client still gets its
image."""
from __future__ import annotations

import io
import signal
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from hotslot.common.v1 import common_pb2
from hotslot.executor.v1 import executor_service_pb2 as epb
from hotslot.router.v1 import router_service_pb2 as pb
from hotslot.router.v1 import router_service_pb2_grpc as pb_grpc
from tests.support.procs import ServiceProcess
from tests.support.stack import executor_stub, generate_request, start_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

GRACE_S = 3.0
LOAD_S = 8.0
"""How long a load takes under the read cap: well past the grace, so the request is still running when it ends."""


def slow_loading_args(model: Path) -> tuple[str, ...]:
    size = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
    return ("--preload-read-bytes-per-s", str(max(1, int(size / LOAD_S))), "--no-map-view-files",
            "--no-convert-in-executor", "--shutdown-grace-s", str(GRACE_S))


def queue_depth(executor: ServiceProcess) -> int:
    with grpc.insecure_channel(executor.address) as channel:
        return executor_stub(channel).GetStatus(epb.GetStatusRequest(), timeout=5).status.queue_depth


def retry_infos(error: grpc.RpcError) -> list[error_details_pb2.RetryInfo]:
    status = rpc_status.from_call(error)
    found = []
    for detail in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            found.append(info)
    return found


def test_a_request_cut_by_the_shutdown_grace_gets_unavailable_with_a_retry_hint(
    tmp_path: Path, tiny_family: list[Path]
) -> None:
    model = tiny_family[0]
    stack = start_stack(tmp_path, [model])
    try:
        executor = stack.start_executor(*slow_loading_args(model))
        with grpc.insecure_channel(executor.address) as channel:
            pending = executor_stub(channel).Generate.future(
                generate_request(model.name, steps=2, width=64, height=64), timeout=120)
            wait_for(lambda: queue_depth(executor) == 1, "the request is loading its model")
            executor.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as raised:
                pending.result()
        error = raised.value
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert "shutting down" in error.details()
        (info,) = retry_infos(error)
        assert info.retry_delay.ToNanoseconds() > 0
        assert executor.proc.wait(30) == 0, executor.log()[-3000:]
        assert "ending them with UNAVAILABLE" in executor.log()
    finally:
        stack.stop()


def test_through_the_router_a_request_cut_by_an_executors_shutdown_is_served_by_the_other(
    tmp_path: Path, tiny_family: list[Path]
) -> None:
    model = tiny_family[0]
    stack = start_stack(tmp_path, [model])
    try:
        executors = stack.start_executors(2, *slow_loading_args(model))
        router = stack.start_router()
        with grpc.insecure_channel(router.address) as channel:
            stub = pb_grpc.RouterServiceStub(channel)
            wait_for(lambda: len(stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=5).executors) == 2,
                     "the router follows both executors")
            pending = stub.Generate.future(pb.GenerateRequest(
                model=common_pb2.ModelRef(model_id=model.name),
                params=common_pb2.GenerationParams(prompt="a lighthouse", steps=2, width=64, height=64, seed=1)),
                timeout=180)
            first = wait_for(lambda: next((e for e in executors if queue_depth(e) == 1), None),
                             "the request is loading on one executor")
            first.proc.send_signal(signal.SIGTERM)
            reply = pending.result()
        assert len(reply.attempted_executor_ids) == 2, reply.attempted_executor_ids
        assert reply.executor_id == reply.attempted_executor_ids[1]
        assert Image.open(io.BytesIO(reply.images[0].data)).size == (64, 64)
        assert first.proc.wait(30) == 0
    finally:
        stack.stop()
