"""The executor's status: its lifecycle state and a version that every change bumps (`StatusBoard`), and the
snapshot that GetStatus and WatchStatus send (`StatusView`): held models and adapters, tier usage, the queue in
service order, measured costs and the backlog, and the preloader's health."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from .costs import LOAD_TIERS, CostModel, CostSnapshot
from .generation import GenerationLimits
from .jobs import Job, RequestQueue
from .lora import adapter_name, loaded_weights
from .metrics import ExecutorMetrics
from .ports import PreloaderHandle
from .queue_policy import service_order
from .records import ExecutorSnapshot, ExecutorState, HeldAdapter, PreloaderState, QueuedState, QueueEntry
from .slots import ModelKey, SlotManager, Tier

if TYPE_CHECKING:
    from .preparation import Preparations

log = logging.getLogger(__name__)


class StatusBoard:
    """The lifecycle state and the status version. `changed()` after anything a watcher or the worker should see:
    it wakes the worker (it plans again), bumps the version, updates the gauges and wakes the watchers."""

    def __init__(self, queue: RequestQueue, slots: SlotManager, metrics: ExecutorMetrics) -> None:
        self.queue = queue
        self.slots = slots
        self.metrics = metrics
        self.state = ExecutorState.STARTING
        self.version = 0
        self.event = asyncio.Event()  # set (and replaced) on the next change

    def changed(self) -> None:
        self.queue.wake.set()  # the worker plans again: a model became ready, a request left, a load ended
        self.version += 1
        self.metrics.state(self.queue.depth(), self.slots.usage())
        self.event.set()
        self.event = asyncio.Event()


class StatusView:
    def __init__(
        self,
        *,
        executor_id: str,
        address: str,
        device: str,
        board: StatusBoard,
        queue: RequestQueue,
        preparations: Preparations,
        slots: SlotManager,
        preloader: PreloaderHandle,
        costs: CostModel,
        limits: GenerationLimits,
        metrics: ExecutorMetrics,
        device_memory: Callable[[], tuple[int, int]],
        queue_capacity: int,
        max_overtake_s: float,
        max_batch_images: int,
        max_adapters: int,
    ) -> None:
        self.executor_id = executor_id
        self.address = address
        self.device = device
        self.board = board
        self.queue = queue
        self.preparations = preparations
        self.slots = slots
        self.preloader = preloader
        self.costs = costs
        self.limits = limits
        self.metrics = metrics
        self.device_memory = device_memory
        self.queue_capacity = queue_capacity
        self.max_overtake_s = max_overtake_s
        self.max_batch_images = max_batch_images
        self.max_adapters = max_adapters
        self._preloader_seen: tuple[int | None, bool, int] | None = None

    def snapshot(self) -> ExecutorSnapshot:
        total, used = self.device_memory()
        return ExecutorSnapshot(
            executor_id=self.executor_id,
            address=self.address,
            state=self.board.state,
            device=self.device,
            models=self.slots.held(),
            tiers=self.slots.usage(),
            queue_depth=self.queue.depth(),
            queue_capacity=self.queue_capacity,
            device_memory_total=total,
            device_memory_used=used,
            preloader=PreloaderState(
                pid=self.preloader.pid or 0,
                alive=self.preloader.is_alive(),
                restarts=self.preloader.restarts,
                loading=self.preparations.loading(),
            ),
            version=self.board.version,
            queue=self.queue_entries(),
            costs=self.cost_snapshot(),
            adapters=self.held_adapters(),
            max_adapters=self.max_adapters,
        )

    def held_adapters(self) -> list[HeldAdapter]:
        out = []
        for entry in self.slots.adapters():
            assert entry.base is not None  # an adapter's entry names its base
            base = self.slots.get(entry.base)
            in_pipeline = (base is not None and base.pipeline is not None
                           and loaded_weights(base.pipeline, adapter_name(entry.key)) is entry.weights)
            out.append(HeldAdapter(entry.key, entry.base, base.tier if base is not None and in_pipeline else Tier.HOST,
                                   entry.size_bytes, entry.refs))
        return out

    def service_order(self) -> list[Job]:
        return service_order(self.queue.live(), ready=self.preparations.ready, call_seconds=self.costs.call_seconds,
                             max_overtake_s=self.max_overtake_s, max_batch_images=self.max_batch_images)

    def queue_entries(self) -> list[QueueEntry]:
        now = time.perf_counter()

        def state(job: Job) -> QueuedState:
            if self.preparations.ready(job):
                return QueuedState.READY
            return QueuedState.LOADING if job.key in self.preparations else QueuedState.WAITING

        return [QueueEntry(j.request_id, j.key, QueuedState.RUNNING if running else state(j), now - j.enqueued_at,
                           j.overtaken_s, j.params.num_images, j.adapters)
                for running, jobs in ((True, self.queue.running), (False, self.service_order())) for j in jobs]

    def cost_snapshot(self) -> CostSnapshot:
        """The fitted costs, and the backlog: the running call's estimated remainder, the loads the waiting requests
        still need (the one under way less what it has done), and each waiting request's service time."""
        now = time.perf_counter()
        backlog = 0.0
        if self.queue.running:
            backlog += max(0.0, (self.costs.call_seconds([j.params for j in self.queue.running]) or 0.0)
                           - (now - self.queue.run_started))
        loads: dict[ModelKey, float] = {}
        for job in self.queue.waiting:
            if job.stop.is_set():
                continue
            backlog += self.costs.call_seconds([job.params]) or 0.0
            if job.key in loads or self.preparations.ready(job):
                continue
            prep = self.preparations.get(job.key)
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
            event = self.board.event
            sent = loop.time()
            yield self.snapshot()
            await event.wait()
            wait = min_interval_s - (loop.time() - sent)
            if wait > 0:
                await asyncio.sleep(wait)

    async def watch_preloader(self) -> None:
        """Publishes preloader deaths and restarts in the status; the preloader restarts itself."""
        while True:
            seen = (self.preloader.pid, self.preloader.is_alive(), self.preloader.restarts)
            if seen != self._preloader_seen:
                if self._preloader_seen and not seen[1]:
                    log.warning("preloader process died; the active model keeps serving")
                if self._preloader_seen and seen[2] > self._preloader_seen[2]:
                    self.metrics.preloader_restarted(seen[2] - self._preloader_seen[2])
                self._preloader_seen = seen
                self.board.changed()
            await asyncio.sleep(0.2)
