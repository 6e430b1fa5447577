"""gRPC adapter of the router: converts the public router.v1 messages to core calls, and the executors' and the
registry's (internal) messages the core passes back into router.v1 messages; nothing else."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from hotslot.registry.v1 import registry_service_pb2 as registry_pb
from hotslot.router.v1 import router_service_pb2 as pb
from hotslot.router.v1 import router_service_pb2_grpc as pb_grpc

from .core import ClusterStatus, EvictAnswer, Preloaded, Routed, RouterCore
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
    """The executor's answer with the attempts and the placement reason; the router's own queue wait is added to the
    `queue` phase, which covers the executor's and the router's queues."""
    result = routed.result
    response = pb.GenerateResponse(
        images=result.images,
        model=result.model,
        tier=result.tier,
        timings=result.timings,
        executor_id=result.executor_id,
        request_id=result.request_id,
        batch_requests=result.batch_requests,
        adapters=[pb.AppliedAdapter(model=a.model, scale=a.scale, tier=a.tier) for a in result.adapters],
        attempted_executor_ids=routed.attempted_executor_ids,
        placement_reason=f"PLACEMENT_REASON_{routed.placement_reason.name}",
    )
    if routed.router_queue_s > 0:
        queue = response.timings.queue
        queue.FromNanoseconds(queue.ToNanoseconds() + int(routed.router_queue_s * 1e9))
    return response


def stream_event_to_proto(event: ProgressEvent | Routed) -> pb.GenerateStreamResponse:
    if isinstance(event, Routed):
        return pb.GenerateStreamResponse(result=routed_to_proto(event))
    payload = event.payload
    if event.kind == "load":
        return pb.GenerateStreamResponse(load=pb.LoadProgress(
            phase=payload.phase, bytes_done=payload.bytes_done, bytes_total=payload.bytes_total,
            queue_position=payload.queue_position))
    return pb.GenerateStreamResponse(step=pb.StepProgress(
        step=payload.step, total_steps=payload.total_steps, elapsed=payload.elapsed))


def preloaded_to_proto(preloaded: Preloaded) -> pb.PreloadResponse:
    return pb.PreloadResponse(replicas=[
        pb.PreloadReplica(executor_id=r.executor_id, model=r.result.model, tier=r.result.tier,
                          from_tier=r.result.from_tier, timings=r.result.timings)
        for r in preloaded.replicas
    ])


_EVICT_OUTCOMES = {
    "EVICTED": pb.EVICT_OUTCOME_EVICTED,
    "MARKED": pb.EVICT_OUTCOME_MARKED,
    "NOT_HELD": pb.EVICT_OUTCOME_NOT_HELD,
    "FAILED": pb.EVICT_OUTCOME_FAILED,
}


def evicted_to_proto(answers: list[EvictAnswer]) -> pb.EvictResponse:
    return pb.EvictResponse(results=[
        pb.EvictResult(executor_id=a.executor_id, outcome=_EVICT_OUTCOMES[a.outcome.name], freed_bytes=a.freed_bytes,
                       pending_bytes=a.pending_bytes, message=a.message)
        for a in answers
    ])


def list_request_to_registry(request: pb.ListModelsRequest) -> registry_pb.ListModelsRequest:
    return registry_pb.ListModelsRequest(
        page_size=request.page_size, page_token=request.page_token, kind=request.kind, labels=dict(request.labels)
    )


def model_to_proto(model: Any) -> pb.Model:
    """A registry Model as the public router.v1 Model (the source directory on the models root stays internal)."""
    return pb.Model(
        model_id=model.model_id, revision=model.revision, kind=model.kind, base_model_id=model.base_model_id,
        labels=dict(model.labels), manifest=model.manifest, create_time=model.create_time,
    )


def executor_status_to_proto(status: Any) -> pb.ExecutorStatus:
    """An executor's ExecutorStatus as the public view: without its placement inputs (costs, queue, version)."""
    preloader = status.preloader
    return pb.ExecutorStatus(
        executor_id=status.executor_id,
        address=status.address,
        state=status.state,
        device=status.device,
        models=[pb.HeldModel(model=m.model, tier=m.tier, size_bytes=m.size_bytes, ref_count=m.ref_count,
                             evicting=m.evicting, unique_bytes=m.unique_bytes, shared_bytes=m.shared_bytes)
                for m in status.models],
        adapters=[pb.HeldAdapter(model=a.model, base=a.base, tier=a.tier, size_bytes=a.size_bytes,
                                 ref_count=a.ref_count) for a in status.adapters],
        tiers=[pb.TierUsage(tier=t.tier, used_bytes=t.used_bytes, budget_bytes=t.budget_bytes) for t in status.tiers],
        queue_depth=status.queue_depth,
        queue_capacity=status.queue_capacity,
        device_memory_total_bytes=status.device_memory_total_bytes,
        device_memory_used_bytes=status.device_memory_used_bytes,
        max_adapters=status.max_adapters,
        preloader=pb.PreloaderStatus(
            pid=preloader.pid, alive=preloader.alive, restarts=preloader.restarts,
            loading=preloader.loading if preloader.HasField("loading") else None,
        ),
    )


def cluster_status_to_proto(status: ClusterStatus) -> pb.GetClusterStatusResponse:
    return pb.GetClusterStatusResponse(
        executors=[executor_status_to_proto(e) for e in status.executors],
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
        page = await self.core.list_models(list_request_to_registry(request))
        return pb.ListModelsResponse(models=[model_to_proto(m) for m in page.models],
                                     next_page_token=page.next_page_token)

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=model_to_proto(await self.core.get_model(request.model_id, request.revision)))

    async def Preload(self, request: pb.PreloadRequest, context) -> pb.PreloadResponse:
        preloaded = await self.core.preload(
            request.model.model_id, request.model.revision, request.replicas, context.time_remaining()
        )
        return preloaded_to_proto(preloaded)

    async def Evict(self, request: pb.EvictRequest, context) -> pb.EvictResponse:
        answers = await self.core.evict(
            request.model.model_id, request.model.revision, request.executor_id, context.time_remaining()
        )
        return evicted_to_proto(answers)

    async def GetClusterStatus(self, request: pb.GetClusterStatusRequest, context) -> pb.GetClusterStatusResponse:
        return cluster_status_to_proto(self.core.cluster_status())
