"""OpenTelemetry tracing for every service: the tracer provider and its exporter (chosen by the standard OTEL_*
variables), and gRPC interceptors that carry the W3C trace context from client to server across every hop."""
from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from hotslot.bootstrap.interceptors import split_method, wrap_handler
from hotslot.bootstrap.settings import DEFAULT_MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "hotslot.bootstrap"

# Probes call these every few seconds; a span per probe would drown the traces that matter.
UNTRACED_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)

_FLUSH_TIMEOUT_MS = 5_000


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    names = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if names:
        return [name.strip() for name in names.split(",") if name.strip()]
    # The OTel default is "otlp", but with no collector running (a laptop, CI) that default means an export error
    # logged every few seconds for the life of the process. So: export only when an endpoint says where to.
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return ["otlp"]
    return ["none"]


def configure_tracing(service_name: str, *, exporter: SpanExporter | None = None) -> TracerProvider:
    """Builds a tracer provider whose resource has service.name `service_name`. With `exporter` (tests pass an
    InMemorySpanExporter) every span goes to it as it ends. Without it OTEL_TRACES_EXPORTER picks: "otlp" (gRPC;
    the exporter reads OTEL_EXPORTER_OTLP_* itself), "console", "none", or a comma-separated list of them; unset
    means "otlp" if an OTLP endpoint is set and "none" otherwise. The provider is returned, not made global: the
    caller decides (run_server does, for the process it owns)."""
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return provider
    for name in _exporter_names(os.environ):
        if name == "otlp":
            # Imported here: it pulls in the OTLP protos, which a process that exports nothing need not load.
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif name != "none":
            log.warning("OTEL_TRACES_EXPORTER %r is not supported here (otlp, console, none); ignoring it", name)
    return provider


def shutdown_tracing(provider: trace.TracerProvider | None) -> None:
    """Exports the spans still buffered, then stops the provider's processors."""
    if not isinstance(provider, TracerProvider):
        return
    if not provider.force_flush(_FLUSH_TIMEOUT_MS):
        log.warning("tracing: not every span was exported within %d ms", _FLUSH_TIMEOUT_MS)
    provider.shutdown()


def _tracer(tracer_provider: trace.TracerProvider | None) -> trace.Tracer:
    return trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)


def _rpc_attributes(full_method: str) -> dict[str, str]:
    service, method = split_method(full_method)
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


def _status_code(value: Any) -> grpc.StatusCode:
    if value is None:
        return grpc.StatusCode.OK
    if isinstance(value, grpc.StatusCode):
        return value
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def _end_rpc_status(span: trace.Span, code: grpc.StatusCode, details: str | None = None) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}" if details else code.name))


def _metadata_carrier(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, list[str]]:
    carrier: dict[str, list[str]] = {}
    for key, value in metadata or ():
        if isinstance(value, str):
            carrier.setdefault(key.lower(), []).append(value)
    return carrier


