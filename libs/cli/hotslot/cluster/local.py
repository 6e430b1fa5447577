"""A whole hotslot cluster on one machine (`hotslot up`): registry, storage-cache, N executors and the router as
separate processes on embedded defaults — a SQLite file, a local directory standing in for the NFS share and a
local cache directory, all under one state directory. Started in dependency order, stopped in reverse. With
`tls`, a throwaway CA and certificates under <state>/tls: every service serves TLS, requires client certificates
(mTLS) and bearer tokens, and calls the others with its own certificate and token. While it runs, `supervise()`
restarts a service that exits, on the port it had (the others address it there), with backoff and a restart
budget (cluster.supervision)."""
from __future__ import annotations

import json
import logging
import os
import signal
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hotslot.bootstrap.security import ClientSecurity
from hotslot.bootstrap.settings import METRICS_OFF
from hotslot.cluster import certs
from hotslot.cluster.process import LISTENING, ServiceProcess, is_serving, spawn_service, wait_ready
from hotslot.cluster.supervision import RestartBudget, RestartPolicy, describe_exit

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"router": 50050, "registry": 50051, "storage-cache": 50052, "executor": 50053}
# Prometheus /metrics endpoints: the services' defaults, executors counting up from 9463 like their gRPC ports.
DEFAULT_METRICS_PORTS = {"router": 9460, "registry": 9461, "storage-cache": 9462, "executor": 9463}


