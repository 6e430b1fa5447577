"""Starts hotslot services as real child processes (`hotslot serve ...`) and waits until they answer health."""
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

LISTENING = re.compile(r"hotslot (\S+) listening on (\S+):(\d+)")
HOTSLOT = [sys.executable, "-m", "hotslot.cli.main"]


@dataclass
class ServiceProcess:
    name: str
    proc: subprocess.Popen
    log_path: Path
    host: str = ""
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_service(
    service: str, args: list[str], *, log_path: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> ServiceProcess:
    """Runs `hotslot serve <service> --port 0 <args>`, reads the port from its log, waits for SERVING."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
    proc = subprocess.Popen(
        [*HOTSLOT, "serve", service, "--host", "127.0.0.1", "--port", "0", *args],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=full_env,
    )
    svc = ServiceProcess(service, proc, log_path, env=full_env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = LISTENING.search(svc.log())
        if match:
            svc.host, svc.port = match.group(2), int(match.group(3))
            break
        if proc.poll() is not None:
            raise RuntimeError(f"{service} exited with {proc.returncode}:\n{svc.log()}")
        time.sleep(0.05)
    else:
        svc.stop(signal.SIGKILL)
        raise TimeoutError(f"{service} did not report its port within {timeout}s:\n{svc.log()}")
    wait_serving(svc.address, timeout=max(1.0, deadline - time.monotonic()))
    return svc


def wait_serving(address: str, service: str = "", timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout}s")
            time.sleep(0.1)