class TracingServerInterceptor(grpc.aio.ServerInterceptor):
    """Runs each RPC in a SERVER span named after the full method ("/pkg.Service/Method"), continuing the trace
    whose W3C `traceparent`/`tracestate` came in the request metadata. The span is the current one while the
    handler runs (spans the core starts become its children) and, for streaming responses, until the stream ends.
    Install it outermost so the error interceptor runs inside the span."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        untraced_services: Iterable[str] = UNTRACED_SERVICES,
    ) -> None:
        self._tracer = _tracer(tracer_provider)
        self._untraced = frozenset(untraced_services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or split_method(method)[0] in self._untraced:
            return handler
        metadata = handler_call_details.invocation_metadata
        tracer = self._tracer

        @asynccontextmanager
        async def server_span(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[trace.Span]:
            parent = propagate.extract(_metadata_carrier(metadata))
            span = tracer.start_span(method, context=parent, kind=SpanKind.SERVER, attributes=_rpc_attributes(method))
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            try:
                yield span
            except grpc.aio.AbortError:
                _end_rpc_status(span, _status_code(context.code()), context.details())
                raise
            except asyncio.CancelledError:
                _end_rpc_status(span, grpc.StatusCode.CANCELLED)
                raise
            except Exception as error:
                # Reached only without the error interceptor inside; gRPC then answers UNKNOWN.
                span.record_exception(error)
                _end_rpc_status(span, grpc.StatusCode.UNKNOWN, type(error).__name__)
                raise
            else:
                # A handler may end the RPC with set_code() instead of raising.
                _end_rpc_status(span, _status_code(context.code()), context.details())
            finally:
                otel_context.detach(token)
                span.end()

        return wrap_handler(handler, server_span)


class _ClientTracing:
    """Starts a CLIENT span per call and puts its W3C context into the outgoing metadata."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = _tracer(tracer_provider)
        # Spans of streaming calls are ended by a task started from the call's done callback; kept here so the
        # task is not garbage-collected before it runs.
        self._ending: set[asyncio.Task[None]] = set()

    def _start(self, details: grpc.aio.ClientCallDetails) -> tuple[trace.Span, grpc.aio.ClientCallDetails]:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        span = self._tracer.start_span(method, kind=SpanKind.CLIENT, attributes=_rpc_attributes(method))
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in carrier.items():
            if key in metadata:  # type: ignore[comparison-overlap]  # aio.Metadata looks up keys; not so in typeshed
                metadata.delete_all(key)
            metadata.add(key, value)
        return span, details._replace(metadata=metadata)  # type: ignore[attr-defined]  # a namedtuple at run time

    @staticmethod
    def _fail(span: trace.Span, error: BaseException) -> None:
        if isinstance(error, grpc.aio.AioRpcError):
            _end_rpc_status(span, error.code(), error.details())
        elif isinstance(error, asyncio.CancelledError):
            _end_rpc_status(span, grpc.StatusCode.CANCELLED)
        else:
            span.record_exception(error)
            _end_rpc_status(span, grpc.StatusCode.UNKNOWN, type(error).__name__)
        span.end()

    async def _unary_response(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        span, details = self._start(details)
        try:
            call = await continuation(details, request)
            # Awaiting the code waits for the RPC to end without raising, and the call (with its metadata and
            # status) is still what the caller gets.
            code = await call.code()
            _end_rpc_status(span, code, await call.details())
        except BaseException as error:
            self._fail(span, error)
            raise
        span.end()
        return call

    async def _stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        # Returned at once (the caller writes requests or reads responses through it); the span ends when the
        # call does, however it ends: drained, failed, or cancelled by a caller that stopped reading.
        span, details = self._start(details)
        try:
            call = await continuation(details, request)
        except BaseException as error:
            self._fail(span, error)
            raise
        call.add_done_callback(functools.partial(self._on_done, span))
        return call

    def _on_done(self, span: trace.Span, call: grpc.aio.Call) -> None:
        task = asyncio.get_running_loop().create_task(self._end_stream(span, call))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    @staticmethod
    async def _end_stream(span: trace.Span, call: grpc.aio.Call) -> None:
        try:
            _end_rpc_status(span, await call.code(), await call.details())
        finally:
            span.end()


class TracingUnaryUnaryClientInterceptor(_ClientTracing, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await self._unary_response(continuation, client_call_details, request)


class TracingUnaryStreamClientInterceptor(_ClientTracing, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await self._stream(continuation, client_call_details, request)


class TracingStreamUnaryClientInterceptor(_ClientTracing, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await self._stream(continuation, client_call_details, request_iterator)


class TracingStreamStreamClientInterceptor(_ClientTracing, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await self._stream(continuation, client_call_details, request_iterator)


def client_interceptors(tracer_provider: trace.TracerProvider | None = None) -> list[grpc.aio.ClientInterceptor]:
    """One tracing interceptor per call kind (a grpc.aio channel files each interceptor under one kind only)."""
    return [
        TracingUnaryUnaryClientInterceptor(tracer_provider),
        TracingUnaryStreamClientInterceptor(tracer_provider),
        TracingStreamUnaryClientInterceptor(tracer_provider),
        TracingStreamStreamClientInterceptor(tracer_provider),
    ]


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def insecure_channel(
    target: str,
    *,
    tracer_provider: trace.TracerProvider | None,
    options: Sequence[tuple[str, Any]] | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> grpc.aio.Channel:
    """A plaintext channel to `target` whose calls are traced and carry the trace context. `options` override the
    message-size limits set from `max_message_bytes`. Must be called with the event loop running."""
    merged = dict(message_size_options(max_message_bytes))
    merged.update(dict(options or ()))
    return grpc.aio.insecure_channel(
        target, options=list(merged.items()), interceptors=client_interceptors(tracer_provider)
    )
