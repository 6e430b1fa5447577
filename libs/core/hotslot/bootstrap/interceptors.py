"""Server interceptor that turns hotslot domain errors into gRPC status codes (with google.rpc rich details where a
client can act on them) and hides everything else behind a generic INTERNAL; plus the helper that lets a server
interceptor wrap any of the four kinds of method handler."""
from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import trace

from hotslot import errors

log = logging.getLogger(__name__)

# Runs around one RPC, given its servicer context; for streaming responses it spans the whole stream.
Around = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[Any]]


async def _call_unary_response(behavior: Callable[..., Any], request: Any, context: grpc.aio.ServicerContext) -> Any:
    result = behavior(request, context)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _call_stream_response(behavior: Callable[..., Any], request: Any, context: grpc.aio.ServicerContext) -> None:
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


def wrap_handler(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler:
    """Returns a handler that runs `around(context)` around `handler`, whichever of the four kinds it is. The
    handler's (de)serializers are kept. Handlers may be coroutines, async generators or reader/writer style;
    a plain function is called on the event loop, so servicers must not block."""

    deserializer = handler.request_deserializer
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                return await _call_unary_response(behavior, request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)
    if handler.unary_stream is not None:
        behavior = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
            async with around(context):
                await _call_stream_response(behavior, request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)
    if handler.stream_unary is not None:
        behavior = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                return await _call_unary_response(behavior, requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, serializer)
    if handler.stream_stream is not None:
        behavior = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> None:
            async with around(context):
                await _call_stream_response(behavior, requests, context)

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)
    raise TypeError(f"method handler has no behaviour: {handler!r}")


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
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in error.violations
                ]
            )
        )
    if isinstance(error, errors.ResourceExhausted) and error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return details


def error_info(reason: str, metadata: dict[str, str] | None = None) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo every hotslot error status carries: a stable reason in domain hotslot.dev."""
    return error_details_pb2.ErrorInfo(reason=str(reason), domain=errors.ERROR_DOMAIN, metadata=metadata or {})


def rich_status(code: grpc.StatusCode, message: str, details: list[Any]) -> grpc.Status:
    """code and message, with a `grpc-status-details-bin` trailer holding a google.rpc.Status with `details`."""
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


def to_grpc_status(error: errors.HotslotError) -> grpc.Status:
    """code, message and a `grpc-status-details-bin` trailer with a google.rpc.Status holding ErrorInfo (always),
    then BadRequest or RetryInfo where the error carries them."""
    return rich_status(status_code_of(error), error.message, _error_details(error))


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Ends an RPC whose handler raised a hotslot.errors class with that class's status code and the error's
    message, and a google.rpc.ErrorInfo with the error's reason on every status it sends. Any other exception ends it with INTERNAL and a message naming only a request id; the exception and
    its traceback go to the log and to the current span under that id. An RPC the servicer aborted itself
    (context.abort) passes through untouched. Install it inside the tracing interceptor so the span is current."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        @asynccontextmanager
        async def mapping_errors(context: grpc.aio.ServicerContext):
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

        return wrap_handler(handler, mapping_errors)


def _chosen_status(context: grpc.aio.ServicerContext) -> tuple[grpc.StatusCode, str] | None:
    code = context.code()
    if code is None:
        return None
    if not isinstance(code, grpc.StatusCode):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if code is grpc.StatusCode.OK:
        return None
    return code, context.details() or ""


def _trailers(context: grpc.aio.ServicerContext, extra: tuple) -> tuple:
    # abort() replaces the trailing metadata the handler set before it raised; keep that metadata.
    try:
        existing = tuple(context.trailing_metadata() or ())
    except NotImplementedError:
        existing = ()
    return existing + tuple(extra)
