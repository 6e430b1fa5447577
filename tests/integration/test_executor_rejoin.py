"""A real executor process behind a real router, killed and started again on the same port: the router takes it
back within its own watch backoff (not gRPC's default reconnect backoff, which grows to minutes), and an executor
that stops answering without closing its connection (SIGSTOP: the kernel keeps the TCP connection open) is dropped
within the keepalive time plus its timeout, then taken back when it resumes."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from hotslot.router.v1 import router_service_pb2 as pb
from hotslot.router.v1 import router_service_pb2_grpc as pb_grpc
from tests.support.procs import spawn_service, wait_ready
from tests.support.stack import start_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

WATCH_BACKOFF_MAX_S = 2.0
KEEPALIVE_TIME_S = 2.0
KEEPALIVE_TIMEOUT_S = 2.0
DOWN_S = 20.0
"""How long the executor stays away. gRPC's default reconnect backoff (1 s, x1.6 per failure, up to 120 s) has
grown past 10 s after 20 s of failures, so without the router's reconnect options a rejoin would take up to that
long after the executor is back; with them the wait between attempts never exceeds WATCH_BACKOFF_MAX_S."""
SLACK_S = 5.0
"""Generous room on a shared, loaded test machine for what is not backoff: the router noticing the new stream's
first status, and this test's own polling. The bound is behaviour (the configured backoff decides), not speed."""


def connected(stub: pb_grpc.RouterServiceStub) -> list[str]:
    return [e.executor_id for e in stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=5).executors]


def test_a_restarted_executor_rejoins_within_the_watch_backoff_and_a_frozen_one_is_dropped_by_keepalive(
    tmp_path: Path,
) -> None:
    stack = start_stack(tmp_path, [])
    try:
        executor = stack.start_executor()
        router = stack.start_router(
            "--watch-backoff-s", "0.2", "--watch-backoff-max-s", str(WATCH_BACKOFF_MAX_S),
            "--keepalive-time-s", str(KEEPALIVE_TIME_S), "--keepalive-timeout-s", str(KEEPALIVE_TIMEOUT_S),
        )
        with grpc.insecure_channel(router.address) as channel:
            stub = pb_grpc.RouterServiceStub(channel)
            (executor_id,) = wait_for(lambda: connected(stub), "the router follows the executor")

            # Killed: its connections close at once, so the router drops it now and starts reconnecting.
            executor.proc.kill()
            executor.proc.wait(10)
            wait_for(lambda: connected(stub) == [], "the router drops the killed executor", timeout=10)
            lost = time.monotonic()
            time.sleep(max(0.0, DOWN_S - (time.monotonic() - lost)))
            again = spawn_service("executor", stack._executor_args(()), log_path=tmp_path / "executor-again.log",
                                  env=stack.env, port=executor.port)
            stack.executors.append(again)
            wait_ready(again, 180)
            serving = time.monotonic()
            wait_for(lambda: connected(stub) == [executor_id],
                     "the router takes the executor back within its watch backoff",
                     timeout=WATCH_BACKOFF_MAX_S + SLACK_S)
            rejoined_s = time.monotonic() - serving
            print(f"rejoined {rejoined_s:.2f} s after the restarted executor was SERVING "
                  f"(down {serving - lost:.1f} s)")

            # Frozen: the TCP connection stays open, only the pings go unanswered.
            os.kill(again.pid, signal.SIGSTOP)
            try:
                frozen = time.monotonic()
                wait_for(lambda: connected(stub) == [], "keepalive drops the frozen executor",
                         timeout=KEEPALIVE_TIME_S + KEEPALIVE_TIMEOUT_S + SLACK_S)
                print(f"frozen executor dropped after {time.monotonic() - frozen:.2f} s")
            finally:
                os.kill(again.pid, signal.SIGCONT)
            wait_for(lambda: connected(stub) == [executor_id], "the resumed executor is taken back",
                     timeout=WATCH_BACKOFF_MAX_S + SLACK_S)
    finally:
        stack.stop()
