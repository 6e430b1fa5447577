"""gRPC adapter of the registry: converts protobuf to core calls and back, nothing else."""
from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf.timestamp_pb2 import Timestamp

from hotslot.convert import kind_from_proto, kind_to_proto, manifest_to_proto
from hotslot.registry.v1 import registry_service_pb2 as pb
from hotslot.registry.v1 import registry_service_pb2_grpc as pb_grpc

from .core import RegistryCore
from .store import ModelRecord

_EVENT_TYPES = {
    "EXISTING": pb.MODEL_EVENT_TYPE_EXISTING,
    "SYNCED": pb.MODEL_EVENT_TYPE_SYNCED,
    "REGISTERED": pb.MODEL_EVENT_TYPE_REGISTERED,
    "DELETED": pb.MODEL_EVENT_TYPE_DELETED,
}


def model_to_proto(record: ModelRecord) -> pb.Model:
    created = Timestamp()
    created.FromNanoseconds(int(record.create_time * 1e9))
    return pb.Model(
        model_id=record.model_id,
        revision=record.revision,
        kind=kind_to_proto(record.kind),
        base_model_id=record.base_model_id,
        labels=record.labels,
        source=record.source,
        manifest=manifest_to_proto(record.manifest),
        create_time=created,
    )


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    def __init__(self, core: RegistryCore) -> None:
        self.core = core

    async def RegisterModel(self, request: pb.RegisterModelRequest, context) -> pb.RegisterModelResponse:
        record, created = await self.core.register(
            model_id=request.model_id,
            kind=kind_from_proto(request.kind) or "",
            base_model_id=request.base_model_id,
            source=request.source,
            labels=dict(request.labels),
        )
        return pb.RegisterModelResponse(model=model_to_proto(record), created=created)

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.GetModelResponse:
        record = await self.core.get(request.model_id, request.revision)
        return pb.GetModelResponse(model=model_to_proto(record))

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        page = await self.core.list(
            request.page_size, request.page_token, kind_from_proto(request.kind), dict(request.labels)
        )
        return pb.ListModelsResponse(
            models=[model_to_proto(m) for m in page.models], next_page_token=page.next_page_token
        )

    async def DeleteModel(self, request: pb.DeleteModelRequest, context) -> pb.DeleteModelResponse:
        return pb.DeleteModelResponse(deleted_revisions=await self.core.delete(request.model_id))

    async def WatchModels(self, request: pb.WatchModelsRequest, context) -> AsyncIterator[pb.WatchModelsResponse]:
        async for event in self.core.watch(kind_from_proto(request.kind)):
            yield pb.WatchModelsResponse(
                type=_EVENT_TYPES[event.type],
                model=model_to_proto(event.model) if event.model is not None else None,
            )
