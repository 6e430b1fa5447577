"""Starts one hotslot service as a child process (`hotslot serve <service>`), learns its port from the
`listening on` log line, waits until its health check says SERVING, and stops it with SIGTERM then SIGKILL."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Read by `hotslot serve` at start: it asks the kernel for SIGTERM when this launcher dies, so a launcher that
# crashes or is killed leaves no orphan services.
from hotslot.bootstrap.parent import PARENT_PID_ENV
from hotslot.bootstrap.security import ClientSecurity, sync_channel

LISTENING = re.compile(r"hotslot (\S+) listening on (\S+):(\d+)")
METRICS = re.compile(r"hotslot (\S+) metrics on (http://\S+/metrics)")  # logged before LISTENING
HOTSLOT = [sys.executable, "-m", "hotslot.cli.main"]


@dataclass
class ServiceProcess:
    name: str
    proc: subprocess.Popen
    log_path: Path
    host: str = ""
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    metrics_url: str = ""
    """Its Prometheus endpoint, http://host:port/metrics ("" when it serves none)."""
    log_offset: int = 0
    """Where this process's output starts in `log_path` (a restarted service appends to its log)."""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def own_log(self) -> str:
        """The output of this process only: the log from `log_offset` on."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as log_file:
            log_file.seek(self.log_offset)
            return log_file.read().decode(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 30) -> int:
        """Sends `sig` (None: it was sent already), waits up to `timeout`, then SIGKILL. Returns the exit code."""
        if sig is not None:
            self.send(sig)
        if self.wait(timeout) is None:
            self.proc.kill()
            self.proc.wait(10)
        return self.proc.returncode


def spawn_service(
    service: str,
    args: list[str],
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    metrics_port: int = 0,
    append: bool = False,
) -> ServiceProcess:
    """Starts `hotslot serve <service> --host HOST --port PORT --metrics-port METRICS_PORT <args>` with its output in
    `log_path` (appended to it with `append`, as for a restart, so the previous run's last words stay) and returns
    at once; `wait_ready` learns its ports (metrics_port 0: a free one, -1: none; a --metrics-port in `args` wins).
    Call it from the main thread: the child's parent-death signal fires when the *thread* that spawned it ends."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid()), **(env or {})}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if not append:
        log_path.write_bytes(b"")
    offset = log_path.stat().st_size
    # Always O_APPEND: a killed service's children (its resource tracker) may still write to the log after a
    # restart, and at their own offset they would overwrite the new run's lines.
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [*HOTSLOT, "serve", service, "--host", host, "--port", str(port), "--metrics-port", str(metrics_port),
             *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,  # Ctrl-C in the launcher's terminal reaches the launcher only; it stops us in order
        )
    return ServiceProcess(service, proc, log_path, env=full_env, log_offset=offset)


def wait_ready(svc: ServiceProcess, timeout: float = 60, security: ClientSecurity | None = None) -> ServiceProcess:
    """Reads the port the service bound from its log and waits until it is SERVING (asked over TLS with
    `security`'s CA and client certificate when given: a server with TLS speaks nothing else). Raises RuntimeError (with
    the end of its log) if it exits, TimeoutError if it takes longer than `timeout`; it is killed then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = LISTENING.search(svc.own_log())
        if match:
            svc.host, svc.port = match.group(2), int(match.group(3))
            metrics = METRICS.search(svc.own_log())
            svc.metrics_url = metrics.group(2) if metrics else ""
            break
        if svc.proc.poll() is not None:
            raise RuntimeError(f"{svc.name} exited with {svc.proc.returncode}:\n{svc.log()[-4000:]}")
        time.sleep(0.05)
    else:
        svc.stop(signal.SIGKILL)
        raise TimeoutError(f"{svc.name} did not report its port within {timeout}s:\n{svc.log()[-4000:]}")
    try:
        wait_serving(svc.address, timeout=max(1.0, deadline - time.monotonic()), security=security)
    except TimeoutError:
        svc.stop(signal.SIGKILL)
        raise
    return svc


def start_service(
    service: str,
    args: list[str],
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    host: str = "127.0.0.1",
    port: int = 0,
    metrics_port: int = 0,
    security: ClientSecurity | None = None,
) -> ServiceProcess:
    """spawn_service + wait_ready."""
    svc = spawn_service(service, args, log_path=log_path, env=env, host=host, port=port, metrics_port=metrics_port)
    return wait_ready(svc, timeout, security)


def is_serving(address: str, service: str = "", timeout: float = 1.0, security: ClientSecurity | None = None) -> bool:
    """One health check: True when `address` answers SERVING within `timeout`."""
    with sync_channel(address, security) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_serving(address: str, service: str = "", timeout: float = 30, security: ClientSecurity | None = None) -> None:
    deadline = time.monotonic() + timeout
    with sync_channel(address, security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                # typeshed's HealthStub lists no methods (grpc adds them in __init__)
                reply = stub.Check(  # type: ignore[attr-defined]
                    health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout}s")
            time.sleep(0.1)
