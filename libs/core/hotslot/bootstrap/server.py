"""The gRPC server every service runs: its servicers plus health and reflection, tracing and error mapping
around every call, and a graceful shutdown on SIGTERM/SIGINT (health NOT_SERVING first, then a bounded grace)."""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from opentelemetry import metrics, trace

from hotslot.bootstrap.channels import server_keepalive_options
from hotslot.bootstrap.inflight import InflightCalls
from hotslot.bootstrap.interceptors import ErrorMappingInterceptor
from hotslot.bootstrap.logging import configure_logging
from hotslot.bootstrap.metrics import MetricsEndpoint, MetricsServerInterceptor
from hotslot.bootstrap.reflection import enable_reflection
from hotslot.bootstrap.security import TokenAuthInterceptor, TokenTable, server_credentials
from hotslot.bootstrap.settings import METRICS_OFF, ServiceSettings, format_address
from hotslot.bootstrap.telemetry import (
    INSTRUMENTATION_NAME,
    TracingServerInterceptor,
    configure_tracing,
    message_size_options,
    shutdown_tracing,
)

log = logging.getLogger(__name__)

HealthServicer = health_aio.HealthServicer

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class ServiceRegistration:
    """One gRPC service a server hosts."""

    full_name: str
    """Fully-qualified service name, e.g. pb.DESCRIPTOR.services_by_name["RegistryService"].full_name; the name
    health and reflection report it under."""
    servicer: object
    add_to_server: Callable[[object, grpc.aio.Server], None]
    """The generated add_<Service>Servicer_to_server."""

    @classmethod
    def of(
        cls, file: FileDescriptor, service: str, servicer: object,
        add_to_server: Callable[[object, grpc.aio.Server], None],
    ) -> ServiceRegistration:
        """The registration of `service` (its short name) declared in a generated module's file, e.g.
        ServiceRegistration.of(pb.DESCRIPTOR, "RegistryService", servicer, pb_grpc.add_RegistryServiceServicer_to_server)."""
        return cls(file.services_by_name[service].full_name, servicer, add_to_server)


