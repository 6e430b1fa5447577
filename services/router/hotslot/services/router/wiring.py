"""Builds the router from its settings: executor membership, registry catalog, core, servicer, and the gRPC server
around them."""
from __future__ import annotations

import importlib.metadata
import logging

import grpc_service_pb2_grpc as oip_grpc

from hotslot.bootstrap.channels import downstream_options, keepalive_options, reconnect_options
from hotslot.bootstrap.logging import configure_logging
from hotslot.bootstrap.metrics import MetricsEndpoint
from hotslot.bootstrap.security import service_channel
from hotslot.bootstrap.server import ServiceRegistration, run_server, service_resource_name
from hotslot.router.v1 import router_service_pb2 as pb
from hotslot.router.v1 import router_service_pb2_grpc as pb_grpc

from .clients import GrpcExecutorConnector, GrpcModelCatalog
from .core import RouterCore
from .membership import ExecutorMembership
from .metrics import RouterMetrics
from .oip_frontend import InferenceFrontend
from .oip_servicer import SERVICE_FULL_NAME as OIP_SERVICE_NAME
from .oip_servicer import InferenceServicer
from .servicer import RouterServicer
from .settings import RouterSettings

log = logging.getLogger(__name__)

SERVICE_NAME = "router"


def build(
    settings: RouterSettings, metrics: RouterMetrics | None = None
) -> tuple[RouterCore, ExecutorMembership, GrpcModelCatalog | None]:
    """Must run with the event loop running (the executor channels are made as targets are added)."""

    security = settings.client_security()

    def channel(address: str):
        # tracer_provider None: the global one run_server installs, looked up when the first call is made.
        return service_channel(address, security=security, tracer_provider=None,
                               max_message_bytes=settings.max_message_bytes, options=downstream_options(settings))

    def executor_channel(address: str):
        # gRPC's own reconnect backoff follows the watch backoff, so a restarted executor is followed again
        # within watch_backoff_max_s; keepalive notices one that stopped answering.
        return service_channel(address, security=security, tracer_provider=None,
                               max_message_bytes=settings.max_message_bytes,
                               options=[*reconnect_options(settings.watch_backoff_s, settings.watch_backoff_max_s),
                                        *keepalive_options(settings.keepalive_time_s, settings.keepalive_timeout_s)])

    membership = ExecutorMembership(
        GrpcExecutorConnector(executor_channel),
        static_targets=settings.executors,
        dns_target=settings.executors_dns,
        dns_refresh_s=settings.dns_refresh_s,
        watch_backoff_s=settings.watch_backoff_s,
        watch_backoff_max_s=settings.watch_backoff_max_s,
    )
    catalog = None
    if settings.registry_address:
        catalog = GrpcModelCatalog(
            settings.registry_address, timeout_s=settings.registry_timeout_s, channel_factory=channel
        )
    core = RouterCore(
        membership,
        catalog,
        max_queue=settings.max_queue,
        max_inflight_per_executor=settings.max_inflight_per_executor,
        queue_timeout_s=settings.queue_timeout_s,
        retry_after_s=settings.retry_after_s,
        retry_attempts=settings.retry_attempts,
        metrics=metrics,
        refusal_log_interval_s=settings.refusal_log_interval_s,
    )
    return core, membership, catalog


def registrations(core: RouterCore) -> list[ServiceRegistration]:
    return [
        ServiceRegistration.of(pb.DESCRIPTOR, "RouterService", RouterServicer(core), pb_grpc.add_RouterServiceServicer_to_server),
        # The Open Inference Protocol (KServe v2 / Triton clients) on the same port.
        ServiceRegistration(
            full_name=OIP_SERVICE_NAME,
            servicer=InferenceServicer(InferenceFrontend(core, server_version=_version())),
            add_to_server=oip_grpc.add_GRPCInferenceServiceServicer_to_server,
        ),
    ]


def _version() -> str:
    try:
        return importlib.metadata.version("hotslot-router")  # its own distribution: installed without `hotslot` too
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        return "0+unknown"


async def serve(settings: RouterSettings) -> None:
    # Before run_server (which configures it again): membership logs the targets it starts following.
    configure_logging(SERVICE_NAME, settings.log_level, settings.log_format)
    if not settings.executors and not settings.executors_dns:
        log.warning("no executors configured (executors / executors_dns): every Generate will be UNAVAILABLE")
    endpoint = MetricsEndpoint(service_resource_name(settings, SERVICE_NAME))
    core, membership, catalog = build(settings, RouterMetrics(endpoint.meter(__name__)))
    try:
        await membership.start()
        await run_server(registrations(core), settings=settings, service_name=SERVICE_NAME,
                         metrics_endpoint=endpoint)
    finally:
        # After the server stopped: requests still in flight during the grace need their executor channels.
        await membership.close()
        if catalog is not None:
            await catalog.close()