def cpu_thread_args(spec: ClusterSpec, cpus: int | None = None) -> list[str]:
    """On CPU, executors share the machine's cores: each gets `--torch-threads cores // executors` (at least 1)
    unless the caller set torch threads itself (an --executor-arg, or HOTSLOT_EXECUTOR_TORCH_THREADS). With torch's
    default every executor would start one thread per core, and two executors on two cores ran 20-40x slower per
    step than one thread each."""
    if spec.device != "cpu" or os.environ.get("HOTSLOT_EXECUTOR_TORCH_THREADS"):
        return []
    if any(arg.split("=")[0] == "--torch-threads" for arg in spec.executor_args):
        return []
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return ["--torch-threads", str(max(1, cpus // max(1, spec.executors)))]


@dataclass
class ClusterSpec:
    state_dir: Path = Path(".hotslot")
    executors: int = 2
    host: str = "127.0.0.1"
    auto_ports: bool = False  # pick free ports instead of the well-known 50050-5005x (and 9460-946x for metrics)
    device: str = "cpu"
    cache_capacity: str = "20GiB"
    executor_args: list[str] = field(default_factory=list)
    otel: str = "none"  # none, console, otlp
    otlp_endpoint: str = ""
    shutdown_grace_s: float = 5.0
    start_timeout_s: float = 180.0
    tls: bool = False  # TLS + mTLS + bearer tokens, with credentials generated under <state_dir>/tls
    admin_token: str = ""  # with tls: the user's admin token (generated when empty)
    restart: RestartPolicy = field(default_factory=RestartPolicy)

    @property
    def share(self) -> Path:
        return self.state_dir / "share"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def tls_dir(self) -> Path:
        return self.state_dir / "tls"


class CrashLoop(RuntimeError):
    """A service exited more often than its restart budget allows; the cluster should stop."""


@dataclass
class _Launch:
    """How a service was started, to start it again the same way."""

    service: str
    args: list[str]
    budget: RestartBudget
    restart_at: float | None = None
    """Set while the service is down and waiting out its backoff."""
    starting_since: float | None = None
    """Set while a restarted service is not SERVING yet."""
    restarts: int = 0


class LocalCluster:
    def __init__(
        self,
        spec: ClusterSpec,
        on_progress: Callable[[str], None] = lambda msg: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.on_progress = on_progress
        self.services: dict[str, ServiceProcess] = {}
        self.credentials: certs.LocalCredentials | None = None
        self._clock = clock
        self._launches: dict[str, _Launch] = {}

    # -- addresses ---------------------------------------------------------------------------------------
    def address(self, name: str) -> str:
        return self.services[name].address

    @property
    def executors(self) -> list[ServiceProcess]:
        return [svc for name, svc in self.services.items() if name.startswith("executor")]

    def endpoints(self) -> dict[str, str]:
        return {name: svc.address for name, svc in self.services.items()}

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _port(self, service: str, index: int = 0) -> int:
        return 0 if self.spec.auto_ports else DEFAULT_PORTS[service] + index

    def _env(self, name: str) -> dict[str, str]:
        env = {"OTEL_SERVICE_NAME": f"hotslot-{name}", "OTEL_TRACES_EXPORTER": self.spec.otel}
        if self.spec.otel == "otlp" and self.spec.otlp_endpoint:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.spec.otlp_endpoint
        return env

    def _security_args(self) -> list[str]:
        c = self.credentials
        if c is None:
            return []
        return [
            "--tls-cert-file", str(c.service_cert), "--tls-key-file", str(c.service_key),
            "--tls-client-ca-file", str(c.ca), "--tokens-file", str(c.tokens_file),
            "--client-tls-ca-file", str(c.ca), "--client-tls-cert-file", str(c.service_cert),
            "--client-tls-key-file", str(c.service_key), "--client-token-file", str(c.service_token_file),
        ]

    def client_security(self, token: str | None = None) -> ClientSecurity | None:
        """How a client reaches this cluster (None: plaintext): the CA, the user's certificate, `token`."""
        c = self.credentials
        if c is None:
            return None
        return ClientSecurity(ca_file=c.ca, cert_file=c.client_cert, key_file=c.client_key, token=token)

    def client_env(self) -> dict[str, str]:
        """The HOTSLOT_CLIENT_* variables the CLI needs to talk to this cluster."""
        env = {}
        if "router" in self.services:
            env["HOTSLOT_CLIENT_ROUTER"] = self.address("router")
        if "registry" in self.services:
            env["HOTSLOT_CLIENT_REGISTRY"] = self.address("registry")
        if "storage-cache" in self.services:
            env["HOTSLOT_CLIENT_STORAGE"] = self.address("storage-cache")
        c = self.credentials
        if c is not None:
            env.update({
                "HOTSLOT_CLIENT_CA": str(c.ca.resolve()), "HOTSLOT_CLIENT_CERT": str(c.client_cert.resolve()),
                "HOTSLOT_CLIENT_KEY": str(c.client_key.resolve()), "HOTSLOT_CLIENT_TOKEN": c.admin_token,
            })
        return env

    def _spawn(self, name: str, service: str, args: list[str], index: int = 0) -> ServiceProcess:
        self.on_progress(f"starting {name}")
        full_args = [*args, "--shutdown-grace-s", str(self.spec.shutdown_grace_s), *self._security_args()]
        svc = spawn_service(
            service,
            full_args,
            log_path=self.spec.logs / f"{name}.log",
            env=self._env(name),
            host=self.spec.host,
            port=self._port(service, index),
            metrics_port=0 if self.spec.auto_ports else DEFAULT_METRICS_PORTS[service] + index,
        )
        self.services[name] = svc
        self._launches[name] = _Launch(service, full_args, RestartBudget(self.spec.restart, self._clock))
        return svc

    def _ready(self, name: str) -> ServiceProcess:
        svc = wait_ready(self.services[name], self.spec.start_timeout_s, self.client_security())
        self.on_progress(f"{name} serving on {svc.address}, metrics on {svc.metrics_url} (pid {svc.pid})")
        return svc

    def start(self) -> None:
        spec = self.spec
        spec.share.mkdir(parents=True, exist_ok=True)
        if spec.tls:
            self.credentials = certs.generate(spec.tls_dir, [spec.host], admin_token=spec.admin_token or None)
            self.on_progress(f"TLS: throwaway CA, certificates and tokens in {spec.tls_dir}")
        try:
            self._spawn("registry", "registry", [
                "--models-root", str(spec.share), "--database", str(spec.state_dir / "registry.db")])
            registry = self._ready("registry")
            self._spawn("storage-cache", "storage-cache", [
                "--backing-root", str(spec.share), "--cache-dir", str(spec.state_dir / "cache"),
                "--capacity-bytes", spec.cache_capacity, "--registry-address", registry.address])
            storage = self._ready("storage-cache")
            # Executors start together: each imports torch and spawns its preloader, the slow part of `up`.
            names = [f"executor-{i}" for i in range(spec.executors)]
            for i, name in enumerate(names):
                self._spawn(name, "executor", [
                    "--registry-address", registry.address, "--storage-address", storage.address,
                    "--device", spec.device, "--executor-id", name, *cpu_thread_args(spec), *spec.executor_args], i)
            for name in names:
                self._ready(name)
            self._spawn("router", "router", [
                "--registry-address", registry.address,
                "--executors", ",".join(e.address for e in self.executors)])
            self._ready("router")
        except BaseException:
            self.stop()
            raise
        (spec.state_dir / "cluster.json").write_text(json.dumps(self.endpoints(), indent=2) + "\n")
        if self.credentials is not None:
            env_file = spec.tls_dir / "client.env"
            env_file.write_text("".join(f"export {k}={v}\n" for k, v in self.client_env().items()))
            env_file.chmod(0o600)

    def stop(self) -> dict[str, int]:
        """SIGTERM to every service, router first (no new work), then executors, storage-cache and registry; each
        gets its shutdown grace, then SIGKILL. Returns the exit codes."""
        codes: dict[str, int] = {}
        order = ["router", *[n for n in self.services if n.startswith("executor")], "storage-cache", "registry"]
        for name in order:
            svc = self.services.get(name)
            if svc is not None:
                svc.send(signal.SIGTERM)
        for name in order:
            svc = self.services.pop(name, None)
            if svc is not None:
                codes[name] = svc.stop(None, timeout=self.spec.shutdown_grace_s + 10)
                self.on_progress(f"{name} stopped (exit {codes[name]})")
        (self.spec.state_dir / "cluster.json").unlink(missing_ok=True)
        return codes

    def dead(self) -> list[str]:
        return [name for name, svc in self.services.items() if not svc.alive()]

    # -- supervision -------------------------------------------------------------------------------------
    def supervise(self) -> None:
        """One round of supervision, called every fraction of a second while the cluster runs (from the main
        thread: restarts spawn processes). A service that exited is restarted after its backoff, on the port it
        had, with its output appended to the same log; the others keep serving. Reports each exit, restart and
        return through on_progress. Raises CrashLoop when a service exits again with its restart budget used up
        (the caller then stops the cluster)."""
        now = self._clock()
        for name, svc in list(self.services.items()):
            launch = self._launches[name]
            if launch.restart_at is not None:
                if now >= launch.restart_at:
                    self._restart(name, launch)
                continue
            if not svc.alive():
                self._exited(name, svc, launch, now)
            elif launch.starting_since is not None:
                self._check_started(name, svc, launch, now)

    def _exited(self, name: str, svc: ServiceProcess, launch: _Launch, now: float) -> None:
        how = describe_exit(svc.proc.returncode)
        policy = self.spec.restart
        delay = launch.budget.next_delay()
        if delay is None:
            raise CrashLoop(
                f"{name} exited ({how}) after {policy.max_restarts} restart{'' if policy.max_restarts == 1 else 's'} "
                f"within {policy.window_s:g} s; it keeps "
                f"crashing, so the cluster stops. Its log: {svc.log_path}"
            )
        launch.restarts += 1
        launch.starting_since = None
        launch.restart_at = now + delay
        self.on_progress(
            f"{name} (pid {svc.pid}) exited ({how}); restarting it on {svc.address} in {delay:g} s "
            f"(restart {launch.budget.recent()} of at most {policy.max_restarts} within {policy.window_s:g} s). "
            f"Its log: {svc.log_path}"
        )

    def _restart(self, name: str, launch: _Launch) -> None:
        old = self.services[name]
        with open(old.log_path, "ab") as log_file:
            log_file.write(f"\n---- hotslot up: {name} exited ({describe_exit(old.proc.returncode)}); "
                           f"restart {launch.restarts} ----\n".encode())
        # The same host and port: the router, executors and cluster.json address it there. A port picked with
        # --auto-ports is the one it bound first, kept for the life of `up`.
        # Its metrics port too, where scrapers look for it.
        metrics_port = urllib.parse.urlsplit(old.metrics_url).port if old.metrics_url else None
        svc = spawn_service(launch.service, launch.args, log_path=old.log_path, env=self._env(name),
                            host=old.host or self.spec.host, port=old.port, append=True,
                            metrics_port=METRICS_OFF if metrics_port is None else metrics_port)
        svc.host, svc.port, svc.metrics_url = old.host, old.port, old.metrics_url
        self.services[name] = svc
        launch.restart_at = None
        launch.starting_since = self._clock()
        self.on_progress(f"{name} restarted (pid {svc.pid})")

    def _check_started(self, name: str, svc: ServiceProcess, launch: _Launch, now: float) -> None:
        assert launch.starting_since is not None
        if LISTENING.search(svc.own_log()) and is_serving(svc.address, timeout=0.5, security=self.client_security()):
            launch.starting_since = None
            self.on_progress(f"{name} is back: serving on {svc.address} (pid {svc.pid})")
        elif now - launch.starting_since > self.spec.start_timeout_s:
            self.on_progress(f"{name} did not start within {self.spec.start_timeout_s:g} s; killing it")
            svc.proc.kill()
            svc.proc.wait(10)  # counted as an exit in the next round
