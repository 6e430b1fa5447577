"""Builds the router from its settings: executor membership, registry catalog, core, servicer, and the gRPC server
around them."""
from __future__ import annotations

import importlib.metadata
import logging
from typing import Annotated

import grpc_service_pb2_grpc as oip_grpc
from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from hotslot.bootstrap.channels import downstream_options, keepalive_options, reconnect_options
from hotslot.bootstrap.logging import configure_logging
from hotslot.bootstrap.metrics import MetricsEndpoint
from hotslot.bootstrap.security import service_channel
from hotslot.bootstrap.server import ServiceRegistration, run_server, service_resource_name
from hotslot.bootstrap.settings import ServiceSettings, metrics_port_field
from hotslot.router.v1 import router_service_pb2 as pb
from hotslot.router.v1 import router_service_pb2_grpc as pb_grpc

from .clients import GrpcExecutorConnector, GrpcModelCatalog
from .core import RouterCore
from .membership import ExecutorMembership, split_host_port
from .metrics import RouterMetrics
from .oip_frontend import InferenceFrontend
from .oip_servicer import SERVICE_FULL_NAME as OIP_SERVICE_NAME
from .oip_servicer import InferenceServicer
from .refusals import DEFAULT_REFUSAL_LOG_INTERVAL_S
from .servicer import RouterServicer

log = logging.getLogger(__name__)

SERVICE_NAME = "router"
DEFAULT_PORT = 50050
DEFAULT_METRICS_PORT = 9460


class RouterSettings(ServiceSettings):
    """Settings of the router (environment variables HOTSLOT_ROUTER_*)."""

    model_config = SettingsConfigDict(env_prefix="HOTSLOT_ROUTER_", extra="ignore")

    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="TCP port to listen on; 0 picks a free port.")
    metrics_port: int = metrics_port_field(DEFAULT_METRICS_PORT)
    executors: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Executor addresses, comma-separated host:port. Ones not up yet are retried until they are.",
    )
    executors_dns: str = Field(
        "",
        description="name:port whose every A/AAAA record is one executor (a Kubernetes headless Service); "
        "re-resolved every dns_refresh_s. Combines with `executors`.",
    )
    dns_refresh_s: float = Field(5.0, gt=0, description="Seconds between resolutions of executors_dns.")
    registry_address: str = Field(
        "127.0.0.1:50051",
        description="host:port of the model-registry for ListModels/GetModel and for refusing unknown models "
        "early; empty for none.",
    )
    registry_timeout_s: float = Field(10.0, gt=0, description="Deadline of each call to the registry.")
    max_queue: int = Field(
        256, ge=0, description="Requests that may wait in the router while every executor is full; beyond it "
        "RESOURCE_EXHAUSTED."
    )
    max_inflight_per_executor: int = Field(
        32, gt=0, description="Requests the router keeps outstanding on one executor at most."
    )
    queue_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait in the router queue before RESOURCE_EXHAUSTED (the client's "
        "deadline, if sooner, ends it first)."
    )
    retry_after_s: float = Field(
        1.0, ge=0, description="Delay suggested to clients (google.rpc.RetryInfo) when the router refuses work."
    )
    retry_attempts: int = Field(
        1, ge=0, description="Times a request is placed again on another executor when its executor dies or "
        "answers UNAVAILABLE; 0 turns retries off."
    )
    watch_backoff_s: float = Field(
        0.5, gt=0, description="First wait before reconnecting a broken executor status stream; doubles per failure."
    )
    watch_backoff_max_s: float = Field(
        10.0, gt=0, description="Longest wait between reconnection attempts; also bounds gRPC's own reconnect "
        "backoff on the executor channels, so an executor that comes back is followed again within this time."
    )
    keepalive_time_s: float = Field(
        10.0, gt=0, description="Interval of keepalive pings on each executor channel while it is quiet (status "
        "streams often are): an executor that stops answering without closing its connection (frozen, or its node "
        "gone) is dropped after keepalive_time_s + keepalive_timeout_s. Executors must accept pings this often "
        "(their keepalive_min_ping_interval_s)."
    )
    keepalive_timeout_s: float = Field(
        5.0, gt=0, description="Time a keepalive ping may go unanswered before the executor's connection is closed "
        "and its requests are retried elsewhere."
    )

    refusal_log_interval_s: float = Field(
        DEFAULT_REFUSAL_LOG_INTERVAL_S, gt=0, description="Requests refused with RESOURCE_EXHAUSTED are logged at most once per this many "
        "seconds per reason (router queue full, queue wait timed out, executor refused), with a count of the "
        "others."
    )

    @field_validator("executors", mode="before")
    @classmethod
    def _split_targets(cls, value: object) -> object:
        if isinstance(value, str):
            return [target.strip() for target in value.split(",") if target.strip()]
        return value

    @field_validator("executors")
    @classmethod
    def _check_targets(cls, value: list[str]) -> list[str]:
        for target in value:
            split_host_port(target)
        return value

    @field_validator("executors_dns")
    @classmethod
    def _check_dns_target(cls, value: str) -> str:
        if value:
            split_host_port(value)
        return value


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
