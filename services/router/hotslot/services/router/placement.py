"""Placement: which executor should run a request for a model. Pure logic over what the executors last reported
plus what the router itself has sent them since; no I/O, and no clock of its own (the caller passes `now`).

The policy: each live executor with room is given an estimate of when the request would finish there, and the
soonest wins (with one credit, below).

    finish = queued work + load + service

- **queued work**: the executor's reported `backlog_seconds` (or, while it reports none, its queue depth times a
  default request's service time), less the time since that status arrived, plus the work the router has sent it
  since (each request's own estimate, load included). The router's in-flight work there is a floor, in case a
  status arrives before the executor has counted the router's requests.
- **load**: the cost of making the model active from the tier it is in there: 0 when active or standby (a pointer
  swap), `fixed + per_gib x size` from host memory, and from the node's disk (LOCAL_DISK) when the executor does not
  hold it, because the router does not see disk contents and the storage-cache keeps what a node read. Nothing when
  a request already queued there (the executor's queue, or the router's requests in flight) will have loaded it.
  Costs are the executor's measured ones (`CostEstimates.load_costs`); for a tier it has not measured, the median
  of the other live executors' measurements, then what it reports unmeasured, then the DEFAULT_* constants below.
- **service**: the request's work units (steps x width x height / 512^2 x images, the executor's defaults for zeros)
  times the executor's `seconds_per_work_unit`, plus its `seconds_per_request`; until it has measured any, the
  median of the live executors that have, and the defaults below while none has. (An executor that has run nothing
  must not look faster than those that have just because the defaults are for another device: it would draw
  requests for held models to a second load.)
- **the credit**: where a request already queued there will load the model (it is not resident yet), that load is
  part of the queued work, but a request for the same model shares it instead of paying for one of its own; the
  ranking leaves it out (`Estimate.shared_load_s`). Without it, the second request for a cold model would load it
  again on any idle executor, since both sides of the comparison would hold one load.

So a model stays where it is held while its queue there is shorter than a load elsewhere, and spreads to a second
executor (reason SPREAD) once that queue costs more; a model held nowhere goes to the executor that finishes it
soonest (LOAD), and the requests after it follow it there while their queue (behind the load) is shorter than a
second load elsewhere, so cold traffic consolidates. SPREAD also names a load on one executor while another is
already loading the model for the router's earlier requests. With equal queues the tier order falls out: active
and standby both cost nothing to make active (the tie-break prefers active), host memory costs less than a disk,
and a load costs more than nothing. Ties (equal estimates) go to the better tier, then to the executor holding the
fewest bytes (most room to load), then to the smallest id, so the choice is deterministic."""
from __future__ import annotations

import enum
import statistics
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from hotslot.tiers import Tier as Tier  # re-exported: residency tiers, fastest first (hotslot.common.v1.Tier)

GIB = 1024**3
WORK_UNIT_PIXELS = 512 * 512

# Stand-ins for what an executor has not measured (a fresh executor, or one that reports no costs). A default
# request (25 steps of 512x512) then costs 1.35 s, and a load from the node's disk 1 s + 1 s/GiB: a 2 GiB model
# (3 s to load) stays on an executor holding it until more than two such requests wait there.
DEFAULT_SECONDS_PER_WORK_UNIT = 0.05
DEFAULT_SECONDS_PER_REQUEST = 0.1
DEFAULT_STEPS = 25
DEFAULT_WIDTH = 512
DEFAULT_HEIGHT = 512
DEFAULT_MODEL_BYTES = 2 * GIB
"""Size of a model neither an executor nor the registry has given a size for (an SD 1.5 pipeline in fp16)."""
DEFAULT_ADAPTER_BYTES = 64 * 1024**2
"""Size of a LoRA adapter no executor reports (an SD 1.5 rank-64 adapter in fp16 is ~75 MB)."""


class PlacementReason(enum.IntEnum):
    """Why an executor was chosen; the values are hotslot.router.v1.PlacementReason's."""

    UNSPECIFIED = 0
    ACTIVE = 1
    """The model is active there."""
    STANDBY = 2
    """The model is in standby there (a pointer swap away)."""
    HOST = 3
    """The model's weights are in host memory there."""
    LOAD = 4
    """No live executor holds the model: it loads where the request finishes soonest."""
    SPREAD = 5
    """Another executor holds the model (or is loading it), but its queue would take longer than loading it here."""

    @property
    def label(self) -> str:
        """Lower-case name, as in logs and span attributes ("active", "spread")."""
        return self.name.lower()


