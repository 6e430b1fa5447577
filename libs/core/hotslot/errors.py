"""Domain errors raised by service cores. They carry no transport types; the bootstrap's error interceptor maps
each class to a gRPC status code, so cores never import grpc."""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

ERROR_DOMAIN = "hotslot.dev"
"""google.rpc.ErrorInfo.domain of every hotslot error."""


class Reason(StrEnum):
    """Stable, machine-readable reasons, sent on every error status as google.rpc.ErrorInfo.reason (domain
    `hotslot.dev`). The names are those of hotslot.common.v1.ErrorReason without its `ERROR_REASON_` prefix (a
    test keeps the two equal). A client branches on these, never on messages. Each error class has a default;
    a raise site names a more specific one where a client can act on the difference."""

    # INVALID_ARGUMENT
    INVALID_PARAMETER = "INVALID_PARAMETER"
    UNSAFE_FILE_FORMAT = "UNSAFE_FILE_FORMAT"
    # NOT_FOUND
    NOT_FOUND = "NOT_FOUND"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    MODEL_NOT_HELD = "MODEL_NOT_HELD"
    EXECUTOR_NOT_FOUND = "EXECUTOR_NOT_FOUND"
    # ALREADY_EXISTS
    ALREADY_EXISTS = "ALREADY_EXISTS"
    # FAILED_PRECONDITION
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ADAPTER_MISMATCH = "ADAPTER_MISMATCH"
    # RESOURCE_EXHAUSTED
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    QUEUE_FULL = "QUEUE_FULL"
    MODEL_TOO_LARGE = "MODEL_TOO_LARGE"
    # UNAVAILABLE
    UNAVAILABLE = "UNAVAILABLE"
    NO_EXECUTOR_READY = "NO_EXECUTOR_READY"
    # DATA_LOSS
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    # CANCELLED, DEADLINE_EXCEEDED
    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    # UNKNOWN, INTERNAL, and codes a servicer chose itself (UNIMPLEMENTED)
    UNKNOWN = "UNKNOWN"
    INTERNAL = "INTERNAL"
    UNIMPLEMENTED = "UNIMPLEMENTED"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: which field and what is wrong with it (google.rpc.BadRequest)."""

    field: str
    description: str


class HotslotError(Exception):
    """Base of every error a client is meant to see. Its message is sent to the client as is; its `reason` (the
    class's default unless the raise site names one, or the reason a peer sent) goes out as ErrorInfo.reason. A
    reason is a str, not only a Reason: one forwarded from a newer peer is passed on unchanged."""

    reason: str = Reason.UNKNOWN

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidArgument(HotslotError):
    """The request is malformed; retrying it unchanged fails again (INVALID_ARGUMENT)."""

    reason = Reason.INVALID_PARAMETER

    def __init__(
        self, message: str, violations: list[FieldViolation] | None = None, *, reason: str | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.violations = list(violations or [])

    @classmethod
    def field(cls, field: str, description: str, *, reason: str | None = None) -> InvalidArgument:
        return cls(f"{field}: {description}", [FieldViolation(field, description)], reason=reason)


class NotFound(HotslotError):
    """The named thing does not exist (NOT_FOUND)."""

    reason = Reason.NOT_FOUND


class AlreadyExists(HotslotError):
    """The thing to create exists already (ALREADY_EXISTS)."""

    reason = Reason.ALREADY_EXISTS


class FailedPrecondition(HotslotError):
    """The system is not in a state in which the request can run (FAILED_PRECONDITION)."""

    reason = Reason.FAILED_PRECONDITION


class ResourceExhausted(HotslotError):
    """A bound was hit (queue length, byte budget); retry later (RESOURCE_EXHAUSTED)."""

    reason = Reason.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None, *, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_s = retry_after_s


class Unavailable(HotslotError):
    """A dependency is down or the service is shutting down; retry later (UNAVAILABLE)."""

    reason = Reason.UNAVAILABLE


class DataLoss(HotslotError):
    """Stored bytes do not match their checksum (DATA_LOSS)."""

    reason = Reason.CHECKSUM_MISMATCH


class CorruptRead(DataLoss):
    """A cached file read back does not match the checksum recorded when it was cached (DATA_LOSS): the node's
    disk changed it. `path` is the file (the message starts with it, so the class survives a process boundary
    that carries only the class name and the message)."""

    SUFFIX = ": its bytes do not match the checksum recorded when the storage-cache cached it"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.path = message[: -len(self.SUFFIX)] if message.endswith(self.SUFFIX) else ""

    @classmethod
    def of(cls, path: object) -> CorruptRead:
        return cls(f"{path}{cls.SUFFIX}")


class Cancelled(HotslotError):
    """The caller cancelled the operation (CANCELLED)."""

    reason = Reason.CANCELLED


class DeadlineExceeded(HotslotError):
    """The caller's deadline passed before the operation finished (DEADLINE_EXCEEDED)."""

    reason = Reason.DEADLINE_EXCEEDED
