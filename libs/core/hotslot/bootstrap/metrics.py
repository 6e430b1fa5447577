"""OpenTelemetry metrics for every service, served in the Prometheus text format on a `/metrics` HTTP endpoint of
its own (`metrics_port`), and a gRPC server interceptor counting and timing every RPC by method and status code.
Service cores get a plain OpenTelemetry Meter (or a small metrics object built on one) through their constructors."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
import grpc.aio
from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from prometheus_client import CollectorRegistry, start_http_server

from hotslot.bootstrap.interceptors import split_method, wrap_handler
from hotslot.bootstrap.settings import format_address
from hotslot.metering import SECONDS_BUCKETS

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "hotslot.bootstrap"
METRICS_PATH = "/metrics"

class MetricsEndpoint:
    """One process's metrics: a MeterProvider whose instruments a Prometheus reader collects at every scrape (no
    background export), in a registry of its own (not prometheus_client's global one), and the HTTP server that
    answers the scrapes once `serve` is called."""

    def __init__(self, service_name: str) -> None:
        self.registry = CollectorRegistry()
        # Scope labels (otel_scope_name, ...) on every series would only repeat which module made the instrument.
        reader = PrometheusMetricReader(scope_info_enabled=False, registry=self.registry)
        self.provider = MeterProvider(
            metric_readers=[reader], resource=Resource.create({SERVICE_NAME: service_name})
        )
        self._httpd: WSGIServer | None = None
        self.port = 0

    def meter(self, name: str) -> metrics.Meter:
        return self.provider.get_meter(name)

    def serve(self, host: str, port: int) -> int:
        """Starts answering GET http://host:port/metrics (any path, in fact) on a daemon thread; port 0 picks a
        free one. Returns the bound port. Raises OSError when the port is taken."""
        httpd, _thread = start_http_server(port, host, registry=self.registry)
        self._httpd = httpd
        self.port = httpd.server_port
        return self.port

    def url(self, host: str) -> str:
        return f"http://{format_address(host, self.port)}{METRICS_PATH}"

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        self.provider.shutdown()


def _code_name(value: object) -> str:
    if value is None:
        return grpc.StatusCode.OK.name
    if isinstance(value, grpc.StatusCode):
        return value.name
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code.name
    return grpc.StatusCode.UNKNOWN.name


class MetricsServerInterceptor(grpc.aio.ServerInterceptor):
    """Counts each RPC when it ends (`hotslot_grpc_server_requests_total`) and records how long it took
    (`hotslot_grpc_server_duration_seconds`; a stream until its last message), both labelled by grpc_service,
    grpc_method and grpc_code, plus a gauge of RPCs in progress. Install it outside the error interceptor so it
    sees the code a domain error was mapped to."""

    def __init__(self, meter: metrics.Meter) -> None:
        self._requests = meter.create_counter(
            "hotslot_grpc_server_requests", unit="{request}",
            description="RPCs this server finished, by service, method and status code.",
        )
        self._duration = meter.create_histogram(
            "hotslot_grpc_server_duration", unit="s",
            description="Seconds from the start of an RPC to its status, by service, method and status code.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self._in_flight = meter.create_up_down_counter(
            "hotslot_grpc_server_in_flight", unit="{request}", description="RPCs in progress, by service and method."
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(handler_call_details.method)
        labels = {"grpc_service": service, "grpc_method": method}
        requests, duration, in_flight = self._requests, self._duration, self._in_flight

        @asynccontextmanager
        async def measured(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
            started = time.perf_counter()
            in_flight.add(1, labels)
            code: object = None
            try:
                yield
            except grpc.aio.AbortError:
                code = context.code()
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.UNKNOWN  # only without the error interceptor inside
                raise
            else:
                code = context.code()  # a handler may end the RPC with set_code() instead of raising
            finally:
                in_flight.add(-1, labels)
                attributes = {**labels, "grpc_code": _code_name(code)}
                requests.add(1, attributes)
                duration.record(time.perf_counter() - started, attributes)

        return wrap_handler(handler, measured)
