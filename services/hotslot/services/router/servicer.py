"""gRPC adapter of the router: converts protobuf to core calls and back, nothing else."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from hotslot.router.v1 import router_service_pb2 as pb
from hotslot.router.v1 import router_service_pb2_grpc as pb_grpc

from .core import ClusterStatus, Preloaded, Routed, RouterCore
from .downstream import GenerateCall, ProgressEvent
from .placement import RequestWork


def generate_call(request: pb.GenerateRequest | pb.GenerateStreamRequest) -> GenerateCall:
    params = request.params
    return GenerateCall(
        model_id=request.model.model_id,
        revision=request.model.revision,
        params=params,
        request_id=request.request_id,
        work=RequestWork(steps=params.steps, width=params.width, height=params.height, num_images=params.num_images),
        adapters=tuple(request.adapters),
    )


def routed_to_proto(routed: Routed) -> pb.GenerateResponse:
    """The executor's answer wrapped with the attempts; the router's own queue wait is added to the `queue`
    phase, which covers the executor's and the router's queues."""
    response = pb.GenerateResponse(
        result=routed.result,
        attempted_executor_ids=routed.attempted_executor_ids,
        placement_reason=pb.PlacementReason.Value(f"PLACEMENT_REASON_{routed.placement_reason.name}"),
    )
    if routed.router_queue_s > 0:
        queue = response.result.timings.queue
        queue.FromNanoseconds(queue.ToNanoseconds() + int(routed.router_queue_s * 1e9))
    return response


def stream_event_to_proto(event: ProgressEvent | Routed) -> pb.GenerateStreamResponse:
    if isinstance(event, Routed):
        return pb.GenerateStreamResponse(result=routed_to_proto(event))
    return pb.GenerateStreamResponse(**{event.kind: event.payload})


def preloaded_to_proto(preloaded: Preloaded) -> pb.PreloadResponse:
    return pb.PreloadResponse(
        executor_id=preloaded.executor_id,
        result=preloaded.result,
        replicas=[pb.PreloadReplica(executor_id=r.executor_id, result=r.result) for r in preloaded.replicas],
    )


def cluster_status_to_proto(status: ClusterStatus) -> pb.GetClusterStatusResponse:
    return pb.GetClusterStatusResponse(
        executors=status.executors,
        router_queue_depth=status.router_queue_depth,
        unreachable_addresses=status.unreachable_addresses,
    )


class RouterServicer(pb_grpc.RouterServiceServicer):
    def __init__(self, core: RouterCore) -> None:
        self.core = core

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        return routed_to_proto(await self.core.generate(generate_call(request), context.time_remaining()))

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        events = self.core.generate_stream(generate_call(request), context.time_remaining())
        async with contextlib.aclosing(events):
            async for event in events:
                yield stream_event_to_proto(event)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(response=await self.core.list_models(request.request))

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=await self.core.get_model(request.model_id, request.revision))

    async def Preload(self, request: pb.PreloadRequest, context) -> pb.PreloadResponse:
        preloaded = await self.core.preload(
            request.model.model_id, request.model.revision, request.replicas, context.time_remaining()
        )
        return preloaded_to_proto(preloaded)

    async def GetClusterStatus(self, request: pb.GetClusterStatusRequest, context) -> pb.GetClusterStatusResponse:
        return cluster_status_to_proto(self.core.cluster_status())
