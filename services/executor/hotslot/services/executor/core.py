"""Executor domain logic: a queue of generation requests served one pipeline call at a time on the device (first in,
first out, except that requests for held models may overtake loading ones within a budget, and compatible requests
for one model share a call: queue_policy), the hot-swap slot kept full by the preloader (looking ahead in the queue
so the next model loads while the current one computes), phase timings and spans recorded where each phase happens,
measured costs, and a versioned status for watchers. LoRA adapters are models in the host tier that a request
applies on its resident base (`lora`): they load beside the queue like models, and a request runs when its base
and its adapters are held. No grpc here.

`ExecutorCore` is the façade the servicer calls; the work is split by concern:
  scheduler    the queue and its worker: overtaking, batching, the swap, adapters on the call, denoise, encode
  preparation  single-flight loads to HOST/STANDBY, the lookahead, verified-read retries, readiness, preload
  leases       storage-cache leases renewed while held, released on eviction
  resolver     the registry's answers, cached; a request's model and adapters resolved and checked
  status       the lifecycle state, the status version, snapshots and watch
  jobs, records, spans, ports: the queue's data, the values handed out, span recording, the loader's Protocols"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from opentelemetry import trace

from hotslot.errors import InvalidArgument, NotFound, Reason
from hotslot.manifest import validate_model_id

from .costs import CostModel
from .downstream import ModelResolver, ViewProvider
from .generation import GenerationLimits, GenerationParams
from .jobs import Emit, RequestQueue
from .leases import Leases
from .metrics import ExecutorMetrics
from .ports import Loader, PreloaderHandle
from .preparation import DEFAULT_PRELOADER_RESTART_WAIT_S, Preparations
from .records import (
    LOAD_PHASES,
    PHASES,
    AdapterUse,
    AppliedAdapter,
    EvictOutcome,
    ExecutorSnapshot,
    ExecutorState,
    GenerateOutcome,
    HeldAdapter,
    LoadEvent,
    LoadPhase,
    PhaseTimes,
    PreloaderState,
    PreloadOutcome,
    QueuedState,
    QueueEntry,
    StepEvent,
)
from .resolver import KIND_LORA, KIND_PIPELINE, AdapterRef, CachingResolver
from .scheduler import DEFAULT_MAX_LOAD_ATTEMPTS, Scheduler
from .slots import ModelKey, SlotManager, Tier
from .spans import SpanRecorder
from .status import StatusBoard, StatusView

__all__ = [
    "KIND_LORA",
    "KIND_PIPELINE",
    "LOAD_PHASES",
    "DEFAULT_MAX_LOAD_ATTEMPTS",
    "PHASES",
    "AdapterUse",
    "AppliedAdapter",
    "EvictOutcome",
    "ExecutorCore",
    "ExecutorSnapshot",
    "ExecutorState",
    "GenerateOutcome",
    "HeldAdapter",
    "LoadEvent",
    "LoadPhase",
    "PhaseTimes",
    "PreloadOutcome",
    "PreloaderState",
    "QueueEntry",
    "QueuedState",
    "StepEvent",
]

log = logging.getLogger(__name__)


class ExecutorCore:
    def __init__(
        self,
        *,
        executor_id: str,
        address: str,
        device: str,
        loader: Loader,
        preloader: PreloaderHandle,
        slots: SlotManager,
        resolver: ModelResolver,
        views: ViewProvider,
        limits: GenerationLimits,
        queue_capacity: int,
        lookahead: bool = True,
        lease_ttl_s: float = 300.0,
        load_timeout_s: float = 1800.0,
        retry_after_s: float = 1.0,
        device_memory: Callable[[], tuple[int, int]] = lambda: (0, 0),
        resolve_cache_s: float = 5.0,
        max_overtake_s: float = 10.0,
        max_batch_images: int = 1,
        max_adapters: int = 4,
        preloader_restart_wait_s: float = DEFAULT_PRELOADER_RESTART_WAIT_S,
        max_load_attempts: int = DEFAULT_MAX_LOAD_ATTEMPTS,
        costs: CostModel | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        metrics: ExecutorMetrics | None = None,
    ) -> None:
        self.executor_id = executor_id
        self.address = address
        self.device = device
        self.loader = loader
        self.preloader = preloader
        self.slots = slots
        self.limits = limits
        self.costs = costs or CostModel()
        self.metrics = metrics or ExecutorMetrics()
        spans = SpanRecorder(trace.get_tracer(__name__, tracer_provider=tracer_provider))
        self.queue = RequestQueue()
        self.board = StatusBoard(self.queue, slots, self.metrics)
        self.leases = Leases(views, slots, lease_ttl_s)
        self.resolver = CachingResolver(resolver, slots, resolve_cache_s, max_adapters)
        self.preparations = Preparations(
            slots=slots, loader=loader, preloader=preloader, views=views, leases=self.leases, queue=self.queue,
            board=self.board, costs=self.costs, metrics=self.metrics, spans=spans, lookahead=lookahead,
            lease_ttl_s=lease_ttl_s, load_timeout_s=load_timeout_s, preloader_restart_wait_s=preloader_restart_wait_s,
        )
        self.scheduler = Scheduler(
            executor_id=executor_id, device=device, queue=self.queue, board=self.board,
            preparations=self.preparations, resolver=self.resolver, slots=slots, loader=loader, costs=self.costs,
            metrics=self.metrics, spans=spans, limits=limits, queue_capacity=queue_capacity,
            retry_after_s=retry_after_s, max_overtake_s=max_overtake_s, max_batch_images=max(1, max_batch_images),
            max_adapters=max_adapters, max_load_attempts=max_load_attempts,
        )
        self.view = StatusView(
            executor_id=executor_id, address=address, device=device, board=self.board, queue=self.queue,
            preparations=self.preparations, slots=slots, preloader=preloader, costs=self.costs, limits=limits,
            metrics=self.metrics, device_memory=device_memory, queue_capacity=queue_capacity,
            max_overtake_s=max_overtake_s, max_batch_images=max(1, max_batch_images), max_adapters=max_adapters,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.slots.on_evict = self.leases.on_evict  # a model that leaves releases its storage-cache lease
        self.slots.on_demote = lambda entry: self.loader.demote(entry.weights)

    def identify(self, executor_id: str, address: str) -> None:
        """Names this executor and the address routers dial, once its port is bound: in its answers and status."""
        self.executor_id = self.scheduler.executor_id = self.view.executor_id = executor_id
        self.address = self.view.address = address

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        seconds = await asyncio.to_thread(self.loader.warmup)
        log.info("imported pipeline classes in %.1f s", seconds)
        self._tasks = [
            asyncio.create_task(self.scheduler.worker(), name="executor-worker"),
            asyncio.create_task(self.leases.renew_forever(), name="executor-leases"),
            asyncio.create_task(self.view.watch_preloader(), name="executor-preloader-watch"),
        ]
        self.board.state = ExecutorState.READY
        self.board.changed()

    async def drain(self) -> None:
        """Stops taking requests (status DRAINING) so routers move away before the server stops."""
        self.board.state = ExecutorState.DRAINING
        self.board.changed()

    async def close(self) -> None:
        self.board.state = ExecutorState.DRAINING
        self.scheduler.shut()
        tasks = [*self._tasks, *self.leases.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self.preparations.cancel(), return_exceptions=True)
        for entry in self.slots.clear():
            log.debug("dropped %s on shutdown", entry.key)
        self.board.changed()

    # -- status ------------------------------------------------------------------------------------------
    def status(self) -> ExecutorSnapshot:
        return self.view.snapshot()

    def watch(self, min_interval_s: float = 0.0) -> AsyncIterator[ExecutorSnapshot]:
        """The current status, then a new one after every change, coalesced (StatusView.watch)."""
        return self.view.watch(min_interval_s)

    # -- requests ----------------------------------------------------------------------------------------
    async def generate(
        self,
        model_id: str,
        revision: int,
        params: GenerationParams,
        request_id: str = "",
        emit: Emit | None = None,
        adapters: Sequence[AdapterRef] = (),
    ) -> GenerateOutcome:
        """Queues one request and waits for it. `emit` receives LoadEvent/StepEvent objects on the event loop.
        `adapters`: (model id, revision, scale or None for 1.0) of LoRA adapters to apply on the model (or, when
        the model is itself an adapter, on its base after it). Cancelling the awaiting task (client cancel,
        deadline) stops denoising between steps."""
        return await self.scheduler.generate(model_id, revision, params, request_id, emit, adapters)

    async def preload(self, model_id: str, revision: int, target: int) -> PreloadOutcome:
        validate_model_id(model_id, "model.model_id")
        if target not in (Tier.STANDBY, Tier.HOST):
            raise InvalidArgument.field("target_tier", "must be TIER_STANDBY or TIER_HOST")
        tier = Tier(target)
        resolved = await self.resolver.resolve(model_id, revision)
        key = ModelKey(resolved.model_id, resolved.revision)
        self.slots.check_fits(key, resolved.total_bytes)
        base = None
        if resolved.kind == KIND_LORA:  # its weights go to the host tier; a pipeline loads them when a request runs
            base, tier = await self.resolver.adapter_base(resolved, model_id), Tier.HOST
        return await self.preparations.preload(key, tier, resolved.total_bytes,
                                               trace.set_span_in_context(trace.get_current_span()), base)

    async def evict(self, model_id: str, revision: int) -> EvictOutcome:
        """Drops every held revision of the model (only `revision` unless 0) that no request uses; marks the others,
        which the slot manager drops when their last request releases them."""
        validate_model_id(model_id, "model.model_id")
        entries = self.slots.find(model_id, revision)
        if not entries:
            raise NotFound(f"model {model_id!r} is not held by executor {self.executor_id}",
                           reason=Reason.MODEL_NOT_HELD)
        freed = pending = 0
        for entry in entries:
            if self.slots.evict(entry.key):
                freed += entry.size_bytes
            else:
                pending += entry.size_bytes
        self.board.changed()
        return EvictOutcome(freed, pending)
