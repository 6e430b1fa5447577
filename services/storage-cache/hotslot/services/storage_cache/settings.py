"""Settings of the storage-cache (environment variables HOTSLOT_STORAGE_CACHE_*)."""
from __future__ import annotations

from pathlib import Path

from pydantic import ByteSize, Field, field_validator
from pydantic_settings import SettingsConfigDict

from hotslot.bootstrap.settings import ServiceSettings, metrics_port_field

from .core import (
    DEFAULT_LEASE_TTL_S,
    DEFAULT_MAX_LEASE_TTL_S,
    DEFAULT_PARALLEL_FETCHES,
    DEFAULT_READ_CHUNK_BYTES,
)

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
