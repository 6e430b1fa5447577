"""The router's gRPC adapters: downstream status codes become hotslot errors with the same code, message and rich
details; an ExecutorStatus becomes placement's snapshot."""
from __future__ import annotations

import asyncio
import contextlib

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from hotslot import errors
from hotslot.bootstrap.interceptors import status_code_of
from hotslot.common.v1 import common_pb2
from hotslot.executor.v1 import executor_service_pb2 as executor_pb
from hotslot.executor.v1 import executor_service_pb2_grpc as executor_grpc
from hotslot.services.router.clients import GrpcExecutorClient, error_from_rpc, snapshot_from_proto
from hotslot.services.router.downstream import ExecutorUnavailable, GenerateCall, ResultEvent
from hotslot.services.router.placement import HeldModel, Tier


def rpc_error(code: grpc.StatusCode, details: str, *rich) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata()
    if rich:
        status = status_pb2.Status(code=getattr(code_pb2, code.name), message=details)
        for detail in rich:
            status.details.add().Pack(detail)
        trailing.add("grpc-status-details-bin", status.SerializeToString())
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.CANCELLED, errors.Cancelled),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        (grpc.StatusCode.UNAVAILABLE, ExecutorUnavailable),
    ],
)
def test_code_and_message_are_kept(code: grpc.StatusCode, cls: type) -> None:
    error = error_from_rpc(rpc_error(code, "model 'x' is not registered"), "executor at h:1")
    assert type(error) is cls and error.message == "model 'x' is not registered"
    assert status_code_of(error) == code


def test_bad_request_and_retry_info_survive_the_hop() -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field="params.steps", description="1..150")]
    )
    error = error_from_rpc(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "params.steps: 1..150", bad), "e")
    assert isinstance(error, errors.InvalidArgument)
    assert [(v.field, v.description) for v in error.violations] == [("params.steps", "1..150")]

    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000))
    error = error_from_rpc(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", retry), "e")
    assert isinstance(error, errors.ResourceExhausted) and error.retry_after_s == 2.5
    plain = error_from_rpc(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"), "e")
    assert plain.retry_after_s is None


def test_the_peers_error_info_reason_is_kept_for_the_client() -> None:
    info = error_details_pb2.ErrorInfo(reason="MODEL_NOT_FOUND", domain="hotslot.dev")
    error = error_from_rpc(rpc_error(grpc.StatusCode.NOT_FOUND, "model 'x' is not registered", info), "e")
    assert isinstance(error, errors.NotFound) and error.reason == "MODEL_NOT_FOUND"
    info = error_details_pb2.ErrorInfo(reason="QUEUE_FULL", domain="hotslot.dev")
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1))
    error = error_from_rpc(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", info, retry), "e")
    assert (error.reason, error.retry_after_s) == ("QUEUE_FULL", 1.0)
    # No ErrorInfo, or one of another domain: the class's default reason.
    assert error_from_rpc(rpc_error(grpc.StatusCode.NOT_FOUND, "gone"), "e").reason == "NOT_FOUND"
    foreign = error_details_pb2.ErrorInfo(reason="QUOTA", domain="example.com")
    assert error_from_rpc(rpc_error(grpc.StatusCode.UNAVAILABLE, "down", foreign), "e").reason == "UNAVAILABLE"


def test_codes_without_a_domain_class_name_the_peer() -> None:
    error = error_from_rpc(rpc_error(grpc.StatusCode.INTERNAL, "internal error (request id 12)"), "executor at h:1")
    assert type(error) is errors.HotslotError
    assert error.message == "executor at h:1 failed with INTERNAL: internal error (request id 12)"


def test_status_becomes_a_snapshot_and_keeps_the_message() -> None:
    status = executor_pb.ExecutorStatus(
        executor_id="gpu-0",
        state=common_pb2.EXECUTOR_STATE_READY,
        models=[
            executor_pb.HeldModel(model=common_pb2.ModelRef(model_id="m", revision=2), tier=common_pb2.TIER_ACTIVE,
                                  size_bytes=10),
            executor_pb.HeldModel(model=common_pb2.ModelRef(model_id="n", revision=1), tier=99),
        ],
        queue_depth=3,
        queue_capacity=16,
        version=7,
    )
    snapshot = snapshot_from_proto(status, "10.0.0.5:50053")
    assert (snapshot.executor_id, snapshot.address, snapshot.ready) == ("gpu-0", "10.0.0.5:50053", True)
    assert snapshot.models == (HeldModel("m", 2, Tier.ACTIVE, 10), HeldModel("n", 1, Tier.UNSPECIFIED, 0))
    assert (snapshot.queue_depth, snapshot.queue_capacity, snapshot.version) == (3, 16, 7)
    assert snapshot.raw is status and status.address == "10.0.0.5:50053"
    draining = snapshot_from_proto(executor_pb.ExecutorStatus(state=common_pb2.EXECUTOR_STATE_DRAINING), "h:1")
    assert not draining.ready and draining.executor_id == "h:1"


class _StreamingExecutor(executor_grpc.ExecutorServiceServicer):
    """GenerateStream sends a step and the result, then has a little work left before its call ends (as the real
    servicer does: it cancels its finished task and returns). Records how its call ended."""

    def __init__(self) -> None:
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def GenerateStream(self, request, context):
        try:
            yield executor_pb.GenerateStreamResponse(step=executor_pb.StepProgress(step=1, total_steps=1))
            yield executor_pb.GenerateStreamResponse(result=executor_pb.GenerateResponse(executor_id="exec-a"))
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            self.ended.set_result("cancelled")
            raise
        self.ended.set_result("finished")


async def test_a_streamed_result_lets_the_executor_finish_its_call_before_the_router_closes_the_stream() -> None:
    # The router closes the executor's stream as soon as it has the result. Closing it before the executor's status
    # arrived cancelled the executor's call, which then counted and logged a served request as CANCELLED.
    executor = _StreamingExecutor()
    server = grpc.aio.server()
    executor_grpc.add_ExecutorServiceServicer_to_server(executor, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = GrpcExecutorClient(f"127.0.0.1:{port}", channel).generate_stream(
                GenerateCall(model_id="m", revision=1, params=common_pb2.GenerationParams(prompt="p"),
                             request_id="r1"), timeout_s=10)
            async with contextlib.aclosing(stream):
                async for event in stream:
                    if isinstance(event, ResultEvent):
                        assert event.payload.executor_id == "exec-a"
                        break
            assert await asyncio.wait_for(executor.ended, 10) == "finished"
    finally:
        await server.stop(None)
