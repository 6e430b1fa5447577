"""Paths that used to escape the error interceptor as UNKNOWN: request bytes that do not parse (now
INVALID_ARGUMENT with one WARNING line, unary and streaming) and responses that cannot be serialized (now INTERNAL
with a request id, unary and streaming, generator and reader/writer style); plus the bound on echoed text."""
from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from hotslot import errors
from hotslot.bootstrap.interceptors import MAX_ECHO_CHARS, bounded
from hotslot.bootstrap.server import ServiceRegistration, create_server
from hotslot.bootstrap.settings import ServiceSettings
from hotslot.registry.v1 import registry_service_pb2 as rpb

SERVICE = "hotslot.test.v1.Paths"
INTERNAL = re.compile(r"internal error \(request id [0-9a-f]+\)")


class Paths:
    async def Parse(self, request: rpb.GetModelRequest, context) -> rpb.GetModelRequest:
        return request

    async def ParseStream(self, requests: AsyncIterator[rpb.GetModelRequest], context) -> rpb.GetModelRequest:
        return rpb.GetModelRequest(model_id="+".join([r.model_id async for r in requests]))

    async def WrongType(self, request: bytes, context) -> object:
        return object()  # not a message: its serializer fails

    async def WrongTypeStream(self, request: bytes, context) -> AsyncIterator[object]:
        yield rpb.GetModelRequest(model_id="fine")
        yield object()

    async def WrongTypeWritten(self, request: bytes, context) -> None:
        await context.write(object())

    async def Long(self, request: bytes, context) -> bytes:
        raise errors.InvalidArgument.field("model_id", "x" * 20_000)


def _add(servicer: Paths, server: grpc.aio.Server) -> None:
    parse = rpb.GetModelRequest.FromString
    ser = rpb.GetModelRequest.SerializeToString
    handlers = {
        "Parse": grpc.unary_unary_rpc_method_handler(servicer.Parse, parse, ser),
        "ParseStream": grpc.stream_unary_rpc_method_handler(servicer.ParseStream, parse, ser),
        "WrongType": grpc.unary_unary_rpc_method_handler(servicer.WrongType, None, ser),
        "WrongTypeStream": grpc.unary_stream_rpc_method_handler(servicer.WrongTypeStream, None, ser),
        "WrongTypeWritten": grpc.unary_stream_rpc_method_handler(servicer.WrongTypeWritten, None, ser),
        "Long": grpc.unary_unary_rpc_method_handler(servicer.Long),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])


@pytest.fixture
async def channel():
    server, port, _ = await create_server(
        "127.0.0.1:0", [ServiceRegistration(full_name=SERVICE, servicer=Paths(), add_to_server=_add)],
        settings=ServiceSettings(),
    )
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(None)


@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", b"\x0a\x10abc", b"\x0a\x02\xff\xfe"],
                         ids=["garbled", "truncated", "invalid UTF-8"])
async def test_bytes_that_do_not_parse_are_invalid_argument_with_one_warning(channel, caplog, payload) -> None:
    with caplog.at_level(logging.DEBUG), pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(f"/{SERVICE}/Parse")(payload)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    warnings = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING and warnings[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_bad_message_in_a_request_stream_is_invalid_argument(channel) -> None:
    good = rpb.GetModelRequest(model_id="a").SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.stream_unary(f"/{SERVICE}/ParseStream")(iter([good, b"\xff\xff"]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reply = await channel.stream_unary(f"/{SERVICE}/ParseStream")(iter([good, good]))
    assert rpb.GetModelRequest.FromString(reply).model_id == "a+a"


@pytest.mark.parametrize("method", ["WrongType", "WrongTypeStream", "WrongTypeWritten"])
async def test_a_response_that_cannot_be_serialized_is_internal_with_a_request_id(channel, caplog, method) -> None:
    call = (channel.unary_unary if method == "WrongType" else channel.unary_stream)(f"/{SERVICE}/{method}")
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as raised:
        if method == "WrongType":
            await call(b"")
        else:
            async for _ in call(b""):
                pass
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert INTERNAL.fullmatch(raised.value.details())
    assert any(getattr(r, "request_id", None) for r in caplog.records)


async def test_long_messages_are_bounded_with_an_ellipsis(channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(f"/{SERVICE}/Long")(b"")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(raised.value.details()) == MAX_ECHO_CHARS and "…" in raised.value.details()


def test_bounded_keeps_the_start_and_the_end() -> None:
    text = "start " + "x" * 5000 + " end"
    out = bounded(text, 100)
    assert len(out) == 100 and out.startswith("start ") and out.endswith(" end") and "…" in out
    assert bounded("short", 100) == "short"
