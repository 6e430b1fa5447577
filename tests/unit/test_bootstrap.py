"""Tests of the shared service bootstrap: real servers on free ports in this process (one in a child process for
signals), called over real channels."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic_settings import SettingsConfigDict

from hotslot import errors
from hotslot.bootstrap.logging import configure_logging
from hotslot.bootstrap.server import ServiceRegistration, create_server, run_server
from hotslot.bootstrap.settings import ServiceSettings, settings_from
from hotslot.bootstrap.telemetry import configure_tracing, insecure_channel
from hotslot.registry.v1 import registry_service_pb2, registry_service_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
ECHO = "hotslot.test.v1.EchoService"
REGISTRY = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class EchoServicer:
    """Echoes bytes over the four kinds of RPC; raises `error` when a test sets it (mid-stream for streams)."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer
        self.error: BaseException | None = None
        self.endless_closed = asyncio.Event()

    async def Unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if self.error is not None:
            raise self.error
        return request

    async def ServerStream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        # A span held open across yields, as core code streaming results would.
        with self.tracer.start_as_current_span("stream-work"):
            for part in (b"one", b"two"):
                yield part
            if self.error is not None:
                raise self.error

    async def Endless(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            yield b"tick"
            await asyncio.Event().wait()
        finally:
            self.endless_closed.set()

    async def ClientStream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        return b"+".join([request async for request in requests])

    async def BidiStream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        async for request in requests:
            await context.write(request.upper())

    async def Abort(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")

    async def Traced(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        with self.tracer.start_as_current_span("core-work"):
            return request

    async def Slow(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(float(request.decode()))
        return b"done"


def add_echo_to_server(servicer: EchoServicer, server: grpc.aio.Server) -> None:
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(servicer.Unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(servicer.ServerStream),
        "Endless": grpc.unary_stream_rpc_method_handler(servicer.Endless),
        "ClientStream": grpc.stream_unary_rpc_method_handler(servicer.ClientStream),
        "BidiStream": grpc.stream_stream_rpc_method_handler(servicer.BidiStream),
        "Abort": grpc.unary_unary_rpc_method_handler(servicer.Abort),
        "Traced": grpc.unary_unary_rpc_method_handler(servicer.Traced),
        "Slow": grpc.unary_unary_rpc_method_handler(servicer.Slow),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(ECHO, handlers)])


class FakeRegistry(registry_service_pb2_grpc.RegistryServiceServicer):
    """Implements nothing: every method answers as the generated base class does (UNIMPLEMENTED)."""


def registrations(tracer: trace.Tracer) -> tuple[EchoServicer, list[ServiceRegistration]]:
    echo = EchoServicer(tracer)
    return echo, [
        ServiceRegistration(full_name=ECHO, servicer=echo, add_to_server=add_echo_to_server),
        ServiceRegistration(
            full_name=REGISTRY,
            servicer=FakeRegistry(),
            add_to_server=registry_service_pb2_grpc.add_RegistryServiceServicer_to_server,
        ),
    ]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter):
    provider = configure_tracing("hotslot-test", exporter=exporter)
    yield provider
    provider.shutdown()


@pytest.fixture
async def served(provider):
    echo, regs = registrations(provider.get_tracer("test"))
    server, port, health = await create_server(
        "127.0.0.1:0", regs, settings=ServiceSettings(), tracer_provider=provider
    )
    await server.start()
    yield echo, port, health
    await server.stop(None)


@pytest.fixture
async def channel(served):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served[1]}") as channel:
        yield channel


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def unary(channel: grpc.aio.Channel, method: str):
    return channel.unary_unary(f"/{ECHO}/{method}")


async def spans_named(exporter: InMemorySpanExporter, name: str, count: int) -> list[ReadableSpan]:
    # Spans of streaming client calls end in a task started when the call finishes; give it a moment.
    for _ in range(100):
        spans = [span for span in exporter.get_finished_spans() if span.name == name]
        if len(spans) >= count:
            return spans
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} spans named {name}, got {exporter.get_finished_spans()}")


# --- health and reflection ---------------------------------------------------------------------------------------


