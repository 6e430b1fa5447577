"""Router domain logic: admits requests into a bounded queue, places each on an executor, passes the client's
deadline on, retries once elsewhere when the executor dies, and passes catalogue calls to the registry. No
transport code here: executors and the registry are reached through the interfaces in downstream.py."""
from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Collection
from dataclasses import dataclass, field, replace
from typing import Any

from opentelemetry import trace

from hotslot.convert import kind_from_proto
from hotslot.errors import (
    DeadlineExceeded,
    HotslotError,
    InvalidArgument,
    NotFound,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from hotslot.manifest import validate_model_id
from hotslot.request_ids import validate_request_id

from .downstream import ExecutorUnavailable, GenerateCall, ModelCatalog, ProgressEvent, ResultEvent
from .membership import ExecutorLink, ExecutorMembership, Slot
from .metrics import RouterMetrics
from .placement import Choice, Placement, PlacementReason, RequestWork, Tier, held_anywhere
from .refusals import DEFAULT_REFUSAL_LOG_INTERVAL_S, RefusalLog, RefusalReason

log = logging.getLogger(__name__)

_HELD_REASONS = frozenset({PlacementReason.ACTIVE, PlacementReason.STANDBY, PlacementReason.HOST})


@dataclass(frozen=True)
class Routed:
    """An executor's GenerateResponse and how the router got it."""

    result: Any
    attempted_executor_ids: tuple[str, ...]
    placement_reason: PlacementReason
    router_queue_s: float
    """Time the request waited in the router for an executor slot, over all attempts."""


@dataclass(frozen=True)
class PreloadReplica:
    """One executor's part of a Preload: its id and its PreloadResponse."""

    executor_id: str
    result: Any


@dataclass(frozen=True)
class Preloaded:
    replicas: tuple[PreloadReplica, ...]
    """Every executor that loaded the model, in the order chosen (never empty)."""

    @property
    def executor_id(self) -> str:
        return self.replicas[0].executor_id

    @property
    def result(self) -> Any:
        return self.replicas[0].result


class EvictOutcome(enum.Enum):
    """What Evict did on one executor (hotslot.router.v1.EvictOutcome)."""

    EVICTED = 1
    MARKED = 2
    NOT_HELD = 3
    FAILED = 4


@dataclass(frozen=True)
class EvictAnswer:
    """One executor's answer to an Evict."""

    executor_id: str
    outcome: EvictOutcome
    freed_bytes: int = 0
    pending_bytes: int = 0
    message: str = ""


@dataclass(frozen=True)
class ClusterStatus:
    executors: list[Any]
    """Each connected executor's latest status message, ordered by id."""
    router_queue_depth: int
    unreachable_addresses: list[str]


@dataclass(eq=False)
class _Waiter:
    model_id: str
    revision: int
    work: RequestWork
    exclude: frozenset[str]
    adapters: tuple[tuple[str, int], ...] = ()
    future: asyncio.Future[tuple[Slot, PlacementReason]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class RouterCore:
    """Requests that find no executor with room wait in a FIFO queue of at most `max_queue` for up to
    `queue_timeout_s` (or the client's deadline); beyond the queue they are refused with `retry_after_s` as the
    hint. A request whose executor fails with ExecutorUnavailable is placed again, away from the executors already
    tried, up to `retry_attempts` times."""

    def __init__(
        self,
        membership: ExecutorMembership,
        catalog: ModelCatalog | None,
        *,
        max_queue: int = 256,
        max_inflight_per_executor: int = 32,
        queue_timeout_s: float = 30.0,
        retry_after_s: float = 1.0,
        retry_attempts: int = 1,
        tracer_provider: trace.TracerProvider | None = None,
        metrics: RouterMetrics | None = None,
        refusal_log_interval_s: float = DEFAULT_REFUSAL_LOG_INTERVAL_S,
    ) -> None:
        self.membership = membership
        self.catalog = catalog
        self.placement = Placement(max_inflight_per_executor)
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self.retry_attempts = retry_attempts
        self.refusals = RefusalLog(log, refusal_log_interval_s)
        self._waiters: deque[_Waiter] = deque()
        self._model_bytes: dict[tuple[str, int], int] = {}
        self._adapter_bases: dict[tuple[str, int], str] = {}
        """(adapter id, revision asked) -> its base model id, as the registry said."""
        """(model id, revision asked) -> the registry's total_bytes, for the load cost of models no executor holds."""
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        self.metrics = metrics or RouterMetrics()
        membership.add_listener(self._admit_waiters)

    # -- generate ----------------------------------------------------------------------------------------
    async def generate(self, call: GenerateCall, time_remaining_s: float | None) -> Routed:
        call, deadline = await self._prepare(call, time_remaining_s)
        attempted: list[str] = []
        queued_s = 0.0
        while True:
            slot, reason, waited_s = await self._acquire(call, attempted, deadline)
            queued_s += waited_s
            try:
                result = await slot.link.client.generate(call, self._timeout(deadline))  # type: ignore[union-attr]
            except ExecutorUnavailable as error:
                self._retry_or_raise(call.model_id, call.request_id, attempted, error)
                continue
            except ResourceExhausted as error:
                self._executor_refused(call, attempted, error)
                raise
            finally:
                self.membership.release(slot)
            return Routed(result, tuple(attempted), reason, queued_s)

    async def generate_stream(
        self, call: GenerateCall, time_remaining_s: float | None
    ) -> AsyncGenerator[ProgressEvent | Routed, None]:
        """Progress events, then one Routed. A stream that breaks before its result is retried like Generate:
        progress of the failed attempt has then already been sent, so the client sees loading and step counts
        start over on the new executor. Holding progress back until the result would make the stream useless as
        progress, and a result is never sent twice because nothing is retried after it."""
        call, deadline = await self._prepare(call, time_remaining_s)
        attempted: list[str] = []
        queued_s = 0.0
        while True:
            slot, reason, waited_s = await self._acquire(call, attempted, deadline)
            queued_s += waited_s
            try:
                stream = slot.link.client.generate_stream(call, self._timeout(deadline))  # type: ignore[union-attr]
                async with contextlib.aclosing(stream):
                    async for event in stream:
                        if isinstance(event, ResultEvent):
                            yield Routed(event.payload, tuple(attempted), reason, queued_s)
                            return
                        yield event
                raise ExecutorUnavailable(f"executor {slot.link.executor_id} ended the stream without a result")
            except ExecutorUnavailable as error:
                self._retry_or_raise(call.model_id, call.request_id, attempted, error)
            except ResourceExhausted as error:
                self._executor_refused(call, attempted, error)
                raise
            finally:
                self.membership.release(slot)

    def _executor_refused(self, call: GenerateCall, attempted: list[str], error: ResourceExhausted) -> None:
        self.refusals.refused(RefusalReason.EXECUTOR_REFUSED, f"executor {attempted[-1]}: {error.message}",
                              request_id=call.request_id, model_id=call.model_id)

    async def _prepare(self, call: GenerateCall, time_remaining_s: float | None) -> tuple[GenerateCall, float | None]:
        if not call.model_id:
            raise InvalidArgument.field("model.model_id", "is required")
        validate_request_id(call.request_id)
        if not call.request_id:
            # Made here, not left to the executor, so a retried request keeps one id across executors.
            call = replace(call, request_id=uuid.uuid4().hex)
        deadline = None if time_remaining_s is None else asyncio.get_running_loop().time() + time_remaining_s
        base = await self._check_registered(call.model_id, call.revision)
        adapters = tuple((a.model.model_id, a.model.revision) for a in call.adapters)
        if base:  # an adapter as the model: place its base, with it as the first adapter
            call = replace(call, place_model=(base, 0), place_adapters=((call.model_id, call.revision), *adapters))
        else:
            call = replace(call, place_adapters=adapters)
        return call, deadline

    def _retry_or_raise(self, model_id: str, request_id: str, attempted: list[str], error: ExecutorUnavailable) -> None:
        """Returns when another attempt should be made; otherwise raises the executor's own error (not "no other
        executor", which would hide why the request failed)."""
        if len(attempted) > self.retry_attempts or not self._any_live(frozenset(attempted)):
            raise error
        self.metrics.retried("generate")
        log.warning(
            "executor %s failed (%s); retrying elsewhere", attempted[-1], error.message,
            extra={"request_id": request_id, "model_id": model_id, "attempted": list(attempted)},
        )

    # -- preload ---------------------------------------------------------------------------------------------
    async def preload(
        self, model_id: str, revision: int, replicas: int, time_remaining_s: float | None
    ) -> Preloaded:
        """Loads the model into standby on `replicas` executors (0 means 1; all live ones when fewer exist), in
        parallel: those already holding it first, then those placement would choose for it. A preload does not
        compute, so queue room is not required and nothing is counted in flight. A replica whose executor fails with
        ExecutorUnavailable is retried on another executor not chosen yet, like a Generate; when some replicas
        fail that way and no executor is left for them, the others are the answer (the response lists them). Any
        other failure is the answer. A LoRA adapter is placed like a request for it: on executors holding its base
        first (holders of the adapter among them first), where the executor keeps its weights in host memory."""
        if not model_id:
            raise InvalidArgument.field("model.model_id", "is required")
        if replicas < 0:
            raise InvalidArgument.field("replicas", f"must be 0 or more, got {replicas}")
        base = await self._check_registered(model_id, revision)
        deadline = None if time_remaining_s is None else asyncio.get_running_loop().time() + time_remaining_s
        claimed: list[str] = []
        live = sum(1 for link in self.membership.placeable() if link.live)
        wanted = min(max(replicas, 1), live)
        if wanted == 0:
            raise self._no_executor(())
        outcomes = await asyncio.gather(
            *(self._preload_one(model_id, revision, base, claimed, deadline) for _ in range(wanted)),
            return_exceptions=True,
        )
        done = [outcome for outcome in outcomes if isinstance(outcome, PreloadReplica)]
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        final = next((f for f in failures if not isinstance(f, ExecutorUnavailable)), None)
        if final is not None or not done:
            raise final or failures[0]
        if failures:
            log.warning("preload of %s: %d of %d replicas loaded (%s)", model_id, len(done), wanted,
                        "; ".join(getattr(f, "message", str(f)) for f in failures))
        # In the order chosen, not the order finished.
        done.sort(key=lambda replica: claimed.index(replica.executor_id))
        return Preloaded(tuple(done))

    async def _preload_one(
        self, model_id: str, revision: int, base: str, claimed: list[str], deadline: float | None
    ) -> PreloadReplica:
        """One replica: the best executor nobody has claimed yet (claimed in the same step it is picked, so
        parallel replicas never pick one twice), retried elsewhere on ExecutorUnavailable."""
        attempted: list[str] = []
        while True:
            choice = self._preload_choice(model_id, revision, base, claimed)
            if choice is None:
                raise self._no_executor(claimed)
            link = choice.candidate
            assert isinstance(link, ExecutorLink) and link.client is not None
            claimed.append(link.executor_id)
            attempted.append(link.executor_id)
            try:
                result = await link.client.preload(model_id, revision, self._timeout(deadline))
            except ExecutorUnavailable as error:
                if len(attempted) > self.retry_attempts or not self._any_live(frozenset(claimed)):
                    raise
                self.metrics.retried("preload")
                log.warning("executor %s failed to preload %s (%s); trying another", link.executor_id, model_id,
                            error.message)
                continue
            return PreloadReplica(link.executor_id, result)

    def _preload_choice(self, model_id: str, revision: int, base: str, claimed: list[str]) -> Choice | None:
        # An adapter: rank its base with it as the request's adapter (its load counts where it is not held).
        place, adapters = ((base, 0), ((model_id, revision),)) if base else ((model_id, revision), ())
        ranked = self.placement.rank(
            *place, self.membership.placeable(), size_bytes=self._model_bytes.get(place, 0),
            now=asyncio.get_running_loop().time(), exclude=claimed, need_room=False, adapters=adapters,
        )
        # Executors holding it first, best tier first (active or standby: nothing to do; host: a cheap copy),
        # whatever their queues: a preload does not wait behind them. Then the others, soonest finish first.
        ranked.sort(key=lambda choice: choice.tier
                    if choice.reason in _HELD_REASONS and choice.tier is not None else len(Tier))
        return ranked[0] if ranked else None

    # -- evict -------------------------------------------------------------------------------------------------
    async def evict(
        self, model_id: str, revision: int, executor_id: str, time_remaining_s: float | None
    ) -> list[EvictAnswer]:
        """Evicts the model on `executor_id`, whose errors are the answer (NotFound when it does not hold the model);
        or, with no executor named, on every connected executor whose latest status lists it (revision 0: any
        revision), in parallel, each failure listed as that executor's outcome. Ordered by executor id."""
        validate_model_id(model_id, "model.model_id")
        links = self.membership.placeable()
        timeout = time_remaining_s
        if executor_id:
            link = next((link for link in links if link.executor_id == executor_id and link.client), None)
            if link is None:
                raise NotFound(f"no connected executor has id {executor_id!r}", reason=Reason.EXECUTOR_NOT_FOUND)
            return [self._evict_answer(executor_id, await link.client.evict(model_id, revision, timeout))]  # type: ignore[union-attr]
        holders = [
            link for link in links
            if link.client is not None and link.snapshot is not None and any(
                held.model_id == model_id and (revision == 0 or held.revision == revision)
                for held in (*link.snapshot.models, *link.snapshot.adapters)
            )
        ]
        outcomes = await asyncio.gather(
            *(link.client.evict(model_id, revision, timeout) for link in holders),  # type: ignore[union-attr]
            return_exceptions=True,
        )
        answers = []
        for link, outcome in zip(holders, outcomes, strict=True):
            if isinstance(outcome, NotFound):
                answers.append(EvictAnswer(link.executor_id, EvictOutcome.NOT_HELD, message=outcome.message))
            elif isinstance(outcome, HotslotError):
                answers.append(EvictAnswer(link.executor_id, EvictOutcome.FAILED, message=outcome.message))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                answers.append(self._evict_answer(link.executor_id, outcome))
        return answers

    @staticmethod
    def _evict_answer(executor_id: str, evicted: Any) -> EvictAnswer:
        outcome = EvictOutcome.MARKED if evicted.pending_bytes else EvictOutcome.EVICTED
        return EvictAnswer(executor_id, outcome, evicted.freed_bytes, evicted.pending_bytes)

    # -- registry passthrough ----------------------------------------------------------------------------
    async def list_models(self, request: Any) -> Any:
        return await self._catalog().list_models(request)

    async def get_model(self, model_id: str, revision: int) -> Any:
        return await self._catalog().get_model(model_id, revision)

    def _catalog(self) -> ModelCatalog:
        if self.catalog is None:
            raise Unavailable("no registry is configured: set registry_address (HOTSLOT_ROUTER_REGISTRY_ADDRESS)")
        return self.catalog

    async def _check_registered(self, model_id: str, revision: int) -> str:
        """A model no executor holds is about to be loaded somewhere: ask the registry first, so an unknown id is
        refused with the registry's NOT_FOUND before it takes an executor's queue slot. Models already held are
        known to exist and skip this hop. If the registry cannot answer, the executor (which asks it too) decides.
        Returns the base model id when the model is a LoRA adapter (remembered per id and revision), else ""."""
        known_base = self._adapter_bases.get((model_id, revision))
        if known_base is not None:
            return known_base
        if self.catalog is None or held_anywhere(model_id, revision, self.membership.placeable()):
            return ""
        try:
            model = await self.catalog.get_model(model_id, revision)
        except Unavailable as error:
            log.warning("cannot check %s with the registry (%s); sending it on", model_id, error.message)
            return ""
        # Its size prices the load (placement's load cost); one entry per registered model asked for.
        self._model_bytes[(model_id, revision)] = model.manifest.total_bytes
        if kind_from_proto(model.kind) == "LORA_ADAPTER" and model.base_model_id:
            base: str = model.base_model_id
            self._adapter_bases[(model_id, revision)] = base
            return base
        return ""

    # -- cluster status ----------------------------------------------------------------------------------
    def cluster_status(self) -> ClusterStatus:
        return ClusterStatus(
            executors=[link.snapshot.raw for link in self.membership.placeable()],  # type: ignore[union-attr]
            router_queue_depth=len(self._waiters),
            unreachable_addresses=self.membership.unreachable_addresses(),
        )

    # -- admission ---------------------------------------------------------------------------------------
    async def _acquire(
        self, call: GenerateCall, attempted: list[str], deadline: float | None
    ) -> tuple[Slot, PlacementReason, float]:
        """Places the request and counts it in flight on the chosen executor, waiting in the router queue while
        every executor is full. Appends the executor id to `attempted`. Returns (slot, reason, seconds waited)."""
        model_id, revision = call.place_model or (call.model_id, call.revision)
        waiter = _Waiter(model_id, revision, call.work, frozenset(attempted), call.place_adapters)
        placed = self._place(waiter)
        if placed is not None:
            (slot, reason), waited = placed, 0.0
        else:
            # A span only when the request really queues: the common case then costs no span of its own, and
            # the placement lands as attributes on the RPC's span below.
            with self._tracer.start_as_current_span("router.queue"):
                loop = asyncio.get_running_loop()
                started = loop.time()
                slot, reason = await self._wait_for_room(waiter, deadline)
                waited = loop.time() - started
        attempted.append(slot.link.executor_id)
        self.metrics.placed(reason)
        span = trace.get_current_span()
        span.set_attribute("hotslot.model_id", call.model_id)
        span.set_attribute("hotslot.request_id", call.request_id)
        span.set_attribute("hotslot.executor_id", slot.link.executor_id)
        span.set_attribute("hotslot.placement_reason", reason.label)
        span.set_attribute("hotslot.placement_work_s", slot.work_s)
        span.set_attribute("hotslot.attempts", len(attempted))
        return slot, reason, waited

    def _place(self, waiter: _Waiter) -> tuple[Slot, PlacementReason] | None:
        """Chooses an executor with room and reserves a slot there with the request's estimated work, in one step;
        None when every executor is full."""
        choice = self.placement.choose(
            waiter.model_id, waiter.revision, self.membership.placeable(), work=waiter.work,
            size_bytes=self._model_bytes.get((waiter.model_id, waiter.revision), 0),
            now=asyncio.get_running_loop().time(), exclude=waiter.exclude, adapters=waiter.adapters,
        )
        if choice is None:
            return None
        assert isinstance(choice.candidate, ExecutorLink)
        slot = self.membership.reserve(
            choice.candidate, work_s=choice.estimate.work_s, model=(waiter.model_id, waiter.revision)
        )
        return slot, choice.reason

    async def _wait_for_room(self, waiter: _Waiter, deadline: float | None) -> tuple[Slot, PlacementReason]:
        if not self._any_live(waiter.exclude):
            raise self._no_executor(waiter.exclude)
        if len(self._waiters) >= self.max_queue:
            self.refusals.refused(RefusalReason.QUEUE_FULL, f"every executor is busy and {self.max_queue} "
                                  "requests wait already (max_queue)", model_id=waiter.model_id)
            raise self.metrics.refused(ResourceExhausted(
                f"every executor is busy and the router queue is full ({self.max_queue} waiting); "
                f"retry in {self.retry_after_s:g} s",
                retry_after_s=self.retry_after_s,
                reason=Reason.QUEUE_FULL,
            ), "queue_full")
        loop = asyncio.get_running_loop()
        limit = self.queue_timeout_s
        if deadline is not None:
            limit = min(limit, deadline - loop.time())
        self._waiters.append(waiter)
        self.metrics.queue_depth(len(self._waiters))
        try:
            async with asyncio.timeout(max(limit, 0.0)):
                return await waiter.future
        except TimeoutError:
            if deadline is not None and loop.time() >= deadline:
                raise self.metrics.refused(DeadlineExceeded(
                    "the deadline passed while the request waited for an executor"), "deadline") from None
            self.refusals.refused(RefusalReason.QUEUE_TIMEOUT, f"waited {self.queue_timeout_s:g} s "
                                  "(queue_timeout_s) without room on any executor", model_id=waiter.model_id)
            raise self.metrics.refused(ResourceExhausted(
                f"no executor had room within {self.queue_timeout_s:g} s; retry in {self.retry_after_s:g} s",
                retry_after_s=self.retry_after_s,
                reason=Reason.QUEUE_FULL,
            ), "queue_timeout") from None
        except BaseException:
            # Cancelled (client gone) after _admit_waiters reserved a slot for us but before we resumed: give the
            # slot back, or the executor would look busier forever.
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.membership.release(future.result()[0])
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            self.metrics.queue_depth(len(self._waiters))
            waiter.future.cancel()

    def _admit_waiters(self) -> None:
        """Runs after every membership change: hands freed room to waiting requests, oldest first. Runs without
        awaiting, so a slot is reserved in the same step it is found and nobody else can take it."""
        if not self._waiters:
            return
        for waiter in list(self._waiters):
            if waiter.future.done():
                continue
            placed = self._place(waiter)
            if placed is not None:
                self._waiters.remove(waiter)
                waiter.future.set_result(placed)
            elif not self._any_live(waiter.exclude):
                self._waiters.remove(waiter)
                waiter.future.set_exception(self._no_executor(waiter.exclude))

    def _any_live(self, exclude: frozenset[str]) -> bool:
        return any(link.live and link.executor_id not in exclude for link in self.membership.placeable())

    def _no_executor(self, exclude: Collection[str]) -> Unavailable:
        """The error of a request refused for want of a live executor (counted as a refusal: it is raised)."""
        known = len(self.membership.targets())
        if exclude:
            error: Unavailable = ExecutorUnavailable(
                f"no other executor is ready (tried {', '.join(exclude)}; {known} known)",
                reason=Reason.NO_EXECUTOR_READY,
            )
        else:
            error = Unavailable(f"no executor is ready ({known} known, "
                                f"{len(self.membership.unreachable_addresses())} unreachable)",
                                reason=Reason.NO_EXECUTOR_READY)
        self.metrics.refused(error, "no_executor")
        return error

    @staticmethod
    def _timeout(deadline: float | None) -> float | None:
        if deadline is None:
            return None
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise DeadlineExceeded("the deadline passed before the request reached an executor")
        return remaining
