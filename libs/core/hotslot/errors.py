"""Domain errors raised by service cores. They carry no transport types; the bootstrap's error interceptor maps
each class to a gRPC status code, so cores never import grpc."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: which field and what is wrong with it (google.rpc.BadRequest)."""

    field: str
    description: str


class HotslotError(Exception):
    """Base of every error a client is meant to see. Its message is sent to the client as is."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(HotslotError):
    """The request is malformed; retrying it unchanged fails again (INVALID_ARGUMENT)."""

    def __init__(self, message: str, violations: list[FieldViolation] | None = None) -> None:
        super().__init__(message)
        self.violations = list(violations or [])

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls(f"{field}: {description}", [FieldViolation(field, description)])


class NotFound(HotslotError):
    """The named thing does not exist (NOT_FOUND)."""


class AlreadyExists(HotslotError):
    """The thing to create exists already (ALREADY_EXISTS)."""


class FailedPrecondition(HotslotError):
    """The system is not in a state in which the request can run (FAILED_PRECONDITION)."""


class ResourceExhausted(HotslotError):
    """A bound was hit (queue length, byte budget); retry later (RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(HotslotError):
    """A dependency is down or the service is shutting down; retry later (UNAVAILABLE)."""


class DataLoss(HotslotError):
    """Stored bytes do not match their checksum (DATA_LOSS)."""


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


class DeadlineExceeded(HotslotError):
    """The caller's deadline passed before the operation finished (DEADLINE_EXCEEDED)."""