# Tiers an executor holds a model in, in the sense of "it is there": they make a reason ACTIVE/STANDBY/HOST and
# count for held_anywhere. Disk tiers do not: every executor reads the same storage-cache / NFS.
_HELD_TIERS: dict[Tier | None, PlacementReason] = {Tier.ACTIVE: PlacementReason.ACTIVE, Tier.STANDBY: PlacementReason.STANDBY,
               Tier.HOST: PlacementReason.HOST}
_FREE_TIERS = (Tier.ACTIVE, Tier.STANDBY)
_UNHELD_TIER = Tier.LOCAL_DISK
"""Tier a model is loaded from on an executor that does not hold it (see the module docstring)."""


@dataclass(frozen=True)
class HeldModel:
    """One model an executor holds, in one tier."""

    model_id: str
    revision: int
    tier: Tier
    size_bytes: int = 0


@dataclass(frozen=True)
class QueuedRequest:
    """One request in an executor's queue, as its status lists it: placement only needs its model (a load of it
    there is under way or will be). The rest of the entry (state, waits) reaches GetClusterStatus in `raw`."""

    model_id: str
    revision: int


@dataclass(frozen=True)
class TierCost:
    """Cost of a load from one tier, as the executor measured it (samples 0: its own defaults)."""

    tier: Tier
    fixed_seconds: float = 0.0
    seconds_per_gib: float = 0.0
    samples: int = 0


@dataclass(frozen=True)
class CostEstimates:
    """What an executor measured, for placement; zeros mean "not measured" and placement uses its defaults."""

    seconds_per_work_unit: float = 0.0
    seconds_per_request: float = 0.0
    backlog_seconds: float = 0.0
    load_costs: tuple[TierCost, ...] = ()
    default_steps: int = 0
    default_width: int = 0
    default_height: int = 0

    @property
    def measured_service(self) -> bool:
        return self.seconds_per_work_unit > 0

    def load_seconds(self, tier: Tier, size_bytes: int) -> float:
        """Seconds to make a model of `size_bytes` active from `tier`."""
        if tier in _FREE_TIERS:
            return 0.0
        if tier not in DEFAULT_LOAD_COSTS:  # UNSPECIFIED or a tier newer than this router
            tier = _UNHELD_TIER
        reported = (c for c in self.load_costs if c.tier == tier and (c.fixed_seconds or c.seconds_per_gib))
        cost = next(reported, DEFAULT_LOAD_COSTS[tier])
        return cost.fixed_seconds + cost.seconds_per_gib * size_bytes / GIB

    def service_seconds(self, work: RequestWork) -> float:
        """Device seconds of one request."""
        units = work.units(self.default_steps or DEFAULT_STEPS, self.default_width or DEFAULT_WIDTH,
                           self.default_height or DEFAULT_HEIGHT)
        if self.measured_service:
            return units * self.seconds_per_work_unit + self.seconds_per_request
        return units * DEFAULT_SECONDS_PER_WORK_UNIT + DEFAULT_SECONDS_PER_REQUEST

    def filled_from(self, peers: CostEstimates) -> CostEstimates:
        """These costs with what this executor has not measured taken from `peers` (see `peer_costs`): the service
        time, and the load cost of each tier without samples (ahead of this executor's own unmeasured values)."""
        take_service = not self.measured_service and peers.measured_service
        own = {cost.tier for cost in self.load_costs if cost.samples > 0}
        if not take_service and not any(cost.tier not in own for cost in peers.load_costs):
            return self
        load_costs = (
            *(cost for cost in self.load_costs if cost.samples > 0),
            *(cost for cost in peers.load_costs if cost.tier not in own),
            *(cost for cost in self.load_costs if cost.samples <= 0),
        )
        filled = replace(self, load_costs=load_costs)
        if take_service:
            filled = replace(filled, seconds_per_work_unit=peers.seconds_per_work_unit,
                             seconds_per_request=peers.seconds_per_request)
        return filled


def peer_costs(candidates: Iterable[Candidate]) -> CostEstimates:
    """The medians of what the given executors measured (service time; each tier's load cost, measured ones only),
    for an executor that has not measured them yet; zeros where none has."""
    snapshots = [candidate.snapshot for candidate in candidates if candidate.snapshot is not None]
    service = [s.costs for s in snapshots if s.costs.measured_service]
    by_tier: dict[Tier, list[TierCost]] = {}
    for snapshot in snapshots:
        for cost in snapshot.costs.load_costs:
            if cost.samples > 0 and (cost.fixed_seconds or cost.seconds_per_gib):
                by_tier.setdefault(cost.tier, []).append(cost)
    if not service and not by_tier:
        return NO_COSTS
    return CostEstimates(
        seconds_per_work_unit=statistics.median(c.seconds_per_work_unit for c in service) if service else 0.0,
        seconds_per_request=statistics.median(c.seconds_per_request for c in service) if service else 0.0,
        load_costs=tuple(
            TierCost(tier, statistics.median(c.fixed_seconds for c in costs),
                     statistics.median(c.seconds_per_gib for c in costs), sum(c.samples for c in costs))
            for tier, costs in sorted(by_tier.items())
        ),
    )


