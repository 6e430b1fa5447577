"""gRPC adapter of the executor: converts protobuf to core calls and back, nothing else."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

from google.protobuf.duration_pb2 import Duration

from hotslot.common.v1 import common_pb2
from hotslot.executor.v1 import executor_service_pb2 as pb
from hotslot.executor.v1 import executor_service_pb2_grpc as pb_grpc

from .core import (
    AdapterUse,
    ExecutorCore,
    ExecutorSnapshot,
    ExecutorState,
    GenerateOutcome,
    LoadEvent,
    LoadPhase,
    PhaseTimes,
    QueueEntry,
    StepEvent,
)
from .costs import CostSnapshot
from .generation import GenerationParams
from .slots import Tier


def _tier(tier: Tier) -> common_pb2.Tier:
    """The slots' tier as the proto enum (the same numbers; the generated stubs type enum fields by their class)."""
    return cast(common_pb2.Tier, int(tier))


def _load_phase(phase: LoadPhase) -> common_pb2.LoadPhase:
    """hotslot.tiers.LoadPhase as the proto enum (the same numbers)."""
    return cast(common_pb2.LoadPhase, int(phase))


def _state(state: ExecutorState) -> common_pb2.ExecutorState:
    """hotslot.tiers.ExecutorState as the proto enum (the same numbers)."""
    return cast(common_pb2.ExecutorState, int(state))


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def params_from_proto(p: common_pb2.GenerationParams) -> GenerationParams:
    return GenerationParams(
        prompt=p.prompt, negative_prompt=p.negative_prompt, steps=p.steps,
        guidance_scale=p.guidance_scale if p.HasField("guidance_scale") else None,
        width=p.width, height=p.height, seed=p.seed if p.HasField("seed") else None, num_images=p.num_images,
    )


def adapters_from_proto(adapters) -> list[tuple[str, int, float | None]]:
    """AdapterRef messages -> (model id, revision, scale or None when unset: 1.0)."""
    return [(a.model.model_id, a.model.revision, a.scale if a.HasField("scale") else None) for a in adapters]


def ref_to_proto(key) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(model_id=key.model_id, revision=key.revision)


def adapter_use_to_proto(use: AdapterUse) -> common_pb2.AdapterRef:
    return common_pb2.AdapterRef(model=ref_to_proto(use.key), scale=use.scale)


def timings_to_proto(t: PhaseTimes) -> common_pb2.PhaseTimings:
    return common_pb2.PhaseTimings(
        queue=duration(t.queue), ensure=duration(t.ensure), read=duration(t.read),
        materialize=duration(t.materialize), swap=duration(t.swap), denoise=duration(t.denoise),
        encode=duration(t.encode), total=duration(t.total),
    )


def outcome_to_proto(o: GenerateOutcome) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        images=[common_pb2.Image(data=png, mime_type="image/png", width=w, height=h, seed=seed)
                for png, w, h, seed in o.images],
        model=common_pb2.ModelRef(model_id=o.key.model_id, revision=o.key.revision),
        tier=_tier(o.tier),
        timings=timings_to_proto(o.timings),
        executor_id=o.executor_id,
        request_id=o.request_id,
        batch_requests=o.batch_requests,
        adapters=[pb.AppliedAdapter(model=ref_to_proto(a.key), scale=a.scale, tier=_tier(a.tier)) for a in o.adapters],
    )


def event_to_proto(event) -> pb.GenerateStreamResponse:
    if isinstance(event, LoadEvent):
        return pb.GenerateStreamResponse(load=pb.LoadProgress(
            phase=_load_phase(event.phase), bytes_done=event.bytes_done, bytes_total=event.bytes_total,
            queue_position=event.queue_position))
    assert isinstance(event, StepEvent)
    return pb.GenerateStreamResponse(step=pb.StepProgress(
        step=event.step, total_steps=event.total_steps, elapsed=duration(event.elapsed_s)))