async def create_server(
    address: str,
    registrations: list[ServiceRegistration],
    *,
    settings: ServiceSettings,
    tracer_provider: trace.TracerProvider | None = None,
    meter: metrics.Meter | None = None,
    inflight: InflightCalls | None = None,
) -> tuple[grpc.aio.Server, int, HealthServicer]:
    """Builds (does not start) a server bound to `address` ("127.0.0.1:0" or "[::]:0" picks a free port) hosting
    `registrations`, the grpc.health.v1 service (SERVING for "" and each service) and reflection (v1 and v1alpha,
    with the contracts' comments). With `meter`, every RPC is counted and timed on it. With `inflight`, every call
    is tracked there (shutdown ends the ones still running with UNAVAILABLE). Returns the server, the bound port
    and the health servicer."""
    # Tracing first, so errors are mapped while the server span is current and land on it; metrics outside the
    # token check and the error mapping, so they count refusals and the status code a domain error became; the
    # in-flight tracker innermost, so the UNAVAILABLE it ends a call with is seen by all of them.
    interceptors: list[grpc.aio.ServerInterceptor] = [TracingServerInterceptor(tracer_provider)]
    if meter is not None:
        interceptors.append(MetricsServerInterceptor(meter))
    if settings.tokens_file is not None:
        # Before anything reaches the servicer.
        interceptors.append(TokenAuthInterceptor(TokenTable(settings.tokens_file)))
    interceptors.append(ErrorMappingInterceptor())
    if inflight is not None:
        interceptors.append(inflight)
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            *message_size_options(settings.max_message_bytes),
            *server_keepalive_options(settings.keepalive_min_ping_interval_s),
        ],
    )
    names = [registration.full_name for registration in registrations]
    for registration in registrations:
        registration.add_to_server(registration.servicer, server)

    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (health.OVERALL_HEALTH, *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    enable_reflection([*names, health.SERVICE_NAME], server)

    tls = settings.server_tls()
    try:
        port = server.add_secure_port(address, server_credentials(tls)) if tls else server.add_insecure_port(address)
    except RuntimeError as error:
        raise OSError(f"cannot listen on {address}: {error}") from error
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port, health_servicer


def create_health_server(address: str, health_servicer: HealthServicer) -> tuple[grpc.aio.Server, int]:
    """A plaintext server of grpc.health.v1 alone, sharing `health_servicer` with the main server (so it turns
    NOT_SERVING with it): for probes that cannot speak TLS. It answers nothing else, so it needs no token."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:
        raise OSError(f"cannot listen on {address} (health port): {error}") from error
    return server, port


async def run_server(
    registrations: list[ServiceRegistration],
    *,
    settings: ServiceSettings,
    service_name: str,
    on_started: Callable[[int], Awaitable[None] | None] | None = None,
    on_shutdown: Iterable[Callable[[], Awaitable[None] | None]] = (),
    tracer_provider: trace.TracerProvider | None = None,
    metrics_endpoint: MetricsEndpoint | None = None,
) -> None:
    """Serves `registrations` until SIGTERM or SIGINT, then shuts down gracefully.

    Logs `hotslot <service_name> listening on <host>:<port>` at INFO once the port is bound (launchers parse it)
    and calls `on_started(port)`. On the first signal: every health status turns NOT_SERVING (load balancers stop
    sending), the `on_shutdown` hooks run in order (e.g. end watch streams so they do not hold the grace), then
    in-flight RPCs get `settings.shutdown_grace_s`; those still running `settings.shutdown_abort_margin_s` before
    its end are ended with UNAVAILABLE and a RetryInfo detail, so clients retry them elsewhere (what gRPC cuts at
    the end of the grace gets CANCELLED). A second signal cancels them now.
    With `on_started`, health reports NOT_SERVING until that hook returns (a startup step such as warming up).

    Configures logging from `settings`. Without `tracer_provider` it builds one from the OTEL_* variables, makes
    it the global provider (so core code using trace.get_tracer() is exported) and flushes it at the end; a
    provider passed in is used as is and left to the caller.

    Metrics: unless `settings.metrics_port` is -1, the Prometheus endpoint of `metrics_endpoint` (one is made when
    none is given: a service whose core records metrics makes it first and passes it) is served on
    host:metrics_port before the gRPC port opens, logged as `hotslot <service_name> metrics on http://...`, and
    closed at the end; every RPC is counted and timed on it."""
    configure_logging(service_name, settings.log_level, settings.log_format)
    if metrics_endpoint is None:
        metrics_endpoint = MetricsEndpoint(service_resource_name(settings, service_name))
    meter = None
    if settings.metrics_port != METRICS_OFF:
        try:
            metrics_endpoint.serve(settings.host, settings.metrics_port)
        except OSError as error:
            metrics_endpoint.close()
            raise OSError(f"cannot listen for metrics on {format_address(settings.host, settings.metrics_port)}: "
                          f"{error}") from error
        log.info("hotslot %s metrics on %s", service_name, metrics_endpoint.url(settings.host))
        meter = metrics_endpoint.meter(INSTRUMENTATION_NAME)
    owns_provider = tracer_provider is None
    if tracer_provider is None:
        tracer_provider = configure_tracing(service_resource_name(settings, service_name))
        trace.set_tracer_provider(tracer_provider)

    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    stop_now = asyncio.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if not stop_requested.is_set():
            log.info("%s received; shutting down (grace %.1f s)", name, settings.shutdown_grace_s)
            stop_requested.set()
        else:
            log.warning("%s received again; cancelling in-flight RPCs now", name)
            stop_now.set()

    installed: list[signal.Signals] = []
    inflight = InflightCalls()
    try:
        server, port, health_servicer = await create_server(
            settings.address, registrations, settings=settings, tracer_provider=tracer_provider, meter=meter,
            inflight=inflight,
        )
        health_server = None
        if settings.health_port is not None:
            health_server, health_port = create_health_server(
                format_address(settings.host, settings.health_port), health_servicer
            )
            await health_server.start()
            log.info("hotslot %s health (plaintext) on %s", service_name, format_address(settings.host, health_port))
        for signum in _SIGNALS:
            try:
                loop.add_signal_handler(signum, on_signal, signum)
                installed.append(signum)
            except (NotImplementedError, RuntimeError, ValueError):
                # Not the main thread, or a platform without loop signal handlers: whoever runs us stops us.
                log.debug("cannot handle %s here; relying on cancellation", signal.Signals(signum).name)

        names = [health.OVERALL_HEALTH, *(r.full_name for r in registrations)]
        try:
            if on_started is not None:
                # Not ready until the startup hook is done: health says NOT_SERVING meanwhile, so launchers and
                # Kubernetes readiness probes wait (the port is open and logged, for launchers that parse it).
                for name in names:
                    await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            await server.start()
            log.info("hotslot %s listening on %s", service_name, format_address(settings.host, port))
            if on_started is not None:
                result = on_started(port)
                if inspect.isawaitable(result):
                    await result
                for name in names:
                    await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
                log.info("hotslot %s ready", service_name)
            # Not raced against server.wait_for_termination(): cancelling that cancels the server's own
            # shutdown future, and the server.stop() below then fails with CancelledError.
            await stop_requested.wait()
        finally:
            await _shut_down(server, health_servicer, list(on_shutdown), settings.shutdown_grace_s, stop_now,
                             inflight=inflight, abort_margin_s=settings.shutdown_abort_margin_s)
            if health_server is not None:
                await health_server.stop(None)
            log.info("hotslot %s stopped", service_name)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        if owns_provider:
            shutdown_tracing(tracer_provider)
        metrics_endpoint.close()


def service_resource_name(settings: ServiceSettings, service_name: str) -> str:
    """service.name of the process's traces and metrics: the setting, else OTEL_SERVICE_NAME, else hotslot-<service>."""
    return settings.otel_service_name or os.environ.get("OTEL_SERVICE_NAME") or f"hotslot-{service_name}"


async def _run_hooks(hooks: list[Callable[[], Awaitable[None] | None]]) -> None:
    for hook in hooks:
        try:
            result = hook()
            if inspect.isawaitable(result):
                await result
        except Exception:
            # One failing hook must not keep the others (or the server's stop) from running.
            log.exception("shutdown hook %r failed", hook)


async def _shut_down(
    server: grpc.aio.Server,
    health_servicer: HealthServicer,
    hooks: list[Callable[[], Awaitable[None] | None]],
    grace_s: float,
    stop_now: asyncio.Event,
    *,
    inflight: InflightCalls | None = None,
    abort_margin_s: float = 0.0,
) -> None:
    """NOT_SERVING first (so balancers stop sending while we still answer), then the hooks, then server.stop(grace).
    `abort_margin_s` before the grace ends, the calls `inflight` still tracks are ended with UNAVAILABLE +
    RetryInfo. `stop_now` (the second signal) or cancellation of our task cuts the hooks and the grace short: a
    second server.stop(None) while the graceful one waits cancels the in-flight RPCs at once."""
    await health_servicer.enter_graceful_shutdown()
    hurry = asyncio.ensure_future(stop_now.wait())
    graceful: asyncio.Future[None] | None = None
    try:
        hooks_done = asyncio.ensure_future(_run_hooks(hooks))
        try:
            await asyncio.wait({hooks_done, hurry}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not hooks_done.done():
                log.warning("shutdown hooks cut short")
                hooks_done.cancel()
        graceful = asyncio.ensure_future(server.stop(grace_s))
        if inflight is not None:
            ending_at = max(0.0, grace_s - abort_margin_s)
            await asyncio.wait({graceful, hurry}, timeout=ending_at, return_when=asyncio.FIRST_COMPLETED)
            if not graceful.done() and not hurry.done():
                ended = inflight.end_all()
                if ended:
                    log.warning("%d call(s) still running %.1f s into the shutdown grace: ending them with "
                                "UNAVAILABLE so their clients retry elsewhere", ended, ending_at)
        await asyncio.wait({graceful, hurry}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hurry.cancel()
        if graceful is None or not graceful.done():
            await server.stop(None)
        if graceful is not None:
            await graceful


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Runs `main()` on a fresh event loop: the entry point of a service's CLI command."""
    asyncio.run(main())