NO_COSTS = CostEstimates()

# Loads from host memory (copy to the device), the node's disk (storage-cache) and NFS (a first read).
DEFAULT_LOAD_COSTS: Mapping[Tier, TierCost] = {
    Tier.HOST: TierCost(Tier.HOST, 0.5, 0.5),
    Tier.LOCAL_DISK: TierCost(Tier.LOCAL_DISK, 1.0, 1.0),
    Tier.BACKING_STORE: TierCost(Tier.BACKING_STORE, 1.0, 4.0),
}


@dataclass(frozen=True)
class RequestWork:
    """The size of a request, from its GenerationParams; zeros mean the executor's defaults."""

    steps: int = 0
    width: int = 0
    height: int = 0
    num_images: int = 0

    def units(self, default_steps: int, default_width: int, default_height: int) -> float:
        """Work units: one is one denoising step of one 512x512 image."""
        pixels = (self.width or default_width) * (self.height or default_height)
        return (self.steps or default_steps) * pixels / WORK_UNIT_PIXELS * max(self.num_images, 1)


DEFAULT_WORK = RequestWork()


@dataclass(frozen=True)
class ExecutorSnapshot:
    """What an executor last said about itself (one WatchStatus message)."""

    executor_id: str
    address: str
    ready: bool
    models: tuple[HeldModel, ...] = ()
    queue_depth: int = 0
    queue_capacity: int = 0
    version: int = 0
    raw: Any = field(default=None, compare=False)
    """The executor's own status message, reported as is by GetClusterStatus; placement never reads it."""
    queue: tuple[QueuedRequest, ...] = ()
    """Requests waiting or running there, in service order."""
    costs: CostEstimates = NO_COSTS
    adapters: tuple[HeldModel, ...] = ()
    """LoRA adapters held there (weights in host memory, or also loaded in their base's pipeline)."""

    def holds_adapter(self, model_id: str, revision: int) -> bool:
        return any(a.model_id == model_id and _matches(revision, a.revision) for a in self.adapters)

    @property
    def held_bytes(self) -> int:
        return sum(model.size_bytes for model in self.models)

    def best_tier(self, model_id: str, revision: int) -> Tier | None:
        """Fastest tier holding the model; revision 0 matches any revision held."""
        tiers = [
            model.tier
            for model in self.models
            if model.model_id == model_id and _matches(revision, model.revision) and model.tier != Tier.UNSPECIFIED
        ]
        return min(tiers) if tiers else None

    def queued_for(self, model_id: str, revision: int) -> bool:
        """Whether a request for the model is in this executor's queue (so its load, if any, is under way)."""
        return any(q.model_id == model_id and _matches(revision, q.revision) for q in self.queue)

    def backlog_seconds(self) -> float:
        """Work queued there when the status was sent: the executor's own estimate, or while it gives none, its
        queue depth times a default request."""
        if self.costs.backlog_seconds > 0:
            return self.costs.backlog_seconds
        return self.queue_depth * self.costs.service_seconds(DEFAULT_WORK)


def _matches(wanted: int, held: int) -> bool:
    return wanted == 0 or held == 0 or wanted == held