def status_to_proto(s: ExecutorSnapshot) -> pb.ExecutorStatus:
    return pb.ExecutorStatus(
        executor_id=s.executor_id,
        address=s.address,
        state=_state(s.state),
        device=s.device,
        models=[pb.HeldModel(model=common_pb2.ModelRef(model_id=m.key.model_id, revision=m.key.revision),
                             tier=_tier(m.tier), size_bytes=m.size_bytes, ref_count=m.refs, evicting=m.evicting,
                             unique_bytes=m.unique_bytes, shared_bytes=m.shared_bytes)
                for m in s.models],
        tiers=[pb.TierUsage(tier=_tier(t.tier), used_bytes=t.used_bytes, budget_bytes=t.budget_bytes) for t in s.tiers],
        queue_depth=s.queue_depth,
        queue_capacity=s.queue_capacity,
        device_memory_total_bytes=s.device_memory_total,
        device_memory_used_bytes=s.device_memory_used,
        preloader=pb.PreloaderStatus(
            pid=s.preloader.pid, alive=s.preloader.alive, restarts=s.preloader.restarts,
            loading=common_pb2.ModelRef(model_id=s.preloader.loading.model_id, revision=s.preloader.loading.revision)
            if s.preloader.loading else None),
        version=s.version,
        queue=[queued_to_proto(q) for q in s.queue],
        costs=costs_to_proto(s.costs) if s.costs else None,
        adapters=[pb.HeldAdapter(model=ref_to_proto(a.key), base=ref_to_proto(a.base), tier=_tier(a.tier),
                                 size_bytes=a.size_bytes, ref_count=a.refs) for a in s.adapters],
        max_adapters=s.max_adapters,
    )


def queued_to_proto(q: QueueEntry) -> pb.QueuedRequest:
    return pb.QueuedRequest(
        request_id=q.request_id, model=common_pb2.ModelRef(model_id=q.key.model_id, revision=q.key.revision),
        state=cast(pb.QueuedState, int(q.state)), waited=duration(q.waited_s), overtaken=duration(q.overtaken_s), num_images=q.num_images,
        adapters=[adapter_use_to_proto(a) for a in q.adapters])


def costs_to_proto(c: CostSnapshot) -> pb.CostEstimates:
    return pb.CostEstimates(
        seconds_per_work_unit=c.seconds_per_work_unit, seconds_per_request=c.seconds_per_request,
        backlog_seconds=c.backlog_seconds,
        load_costs=[pb.TierCost(tier=_tier(tier), fixed_seconds=line.fixed, seconds_per_gib=line.per_unit,
                                samples=line.samples) for tier, line in c.load_costs.items()],
        default_steps=c.default_steps, default_width=c.default_width, default_height=c.default_height,
    )


class ExecutorServicer(pb_grpc.ExecutorServiceServicer):
    def __init__(self, core: ExecutorCore, status_min_interval_s: float = 0.0) -> None:
        self.core = core
        self.status_min_interval_s = status_min_interval_s

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        outcome = await self.core.generate(request.model.model_id, request.model.revision,
                                           params_from_proto(request.params), request.request_id,
                                           adapters=adapters_from_proto(request.adapters))
        return outcome_to_proto(outcome)

    async def GenerateStream(self, request: pb.GenerateStreamRequest, context) -> AsyncIterator[pb.GenerateStreamResponse]:
        events: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self.core.generate(
            request.model.model_id, request.model.revision, params_from_proto(request.params), request.request_id,
            emit=events.put_nowait, adapters=adapters_from_proto(request.adapters)))
        try:
            while not (task.done() and events.empty()):
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield event_to_proto(getter.result())
                else:
                    getter.cancel()
            yield pb.GenerateStreamResponse(result=outcome_to_proto(task.result()))
        finally:
            task.cancel()

    async def Preload(self, request: pb.PreloadRequest, context) -> pb.PreloadResponse:
        o = await self.core.preload(request.model.model_id, request.model.revision,
                                    request.target_tier or Tier.STANDBY)
        return pb.PreloadResponse(model=common_pb2.ModelRef(model_id=o.key.model_id, revision=o.key.revision),
                                  tier=_tier(o.tier), from_tier=_tier(o.from_tier), timings=timings_to_proto(o.timings))

    async def Evict(self, request: pb.EvictRequest, context) -> pb.EvictResponse:
        evicted = await self.core.evict(request.model.model_id, request.model.revision)
        return pb.EvictResponse(freed_bytes=evicted.freed_bytes, pending_bytes=evicted.pending_bytes)

    async def GetStatus(self, request: pb.GetStatusRequest, context) -> pb.GetStatusResponse:
        return pb.GetStatusResponse(status=status_to_proto(self.core.status()))

    async def WatchStatus(self, request: pb.WatchStatusRequest, context) -> AsyncIterator[pb.WatchStatusResponse]:
        async for snapshot in self.core.watch(self.status_min_interval_s):
            yield pb.WatchStatusResponse(status=status_to_proto(snapshot))