async def test_health_reports_serving_for_the_server_and_each_service(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", ECHO, REGISTRY):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == SERVING, service
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Check(health_pb2.HealthCheckRequest(service="hotslot.nope.v1.Nope"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_every_service_and_describes_them(served):
    def ask() -> tuple[list[str], str]:
        with grpc.insecure_channel(f"127.0.0.1:{served[1]}") as sync_channel:
            database = ProtoReflectionDescriptorDatabase(sync_channel)
            return list(database.get_services()), database.FindFileContainingSymbol(REGISTRY).name

    # The reflection client is synchronous and the server runs on this loop: ask from another thread.
    services, registry_file = await asyncio.to_thread(ask)
    assert set(services) == {
        ECHO,
        REGISTRY,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
    assert registry_file.endswith("registry_service.proto")


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need main thread")
async def test_sigterm_turns_health_not_serving_before_shutdown_hooks_run(provider, restore_logging):
    _, regs = registrations(provider.get_tracer("test"))
    seen: dict[str, int] = {}
    channels: list[grpc.aio.Channel] = []

    async def check(service: str) -> int:
        response = await health_pb2_grpc.HealthStub(channels[0]).Check(health_pb2.HealthCheckRequest(service=service))
        return response.status

    async def started(port: int) -> None:
        channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        seen["before"] = await check(REGISTRY)
        os.kill(os.getpid(), __import__("signal").SIGTERM)

    async def hook() -> None:
        # The server still answers while hooks run, and it already says NOT_SERVING for everything.
        seen["overall"] = await check("")
        seen["during"] = await check(REGISTRY)

    settings = ServiceSettings(shutdown_grace_s=1.0)
    await asyncio.wait_for(
        run_server(regs, settings=settings, service_name="test", on_started=started, on_shutdown=[hook],
                   tracer_provider=provider),
        timeout=10,
    )
    await channels[0].close()
    # "before" is read inside the startup hook: not ready until it returns.
    assert seen == {"before": NOT_SERVING, "overall": NOT_SERVING, "during": NOT_SERVING}


async def test_health_turns_serving_only_after_the_startup_hook(provider, restore_logging):
    _, regs = registrations(provider.get_tracer("test"))
    seen: list[int] = []
    release = asyncio.Event()

    async def started(port: int) -> None:
        async def probe() -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                seen.append((await stub.Check(health_pb2.HealthCheckRequest(service=REGISTRY))).status)
                release.set()
                async for update in stub.Watch(health_pb2.HealthCheckRequest(service=REGISTRY)):
                    if update.status == SERVING:
                        seen.append(SERVING)
                        break
                os.kill(os.getpid(), __import__("signal").SIGTERM)

        asyncio.get_running_loop().create_task(probe())
        await release.wait()  # the warm-up takes until the probe has looked once

    await asyncio.wait_for(
        run_server(regs, settings=ServiceSettings(shutdown_grace_s=1.0), service_name="test", on_started=started,
                   tracer_provider=provider),
        timeout=10,
    )
    assert seen == [NOT_SERVING, SERVING]


# --- error mapping -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgument("bad request"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("model m1 not found"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("model m1 exists"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.FailedPrecondition("slot busy"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ResourceExhausted("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("executor down"), grpc.StatusCode.UNAVAILABLE),
        (errors.DataLoss("checksum mismatch"), grpc.StatusCode.DATA_LOSS),
        (errors.Cancelled("cancelled by caller"), grpc.StatusCode.CANCELLED),
        (errors.DeadlineExceeded("too late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
async def test_domain_errors_become_their_status_code_with_their_message(served, channel, error, code):
    served[0].error = error
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await unary(channel, "Unary")(b"x")
    assert raised.value.code() == code
    assert raised.value.details() == error.message


async def test_invalid_argument_carries_field_violations_as_bad_request(served, channel):
    served[0].error = errors.InvalidArgument.field("model_id", "must not be empty")
    call = unary(channel, "Unary")(b"x")
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    status = await rpc_status.aio.from_call(call)
    assert status.code == code_pb2.INVALID_ARGUMENT
    assert status.message == "model_id: must not be empty"
    [bad_request] = unpacked(status, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [("model_id", "must not be empty")]
    [info] = unpacked(status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("INVALID_PARAMETER", "hotslot.dev")


async def test_resource_exhausted_tells_the_client_when_to_retry(served, channel):
    served[0].error = errors.ResourceExhausted("queue full", retry_after_s=2.5)
    call = unary(channel, "Unary")(b"x")
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    status = await rpc_status.aio.from_call(call)
    [retry] = unpacked(status, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToNanoseconds() == 2_500_000_000


def unpacked(status, detail_type: type) -> list:
    """The details of `status` of one google.rpc type."""
    found = []
    for detail in status.details:
        message = detail_type()
        if detail.Unpack(message):
            found.append(message)
    return found


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (errors.InvalidArgument("bad"), "INVALID_PARAMETER"),
        (errors.InvalidArgument("pickle", reason=errors.Reason.UNSAFE_FILE_FORMAT), "UNSAFE_FILE_FORMAT"),
        (errors.NotFound("gone"), "NOT_FOUND"),
        (errors.NotFound("model 'x' is not registered", reason=errors.Reason.MODEL_NOT_FOUND), "MODEL_NOT_FOUND"),
        (errors.AlreadyExists("there"), "ALREADY_EXISTS"),
        (errors.FailedPrecondition("busy"), "FAILED_PRECONDITION"),
        (errors.ResourceExhausted("full", 1.0, reason=errors.Reason.QUEUE_FULL), "QUEUE_FULL"),
        (errors.ResourceExhausted("too big", reason=errors.Reason.MODEL_TOO_LARGE), "MODEL_TOO_LARGE"),
        (errors.Unavailable("down"), "UNAVAILABLE"),
        (errors.DataLoss("bad bytes"), "CHECKSUM_MISMATCH"),
        (errors.Cancelled("stop"), "CANCELLED"),
        (errors.DeadlineExceeded("late"), "DEADLINE_EXCEEDED"),
        (errors.HotslotError("peer said something odd"), "UNKNOWN"),
        (errors.HotslotError("from a newer peer", reason="SOME_NEW_REASON"), "SOME_NEW_REASON"),
    ],
)
async def test_every_domain_error_carries_error_info_with_its_reason(served, channel, error, reason):
    served[0].error = error
    call = unary(channel, "Unary")(b"x")
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    status = await rpc_status.aio.from_call(call)
    [info] = unpacked(status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == (reason, "hotslot.dev")


def test_python_reasons_are_the_contracts_error_reasons() -> None:
    from hotslot.common.v1 import common_pb2

    in_proto = {name.removeprefix("ERROR_REASON_") for name in common_pb2.ErrorReason.keys()} - {"UNSPECIFIED"}
    assert in_proto == {reason.value for reason in errors.Reason}


async def test_unexpected_error_is_internal_and_reveals_nothing(served, channel, exporter, caplog):
    served[0].error = RuntimeError("secret internals")
    call = unary(channel, "Unary")(b"x")
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    details = raised.value.details()
    match = re.fullmatch(r"internal error \(request id ([0-9a-f]+)\)", details)
    assert match, details
    assert "secret" not in repr(await call.trailing_metadata())
    [info] = unpacked(await rpc_status.aio.from_call(call), error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain, dict(info.metadata)) == ("INTERNAL", "hotslot.dev", {"request_id": match[1]})
    # The operator gets it all: the log has the traceback under the same request id, the span the exception.
    record = next(r for r in caplog.records if getattr(r, "request_id", None) == match[1])
    assert "secret internals" in caplog.text and record.exc_info is not None
    [span] = await spans_named(exporter, f"/{ECHO}/Unary", 1)
    assert [event.attributes["exception.message"] for event in span.events] == ["secret internals"]
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    assert span.status.status_code == trace.StatusCode.ERROR


@pytest.mark.parametrize(
    ("error", "code"),
    [(errors.NotFound("model went away"), grpc.StatusCode.NOT_FOUND), (RuntimeError("secret"), grpc.StatusCode.INTERNAL)],
)
async def test_error_raised_mid_stream_ends_the_stream_with_its_code(served, channel, error, code):
    served[0].error = error
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for response in channel.unary_stream(f"/{ECHO}/ServerStream")(b"x"):
            received.append(response)
    assert received == [b"one", b"two"]
    assert raised.value.code() == code
    assert "secret" not in raised.value.details()


async def test_servicer_abort_passes_through_untouched(channel, exporter, caplog):
    with caplog.at_level(logging.WARNING), pytest.raises(grpc.aio.AioRpcError) as raised:
        await unary(channel, "Abort")(b"x")
    assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.PERMISSION_DENIED, "not yours")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    [span] = await spans_named(exporter, f"/{ECHO}/Abort", 1)
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert span.status.description == "PERMISSION_DENIED: not yours"
    assert not span.events


async def test_client_cancelling_a_stream_closes_the_handler_and_ends_the_span(served, channel, exporter, caplog):
    call = channel.unary_stream(f"/{ECHO}/Endless")(b"x")
    with caplog.at_level(logging.WARNING):
        assert await call.read() == b"tick"
        call.cancel()
        await asyncio.wait_for(served[0].endless_closed.wait(), timeout=5)
        [span] = await spans_named(exporter, f"/{ECHO}/Endless", 1)
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    # Nothing went wrong on the server: no "unexpected error", no context detached in the wrong place.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_generated_base_servicer_still_answers_unimplemented(channel):
    # It sets the code itself, then raises NotImplementedError: that code, not INTERNAL, reaches the client.
    stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetModel(registry_service_pb2.GetModelRequest())
    assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
    [info] = unpacked(rpc_status.from_call(raised.value), error_details_pb2.ErrorInfo)
    assert info.reason == "UNIMPLEMENTED"


# --- tracing -----------------------------------------------------------------------------------------------------


async def test_server_span_continues_the_trace_sent_in_traceparent(channel, exporter):
    trace_id, span_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    metadata = (("traceparent", f"00-{trace_id}-{span_id}-01"),)
    assert await unary(channel, "Unary")(b"x", metadata=metadata) == b"x"
    [span] = await spans_named(exporter, f"/{ECHO}/Unary", 1)
    assert span.kind == SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == trace_id
    assert format(span.parent.span_id, "016x") == span_id
    assert span.attributes["rpc.system"] == "grpc"
    assert span.attributes["rpc.service"] == ECHO
    assert span.attributes["rpc.method"] == "Unary"
    assert span.attributes["rpc.grpc.status_code"] == 0
    assert span.status.status_code == trace.StatusCode.UNSET


async def test_spans_made_by_the_handler_are_children_of_the_server_span(channel, exporter):
    await unary(channel, "Traced")(b"x")
    [work] = await spans_named(exporter, "core-work", 1)
    [server] = await spans_named(exporter, f"/{ECHO}/Traced", 1)
    assert work.parent.span_id == server.context.span_id
    assert work.context.trace_id == server.context.trace_id


async def test_client_interceptors_propagate_context_for_every_kind_of_call(served, provider, exporter):
    tracer = provider.get_tracer("test")

    async def requests():
        for part in (b"a", b"b"):
            yield part

    async with insecure_channel(f"127.0.0.1:{served[1]}", tracer_provider=provider) as channel:
        with tracer.start_as_current_span("caller") as caller:
            assert await channel.unary_unary(f"/{ECHO}/Unary")(b"x") == b"x"
            assert [r async for r in channel.unary_stream(f"/{ECHO}/ServerStream")(b"x")] == [b"one", b"two"]
            assert await channel.stream_unary(f"/{ECHO}/ClientStream")(requests()) == b"a+b"
            assert [r async for r in channel.stream_stream(f"/{ECHO}/BidiStream")(requests())] == [b"A", b"B"]

    for method in ("Unary", "ServerStream", "ClientStream", "BidiStream"):
        spans = await spans_named(exporter, f"/{ECHO}/{method}", 2)
        client = next(span for span in spans if span.kind == SpanKind.CLIENT)
        server = next(span for span in spans if span.kind == SpanKind.SERVER)
        assert client.parent.span_id == caller.get_span_context().span_id, method
        assert server.parent.span_id == client.context.span_id, method
        assert server.context.trace_id == caller.get_span_context().trace_id, method
        assert client.attributes["rpc.grpc.status_code"] == 0, method
    # The handler's span opened across yields belongs to the streaming server span.
    [work] = await spans_named(exporter, "stream-work", 1)
    [server] = [s for s in await spans_named(exporter, f"/{ECHO}/ServerStream", 2) if s.kind == SpanKind.SERVER]
    assert work.parent.span_id == server.context.span_id


async def test_client_span_records_the_failure_status(served, provider, exporter):
    served[0].error = errors.NotFound("nope")
    async with insecure_channel(f"127.0.0.1:{served[1]}", tracer_provider=provider) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary(f"/{ECHO}/Unary")(b"x")
        with pytest.raises(grpc.aio.AioRpcError):
            _ = [r async for r in channel.unary_stream(f"/{ECHO}/ServerStream")(b"x")]
    for method in ("Unary", "ServerStream"):
        spans = await spans_named(exporter, f"/{ECHO}/{method}", 2)
        for span in spans:
            assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0], (method, span.kind)
            assert span.status.status_code == trace.StatusCode.ERROR


async def test_health_checks_make_no_spans(channel, exporter):
    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert exporter.get_finished_spans() == ()


def _processors(provider) -> list:
    return list(provider._active_span_processor._span_processors)


def test_exporter_is_chosen_by_the_standard_otel_variables(monkeypatch):
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    # Nothing said: no collector assumed, so nothing exported.
    assert _processors(configure_tracing("t")) == []

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    [processor] = _processors(configure_tracing("t"))
    assert isinstance(processor, SimpleSpanProcessor)

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    assert _processors(configure_tracing("t")) == []

    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    provider = configure_tracing("hotslot-registry")
    [processor] = _processors(provider)
    assert isinstance(processor, BatchSpanProcessor)
    assert type(processor.span_exporter).__name__ == "OTLPSpanExporter"
    assert provider.resource.attributes["service.name"] == "hotslot-registry"
    provider.shutdown()


# --- settings and logging ----------------------------------------------------------------------------------------


class EchoSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="HOTSLOT_TEST_")


def test_settings_flags_win_over_environment_over_defaults(monkeypatch):
    monkeypatch.setenv("HOTSLOT_TEST_PORT", "7001")
    monkeypatch.setenv("HOTSLOT_TEST_LOG_FORMAT", "json")
    monkeypatch.setenv("HOTSLOT_REGISTRY_PORT", "9999")  # another service's variable: ignored
    from_env = settings_from(EchoSettings, {"port": None, "host": None})
    assert (from_env.port, from_env.log_format, from_env.host) == (7001, "json", "127.0.0.1")
    assert from_env.shutdown_grace_s == 5.0 and from_env.max_message_bytes == 64 * 1024 * 1024
    from_flag = settings_from(EchoSettings, {"port": 7002, "host": "::"})
    assert (from_flag.port, from_flag.address) == (7002, "[::]:7002")


def test_json_logs_are_one_object_per_line_with_the_current_trace(provider, capsys, restore_logging):
    configure_logging("registry", "INFO", "json")
    configure_logging("registry", "INFO", "json")  # idempotent: still one line per record
    with provider.get_tracer("test").start_as_current_span("work") as span:
        logging.getLogger("hotslot.test").info("model %s registered", "m1", extra={"model_id": "m1"})
    logging.getLogger("hotslot.test").debug("below the level")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["message"] == "model m1 registered"
    assert (entry["level"], entry["logger"], entry["service"], entry["model_id"]) == (
        "INFO", "hotslot.test", "registry", "m1"
    )
    assert entry["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert entry["span_id"] == format(span.get_span_context().span_id, "016x")
    assert entry["ts"].endswith("Z")


def test_text_logs_are_one_readable_line(capsys, restore_logging):
    configure_logging("registry", "info", "text")
    logging.getLogger("hotslot.test").warning("slot %d evicted", 3, extra={"model_id": "m1"})
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "WARNING" in line and "[registry] slot 3 evicted" in line and "model_id=m1" in line
    assert "trace_id" not in line


# --- the process: listening line and SIGTERM ---------------------------------------------------------------------


CHILD = textwrap.dedent(
    f"""
    import asyncio, grpc, sys
    sys.path[:0] = {[str(ROOT / "libs/core"), str(ROOT / "libs/proto")]!r}
    from hotslot.bootstrap.server import ServiceRegistration, run, run_server
    from hotslot.bootstrap.settings import ServiceSettings

    async def slow(request, context):
        await asyncio.sleep(float(request.decode()))
        return b"done"

    def add(servicer, server):
        handlers = {{"Slow": grpc.unary_unary_rpc_method_handler(slow)}}
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("{ECHO}", handlers)])

    async def hook():
        print("hook ran", file=sys.stderr, flush=True)

    grace = float(sys.argv[1])
    run(lambda: run_server([ServiceRegistration("{ECHO}", None, add)], settings=ServiceSettings(shutdown_grace_s=grace),
                           service_name="echo", on_shutdown=[hook]))
    """
)


async def start_child(grace_s: float) -> tuple[asyncio.subprocess.Process, int]:
    """Starts a service process and returns it with the port parsed from its `listening on` line."""
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "none"}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(grace_s), stderr=asyncio.subprocess.PIPE, env=env
    )
    while True:
        line = (await asyncio.wait_for(child.stderr.readline(), timeout=15)).decode()
        if not line:
            child.kill()
            raise AssertionError("child exited before listening")
        if match := re.search(r"hotslot echo listening on 127\.0\.0\.1:(\d+)$", line.strip()):
            return child, int(match[1])


async def test_process_logs_its_port_and_exits_cleanly_on_sigterm_after_in_flight_calls_finish():
    child, port = await start_child(grace_s=5)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            in_flight = asyncio.ensure_future(channel.unary_unary(f"/{ECHO}/Slow")(b"0.5"))
            await asyncio.sleep(0.2)
            child.terminate()
            # The grace lets the call that was running finish.
            assert await asyncio.wait_for(in_flight, timeout=5) == b"done"
        assert await asyncio.wait_for(child.wait(), timeout=10) == 0
        assert "hook ran" in (await child.stderr.read()).decode()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def test_second_sigterm_cancels_in_flight_calls_instead_of_waiting_out_the_grace():
    child, port = await start_child(grace_s=600)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            in_flight = asyncio.ensure_future(channel.unary_unary(f"/{ECHO}/Slow")(b"600"))
            await asyncio.sleep(0.2)
            child.terminate()
            await asyncio.sleep(0.2)
            child.terminate()
            with pytest.raises(grpc.aio.AioRpcError):
                await asyncio.wait_for(in_flight, timeout=10)
        assert await asyncio.wait_for(child.wait(), timeout=10) == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


def test_text_logs_escape_control_characters_in_messages_and_fields(capsys) -> None:
    configure_logging("svc", "INFO", "text")
    forged = "r1\n2026-01-01T00:00:00.000Z INFO    x [svc] forged\x1b[31m\u2028"
    logging.getLogger("hotslot.test").info("request %s done", forged, extra={"request_id": forged})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert "r1\\n2026" in lines[0] and "\\x1b[31m" in lines[0] and "\\u2028" in lines[0]


def test_the_pipelines_truncation_warning_keeps_the_fact_but_not_the_prompt(capsys) -> None:
    from hotslot.services.executor.wiring import log_libraries_through_root

    configure_logging("svc", "INFO", "text")
    log_libraries_through_root()  # as the executor does: diffusers' own stderr handler would print the prompt
    library = logging.getLogger("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    library.warning("The following part of your input was truncated because CLIP can only handle sequences up to"
                    " 77 tokens: ['my secret prompt']")
    err = capsys.readouterr().err
    assert "77 tokens" in err and "truncated" in err and "secret" not in err


def test_a_registration_named_by_its_short_name_gets_the_full_name_health_reports() -> None:
    servicer = FakeRegistry()
    reg = ServiceRegistration.of(registry_service_pb2.DESCRIPTOR, "RegistryService", servicer,
                                 registry_service_pb2_grpc.add_RegistryServiceServicer_to_server)
    assert (reg.full_name, reg.servicer) == (REGISTRY, servicer) == ("hotslot.registry.v1.RegistryService", servicer)
