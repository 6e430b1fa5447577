"""Settings of the model-registry (environment variables HOTSLOT_REGISTRY_*)."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from hotslot.bootstrap.settings import ServiceSettings, metrics_port_field

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9461


class RegistrySettings(ServiceSettings):
    """Settings of the model-registry (environment variables HOTSLOT_REGISTRY_*)."""

    model_config = SettingsConfigDict(env_prefix="HOTSLOT_REGISTRY_", extra="ignore")

    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="TCP port to listen on; 0 picks a free port.")
    metrics_port: int = metrics_port_field(DEFAULT_METRICS_PORT)
    models_root: Path = Field(
        Path(".hotslot/share"),
        description="Root of the shared model store (the NFS mount). Sources are given relative to it.",
    )
    database: Path = Field(
        Path(".hotslot/registry.db"), description="SQLite database file; created with its directory if missing."
    )
    hash_chunk_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="Read size when hashing model files (bounds memory per file)."
    )
    default_page_size: int = Field(100, gt=0, description="ListModels page size when the request gives none.")
    max_page_size: int = Field(1000, gt=0, description="Largest ListModels page; bigger requests are capped.")
    watch_queue_size: int = Field(
        1024, gt=0, description="Changes buffered per WatchModels stream before a slow watcher is cut off."
    )
