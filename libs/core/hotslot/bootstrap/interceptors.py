"""Server interceptor that turns hotslot domain errors into gRPC status codes (with google.rpc rich details where a
client can act on them) and hides everything else behind a generic INTERNAL; plus the helper that lets a server
interceptor wrap any of the four kinds of method handler."""
from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, cast

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import trace

from hotslot import errors

log = logging.getLogger(__name__)

# Runs around one RPC, given its servicer context; for streaming responses it spans the whole stream.
Around = Callable[[grpc.aio.ServicerContext[Any, Any]], AbstractAsyncContextManager[Any]]


async def _call_unary_response(behavior: Callable[..., Any], request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    result = behavior(request, context)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _call_stream_response(behavior: Callable[..., Any], request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    # The wrapper is always a coroutine that writes through the context (gRPC's reader/writer style) rather than
    # an async generator: the server then drives everything from one coroutine, so a cancelled or failed stream
    # unwinds `around` in the task and context it was entered in, and the handler's generator is closed there too.
    result = behavior(request, context)
    if inspect.isawaitable(result):
        # reader/writer-style handler: it wrote its responses itself and returns None.
        result = await result
    if result is None:
        return
    if hasattr(result, "__aiter__"):
        try:
            async for response in result:
                await context.write(response)
        finally:
            aclose = getattr(result, "aclose", None)
            if aclose is not None:
                await aclose()
        return
    for response in result:
        await context.write(response)


def split_method(full_method: str) -> tuple[str, str]:
    """("pkg.Service", "Method") from a gRPC full method name ("/pkg.Service/Method")."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def wrap_handler(handler: grpc.RpcMethodHandler[Any, Any], around: Around) -> grpc.RpcMethodHandler[Any, Any]:
    """Returns a handler that runs `around(context)` around `handler`, whichever of the four kinds it is. The
    handler's (de)serializers are kept. Handlers may be coroutines, async generators or reader/writer style;
    a plain function is called on the event loop, so servicers must not block."""

    deserializer = handler.request_deserializer
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with around(context):
                return await _call_unary_response(behavior, request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)
    if handler.unary_stream is not None:
        behavior = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            async with around(context):
                await _call_stream_response(behavior, request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)
    if handler.stream_unary is not None:
        behavior = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with around(context):
                return await _call_unary_response(behavior, requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, serializer)
    if handler.stream_stream is not None:
        behavior = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            async with around(context):
                await _call_stream_response(behavior, requests, context)

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)
    raise TypeError(f"method handler has no behaviour: {handler!r}")


class _Malformed:
    """What a request that could not be parsed deserializes to: the handler refuses it with INVALID_ARGUMENT."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _check(request: Any) -> Any:
    if isinstance(request, _Malformed):
        raise errors.InvalidArgument(
            f"the request is not a valid protobuf message for this method ({request.reason}): check that the "
            "client uses this service's .proto and sends UTF-8 strings"
        )
    return request


async def _checked_stream(requests: Any) -> Any:
    async for request in requests:
        yield _check(request)


def refusing_malformed(handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
    """The handler with a deserializer that does not raise on bad bytes (invalid UTF-8 in a string field, a
    truncated or garbled message): gRPC would log an ERROR with a traceback and answer UNKNOWN "Unexpected
    DecodeError". It logs one WARNING line instead and hands the handler a marker that it refuses with
    INVALID_ARGUMENT (raised inside the handler, so the error interceptor maps it like any domain error)."""
    deserializer = handler.request_deserializer
    if deserializer is None:
        return handler

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as error:  # noqa: BLE001 - any parse failure is the client's bytes
            reason = bounded(f"{type(error).__name__}: {error}", 300)
            log.warning("malformed request to %s (%d bytes): %s", method, len(raw), reason,
                        extra={"rpc_method": method})
            return _Malformed(reason)

    if handler.unary_unary is not None or handler.unary_stream is not None:
        kind = "unary_unary" if handler.unary_unary is not None else "unary_stream"
        behavior = getattr(handler, kind)

        def checked_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return behavior(_check(request), context)

        return _replaced(handler, request_deserializer=deserialize, **{kind: checked_unary})
    kind = "stream_unary" if handler.stream_unary is not None else "stream_stream"
    behavior = getattr(handler, kind)

    def checked_stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return behavior(_checked_stream(requests), context)

    return _replaced(handler, request_deserializer=deserialize, **{kind: checked_stream})


def _replaced(handler: grpc.RpcMethodHandler[Any, Any], **changes: Any) -> grpc.RpcMethodHandler[Any, Any]:
    """A copy of the handler with some fields changed: grpc's handlers are namedtuples at run time, which its type
    stubs do not say."""
    return cast("grpc.RpcMethodHandler[Any, Any]", cast(Any, handler)._replace(**changes))


class _SerializingContext:
    """The servicer context as a reader/writer-style handler sees it: `write` serializes here, so a response that
    cannot be serialized fails inside the handler (INTERNAL with a request id), not in gRPC (UNKNOWN)."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], serializer: Callable[[Any], bytes]) -> None:
        self._context = context
        self._serializer = serializer

    async def write(self, message: Any) -> None:
        await self._context.write(self._serializer(message))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def serializing_inside(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """The handler with its responses serialized inside it (gRPC then sends the bytes as they are): a response
    gRPC cannot serialize (a servicer returning the wrong type) would otherwise end the call UNKNOWN with an
    ERROR traceback, outside any interceptor."""
    serializer = handler.response_serializer
    if serializer is None:
        return handler
    if handler.unary_unary is not None or handler.stream_unary is not None:
        kind = "unary_unary" if handler.unary_unary is not None else "stream_unary"
        behavior = getattr(handler, kind)

        async def unary_response(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            return serializer(await _call_unary_response(behavior, request, context))

        return _replaced(handler, response_serializer=None, **{kind: unary_response})
    kind = "unary_stream" if handler.unary_stream is not None else "stream_stream"
    behavior = getattr(handler, kind)

    async def stream_response(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        serializing = cast("grpc.aio.ServicerContext[Any, Any]", _SerializingContext(context, serializer))
        await _call_stream_response(behavior, request, serializing)

    return _replaced(handler, response_serializer=None, **{kind: stream_response})


_STATUS_BY_ERROR: dict[type[errors.HotslotError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code_of(error: errors.HotslotError) -> grpc.StatusCode:
    """The status code of a domain error; a subclass maps like the class it derives from."""
    for cls in type(error).__mro__:
        code = _STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code
    # HotslotError itself, or a subclass that maps to nothing above: the core meant the client to see the
    # message but said nothing about retrying, which is what UNKNOWN means.
    return grpc.StatusCode.UNKNOWN


def _error_details(error: errors.HotslotError) -> list[Any]:
    details: list[Any] = [error_info(error.reason)]
    if isinstance(error, errors.InvalidArgument) and error.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=bounded(v.field, 200),
                                                                description=bounded(v.description))
                    for v in error.violations
                ]
            )
        )
    if isinstance(error, errors.ResourceExhausted) and error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return details


# Longest message (and field description) an error sends: messages quote what the client sent, and a 10 kB model id
# echoed in the status message and again in grpc-status-details-bin overflowed the caller's 8 KiB metadata limit
# (the router answered RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" instead of the registry's
# INVALID_ARGUMENT). Cut in the middle, so both the start (what failed) and the end (the advice) remain.
MAX_ECHO_CHARS = 1000


def bounded(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text`, or its first and last parts around "…" when it is longer than `limit` characters."""
    if len(text) <= limit:
        return text
    head = (limit - 1) * 2 // 3
    return f"{text[:head]}…{text[len(text) - (limit - 1 - head):]}"


def error_info(reason: str, metadata: dict[str, str] | None = None) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo every hotslot error status carries: a stable reason in domain hotslot.dev."""
    return error_details_pb2.ErrorInfo(reason=str(reason), domain=errors.ERROR_DOMAIN, metadata=metadata or {})


def to_grpc_status(error: errors.HotslotError) -> grpc.Status:
    """code, message and a `grpc-status-details-bin` trailer with a google.rpc.Status holding ErrorInfo (always),
    then BadRequest or RetryInfo where the error carries them. Messages and field descriptions are `bounded`."""
    return rich_status(status_code_of(error), bounded(error.message), _error_details(error))


def rich_status(code: grpc.StatusCode, message: str, details: list[Any]) -> grpc.Status:
    """code and message, with a `grpc-status-details-bin` trailer holding a google.rpc.Status with `details`."""
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Ends an RPC whose handler raised a hotslot.errors class with that class's status code and the error's
    message, and a google.rpc.ErrorInfo with the error's reason on every status it sends. Any other exception ends it with INTERNAL and a message naming only a request id; the exception and
    its traceback go to the log and to the current span under that id. An RPC the servicer aborted itself
    (context.abort) passes through untouched. Install it inside the tracing interceptor so the span is current."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        @asynccontextmanager
        async def mapping_errors(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
            try:
                yield
            except grpc.aio.AbortError:
                # The status is already on the wire; gRPC checks that the very same exception reaches it.
                raise
            except errors.HotslotError as error:
                status = to_grpc_status(error)
                await context.abort(status.code, status.details, _trailers(context, status.trailing_metadata))
            except Exception as error:
                chosen = _chosen_status(context)
                if chosen is not None:
                    # The servicer picked code and details itself before raising (the generated base servicer
                    # does this for UNIMPLEMENTED); they are its words, not the exception's, so they may go out.
                    log.debug("%s ended with %s set by the servicer", method, chosen[0].name, exc_info=True)
                    status = rich_status(chosen[0], chosen[1], [error_info(chosen[0].name)])
                    await context.abort(status.code, status.details, _trailers(context, status.trailing_metadata))
                request_id = uuid.uuid4().hex[:16]
                log.exception(
                    "unexpected error in %s (request id %s)",
                    method,
                    request_id,
                    extra={"rpc_method": method, "request_id": request_id},
                )
                span = trace.get_current_span()
                span.record_exception(error, attributes={"hotslot.request_id": request_id})
                span.set_attribute("hotslot.request_id", request_id)
                status = rich_status(
                    grpc.StatusCode.INTERNAL,
                    f"internal error (request id {request_id})",
                    [error_info(errors.Reason.INTERNAL, {"request_id": request_id})],
                )
                await context.abort(status.code, status.details, _trailers(context, status.trailing_metadata))

        return wrap_handler(serializing_inside(refusing_malformed(handler, method)), mapping_errors)


def _chosen_status(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[grpc.StatusCode, str] | None:
    code = context.code()
    if code is None:
        return None
    if not isinstance(code, grpc.StatusCode):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if code is grpc.StatusCode.OK:
        return None
    return code, context.details() or ""


def _trailers(
    context: grpc.aio.ServicerContext[Any, Any], extra: tuple[tuple[str, str | bytes], ...]
) -> tuple[tuple[str, str | bytes], ...]:
    # abort() replaces the trailing metadata the handler set before it raised; keep that metadata.
    try:
        existing = tuple(context.trailing_metadata() or ())
    except NotImplementedError:
        existing = ()
    return existing + tuple(extra)
