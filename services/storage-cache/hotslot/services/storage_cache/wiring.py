"""Builds the storage-cache from its settings: blob store, backing store, registry resolver, core, servicer, and the
gRPC server around them."""
from __future__ import annotations

from pathlib import Path

from opentelemetry import trace
from pydantic import ByteSize, Field, field_validator
from pydantic_settings import SettingsConfigDict

from hotslot.bootstrap.channels import downstream_options
from hotslot.bootstrap.logging import configure_logging
from hotslot.bootstrap.metrics import MetricsEndpoint
from hotslot.bootstrap.security import service_channel
from hotslot.bootstrap.server import ServiceRegistration, run_server, service_resource_name
from hotslot.bootstrap.settings import ServiceSettings, metrics_port_field
from hotslot.storage.v1 import storage_cache_service_pb2 as pb
from hotslot.storage.v1 import storage_cache_service_pb2_grpc as pb_grpc

from .backing import BackingStore
from .blobstore import BlobStore
from .core import (
    DEFAULT_LEASE_TTL_S,
    DEFAULT_MAX_LEASE_TTL_S,
    DEFAULT_PARALLEL_FETCHES,
    DEFAULT_READ_CHUNK_BYTES,
    StorageCacheCore,
)
from .metrics import StorageCacheMetrics
from .resolver import RegistryResolver
from .servicer import StorageCacheServicer

SERVICE_NAME = "storage-cache"
DEFAULT_PORT = 50052
DEFAULT_METRICS_PORT = 9462
DEFAULT_CAPACITY_BYTES = 20 * 1024**3


class StorageCacheSettings(ServiceSettings):
    """Settings of the storage-cache (environment variables HOTSLOT_STORAGE_CACHE_*). Byte sizes take plain
    numbers or units: 8MiB, 50GiB, 1.5GB."""

    model_config = SettingsConfigDict(env_prefix="HOTSLOT_STORAGE_CACHE_", extra="ignore")

    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="TCP port to listen on; 0 picks a free port.")
    metrics_port: int = metrics_port_field(DEFAULT_METRICS_PORT)
    backing_root: Path = Field(
        Path(".hotslot/share"),
        description="Root of the shared backing store (the NFS mount); the same share as the registry's "
        "models_root. Model sources and upload paths are relative to it.",
    )
    cache_dir: Path = Field(
        Path(".hotslot/cache"),
        description="Node-local directory of blobs, views and temp files; created if missing. Use a local disk.",
    )
    capacity_bytes: ByteSize = Field(
        ByteSize(DEFAULT_CAPACITY_BYTES),
        description="Bytes of blobs the cache may hold; least recently used unpinned blobs are evicted beyond it.",
    )
    parallel_fetches: int = Field(
        DEFAULT_PARALLEL_FETCHES, gt=0, description="Files copied from the backing store at once, over all Ensures."
    )
    read_chunk_bytes: ByteSize = Field(
        ByteSize(DEFAULT_READ_CHUNK_BYTES),
        description="Size of each chunk a fetch copies from the backing store and hashes (in the kernel where "
        "the filesystems allow, else read into one of three buffers of this size per running fetch).",
    )
    fsync: bool = Field(
        True,
        description="fsync every blob and upload before it becomes visible, so a crash never leaves a named "
        "file with missing data. Turn off only on throwaway caches.",
    )
    registry_address: str = Field(
        "127.0.0.1:50051",
        description="host:port of the model-registry, used to resolve model references; empty to accept "
        "explicit manifests only.",
    )
    registry_timeout_s: float = Field(10.0, gt=0, description="Deadline of each registry lookup.")
    lease_ttl_s: float = Field(
        DEFAULT_LEASE_TTL_S, gt=0, description="Lease duration when Pin (or Ensure's pin_ttl) gives none."
    )
    max_lease_ttl_s: float = Field(
        DEFAULT_MAX_LEASE_TTL_S, gt=0, description="Longest lease a client may ask for; longer ones are refused."
    )
    verify_on_start: bool = Field(
        False, description="Re-hash every blob before serving and drop those that do not match (slow on big caches)."
    )

    @field_validator("capacity_bytes", "read_chunk_bytes")
    @classmethod
    def _positive(cls, value: ByteSize, info) -> ByteSize:
        if value <= 0:
            hint = "e.g. 8MiB"
            if info.field_name == "capacity_bytes":
                hint = "the bytes of local disk the cache may use, e.g. 50GiB"
            raise ValueError(f"must be greater than 0: {hint}")
        return value


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