@dataclass(eq=False)
class Candidate:
    """An executor as placement sees it: its last status and the router's own traffic to it."""

    snapshot: ExecutorSnapshot | None = None
    connected: bool = False
    inflight: int = 0
    """Requests the router has sent there that have not finished."""
    sent_since_status: int = 0
    """Requests the router has sent there since `snapshot` arrived (not yet counted in its queue_depth)."""
    sent_work_s: float = 0.0
    """Estimated seconds of those requests (service, plus the load each started)."""
    inflight_work_s: float = 0.0
    """Estimated seconds of every request the router has in flight there."""
    inflight_models: dict[tuple[str, int], int] = field(default_factory=dict)
    """(model id, revision as sent) -> requests the router has in flight there: those models will be loaded there."""
    status_at: float | None = None
    """When `snapshot` arrived, on the caller's clock; None: treat it as current."""

    @property
    def executor_id(self) -> str:
        return self.snapshot.executor_id if self.snapshot is not None else ""

    @property
    def live(self) -> bool:
        """Connected and READY: may take requests when it has room."""
        return self.connected and self.snapshot is not None and self.snapshot.ready

    @property
    def effective_depth(self) -> int:
        """Queue depth counting what the router sent since the status; the router's own in-flight count is a
        floor, in case that status is late."""
        assert self.snapshot is not None
        return max(self.snapshot.queue_depth + self.sent_since_status, self.inflight)

    def count_sent(self, work_s: float, model: tuple[str, int]) -> None:
        """Counts a request the router sends there, with its estimated work and its (model id, revision)."""
        self.inflight += 1
        self.sent_since_status += 1
        self.sent_work_s += work_s
        self.inflight_work_s += work_s
        self.inflight_models[model] = self.inflight_models.get(model, 0) + 1

    def count_finished(self, work_s: float, model: tuple[str, int], *, before_next_status: bool) -> None:
        """Undoes count_sent when the request ends. One that ends before the executor's next status also stops
        counting as sent since the status, or an executor that reports rarely would look ever fuller."""
        self.inflight -= 1
        self.inflight_work_s = max(self.inflight_work_s - work_s, 0.0)
        left = self.inflight_models.get(model, 0) - 1
        if left > 0:
            self.inflight_models[model] = left
        else:
            self.inflight_models.pop(model, None)
        if before_next_status:
            self.sent_since_status -= 1
            self.sent_work_s = max(self.sent_work_s - work_s, 0.0)

    def status_received(self, snapshot: ExecutorSnapshot, now: float | None) -> None:
        """A new status: it counts what the router sent before it."""
        self.snapshot, self.status_at = snapshot, now
        self.sent_since_status, self.sent_work_s = 0, 0.0

    def will_load(self, model_id: str, revision: int) -> bool:
        """Whether a request queued there before this one needs the model, so it is resident by this one's turn."""
        assert self.snapshot is not None
        if self.snapshot.queued_for(model_id, revision):
            return True
        return any(m == model_id and _matches(revision, r) and n > 0 for (m, r), n in self.inflight_models.items())

    def queued_seconds(self, now: float | None) -> float:
        """Work ahead of a new request there (see the module docstring)."""
        assert self.snapshot is not None
        elapsed = 0.0 if now is None or self.status_at is None else max(now - self.status_at, 0.0)
        reported = max(self.snapshot.backlog_seconds() - elapsed, 0.0)
        return max(reported + self.sent_work_s, self.inflight_work_s)


@dataclass(frozen=True)
class Estimate:
    """When a request would finish on one executor, in seconds from now, and its parts."""

    queued_s: float
    load_s: float
    service_s: float
    shared_load_s: float = 0.0
    """The part of `queued_s` that is the load of this model for a request queued before it there, which this one
    shares (see the module docstring); 0 where the model is resident or nothing there loads it."""

    @property
    def finish_s(self) -> float:
        return self.queued_s + self.load_s + self.service_s

    @property
    def rank_s(self) -> float:
        """What placement compares: the finish less the shared load."""
        return self.finish_s - self.shared_load_s

    @property
    def work_s(self) -> float:
        """What the request adds to that executor's queue (its load and service)."""
        return self.load_s + self.service_s


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    reason: PlacementReason
    estimate: Estimate
    tier: Tier | None = None
    """Tier the chosen executor holds the model in (None: not held there)."""


