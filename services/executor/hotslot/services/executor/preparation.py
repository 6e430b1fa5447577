"""Model preparation: bringing a model to HOST or STANDBY (a LoRA adapter: to HOST) once for everyone who needs it
(single flight), the lookahead that prepares the next model waiting in the queue while the current one computes,
verified reads (a corrupt cached file is reported and read once more; a preloader that died is restarted and the
read retried once), and whether a queued request's model and adapters are ready to run. Each load phase is timed,
metered and recorded as a span where it happens."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePath

from opentelemetry import context as otel_context
from opentelemetry.context import Context

from hotslot.errors import CorruptRead, HotslotError, Unavailable

from .costs import CostModel
from .downstream import EnsuredView, ViewProvider
from .jobs import Job, RequestQueue
from .leases import Leases
from .metrics import ExecutorMetrics
from .ports import Loader, Pipeline, PreloaderHandle, ReadOutcome, SharedParts
from .records import ExecutorState, LoadPhase, PhaseTimes, PreloadOutcome
from .slots import ModelKey, SlotEntry, SlotManager, Tier
from .spans import SpanRecorder
from .status import StatusBoard

log = logging.getLogger(__name__)

DEFAULT_PRELOADER_RESTART_WAIT_S = 60.0
"""How long a read waits for a dead preloader to come back before it gives up (setting preloader_restart_wait_s)."""


@dataclass(eq=False)
class Preparation:
    """One model being brought to HOST or STANDBY, shared by everyone who needs it (single-flight)."""

    key: ModelKey
    target: Tier
    task: asyncio.Task[None] = field(init=False, repr=False)  # set right after construction (Preparations.start)
    phase: LoadPhase = LoadPhase.ENSURE
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)  # phase -> (start, end) perf_counter
    from_tier: Tier = Tier.BACKING_STORE
    pipeline: Pipeline = None  # kept when the standby budget could not hold it, so a waiting request can use it
    total_bytes: int = 0
    started_at: float = field(default_factory=time.perf_counter)
    base: ModelKey | None = None  # a LoRA adapter's load (to HOST): the pipeline it applies to


class Preparations:
    def __init__(
        self,
        *,
        slots: SlotManager,
        loader: Loader,
        preloader: PreloaderHandle,
        views: ViewProvider,
        leases: Leases,
        queue: RequestQueue,
        board: StatusBoard,
        costs: CostModel,
        metrics: ExecutorMetrics,
        spans: SpanRecorder,
        lookahead: bool,
        lease_ttl_s: float,
        load_timeout_s: float,
        preloader_restart_wait_s: float = DEFAULT_PRELOADER_RESTART_WAIT_S,
    ) -> None:
        self.slots = slots
        self.loader = loader
        self.preloader = preloader
        self.views = views
        self.leases = leases
        self.queue = queue
        self.board = board
        self.costs = costs
        self.metrics = metrics
        self.spans = spans
        self.lookahead = lookahead
        self.lease_ttl_s = lease_ttl_s
        self.load_timeout_s = load_timeout_s
        self.preloader_restart_wait_s = preloader_restart_wait_s
        self.preparing: dict[ModelKey, Preparation] = {}

    def get(self, key: ModelKey) -> Preparation | None:
        return self.preparing.get(key)

    def __contains__(self, key: ModelKey) -> bool:
        return key in self.preparing

    def loading(self) -> ModelKey | None:
        """The model whose load started first among those under way."""
        return next(iter(self.preparing), None)

    def cancel(self) -> list[asyncio.Task[None]]:
        """Cancels every load under way; returns their tasks to await."""
        tasks = [p.task for p in self.preparing.values()]
        for task in tasks:
            task.cancel()
        return tasks

    # -- readiness ---------------------------------------------------------------------------------------
    def ready(self, job: Job) -> bool:
        """Its model is held where a swap makes it active (STANDBY or ACTIVE, or materialized by its own load) and
        its adapters are held."""
        return self.base_ready(job) and all(self.adapter_held(a.key) for a in job.adapters)

    def base_ready(self, job: Job) -> bool:
        if job.key in self.preparing:
            return False
        entry = self.slots.get(job.key)
        if entry is None:
            return False
        return entry.tier in (Tier.ACTIVE, Tier.STANDBY) or self.kept_pipeline(job, entry) is not None

    def adapter_held(self, key: ModelKey) -> bool:
        return key not in self.preparing and self.slots.get(key) is not None

    @staticmethod
    def kept_pipeline(job: Job, entry: SlotEntry) -> Pipeline:
        """The pipeline a finished load kept for its requests when the standby budget could not hold it."""
        if entry.tier != Tier.HOST:
            return None
        for prep in reversed(job.preps):
            task = prep.task
            if task.done() and not task.cancelled() and task.exception() is None:
                return prep.pipeline
        return None

    # -- single flight -----------------------------------------------------------------------------------
    def start(self, key: ModelKey, target: Tier, total_bytes: int, ctx: Context | None,
              base: ModelKey | None = None) -> Preparation:
        """Starts bringing `key` to `target` (a LoRA adapter, with its `base`: to HOST) in a task of its own."""
        prep = Preparation(key, target, total_bytes=total_bytes, base=base)
        self.preparing[key] = prep
        # The task runs in the trace of the request it loads for (`ctx`), not in whichever one kicked it off (the
        # lookahead starts loads from the worker or from another model's load), so its storage-cache and registry
        # calls land in that request's trace like its phase spans.
        token = otel_context.attach(ctx) if ctx is not None else None
        try:
            prep.task = asyncio.create_task(self._prepare(prep, total_bytes, ctx), name=f"prepare-{key}")
        finally:
            if token is not None:
                otel_context.detach(token)
        self.board.changed()
        return prep

    async def _prepare(self, prep: Preparation, total_bytes: int, ctx: Context | None) -> None:
        key = prep.key
        entry: SlotEntry | None = None
        try:
            entry = self.slots.get(key)
            if entry is None:
                read_fn: Callable[[str, str, float], ReadOutcome] = self.loader.read_adapter
                for attempt in (1, 2):
                    prep.phase = LoadPhase.ENSURE
                    t0_ns, t0 = time.time_ns(), time.perf_counter()
                    view = await self.views.ensure(key.model_id, key.revision, self.lease_ttl_s)
                    prep.spans["ensure"] = (t0, time.perf_counter())
                    prep.from_tier = Tier.LOCAL_DISK if view.all_local else Tier.BACKING_STORE
                    self.metrics.load_phase("ensure", prep.spans["ensure"][1] - t0, prep.from_tier)
                    self.spans.record("ensure", t0_ns, time.time_ns(), ctx,
                                      {"hotslot.model": str(key), "hotslot.bytes_fetched": view.bytes_fetched})
                    prep.phase = LoadPhase.READ
                    t0_ns, t0 = time.time_ns(), time.perf_counter()
                    if prep.base is None:  # components other held models have byte for byte are shared, not read
                        # files this Ensure copied were hashed by the storage-cache just now: not hashed again
                        read_fn = functools.partial(self.loader.read, digests=view.sha256_by_path,
                                                    hashed=view.fetched)
                    try:
                        read = await self._read_with_retry(key, view.view_path, read_fn)
                        break
                    except CorruptRead as err:
                        await self.leases.unpin(view.lease_id)
                        await self._report_corrupt(key, view, err, retrying=attempt == 1)
                        if attempt == 2:
                            raise
                    except BaseException:
                        await self.leases.unpin(view.lease_id)
                        raise
                prep.spans["read"] = (t0, time.perf_counter())
                self.metrics.load_phase("read", prep.spans["read"][1] - t0, prep.from_tier)
                self.spans.record("read", t0_ns, time.time_ns(), ctx,
                                  {"hotslot.model": str(key), "hotslot.bytes": read.weights.nbytes,
                                   "hotslot.handoff_s": read.handoff_s})
                weights = read.weights  # components it may share with others are counted once
                parts = weights.part_sizes() if isinstance(weights, SharedParts) else {}
                entry = self.slots.add_host(key, read.weights, read.weights.nbytes, lease_id=view.lease_id,
                                            view_path=view.view_path, base=prep.base, parts=parts)  # acquired
                self.board.changed()
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
                    self.spans.record("materialize", t0_ns, time.time_ns(), ctx, {"hotslot.model": str(key)})
                    if self.slots.get(key) is entry and entry.tier == Tier.HOST:
                        if not self.slots.set_standby(entry, pipeline):
                            prep.pipeline = pipeline
            finally:
                self.slots.release(entry)
        finally:
            self.preparing.pop(key, None)
            self.board.changed()
            self.kick_lookahead()

    async def _read_with_retry(self, key: ModelKey, view_path: str,
                               read: Callable[[str, str, float], ReadOutcome]) -> ReadOutcome:
        """A preloader that dies mid-load is restarted (automatically, or here) and the load retried once."""
        for attempt in (1, 2):
            try:
                return await asyncio.to_thread(read, str(key), view_path, self.load_timeout_s)
            except Unavailable as err:
                if attempt == 2:
                    raise
                log.warning("load of %s failed (%s); retrying once after the preloader restarts", key, err.message)
                await asyncio.to_thread(self._ensure_preloader)
        raise AssertionError("unreachable")  # the second attempt returns or raises

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
        deadline = time.monotonic() + self.preloader_restart_wait_s
        while time.monotonic() < deadline:
            if self.preloader.is_alive():
                return
            if self.preloader.restarting:
                time.sleep(0.05)
                continue
            try:
                self.preloader.restart()
                return
            except Exception:  # noqa: BLE001 - raced with the automatic restart; check again
                time.sleep(0.1)
        raise Unavailable(f"the preloader subprocess could not be restarted within {self.preloader_restart_wait_s:g} s "
                          "(HOTSLOT_EXECUTOR_PRELOADER_RESTART_WAIT_S)")

    # -- lookahead ---------------------------------------------------------------------------------------
    def kick_lookahead(self) -> None:
        """Preloads the next distinct model waiting in the queue while the current one computes."""
        if not self.lookahead or self.board.state != ExecutorState.READY:
            return
        if any(p.target == Tier.STANDBY for p in self.preparing.values()):
            return  # one at a time: the preloader reads one model after another anyway
        running_keys = {j.key for j in self.queue.running}
        for job in self.queue.waiting:
            if job.stop.is_set() or job.key in running_keys:
                continue
            entry = self.slots.get(job.key)
            if entry is not None and (entry.tier in (Tier.ACTIVE, Tier.STANDBY)
                                      or self.kept_pipeline(job, entry) is not None):
                continue  # ready; or its load kept the pipeline for it (the standby budget could not hold it)
            log.info("lookahead: preparing %s for request %s", job.key, job.request_id)
            self.start(job.key, Tier.STANDBY, job.total_bytes, job.context)
            return

    # -- preload -----------------------------------------------------------------------------------------
    async def preload(self, key: ModelKey, target: Tier, total_bytes: int, ctx: Context | None,
                      base: ModelKey | None) -> PreloadOutcome:
        """Brings a resolved model to `target` (joining a load under way) and reports where its time went."""
        times = PhaseTimes()
        t_start = time.perf_counter()
        entry = self.slots.get(key)
        from_tier = entry.tier if entry else None
        if entry is None or key in self.preparing or (target == Tier.STANDBY and entry.tier == Tier.HOST):
            prep = self.preparing.get(key)
            if prep is None or (target == Tier.STANDBY and prep.target == Tier.HOST):
                if prep is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(prep.task)
                prep = self.start(key, target, total_bytes, ctx, base=base)
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
