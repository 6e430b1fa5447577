"""Builds the registry from its settings: store, core, servicer, and the gRPC server around them."""
from __future__ import annotations

from hotslot.bootstrap.server import ServiceRegistration, run_server
from hotslot.registry.v1 import registry_service_pb2 as pb
from hotslot.registry.v1 import registry_service_pb2_grpc as pb_grpc

from .core import RegistryCore
from .servicer import RegistryServicer
from .settings import RegistrySettings
from .store import SQLiteModelStore

SERVICE_NAME = "registry"


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
