"""The calls a server is running, so a graceful shutdown can end those still running near the end of its grace with
UNAVAILABLE and a RetryInfo detail (a router or client then retries them elsewhere), where gRPC would cut them
with CANCELLED "Cancelling all calls"."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from hotslot.bootstrap.interceptors import wrap_handler

SHUTDOWN_RETRY_AFTER_S = 1.0
"""The RetryInfo delay of a call ended by shutdown: this server is going away, so the hint is for trying again
(elsewhere, or here once restarted) soon."""

SHUTDOWN_MESSAGE = "the server is shutting down and ended this call before it finished; retry it (on another " \
    "replica if there is one)"


def shutdown_status(retry_after_s: float = SHUTDOWN_RETRY_AFTER_S) -> grpc.Status:
    """UNAVAILABLE with a google.rpc.RetryInfo detail in `grpc-status-details-bin`."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_after_s * 1e9))
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=SHUTDOWN_MESSAGE)
    status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)


class InflightCalls(grpc.aio.ServerInterceptor):
    """Keeps the task of every call in progress. `end_all()` cancels them; a call cancelled that way ends with
    shutdown_status() instead of CANCELLED. Install it last (innermost), so the error mapping and the span see the
    UNAVAILABLE it ends with."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ended: set[asyncio.Task[Any]] = set()

    @property
    def running(self) -> int:
        """Calls in progress. (Not __len__: gRPC would take an interceptor with none for false and skip it.)"""
        return len(self._tasks)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return wrap_handler(handler, self._tracked)

    @asynccontextmanager
    async def _tracked(self, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if task not in self._ended:
                raise  # the client went away, or gRPC itself cancelled the call
            task.uncancel()
            status = shutdown_status()
            await context.abort(status.code, status.details, status.trailing_metadata)
        finally:
            self._tasks.discard(task)
            self._ended.discard(task)

    def end_all(self) -> int:
        """Ends every call in progress with UNAVAILABLE + RetryInfo (each as soon as it next awaits). Returns how
        many."""
        running = [task for task in self._tasks if not task.done() and task not in self._ended]
        for task in running:
            self._ended.add(task)
            task.cancel()
        return len(running)