class Placement:
    """Chooses the executor expected to finish a request soonest (the module docstring has the policy)."""

    def __init__(self, max_inflight_per_executor: int) -> None:
        if max_inflight_per_executor <= 0:
            raise ValueError("max_inflight_per_executor must be > 0")
        self.max_inflight_per_executor = max_inflight_per_executor

    def has_room(self, candidate: Candidate) -> bool:
        """Below the router's per-executor bound and (when the executor reports one) its queue capacity."""
        if candidate.inflight >= self.max_inflight_per_executor:
            return False
        capacity = candidate.snapshot.queue_capacity if candidate.snapshot is not None else 0
        return capacity <= 0 or candidate.effective_depth < capacity

    @staticmethod
    def estimate(
        candidate: Candidate,
        model_id: str,
        revision: int,
        work: RequestWork,
        size_bytes: int,
        now: float | None,
        peers: CostEstimates = NO_COSTS,
        adapters: Mapping[tuple[str, int], int] | None = None,
    ) -> Estimate:
        """When the request would finish on `candidate` (live, with a status); `peers` fills in the costs it has not
        measured (see `peer_costs`). `adapters` ((id, revision) -> bytes) are the LoRA adapters the request applies
        on the model: each one not held there adds its load from the node's disk (held ones switch in place)."""
        snapshot = candidate.snapshot
        assert snapshot is not None
        costs = snapshot.costs.filled_from(peers)
        tier = snapshot.best_tier(model_id, revision)
        queued = candidate.queued_seconds(now)
        load = shared = 0.0
        if tier not in _FREE_TIERS:
            load = costs.load_seconds(tier if tier is not None else _UNHELD_TIER, size_bytes)
            if candidate.will_load(model_id, revision):
                # An earlier request there loads it: none of our own, and the one queued is shared.
                load, shared = 0.0, min(load, queued)
        for (adapter_id, adapter_revision), adapter_size in (adapters or {}).items():
            if not snapshot.holds_adapter(adapter_id, adapter_revision):
                load += costs.load_seconds(_UNHELD_TIER, adapter_size)
        return Estimate(queued, load, costs.service_seconds(work), shared)

    def rank(
        self,
        model_id: str,
        revision: int,
        candidates: Iterable[Candidate],
        *,
        work: RequestWork = DEFAULT_WORK,
        size_bytes: int = 0,
        now: float | None = None,
        exclude: Collection[str] = (),
        need_room: bool = True,
        adapters: Iterable[tuple[str, int]] = (),
    ) -> list[Choice]:
        """Every live executor not in `exclude` (executor ids), with `need_room` only those with room, soonest
        finish first. `size_bytes` is the model's size when known from elsewhere (the registry), used when no
        executor reports one; 0 for unknown."""
        live = [c for c in candidates if c.live and c.executor_id not in exclude]
        size = model_bytes(model_id, revision, live) or size_bytes or DEFAULT_MODEL_BYTES
        held_elsewhere = held_anywhere(model_id, revision, live)
        loading = {candidate.executor_id for candidate in live if candidate.will_load(model_id, revision)}
        peers = peer_costs(live)
        adapter_sizes = {a: adapter_bytes(*a, live) or DEFAULT_ADAPTER_BYTES for a in adapters}
        keyed = []
        for candidate in live:
            if need_room and not self.has_room(candidate):
                continue
            snapshot = candidate.snapshot
            assert snapshot is not None
            estimate = self.estimate(candidate, model_id, revision, work, size, now, peers, adapter_sizes)
            tier = snapshot.best_tier(model_id, revision)
            if tier in _HELD_TIERS:
                reason = _HELD_TIERS[tier]
            elif held_elsewhere or loading - {snapshot.executor_id}:
                reason = PlacementReason.SPREAD
            else:
                reason = PlacementReason.LOAD
            # Rounded so that estimates equal but for float noise tie, and the tie-breaks decide.
            key = (round(estimate.rank_s, 6), tier if tier is not None else len(Tier), snapshot.held_bytes,
                   snapshot.executor_id)
            keyed.append((key, Choice(candidate, reason, estimate, tier)))
        keyed.sort(key=lambda item: item[0])
        return [choice for _, choice in keyed]

    def choose(
        self,
        model_id: str,
        revision: int,
        candidates: Iterable[Candidate],
        **kw: Any,
    ) -> Choice | None:
        """The first of `rank` (same arguments); None when there is none."""
        ranked = self.rank(model_id, revision, candidates, **kw)
        return ranked[0] if ranked else None


def model_bytes(model_id: str, revision: int, candidates: Iterable[Candidate]) -> int:
    """The model's size as an executor holding it reports it; 0 when none does."""
    for candidate in candidates:
        if candidate.snapshot is None:
            continue
        for model in candidate.snapshot.models:
            if model.model_id == model_id and _matches(revision, model.revision) and model.size_bytes > 0:
                return model.size_bytes
    return 0


def adapter_bytes(model_id: str, revision: int, candidates: Iterable[Candidate]) -> int:
    """A LoRA adapter's size as an executor holding it reports it; 0 when none does."""
    for candidate in candidates:
        for adapter in candidate.snapshot.adapters if candidate.snapshot is not None else ():
            if adapter.model_id == model_id and _matches(revision, adapter.revision) and adapter.size_bytes > 0:
                return adapter.size_bytes
    return 0


def held_anywhere(model_id: str, revision: int, candidates: Iterable[Candidate]) -> bool:
    """Whether a live executor holds the model active, standby or in host memory (so it is known to exist)."""
    return any(
        candidate.live and candidate.snapshot is not None
        and candidate.snapshot.best_tier(model_id, revision) in _HELD_TIERS
        for candidate in candidates
    )
