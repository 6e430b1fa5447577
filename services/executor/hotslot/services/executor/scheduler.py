"""The queue and its worker: generation requests served one pipeline call at a time on the device, first in, first
out, except that requests for held models may overtake loading ones within a budget, and compatible requests for one
model share a call (`queue_policy` decides; this module carries it out). The head's model and adapters are loaded
beside whatever runs (`preparation`); a call swaps its model into the active slot, sets its LoRA adapters, denoises
and encodes, and the phase timings, spans, metrics and the "generated" log line are recorded here."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context

from hotslot.errors import Cancelled, InvalidArgument, Reason, ResourceExhausted, Unavailable
from hotslot.manifest import validate_model_id
from hotslot.request_ids import validate_request_id

from .costs import CostModel, work_units
from .generation import GenerationLimits, GenerationParams, GenerationResult, run_batch, validate
from .jobs import Emit, Job, RequestQueue
from .lora import adapter_name, loaded_adapters, loaded_weights
from .metrics import ExecutorMetrics
from .ports import Loader, Pipeline
from .preparation import Preparation, Preparations
from .queue_policy import Plan, plan_next
from .records import (
    PHASES,
    AdapterUse,
    AppliedAdapter,
    ExecutorState,
    GenerateOutcome,
    LoadEvent,
    LoadPhase,
    PhaseTimes,
    StepEvent,
)
from .resolver import AdapterRef, CachingResolver, check_adapter_refs
from .slots import ModelKey, SlotEntry, SlotManager, Tier
from .spans import SpanRecorder
from .status import StatusBoard

log = logging.getLogger(__name__)

DEFAULT_MAX_LOAD_ATTEMPTS = 3
"""Loads one request may start for its model before it gives up (setting max_load_attempts): a model evicted
between its load and its turn (the tier budgets too small for the traffic) is loaded again, but not forever."""


class Scheduler:
    def __init__(
        self,
        *,
        executor_id: str,
        device: str,
        queue: RequestQueue,
        board: StatusBoard,
        preparations: Preparations,
        resolver: CachingResolver,
        slots: SlotManager,
        loader: Loader,
        costs: CostModel,
        metrics: ExecutorMetrics,
        spans: SpanRecorder,
        limits: GenerationLimits,
        queue_capacity: int,
        retry_after_s: float,
        max_overtake_s: float,
        max_batch_images: int,
        max_adapters: int,
        max_load_attempts: int = DEFAULT_MAX_LOAD_ATTEMPTS,
    ) -> None:
        self.executor_id = executor_id
        self.device = device
        self.queue = queue
        self.board = board
        self.preparations = preparations
        self.resolver = resolver
        self.slots = slots
        self.loader = loader
        self.costs = costs
        self.metrics = metrics
        self.spans = spans
        self.limits = limits
        self.queue_capacity = queue_capacity
        self.retry_after_s = retry_after_s
        self.max_overtake_s = max_overtake_s
        self.max_batch_images = max_batch_images
        self.max_adapters = max_adapters
        self.max_load_attempts = max_load_attempts

    # -- taking requests ---------------------------------------------------------------------------------
    async def generate(
        self,
        model_id: str,
        revision: int,
        params: GenerationParams,
        request_id: str = "",
        emit: Emit | None = None,
        adapters: Sequence[AdapterRef] = (),
    ) -> GenerateOutcome:
        """Queues one request and waits for it (ExecutorCore.generate)."""
        state = self.board.state
        if state != ExecutorState.READY:
            raise Unavailable(f"executor {self.executor_id} is {state.label}; retry on another executor")
        validate_model_id(model_id, "model.model_id")
        validate_request_id(request_id)
        if revision < 0:
            raise InvalidArgument.field("model.revision", "must be >= 0 (0 means the latest)")
        check_adapter_refs(adapters, self.max_adapters)
        params = validate(params, self.limits)
        waiting = self.queue.waiting
        if len(waiting) >= self.queue_capacity:
            raise ResourceExhausted(
                f"executor {self.executor_id} has {len(waiting)} requests waiting (capacity "
                f"{self.queue_capacity}); retry later or on another executor",
                retry_after_s=self.retry_after_s,
                reason=Reason.QUEUE_FULL,
            )
        resolved, uses = await self.resolver.resolve_request(model_id, revision, adapters)
        key = ModelKey(resolved.model_id, resolved.revision)
        self.slots.check_fits(key, resolved.total_bytes)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[GenerateOutcome] = loop.create_future()
        job = Job(
            request_id=request_id or uuid.uuid4().hex[:16],
            key=key,
            params=params,
            total_bytes=resolved.total_bytes,
            emit=emit or (lambda event: None),
            future=future,
            context=trace.set_span_in_context(trace.get_current_span()),
            adapters=tuple(AdapterUse(k, scale) for k, scale, _ in uses),
        )
        # Mark the outcome as seen even when the caller has gone (cancelled), so asyncio does not warn about it.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        if len(waiting) >= self.queue_capacity:  # re-check: the registry call yielded
            raise ResourceExhausted(
                f"executor {self.executor_id} queue is full ({self.queue_capacity}); retry later",
                retry_after_s=self.retry_after_s,
                reason=Reason.QUEUE_FULL,
            )
        waiting.append(job)
        job.emit(LoadEvent(LoadPhase.QUEUED, queue_position=len(waiting)))
        for adapter_key, _, size in uses:  # small: read now, beside the queue, so the head never waits for them
            if self.slots.get(adapter_key) is None and adapter_key not in self.preparations:
                job.preps.append(self.preparations.start(adapter_key, Tier.HOST, size, job.context, base=key))
        self.queue.wake.set()
        self.board.changed()
        self.preparations.kick_lookahead()
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            job.stop.set()
            if job in waiting:
                waiting.remove(job)
            self.board.changed()  # the worker plans again without it (and a batch it is in may stop)
            raise

    def shut(self) -> None:
        """Answers every waiting request Unavailable (the executor is shutting down)."""
        for job in list(self.queue.waiting):
            job.stop.set()
            if job.future and not job.future.done():
                job.future.set_exception(Unavailable("executor is shutting down; retry on another executor"))
        self.queue.waiting.clear()

    # -- the queue: plan, load, run ---------------------------------------------------------------------
    async def worker(self) -> None:
        """Serves the queue one pipeline call at a time. The head's model is loaded beside whatever runs; while it
        loads, requests for held models may overtake it (queue_policy.plan_next), so the worker never waits on a load
        when something else could use the device."""
        wake = self.queue.wake
        while True:
            wake.clear()
            plan = self._plan()
            head = plan.head
            if head is not None and not self.preparations.ready(head) and not self._start_head_load(head):
                continue  # the head failed (its load's error, or evicted too often) and left the queue
            if plan.run:
                await self._run(plan.run, plan.passed)
                continue
            waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(wake.wait())]
            if head is not None:
                waits.extend(p.task for p in head.preps if not p.task.done())
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waits[0].cancel()

    def _plan(self) -> Plan[Job]:
        return plan_next(self.queue.live(), ready=self.preparations.ready,
                         call_seconds=self.costs.call_seconds, max_overtake_s=self.max_overtake_s,
                         max_batch_images=self.max_batch_images)

    def _start_head_load(self, head: Job) -> bool:
        """Makes sure the head's model and adapters are loading; False when the head failed instead (and was
        answered)."""
        for done in head.preps:
            if done.task.done() and not done.task.cancelled():
                error = done.task.exception()
                if error is not None:
                    self._fail(head, error)  # the load's error goes to the request it was for
                    return False
        preparations = self.preparations
        loads: list[Preparation] = []
        if not preparations.base_ready(head):
            prep = preparations.get(head.key)
            if prep is None:
                if sum(p.target == Tier.STANDBY for p in head.preps) >= self.max_load_attempts:
                    self._fail(head, Unavailable(f"model {head.key} was evicted while loading, "
                                                 f"{self.max_load_attempts} times; the tier budgets are too small"))
                    return False
                prep = preparations.start(head.key, Tier.STANDBY, head.total_bytes, head.context)
            loads.append(prep)
        for adapter in head.adapters:
            if preparations.adapter_held(adapter.key):
                continue
            prep = preparations.get(adapter.key)
            if prep is None:
                if sum(p.key == adapter.key for p in head.preps) >= self.max_load_attempts:
                    self._fail(head, Unavailable(f"LoRA adapter {adapter.key} was evicted while loading, "
                                                 f"{self.max_load_attempts} times; the host budget is too small"))
                    return False
                prep = preparations.start(adapter.key, Tier.HOST, 0, head.context, base=head.key)
            loads.append(prep)
        if head.front_at is None and loads:
            self._reached_front(head)
            head.emit(LoadEvent(loads[0].phase, 0, head.total_bytes))
        for prep in loads:
            if prep not in head.preps:
                head.preps.append(prep)
        return True

    def _reached_front(self, job: Job) -> None:
        job.front_at = time.perf_counter()
        self.spans.record("queue", job.enqueued_ns, time.time_ns(), job.context,
                          {"hotslot.request_id": job.request_id})

    def _fail(self, job: Job, err: BaseException) -> None:
        if job in self.queue.waiting:
            self.queue.waiting.remove(job)
        if job.future and not job.future.done():
            job.future.set_exception(err)
        self.board.changed()

    async def _run(self, jobs: list[Job], passed: list[Job]) -> None:
        """One pipeline call for `jobs` (same model, compatible parameters); charges the requests it overtook."""
        for job in jobs:
            self.queue.waiting.remove(job)
        start = time.perf_counter()
        for job in jobs:
            if job.front_at is None:
                self._reached_front(job)
        entry = self.slots.get(jobs[0].key)
        assert entry is not None  # plan_next runs only ready requests, and nothing yielded since
        tier = entry.tier
        kept = next((p for j in jobs if (p := self.preparations.kept_pipeline(j, entry)) is not None), None)
        estimate = self.costs.call_seconds([j.params for j in jobs]) or 0.0
        self.queue.running = jobs
        self.queue.run_started = start
        self.slots.acquire(entry)
        held_adapters = [self.slots.get(a.key) for a in jobs[0].adapters]  # one adapter set per call
        adapter_entries = [e for e in held_adapters if e is not None]
        assert len(adapter_entries) == len(held_adapters)  # ready: held, and nothing yielded since
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
            self.preparations.kick_lookahead()
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
            self.queue.running = []
            charge = max(estimate, time.perf_counter() - start)
            for job in passed:
                job.overtaken_s += charge
            self.board.changed()

    def _finish(self, job: Job, result: GenerationResult, tier: Tier, start: float, swap_s: float, batch: int,
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
        self.spans.record("denoise", denoise_start_ns, denoise_end_ns, ctx,
                          {"hotslot.steps": result.steps_done, "hotslot.batch_requests": batch})
        self.spans.record("encode", denoise_end_ns, denoise_end_ns + int(result.encode_s * 1e9), ctx,
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

    async def _apply_adapters(self, entry: SlotEntry, jobs: list[Job], adapter_entries: list[SlotEntry],
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
                self.spans.record("adapters", t0_ns, time.time_ns(), ctx,
                                  {"hotslot.adapters": ",".join(str(u.key) for u in uses),
                                   "hotslot.loaded": sum(adapter_name(u.key) not in loaded for u in uses)})
        self.board.changed()
        return seconds

    @staticmethod
    def _adapter_source(job: Job, key: ModelKey, loaded: list[str], was_active: bool) -> Tier:
        if adapter_name(key) in loaded:
            return Tier.ACTIVE if was_active else Tier.STANDBY
        prep = next((p for p in job.preps if p.key == key), None)
        return prep.from_tier if prep is not None else Tier.HOST

    # -- the slot ----------------------------------------------------------------------------------------
    def _swap(self, entry: SlotEntry, pipeline: Pipeline, emits: list[Emit], contexts: list[Context | None]) -> float:
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
            self.spans.record("swap", t0_ns, time.time_ns(), ctx, {"hotslot.model": str(entry.key)})
        self.board.changed()
        return seconds
