"""Builds the storage-cache from its settings: blob store, backing store, registry resolver, core, servicer, and the
gRPC server around them."""
from __future__ import annotations

from opentelemetry import trace

from hotslot.bootstrap.channels import downstream_options
from hotslot.bootstrap.logging import configure_logging
from hotslot.bootstrap.metrics import MetricsEndpoint
from hotslot.bootstrap.security import service_channel
from hotslot.bootstrap.server import ServiceRegistration, run_server, service_resource_name
from hotslot.storage.v1 import storage_cache_service_pb2 as pb
from hotslot.storage.v1 import storage_cache_service_pb2_grpc as pb_grpc

from .backing import BackingStore
from .blobstore import BlobStore
from .core import (
    StorageCacheCore,
)
from .metrics import StorageCacheMetrics
from .resolver import RegistryResolver
from .servicer import StorageCacheServicer
from .settings import StorageCacheSettings

SERVICE_NAME = "storage-cache"


def build_core(
    settings: StorageCacheSettings, tracer_provider: trace.TracerProvider | None = None,
    metrics: StorageCacheMetrics | None = None,
) -> tuple[StorageCacheCore, RegistryResolver]:
    """The core and its registry resolver (close both). Without `tracer_provider`, spans go to the global
    provider, which run_server installs before the first call."""
    settings.backing_root.mkdir(parents=True, exist_ok=True)
    security = settings.client_security()
    store = BlobStore(settings.cache_dir, int(settings.capacity_bytes), hash_chunk_bytes=int(settings.read_chunk_bytes))
    resolver = RegistryResolver(
        settings.registry_address,
        timeout_s=settings.registry_timeout_s,
        channel_factory=lambda address: service_channel(
            address, security=security, tracer_provider=tracer_provider,
            max_message_bytes=settings.max_message_bytes, options=downstream_options(settings),
        ),
    )
    core = StorageCacheCore(
        store,
        BackingStore(settings.backing_root),
        resolver,
        parallel_fetches=settings.parallel_fetches,
        read_chunk_bytes=int(settings.read_chunk_bytes),
        fsync=settings.fsync,
        lease_ttl_s=settings.lease_ttl_s,
        max_lease_ttl_s=settings.max_lease_ttl_s,
        tracer_provider=tracer_provider,
        metrics=metrics,
    )
    return core, resolver


def registrations(core: StorageCacheCore) -> list[ServiceRegistration]:
    return [
        ServiceRegistration.of(pb.DESCRIPTOR, "StorageCacheService", StorageCacheServicer(core), pb_grpc.add_StorageCacheServiceServicer_to_server)
    ]


async def serve(settings: StorageCacheSettings) -> None:
    # Before run_server (which configures it again): opening the store and verifying it log what they find.
    configure_logging(SERVICE_NAME, settings.log_level, settings.log_format)
    endpoint = MetricsEndpoint(service_resource_name(settings, SERVICE_NAME))
    core, resolver = build_core(settings, metrics=StorageCacheMetrics(endpoint.meter(__name__)))

    async def verify_before_serving(_port: int) -> None:
        # Runs with the port open and health NOT_SERVING, so probes see a live process that is not ready yet
        # (a long verification of a big cache must not look like a hang).
        await core.verify()

    try:
        await run_server(registrations(core), settings=settings, service_name=SERVICE_NAME,
                         on_started=verify_before_serving if settings.verify_on_start else None,
                         metrics_endpoint=endpoint)
    finally:
        await core.close()
        await resolver.close()
