"""Executor domain logic: a queue of generation requests served one pipeline call at a time on the device (first in,
first out, except that requests for held models may overtake loading ones within a budget, and compatible requests
for one model share a call: queue_policy), the hot-swap slot kept full by the preloader (looking ahead in the queue
so the next model loads while the current one computes), phase timings and spans recorded where each phase happens,
measured costs, and a versioned status for watchers. LoRA adapters are models in the host tier that a request
applies on its resident base (`lora`): they load beside the queue like models, and a request runs when its base
and its adapters are held. No grpc here."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import PurePath
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from hotslot.errors import (
    Cancelled,
    CorruptRead,
    FieldViolation,
    HotslotError,
    InvalidArgument,
    NotFound,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from hotslot.manifest import validate_model_id
from hotslot.request_ids import validate_request_id

from .costs import LOAD_TIERS, CostModel, CostSnapshot, work_units
from .downstream import EnsuredView, ModelResolver, ViewProvider
from .generation import GenerationLimits, GenerationParams, run_batch, validate
from .lora import adapter_name, loaded_adapters, loaded_weights
from .metrics import ExecutorMetrics
from .queue_policy import Plan, plan_next, service_order
from .slots import HeldModel, ModelKey, SlotEntry, SlotManager, Tier, TierUsage

log = logging.getLogger(__name__)

PHASES = ("queue", "ensure", "read", "materialize", "swap", "denoise", "encode")
LOAD_PHASES = ("ensure", "read", "materialize")
KIND_PIPELINE, KIND_LORA = "DIFFUSERS_PIPELINE", "LORA_ADAPTER"
# Loads one request may start for its model before it gives up: a model evicted between its load and its turn
# (the tier budgets too small for the traffic) is loaded again, but not forever.
MAX_LOAD_ATTEMPTS = 3


def _check_adapter_refs(adapters: Sequence[tuple[str, int, float | None]], max_adapters: int) -> None:
    """Refuses malformed adapter references before anything is resolved, every violation at once."""
    bad: list[FieldViolation] = []
    if len(adapters) > max_adapters:
        bad.append(FieldViolation("adapters", f"names {len(adapters)} LoRA adapters; this executor applies at most "
                                              f"{max_adapters}"))
    for i, (adapter_id, adapter_revision, scale) in enumerate(adapters):
        try:
            validate_model_id(adapter_id, f"adapters[{i}].model.model_id")
        except InvalidArgument as err:
            bad.extend(err.violations or [FieldViolation(f"adapters[{i}].model.model_id", err.message)])
        if adapter_revision < 0:
            bad.append(FieldViolation(f"adapters[{i}].model.revision", "must be >= 0 (0 means the latest)"))
        if scale is not None and not math.isfinite(scale):
            bad.append(FieldViolation(f"adapters[{i}].scale", f"is {scale}; use a finite number"))
    if bad:
        raise InvalidArgument("; ".join(f"{v.field} {v.description}" for v in bad), bad)


class QueuedState(enum.IntEnum):
    # Values match hotslot.executor.v1.QueuedState.
    RUNNING = 1
    READY = 2
    LOADING = 3
    WAITING = 4


@dataclass(frozen=True)
class AdapterUse:
    """One LoRA adapter a request applies: its resolved key and scale (equal uses can share a pipeline call)."""

    key: ModelKey
    scale: float


@dataclass(frozen=True)
class AppliedAdapter:
    key: ModelKey
    scale: float
    tier: Tier  # where its weights were when the request ran (ACTIVE/STANDBY: already loaded in the pipeline)


@dataclass(frozen=True)
class HeldAdapter:
    key: ModelKey
    base: ModelKey
    tier: Tier  # HOST, or the tier of its base's pipeline when loaded in it
    size_bytes: int
    refs: int


@dataclass(frozen=True)
class QueueEntry:
    request_id: str
    key: ModelKey
    state: QueuedState
    waited_s: float
    overtaken_s: float
    num_images: int
    adapters: tuple[AdapterUse, ...] = ()


@dataclass
class PhaseTimes:
    queue: float = 0.0
    ensure: float = 0.0
    read: float = 0.0
    materialize: float = 0.0
    swap: float = 0.0
    denoise: float = 0.0
    encode: float = 0.0
    total: float = 0.0


class ExecutorState(StrEnum):
    """Lifecycle of an executor (hotslot.common.v1.ExecutorState)."""

    STARTING = "STARTING"
    READY = "READY"
    DRAINING = "DRAINING"


class LoadPhase(StrEnum):
    """Phase of a load as LoadProgress reports it (hotslot.common.v1.LoadPhase); the values are the span names."""

    QUEUED = "queued"
    ENSURE = "ensure"
    READ = "read"
    MATERIALIZE = "materialize"
    SWAP = "swap"


@dataclass(frozen=True)
class EvictOutcome:
    freed_bytes: int
    """Released now."""
    pending_bytes: int
    """Of models in use, marked: released when their last request ends."""


@dataclass(frozen=True)
class LoadEvent:
    phase: LoadPhase
    bytes_done: int = 0
    bytes_total: int = 0
    queue_position: int = 0


@dataclass(frozen=True)
class StepEvent:
    step: int
    total_steps: int
    elapsed_s: float


@dataclass
class GenerateOutcome:
    images: list[tuple[bytes, int, int, int]]
    key: ModelKey
    tier: Tier
    timings: PhaseTimes
    executor_id: str
    request_id: str
    batch_requests: int = 1
    adapters: list[AppliedAdapter] = field(default_factory=list)


@dataclass
class PreloadOutcome:
    key: ModelKey
    tier: Tier
    from_tier: Tier
    timings: PhaseTimes


@dataclass(frozen=True)
class PreloaderState:
    pid: int
    alive: bool
    restarts: int
    loading: ModelKey | None


@dataclass(frozen=True)
class ExecutorSnapshot:
    executor_id: str
    address: str
    state: ExecutorState
    device: str
    models: list[HeldModel]
    tiers: list[TierUsage]
    queue_depth: int
    queue_capacity: int
    device_memory_total: int
    device_memory_used: int
    preloader: PreloaderState
    version: int
    queue: list[QueueEntry] = field(default_factory=list)
    costs: CostSnapshot | None = None
    adapters: list[HeldAdapter] = field(default_factory=list)
    max_adapters: int = 0


@dataclass(eq=False)
class _Job:
    request_id: str
    key: ModelKey
    params: GenerationParams
    total_bytes: int
    emit: Callable[[Any], None]
    enqueued_at: float = field(default_factory=time.perf_counter)
    enqueued_ns: int = field(default_factory=time.time_ns)
    stop: threading.Event = field(default_factory=threading.Event)
    future: asyncio.Future | None = None
    context: Any = None
    overtaken_s: float = 0.0  # charged by the calls that overtook it
    front_at: float | None = None  # perf_counter when it first was the head (or ran)
    preps: list[_Preparation] = field(default_factory=list)  # the loads it waited for as the head
    adapters: tuple[AdapterUse, ...] = ()  # applied on `key`, in order
    applied: list[AppliedAdapter] = field(default_factory=list)  # set when it runs


@dataclass(eq=False)
class _Preparation:
    """One model being brought to HOST or STANDBY, shared by everyone who needs it (single-flight)."""

    key: ModelKey
    target: Tier
    task: asyncio.Task | None = None
    phase: LoadPhase = LoadPhase.ENSURE
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)  # phase -> (start, end) perf_counter
    from_tier: Tier = Tier.BACKING_STORE
    pipeline: Any = None  # kept when the standby budget could not hold it, so a waiting request can use it
    total_bytes: int = 0
    started_at: float = field(default_factory=time.perf_counter)
    base: ModelKey | None = None  # a LoRA adapter's load (to HOST): the pipeline it applies to


class ExecutorCore:
    def __init__(
        self,
        *,
        executor_id: str,
        address: str,
        device: str,
        loader: Any,  # loader.ModelLoader (read/materialize/demote; blocking)
        preloader: Any,  # hotslot.loading.preloader.Preloader, for status
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
        self.resolver = resolver
        self.views = views
        self.limits = limits
        self.queue_capacity = queue_capacity
        self.lookahead = lookahead
        self.lease_ttl_s = lease_ttl_s
        self.load_timeout_s = load_timeout_s
        self.retry_after_s = retry_after_s
        self._device_memory = device_memory
        self.resolve_cache_s = resolve_cache_s
        self.max_overtake_s = max_overtake_s
        self.max_batch_images = max(1, max_batch_images)
        self.max_adapters = max_adapters
        self.costs = costs or CostModel()
        self._resolved: dict[tuple[str, int], tuple[Any, float]] = {}
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        self.metrics = metrics or ExecutorMetrics()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._wake = asyncio.Event()
        self._running: list[_Job] = []  # the requests of the pipeline call on the device now
        self._run_started = 0.0
        self._preparing: dict[ModelKey, _Preparation] = {}
        self._state = ExecutorState.STARTING
        self._version = 0
        self._changed_event = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._preloader_seen: tuple = ()
        self.slots.on_evict = self._on_evict  # a model that leaves releases its storage-cache lease
        self.slots.on_demote = lambda entry: self.loader.demote(entry.weights)

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        warm = getattr(self.loader, "warmup", None)
        if warm is not None:
            seconds = await asyncio.to_thread(warm)
            log.info("imported pipeline classes in %.1f s", seconds)
        self._tasks = [
            asyncio.create_task(self._worker(), name="executor-worker"),
            asyncio.create_task(self._renew_leases(), name="executor-leases"),
            asyncio.create_task(self._watch_preloader(), name="executor-preloader-watch"),
        ]
        self._state = ExecutorState.READY
        self._changed()

    async def drain(self) -> None:
        """Stops taking requests (status DRAINING) so routers move away before the server stops."""
        self._state = ExecutorState.DRAINING
        self._changed()

    async def close(self) -> None:
        self._state = ExecutorState.DRAINING
        for job in list(self._waiting):
            job.stop.set()
            if job.future and not job.future.done():
                job.future.set_exception(Unavailable("executor is shutting down; retry on another executor"))
        self._waiting.clear()
        for task in self._tasks:
            task.cancel()
        for prep in list(self._preparing.values()):
            if prep.task:
                prep.task.cancel()
        await asyncio.gather(*self._tasks, *(p.task for p in self._preparing.values() if p.task),
                             return_exceptions=True)
        for entry in self.slots.clear():
            log.debug("dropped %s on shutdown", entry.key)
        self._changed()

    # -- status ------------------------------------------------------------------------------------------
    def _changed(self) -> None:
        self._wake.set()  # the worker plans again: a model became ready, a request left, a load ended
        self._version += 1
        self.metrics.state(len(self._waiting) + len(self._running), self.slots.usage())
        self._changed_event.set()
        self._changed_event = asyncio.Event()

    def status(self) -> ExecutorSnapshot:
        total, used = self._device_memory()
        loading = next(iter(self._preparing), None)
        return ExecutorSnapshot(
            executor_id=self.executor_id,
            address=self.address,
            state=self._state,
            device=self.device,
            models=self.slots.held(),
            tiers=self.slots.usage(),
            queue_depth=len(self._waiting) + len(self._running),
            queue_capacity=self.queue_capacity,
            device_memory_total=total,
            device_memory_used=used,
            preloader=PreloaderState(
                pid=self.preloader.pid or 0,
                alive=self.preloader.is_alive(),
                restarts=getattr(self.preloader, "restarts", 0),
                loading=loading,
            ),
            version=self._version,
            queue=self._queue_entries(),
            costs=self._cost_snapshot(),
            adapters=self._held_adapters(),
            max_adapters=self.max_adapters,
        )

    def _held_adapters(self) -> list[HeldAdapter]:
        out = []
        for entry in self.slots.adapters():
            base = self.slots.get(entry.base) if entry.base else None
            in_pipeline = (base is not None and base.pipeline is not None
                           and loaded_weights(base.pipeline, adapter_name(entry.key)) is entry.weights)
            out.append(HeldAdapter(entry.key, entry.base, base.tier if in_pipeline else Tier.HOST,
                                   entry.size_bytes, entry.refs))
        return out

    def _service_order(self) -> list[_Job]:
        return service_order([j for j in self._waiting if not j.stop.is_set()], ready=self._ready,
                             call_seconds=self.costs.call_seconds, max_overtake_s=self.max_overtake_s,
                             max_batch_images=self.max_batch_images)

    def _queue_entries(self) -> list[QueueEntry]:
        now = time.perf_counter()

        def state(job: _Job) -> QueuedState:
            if self._ready(job):
                return QueuedState.READY
            return QueuedState.LOADING if job.key in self._preparing else QueuedState.WAITING

        return [QueueEntry(j.request_id, j.key, QueuedState.RUNNING if running else state(j), now - j.enqueued_at,
                           j.overtaken_s, j.params.num_images, j.adapters)
                for running, jobs in ((True, self._running), (False, self._service_order())) for j in jobs]

    def _cost_snapshot(self) -> CostSnapshot:
        """The fitted costs, and the backlog: the running call's estimated remainder, the loads the waiting requests
        still need (the one under way less what it has done), and each waiting request's service time."""
        now = time.perf_counter()
        backlog = 0.0
        if self._running:
            backlog += max(0.0, (self.costs.call_seconds([j.params for j in self._running]) or 0.0)
                           - (now - self._run_started))
        loads: dict[ModelKey, float] = {}
        for job in self._waiting:
            if job.stop.is_set():
                continue
            backlog += self.costs.call_seconds([job.params]) or 0.0
            if job.key in loads or self._ready(job):
                continue
            prep = self._preparing.get(job.key)
            if prep is not None:
                loads[job.key] = max(0.0, self.costs.load_seconds(prep.from_tier, job.total_bytes)
                                     - (now - prep.started_at))
            else:
                tier = self.slots.tier_of(job.key)
                if tier is None:  # not held: from the backing store unless only local-disk loads were measured
                    tier = Tier.LOCAL_DISK if not self.costs.load(Tier.BACKING_STORE).samples else Tier.BACKING_STORE
                loads[job.key] = self.costs.load_seconds(tier, job.total_bytes)
        service = self.costs.service
        return CostSnapshot(
            seconds_per_work_unit=service.per_unit, seconds_per_request=service.fixed,
            backlog_seconds=backlog + sum(loads.values()),
            load_costs={tier: self.costs.load(tier) for tier in LOAD_TIERS},
            default_steps=self.limits.default_steps, default_width=self.limits.default_width,
            default_height=self.limits.default_height,
        )

    async def watch(self, min_interval_s: float = 0.0) -> AsyncIterator[ExecutorSnapshot]:
        """The current status, then a new one after every change. Coalesced: a slow watcher gets the latest, and
        updates are at least `min_interval_s` apart, so the burst of changes one request makes (queued, running,
        swapped, done) costs the router one or two messages instead of five."""
        loop = asyncio.get_running_loop()
        while True:
            event = self._changed_event
            sent = loop.time()
            yield self.status()
            await event.wait()
            wait = min_interval_s - (loop.time() - sent)
            if wait > 0:
                await asyncio.sleep(wait)

    # -- generate ----------------------------------------------------------------------------------------
    async def generate(
        self,
        model_id: str,
        revision: int,
        params: GenerationParams,
        request_id: str = "",
        emit: Callable[[Any], None] | None = None,
        adapters: Sequence[tuple[str, int, float | None]] = (),
    ) -> GenerateOutcome:
        """Queues one request and waits for it. `emit` receives LoadEvent/StepEvent objects on the event loop.
        `adapters`: (model id, revision, scale or None for 1.0) of LoRA adapters to apply on the model (or, when
        the model is itself an adapter, on its base after it). Cancelling the awaiting task (client cancel,
        deadline) stops denoising between steps."""
        if self._state != ExecutorState.READY:
            raise Unavailable(f"executor {self.executor_id} is {self._state.lower()}; retry on another executor")
        validate_model_id(model_id, "model.model_id")
        validate_request_id(request_id)
        if revision < 0:
            raise InvalidArgument.field("model.revision", "must be >= 0 (0 means the latest)")
        _check_adapter_refs(adapters, self.max_adapters)
        params = validate(params, self.limits)
        if len(self._waiting) >= self.queue_capacity:
            raise ResourceExhausted(
                f"executor {self.executor_id} has {len(self._waiting)} requests waiting (capacity "
                f"{self.queue_capacity}); retry later or on another executor",
                retry_after_s=self.retry_after_s,
                reason=Reason.QUEUE_FULL,
            )
        resolved, uses = await self._resolve_request(model_id, revision, adapters)
        key = ModelKey(resolved.model_id, resolved.revision)
        self.slots.check_fits(key, resolved.total_bytes)
        loop = asyncio.get_running_loop()
        job = _Job(
            request_id=request_id or uuid.uuid4().hex[:16],
            key=key,
            params=params,
            total_bytes=resolved.total_bytes,
            emit=emit or (lambda event: None),
            future=loop.create_future(),
            context=trace.set_span_in_context(trace.get_current_span()),
            adapters=tuple(AdapterUse(k, scale) for k, scale, _ in uses),
        )
        # Mark the outcome as seen even when the caller has gone (cancelled), so asyncio does not warn about it.
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        if len(self._waiting) >= self.queue_capacity:  # re-check: the registry call yielded
            raise ResourceExhausted(
                f"executor {self.executor_id} queue is full ({self.queue_capacity}); retry later",
                retry_after_s=self.retry_after_s,
                reason=Reason.QUEUE_FULL,
            )
        self._waiting.append(job)
        job.emit(LoadEvent(LoadPhase.QUEUED, queue_position=len(self._waiting)))
        for adapter_key, _, size in uses:  # small: read now, beside the queue, so the head never waits for them
            if self.slots.get(adapter_key) is None and adapter_key not in self._preparing:
                job.preps.append(self._start_preparation(adapter_key, Tier.HOST, size, job.context, base=key))
        self._wake.set()
        self._changed()
        self._kick_lookahead()
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.stop.set()
            if job in self._waiting:
                self._waiting.remove(job)
            self._changed()  # the worker plans again without it (and a batch it is in may stop)
            raise

    async def _resolve_request(self, model_id: str, revision: int, adapters: Sequence[tuple[str, int, float | None]]):
        """The base pipeline a request runs on and its adapters as (key, scale, bytes): the model itself first when
        it is an adapter. Refuses adapters that are not LoRA adapters, on another base, or on a base that is not a
        pipeline (InvalidArgument)."""
        resolved = await self._resolve(model_id, revision)
        uses: list[tuple[ModelKey, float, int]] = []
        if resolved.kind == KIND_LORA:
            uses.append((ModelKey(resolved.model_id, resolved.revision), 1.0, resolved.total_bytes))
            base_id = resolved.base_model_id
            resolved = await self._resolve(base_id, 0)
            if resolved.kind and resolved.kind != KIND_PIPELINE:
                raise InvalidArgument.field("model.model_id", f"the base {base_id!r} of LoRA adapter {model_id!r} is a "
                                                              f"{resolved.kind}, not a {KIND_PIPELINE}")
        elif resolved.kind and resolved.kind != KIND_PIPELINE:
            raise InvalidArgument.field(
                "model.model_id", f"{model_id!r} is a {resolved.kind}; generate with a {KIND_PIPELINE} model"
            )
        for i, (adapter_id, adapter_revision, scale) in enumerate(adapters):
            field_name = f"adapters[{i}].model.model_id"
            adapter = await self._resolve(adapter_id, adapter_revision)
            if adapter.kind != KIND_LORA:
                raise InvalidArgument.field(field_name, f"{adapter_id!r} is a {adapter.kind or 'model'}, not a "
                                                        f"{KIND_LORA}")
            if adapter.base_model_id != resolved.model_id:
                raise InvalidArgument.field(
                    field_name, f"LoRA adapter {adapter_id!r} is on base {adapter.base_model_id!r}, but this request "
                                f"runs on {resolved.model_id!r}; all adapters of a request must share one base")
            uses.append((ModelKey(adapter.model_id, adapter.revision), 1.0 if scale is None else float(scale),
                         adapter.total_bytes))
        if len(uses) > self.max_adapters:
            raise InvalidArgument.field("adapters", f"{len(uses)} LoRA adapters (the model counts when it is one); "
                                                    f"this executor applies at most {self.max_adapters}")
        return resolved, uses

    async def _resolve(self, model_id: str, revision: int):
        """The registry's answer for (model, revision), reused for `resolve_cache_s` so a burst of requests costs
        one lookup. When the registry is unreachable, a model this executor holds keeps serving on the last
        answer (a new revision registered meanwhile is picked up once the registry is back)."""
        cache_key = (model_id, revision)
        cached = self._resolved.get(cache_key)
        now = time.monotonic()
        if cached is not None and now - cached[1] < self.resolve_cache_s:
            return cached[0]
        try:
            resolved = await self.resolver.resolve(model_id, revision)
        except Unavailable as err:
            if cached is not None and self.slots.get(ModelKey(cached[0].model_id, cached[0].revision)) is not None:
                log.warning("registry unreachable (%s); serving %s from the last answer", err.message, model_id)
                return cached[0]
            raise
        self._resolved[cache_key] = (resolved, now)
        return resolved

    # -- the queue: plan, load, run ---------------------------------------------------------------------
    async def _worker(self) -> None:
        """Serves the queue one pipeline call at a time. The head's model is loaded beside whatever runs; while it
        loads, requests for held models may overtake it (queue_policy.plan_next), so the worker never waits on a load
        when something else could use the device."""
        while True:
            self._wake.clear()
            plan = self._plan()
            head = plan.head
            if head is not None and not self._ready(head) and not self._start_head_load(head):
                continue  # the head failed (its load's error, or evicted too often) and left the queue
            if plan.run:
                await self._run(plan.run, plan.passed)
                continue
            waits = [asyncio.ensure_future(self._wake.wait())]
            if head is not None:
                waits.extend(p.task for p in head.preps if not p.task.done())
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waits[0].cancel()

    def _plan(self) -> Plan:
        return plan_next([j for j in self._waiting if not j.stop.is_set()], ready=self._ready,
                         call_seconds=self.costs.call_seconds, max_overtake_s=self.max_overtake_s,
                         max_batch_images=self.max_batch_images)

    def _ready(self, job: _Job) -> bool:
        """Its model is held where a swap makes it active (STANDBY or ACTIVE, or materialized by its own load) and
        its adapters are held."""
        return self._base_ready(job) and all(self._adapter_held(a.key) for a in job.adapters)

    def _base_ready(self, job: _Job) -> bool:
        if job.key in self._preparing:
            return False
        entry = self.slots.get(job.key)
        if entry is None:
            return False
        return entry.tier in (Tier.ACTIVE, Tier.STANDBY) or self._kept_pipeline(job, entry) is not None

    def _adapter_held(self, key: ModelKey) -> bool:
        return key not in self._preparing and self.slots.get(key) is not None

    @staticmethod
    def _kept_pipeline(job: _Job, entry: SlotEntry) -> Any:
        """The pipeline a finished load kept for its requests when the standby budget could not hold it."""
        if entry.tier != Tier.HOST:
            return None
        for prep in reversed(job.preps):
            task = prep.task
            if task is not None and task.done() and not task.cancelled() and task.exception() is None:
                return prep.pipeline
        return None

    def _start_head_load(self, head: _Job) -> bool:
        """Makes sure the head's model and adapters are loading; False when the head failed instead (and was
        answered)."""
        for done in head.preps:
            if done.task.done() and not done.task.cancelled() and done.task.exception():
                self._fail(head, done.task.exception())  # the load's error goes to the request it was for
                return False
        loads = []
        if not self._base_ready(head):
            prep = self._preparing.get(head.key)
            if prep is None:
                if sum(p.target == Tier.STANDBY for p in head.preps) >= MAX_LOAD_ATTEMPTS:
                    self._fail(head, Unavailable(f"model {head.key} was evicted while loading, {MAX_LOAD_ATTEMPTS} "
                                                 "times; the tier budgets are too small"))
                    return False
                prep = self._start_preparation(head.key, Tier.STANDBY, head.total_bytes, head.context)
            loads.append(prep)
        for adapter in head.adapters:
            if self._adapter_held(adapter.key):
                continue
            prep = self._preparing.get(adapter.key)
            if prep is None:
                if sum(p.key == adapter.key for p in head.preps) >= MAX_LOAD_ATTEMPTS:
                    self._fail(head, Unavailable(f"LoRA adapter {adapter.key} was evicted while loading, "
                                                 f"{MAX_LOAD_ATTEMPTS} times; the host budget is too small"))
                    return False
                prep = self._start_preparation(adapter.key, Tier.HOST, 0, head.context, base=head.key)
            loads.append(prep)
        if head.front_at is None and loads:
            self._reached_front(head)
            head.emit(LoadEvent(loads[0].phase, 0, head.total_bytes))
        for prep in loads:
            if prep not in head.preps:
                head.preps.append(prep)
        return True

    def _reached_front(self, job: _Job) -> None:
        job.front_at = time.perf_counter()
        self._record_span("queue", job.enqueued_ns, time.time_ns(), job.context, {"hotslot.request_id": job.request_id})

    def _fail(self, job: _Job, err: BaseException) -> None:
        if job in self._waiting:
            self._waiting.remove(job)
        if job.future and not job.future.done():
            job.future.set_exception(err)
        self._changed()

    async def _run(self, jobs: list[_Job], passed: list[_Job]) -> None:
        """One pipeline call for `jobs` (same model, compatible parameters); charges the requests it overtook."""
        for job in jobs:
            self._waiting.remove(job)
        start = time.perf_counter()
        for job in jobs:
            if job.front_at is None:
                self._reached_front(job)
        entry = self.slots.get(jobs[0].key)
        assert entry is not None  # plan_next runs only ready requests, and nothing yielded since
        tier = entry.tier
        kept = next((p for j in jobs if (p := self._kept_pipeline(j, entry)) is not None), None)
        estimate = self.costs.call_seconds([j.params for j in jobs]) or 0.0
        self._running = jobs
        self._run_started = start
        self.slots.acquire(entry)
        adapter_entries = [self.slots.get(a.key) for a in jobs[0].adapters]  # one adapter set per call
        assert all(e is not None for e in adapter_entries)  # ready: held, and nothing yielded since
        for adapter_entry in adapter_entries:
            self.slots.acquire(adapter_entry)
        swap_s = 0.0
        try:
            was_active = self.slots.active is entry
            swap_s = self._swap(entry, kept, [j.emit for j in jobs], [j.context for j in jobs])
            try:
                swap_s += await self._apply_adapters(entry, jobs, adapter_entries, was_active)
            except Exception as err:  # noqa: BLE001 - an adapter that does not fit: its requests fail, the base serves on
                for job in jobs:
                    self._fail(job, err)
                return
            self._kick_lookahead()
            live = [j for j in jobs if not j.stop.is_set()]
            for job in jobs:
                if job.stop.is_set():
                    self._fail(job, Cancelled("request cancelled before denoising started"))
            if not live:
                return
            loop = asyncio.get_running_loop()

            def on_step(step: int, total: int, elapsed: float) -> None:
                for job in live:
                    loop.call_soon_threadsafe(job.emit, StepEvent(step, total, elapsed))

            denoise_start_ns = time.time_ns()
            try:
                results = await asyncio.to_thread(
                    run_batch, entry.pipeline, [j.params for j in live], device=self.device, on_step=on_step,
                    should_stop=[j.stop.is_set for j in live],
                )
            except asyncio.CancelledError:
                for job in live:
                    self._fail(job, Unavailable("executor is shutting down"))
                raise
            except BaseException as err:  # noqa: BLE001 - handed to the waiting requests
                if isinstance(err, Cancelled):
                    log.info("requests %s %s", ",".join(j.request_id for j in live), err.message)
                for job in live:
                    self._fail(job, err)
                return
            done = next(r for r in results if r is not None)
            self.metrics.denoised(done.denoise_s)
            self.costs.record_call(sum(work_units(j.params) for j in live), done.denoise_s + done.encode_s)
            for job, result in zip(live, results, strict=True):
                if result is None:
                    self._fail(job, Cancelled("request cancelled during its batch; the others in it went on"))
                    continue
                self._finish(job, result, tier, start, swap_s, len(live), denoise_start_ns)
        finally:
            for adapter_entry in adapter_entries:
                self.slots.release(adapter_entry)
            self.slots.release(entry)
            self._running = []
            charge = max(estimate, time.perf_counter() - start)
            for job in passed:
                job.overtaken_s += charge
            self._changed()

    def _finish(self, job: _Job, result, tier: Tier, start: float, swap_s: float, batch: int,
                denoise_start_ns: int) -> None:
        times = PhaseTimes()
        front = job.front_at if job.front_at is not None else start
        times.queue = front - job.enqueued_at
        for prep in job.preps:  # the loads it waited for at the front of the queue, as far as it waited
            for phase, (p0, p1) in prep.spans.items():
                overlap = max(0.0, min(p1, start) - max(p0, front))
                setattr(times, phase, getattr(times, phase) + overlap)
        times.swap, times.denoise, times.encode = swap_s, result.denoise_s, result.encode_s
        ctx = job.context
        denoise_end_ns = denoise_start_ns + int(result.denoise_s * 1e9)
        self._record_span("denoise", denoise_start_ns, denoise_end_ns, ctx,
                          {"hotslot.steps": result.steps_done, "hotslot.batch_requests": batch})
        self._record_span("encode", denoise_end_ns, denoise_end_ns + int(result.encode_s * 1e9), ctx,
                          {"hotslot.images": len(result.images)})
        times.total = time.perf_counter() - job.enqueued_at
        base_load = next((p for p in job.preps if p.key == job.key), None)
        from_tier = base_load.from_tier if base_load is not None else tier
        self.metrics.served(from_tier)
        log.info(
            "generated",
            extra={"request_id": job.request_id, "model": str(job.key), "tier": from_tier.name,
                   "batch_requests": batch, **{f"{p}_ms": round(getattr(times, p) * 1000, 3) for p in PHASES}},
        )
        if job.future and not job.future.done():
            job.future.set_result(GenerateOutcome(result.images, job.key, from_tier, times, self.executor_id,
                                                  job.request_id, batch, job.applied))

    async def _apply_adapters(self, entry: SlotEntry, jobs: list[_Job], adapter_entries: list[SlotEntry],
                              was_active: bool) -> float:
        """Sets the call's adapters on the base's pipeline (loading those it lacks; none: the base alone) and
        returns the seconds it took; records where each adapter came from on the jobs."""
        pipeline = entry.pipeline
        uses = jobs[0].adapters
        if not uses and not loaded_adapters(pipeline):
            return 0.0
        held = {adapter_name(e.key): e.weights for e in self.slots.adapters()}
        loaded = [n for n in loaded_adapters(pipeline) if held.get(n) is loaded_weights(pipeline, n)]
        t0_ns, t0 = time.time_ns(), time.perf_counter()
        for job in jobs:
            job.applied = [AppliedAdapter(use.key, use.scale, self._adapter_source(job, use.key, loaded, was_active))
                           for use in uses]
        wanted = [(adapter_name(use.key), e.weights, use.scale) for use, e in zip(uses, adapter_entries, strict=True)]
        await asyncio.to_thread(self.loader.apply_adapters, pipeline, wanted, held)
        seconds = time.perf_counter() - t0
        if uses:
            for ctx in {id(j.context): j.context for j in jobs}.values():
                self._record_span("adapters", t0_ns, time.time_ns(), ctx,
                                  {"hotslot.adapters": ",".join(str(u.key) for u in uses),
                                   "hotslot.loaded": sum(adapter_name(u.key) not in loaded for u in uses)})
        self._changed()
        return seconds

    @staticmethod
    def _adapter_source(job: _Job, key: ModelKey, loaded: list[str], was_active: bool) -> Tier:
        if adapter_name(key) in loaded:
            return Tier.ACTIVE if was_active else Tier.STANDBY
        prep = next((p for p in job.preps if p.key == key), None)
        return prep.from_tier if prep is not None else Tier.HOST

    # -- the slot ----------------------------------------------------------------------------------------
    def _swap(self, entry: SlotEntry, pipeline: Any, emits: list, contexts: list) -> float:
        """Makes `entry` active (a pointer assignment) and returns the seconds it took."""
        swapping = self.slots.active is not entry
        if swapping:
            for emit in emits:
                emit(LoadEvent(LoadPhase.SWAP))
        t0_ns, t0 = time.time_ns(), time.perf_counter()
        self.slots.activate(entry, pipeline)
        seconds = time.perf_counter() - t0
        if swapping:
            self.metrics.swapped(seconds)
        for ctx in contexts:
            self._record_span("swap", t0_ns, time.time_ns(), ctx, {"hotslot.model": str(entry.key)})
        self._changed()
        return seconds

    def _start_preparation(self, key: ModelKey, target: Tier, total_bytes: int, ctx,
                           base: ModelKey | None = None) -> _Preparation:
        """Starts bringing `key` to `target` (a LoRA adapter, with its `base`: to HOST) in a task of its own."""
        prep = _Preparation(key, target, total_bytes=total_bytes, base=base)
        self._preparing[key] = prep
        # The task runs in the trace of the request it loads for (`ctx`), not in whichever one kicked it off (the
        # lookahead starts loads from the worker or from another model's load), so its storage-cache and registry
        # calls land in that request's trace like its phase spans.
        token = otel_context.attach(ctx) if ctx is not None else None
        try:
            prep.task = asyncio.create_task(self._prepare(prep, total_bytes, ctx), name=f"prepare-{key}")
        finally:
            if token is not None:
                otel_context.detach(token)
        self._changed()
        return prep

    async def _prepare(self, prep: _Preparation, total_bytes: int, ctx) -> None:
        key = prep.key
        entry: SlotEntry | None = None
        try:
            entry = self.slots.get(key)
            if entry is None:
                read_fn = self.loader.read_adapter
                for attempt in (1, 2):
                    prep.phase = LoadPhase.ENSURE
                    t0_ns, t0 = time.time_ns(), time.perf_counter()
                    view = await self.views.ensure(key.model_id, key.revision, self.lease_ttl_s)
                    prep.spans["ensure"] = (t0, time.perf_counter())
                    prep.from_tier = Tier.LOCAL_DISK if view.all_local else Tier.BACKING_STORE
                    self.metrics.load_phase("ensure", prep.spans["ensure"][1] - t0, prep.from_tier)
                    self._record_span("ensure", t0_ns, time.time_ns(), ctx,
                                      {"hotslot.model": str(key), "hotslot.bytes_fetched": view.bytes_fetched})
                    prep.phase = LoadPhase.READ
                    t0_ns, t0 = time.time_ns(), time.perf_counter()
                    if prep.base is None:  # components other held models have byte for byte are shared, not read
                        read_fn = functools.partial(self.loader.read, digests=view.sha256_by_path)
                    try:
                        read = await self._read_with_retry(key, view.view_path, read_fn)
                        break
                    except CorruptRead as err:
                        await self._unpin(view.lease_id)
                        await self._report_corrupt(key, view, err, retrying=attempt == 1)
                        if attempt == 2:
                            raise
                    except BaseException:
                        await self._unpin(view.lease_id)
                        raise
                prep.spans["read"] = (t0, time.perf_counter())
                self.metrics.load_phase("read", prep.spans["read"][1] - t0, prep.from_tier)
                self._record_span("read", t0_ns, time.time_ns(), ctx,
                                  {"hotslot.model": str(key), "hotslot.bytes": read.weights.nbytes,
                                   "hotslot.handoff_s": read.handoff_s})
                parts = getattr(read.weights, "part_sizes", dict)()  # components it may share with others
                entry = self.slots.add_host(key, read.weights, read.weights.nbytes, lease_id=view.lease_id,
                                            view_path=view.view_path, base=prep.base, parts=parts)  # acquired
                self._changed()
            else:
                prep.from_tier = entry.tier
                self.slots.acquire(entry)
            try:
                if prep.target == Tier.STANDBY and entry.tier == Tier.HOST:
                    prep.phase = LoadPhase.MATERIALIZE
                    t0_ns, t0 = time.time_ns(), time.perf_counter()
                    pipeline, _ = await asyncio.to_thread(self.loader.materialize, entry.weights)
                    prep.spans["materialize"] = (t0, time.perf_counter())
                    self.metrics.load_phase("materialize", prep.spans["materialize"][1] - t0, prep.from_tier)
                    self.costs.record_load(prep.from_tier, entry.size_bytes,
                                           sum(p1 - p0 for p0, p1 in prep.spans.values()))
                    self._record_span("materialize", t0_ns, time.time_ns(), ctx, {"hotslot.model": str(key)})
                    if self.slots.get(key) is entry and entry.tier == Tier.HOST:
                        if not self.slots.set_standby(entry, pipeline):
                            prep.pipeline = pipeline
            finally:
                self.slots.release(entry)
        finally:
            self._preparing.pop(key, None)
            self._changed()
            self._kick_lookahead()

    async def _read_with_retry(self, key: ModelKey, view_path: str, read: Callable):
        """A preloader that dies mid-load is restarted (automatically, or here) and the load retried once."""
        for attempt in (1, 2):
            try:
                return await asyncio.to_thread(read, str(key), view_path, self.load_timeout_s)
            except Unavailable as err:
                if attempt == 2:
                    raise
                log.warning("load of %s failed (%s); retrying once after the preloader restarts", key, err.message)
                await asyncio.to_thread(self._ensure_preloader)

    async def _report_corrupt(self, key: ModelKey, view: EnsuredView, err: CorruptRead, retrying: bool) -> None:
        """A cached file failed its read checksum: the storage-cache re-hashes and drops the blob, so the next
        Ensure fetches it again from the backing store."""
        try:
            rel = PurePath(err.path).relative_to(view.view_path).as_posix() if err.path else ""
        except ValueError:
            rel = ""
        sha256 = view.sha256_by_path.get(rel, "")
        log.warning("a cached weight file failed its read checksum%s", "; fetching it again" if retrying else "",
                    extra={"model": str(key), "path": err.path, "sha256": sha256})
        if not sha256:
            return
        try:
            await self.views.report_corrupt(sha256, err.path)
        except HotslotError as report_error:  # the retry's Ensure or the DATA_LOSS tell the rest
            log.warning("could not report the corrupt blob to the storage-cache: %s", report_error.message)

    def _ensure_preloader(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.preloader.is_alive():
                return
            if getattr(self.preloader, "_restarting", False):
                time.sleep(0.05)
                continue
            try:
                self.preloader.restart()
                return
            except Exception:  # noqa: BLE001 - raced with the automatic restart; check again
                time.sleep(0.1)
        raise Unavailable("the preloader subprocess could not be restarted within 60 s")

    def _kick_lookahead(self) -> None:
        """Preloads the next distinct model waiting in the queue while the current one computes."""
        if not self.lookahead or self._state != ExecutorState.READY:
            return
        if any(p.target == Tier.STANDBY for p in self._preparing.values()):
            return  # one at a time: the preloader reads one model after another anyway
        running_keys = {j.key for j in self._running}
        for job in self._waiting:
            if job.stop.is_set() or job.key in running_keys:
                continue
            tier = self.slots.tier_of(job.key)
            if tier in (Tier.ACTIVE, Tier.STANDBY):
                continue
            log.info("lookahead: preparing %s for request %s", job.key, job.request_id)
            self._start_preparation(job.key, Tier.STANDBY, job.total_bytes, job.context)
            return

    # -- preload / evict ---------------------------------------------------------------------------------
    async def preload(self, model_id: str, revision: int, target: int) -> PreloadOutcome:
        validate_model_id(model_id, "model.model_id")
        if target not in (Tier.STANDBY, Tier.HOST):
            raise InvalidArgument.field("target_tier", "must be TIER_STANDBY or TIER_HOST")
        target = Tier(target)
        resolved = await self._resolve(model_id, revision)
        key = ModelKey(resolved.model_id, resolved.revision)
        self.slots.check_fits(key, resolved.total_bytes)
        base = None
        if resolved.kind == KIND_LORA:  # its weights go to the host tier; a pipeline loads them when a request runs
            base_model = await self._resolve(resolved.base_model_id, 0)
            if base_model.kind and base_model.kind != KIND_PIPELINE:
                raise InvalidArgument.field("model.model_id", f"the base {resolved.base_model_id!r} of LoRA adapter "
                                                              f"{model_id!r} is not a {KIND_PIPELINE}")
            base, target = ModelKey(base_model.model_id, base_model.revision), Tier.HOST
        times = PhaseTimes()
        t_start = time.perf_counter()
        entry = self.slots.get(key)
        from_tier = entry.tier if entry else None
        if entry is None or key in self._preparing or (target == Tier.STANDBY and entry.tier == Tier.HOST):
            prep = self._preparing.get(key)
            if prep is None or (target == Tier.STANDBY and prep.target == Tier.HOST):
                if prep is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(prep.task)
                prep = self._start_preparation(key, target, resolved.total_bytes,
                                               trace.set_span_in_context(trace.get_current_span()), base=base)
            await asyncio.shield(prep.task)
            for phase, (p0, p1) in prep.spans.items():
                setattr(times, phase, p1 - p0)
            if from_tier is None:
                from_tier = prep.from_tier
        times.total = time.perf_counter() - t_start
        entry = self.slots.get(key)
        if entry is None:
            raise Unavailable(f"model {key} was evicted right after loading; the tier budgets are too small")
        return PreloadOutcome(key, entry.tier, from_tier or entry.tier, times)

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
        self._changed()
        return EvictOutcome(freed, pending)

    # -- leases and housekeeping -------------------------------------------------------------------------
    def _on_evict(self, entry: SlotEntry) -> None:
        log.info("evicted %s (%d bytes)", entry.key, entry.size_bytes)
        release = getattr(entry.weights, "release", None)  # shared components lose a user; the last frees them
        if release is not None:
            release()
        if entry.lease_id:
            task = asyncio.get_running_loop().create_task(self._unpin(entry.lease_id))
            self._tasks.append(task)
            task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _unpin(self, lease_id: str) -> None:
        if not lease_id:
            return
        try:
            await self.views.unpin(lease_id)
        except Exception as err:  # noqa: BLE001 - the lease expires by itself; nothing is lost
            log.warning("unpin of lease %s failed: %s", lease_id, err)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(max(self.lease_ttl_s / 3, 0.05))
            for key in [h.key for h in self.slots.held()] + [a.key for a in self.slots.adapters()]:
                entry = self.slots.get(key)
                if entry is None or not entry.lease_id:
                    continue
                try:
                    await self.views.renew(entry.lease_id, self.lease_ttl_s)
                except Exception as err:  # noqa: BLE001 - keep serving; the files stay open via the loaded weights
                    log.warning("renewing the lease of %s failed: %s", entry.key, err)

    async def _watch_preloader(self) -> None:
        """Publishes preloader deaths and restarts in the status; the preloader restarts itself."""
        while True:
            seen = (self.preloader.pid, self.preloader.is_alive(), getattr(self.preloader, "restarts", 0))
            if seen != self._preloader_seen:
                if self._preloader_seen and not seen[1]:
                    log.warning("preloader process died; the active model keeps serving")
                if self._preloader_seen and seen[2] > self._preloader_seen[2]:
                    self.metrics.preloader_restarted(seen[2] - self._preloader_seen[2])
                self._preloader_seen = seen
                self._changed()
            await asyncio.sleep(0.2)

    # -- tracing -----------------------------------------------------------------------------------------
    def _record_span(self, name: str, start_ns: int, end_ns: int, ctx, attributes: dict) -> None:
        span = self._tracer.start_span(name, context=ctx, start_time=start_ns, attributes=attributes)
        span.end(end_time=max(end_ns, start_ns))
