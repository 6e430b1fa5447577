"""Translation of failed downstream gRPC calls into hotslot errors: the same status code and message, with the
google.rpc ErrorInfo reason and BadRequest and RetryInfo details kept, so a service core can re-raise what its peer
said and the client sees the reason the peer gave."""
from __future__ import annotations

from typing import TypeVar, cast

import grpc
import grpc.aio
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hotslot import errors

M = TypeVar("M", bound=Message)

_ERROR_BY_CODE: dict[grpc.StatusCode, type[errors.HotslotError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DATA_LOSS: errors.DataLoss,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
}


def error_from_rpc(
    error: grpc.aio.AioRpcError,
    peer: str,
    *,
    unavailable: type[errors.Unavailable] = errors.Unavailable,
) -> errors.HotslotError:
    """The hotslot error for a failed downstream call: same code, message and ErrorInfo reason, with the BadRequest
    and RetryInfo details kept. Codes with no hotslot class (INTERNAL, UNKNOWN, UNIMPLEMENTED, ...) become a plain HotslotError
    (UNKNOWN) whose message names the peer and its code; the peer's message is safe to repeat, since every hotslot
    service hides internals behind it already."""
    code = error.code()
    message = error.details() or f"{peer} answered {code.name}"
    reason = reason_of(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        return unavailable(message, reason=reason)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return errors.InvalidArgument(message, _violations(error), reason=reason)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return errors.ResourceExhausted(message, _retry_after_s(error), reason=reason)
    cls = _ERROR_BY_CODE.get(code)
    if cls is None:
        return errors.HotslotError(f"{peer} failed with {code.name}: {message}", reason=reason)
    return cls(message, reason=reason)


def reason_of(error: grpc.aio.AioRpcError) -> str | None:
    """The ErrorInfo reason a hotslot peer sent (domain hotslot.dev); None when it sent none, so the error class's
    default applies."""
    for info in _rich_details(error, error_details_pb2.ErrorInfo):
        if info.domain == errors.ERROR_DOMAIN and info.reason:
            return info.reason
    return None


def _rich_details(error: grpc.aio.AioRpcError, detail_type: type[M]) -> list[M]:
    try:
        # an AioRpcError has the code(), details() and trailing_metadata() that from_call reads, though the stubs
        # type it as a grpc.Call only
        status = rpc_status.from_call(cast(grpc.Call, error))
    except ValueError:  # details that do not match code and message: ignore them rather than fail the call
        return []
    found: list[M] = []
    for any_detail in status.details if status is not None else ():
        detail = detail_type()
        if any_detail.Unpack(detail):
            found.append(detail)
    return found


def _violations(error: grpc.aio.AioRpcError) -> list[errors.FieldViolation]:
    return [
        errors.FieldViolation(violation.field, violation.description)
        for bad_request in _rich_details(error, error_details_pb2.BadRequest)
        for violation in bad_request.field_violations
    ]


def _retry_after_s(error: grpc.aio.AioRpcError) -> float | None:
    for info in _rich_details(error, error_details_pb2.RetryInfo):
        return info.retry_delay.ToNanoseconds() / 1e9
    return None
