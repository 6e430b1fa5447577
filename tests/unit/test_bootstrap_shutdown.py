"""Graceful shutdown of the bootstrap server: calls still running near the end of the grace are ended with
UNAVAILABLE and a RetryInfo detail, so clients retry them elsewhere, instead of gRPC's CANCELLED at its end."""
from __future__ import annotations

import asyncio
import os
import signal
import threading

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hotslot.bootstrap.server import run_server
from hotslot.bootstrap.settings import ServiceSettings
from tests.unit.test_bootstrap import ECHO, exporter, provider, registrations, restore_logging  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals need the main thread"
)


def retry_delay_s(error: grpc.aio.AioRpcError) -> float | None:
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


async def test_calls_still_running_near_the_end_of_the_grace_get_unavailable_with_retry_info(  # noqa: F811
    provider, restore_logging  # noqa: F811 (the fixtures imported above)
):
    _, regs = registrations(provider.get_tracer("test"))
    outcomes: dict[str, grpc.aio.AioRpcError | object] = {}
    calls: list[asyncio.Task] = []

    async def outcome(name: str, call) -> None:
        try:
            outcomes[name] = await call
        except grpc.aio.AioRpcError as error:
            outcomes[name] = error

    async def endless(channel: grpc.aio.Channel) -> list[bytes]:
        return [part async for part in channel.unary_stream(f"/{ECHO}/Endless")(b"")]

    async def started(port: int) -> None:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        calls.append(asyncio.ensure_future(outcome("slow", channel.unary_unary(f"/{ECHO}/Slow")(b"60"))))
        calls.append(asyncio.ensure_future(outcome("quick", channel.unary_unary(f"/{ECHO}/Slow")(b"0.2"))))
        calls.append(asyncio.ensure_future(outcome("stream", endless(channel))))
        await asyncio.sleep(0.3)  # the calls have reached the server
        os.kill(os.getpid(), signal.SIGTERM)

    settings = ServiceSettings(shutdown_grace_s=2.0, shutdown_abort_margin_s=1.0)
    await asyncio.wait_for(
        run_server(regs, settings=settings, service_name="test", on_started=started, tracer_provider=provider),
        timeout=10,
    )
    await asyncio.wait_for(asyncio.gather(*calls), 5)
    assert outcomes["quick"] == b"done"  # finished within the grace: untouched
    for name in ("slow", "stream"):
        error = outcomes[name]
        assert isinstance(error, grpc.aio.AioRpcError), (name, error)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, (name, error.details())
        assert "shutting down" in error.details()
        assert retry_delay_s(error) == pytest.approx(1.0)
