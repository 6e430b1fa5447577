"""Bad bytes and oversized input through real services: request bytes that are not the method's protobuf message
(garbled, truncated, invalid UTF-8 in a string field) answer INVALID_ARGUMENT with one WARNING line and no
traceback, on unary and streaming methods; a 10 kB model id through the router answers INVALID_ARGUMENT with a
bounded message instead of overflowing the metadata limit."""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from hotslot.common.v1 import common_pb2
from hotslot.router.v1 import router_service_pb2 as rpb
from hotslot.router.v1 import router_service_pb2_grpc as rgrpc
from tests.support.stack import Stack, start_stack

pytestmark = pytest.mark.integration

BAD_BYTES = {
    "garbled": b"\xff\xff\xff\xff\xff\xff",
    "truncated": b"\x0a\x10tiny",  # field 1 says 16 bytes follow; 4 do
    "invalid UTF-8 in a string field": b"\x0a\x02\xff\xfe",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_family: list[Path]):
    s = start_stack(tmp_path_factory.mktemp("malformed-stack"), tiny_family[:1])
    s.start_router(executors=[])
    yield s
    s.stop()


def _raw_unary(address: str, method: str, payload: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            call(payload, timeout=30)
    return caught.value


@pytest.mark.parametrize("kind", list(BAD_BYTES))
def test_malformed_request_bytes_answer_invalid_argument_with_one_warning_and_no_traceback(
    stack: Stack, kind: str
) -> None:
    before = stack.registry.log()
    error = _raw_unary(stack.registry.address, "/hotslot.registry.v1.RegistryService/GetModel", BAD_BYTES[kind])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in error.details()
    new = stack.registry.log()[len(before):]
    lines = [line for line in new.splitlines() if "malformed request" in line]
    assert len(lines) == 1 and "WARNING" in lines[0]
    assert "Traceback" not in new and "ERROR" not in new


def test_malformed_bytes_on_a_client_streaming_method_answer_invalid_argument(stack: Stack) -> None:
    before = stack.storage.log()
    with grpc.insecure_channel(stack.storage.address) as channel:
        call = channel.stream_unary("/hotslot.storage.v1.StorageCacheService/PutFile",
                                    request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            call(iter([BAD_BYTES["garbled"]]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    new = stack.storage.log()[len(before):]
    assert "Traceback" not in new


def test_the_service_keeps_serving_after_malformed_bytes(stack: Stack) -> None:
    _raw_unary(stack.router.address, "/hotslot.router.v1.RouterService/GetModel", BAD_BYTES["garbled"])
    with grpc.insecure_channel(stack.router.address) as channel:
        reply = rgrpc.RouterServiceStub(channel).GetModel(rpb.GetModelRequest(model_id="tiny-sd-0"), timeout=30)
    assert reply.model.model_id == "tiny-sd-0"


def test_a_10kb_model_id_through_the_router_answers_invalid_argument_with_a_bounded_message(stack: Stack) -> None:
    model_id = "a" * 10_000
    with grpc.insecure_channel(stack.router.address) as channel:
        stub = rgrpc.RouterServiceStub(channel)
        for call, request in (
            (stub.GetModel, rpb.GetModelRequest(model_id=model_id)),
            (stub.Generate, rpb.GenerateRequest(model=common_pb2.ModelRef(model_id=model_id))),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call(request, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            assert "model id" in caught.value.details()
            assert len(caught.value.details()) <= 1000
