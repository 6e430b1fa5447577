"""Builds the registry from its settings: store, core, servicer, and the gRPC server around them."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from hotslot.bootstrap.server import ServiceRegistration, run_server
from hotslot.bootstrap.settings import ServiceSettings, metrics_port_field
from hotslot.registry.v1 import registry_service_pb2 as pb
from hotslot.registry.v1 import registry_service_pb2_grpc as pb_grpc

from .core import RegistryCore
from .servicer import RegistryServicer
from .store import SQLiteModelStore

SERVICE_NAME = "registry"
DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9461


class RegistrySettings(ServiceSettings):
    """Settings of the model-registry (environment variables HOTSLOT_REGISTRY_*)."""

    model_config = SettingsConfigDict(env_prefix="HOTSLOT_REGISTRY_", extra="ignore")

    port: int = Field(DEFAULT_PORT, description="TCP port to listen on; 0 picks a free port.")
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


def build_core(settings: RegistrySettings) -> RegistryCore:
    settings.models_root.mkdir(parents=True, exist_ok=True)
    store = SQLiteModelStore(settings.database)
    return RegistryCore(
        store,
        settings.models_root,
        hash_chunk_bytes=settings.hash_chunk_bytes,
        default_page_size=settings.default_page_size,
        max_page_size=settings.max_page_size,
        watch_queue_size=settings.watch_queue_size,
    )


def registrations(core: RegistryCore) -> list[ServiceRegistration]:
    return [
        ServiceRegistration.of(pb.DESCRIPTOR, "RegistryService", RegistryServicer(core), pb_grpc.add_RegistryServiceServicer_to_server)
    ]


async def serve(settings: RegistrySettings) -> None:
    core = build_core(settings)

    async def close() -> None:
        core.close_watchers()

    try:
        await run_server(registrations(core), settings=settings, service_name=SERVICE_NAME, on_shutdown=[close])
    finally:
        core.store.close()
