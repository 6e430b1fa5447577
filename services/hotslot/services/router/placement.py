"""Placement: which executor should run a request for a model. Pure logic over what the executors last reported
plus what the router itself has sent them since; no I/O, no clock."""
from __future__ import annotations

import enum
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

REASON_ACTIVE = "active"
REASON_STANDBY = "standby"
REASON_HOST = "host"
REASON_LEAST_LOADED = "least-loaded"


class Tier(enum.IntEnum):
    """Residency tiers, fastest first; the values are hotslot.common.v1.Tier's."""

    UNSPECIFIED = 0
    ACTIVE = 1
    STANDBY = 2
    HOST = 3
    LOCAL_DISK = 4
    BACKING_STORE = 5


# Tiers that make an executor preferable, best first. Disk tiers do not: every executor reads the same
# storage-cache / NFS, so a copy on one node's disk saves little next to an executor's free queue.
_PREFERRED_TIERS = {Tier.ACTIVE: (0, REASON_ACTIVE), Tier.STANDBY: (1, REASON_STANDBY), Tier.HOST: (2, REASON_HOST)}
_LEAST_LOADED_RANK = len(_PREFERRED_TIERS)


@dataclass(frozen=True)
class HeldModel:
    """One model an executor holds, in one tier."""

    model_id: str
    revision: int
    tier: Tier
    size_bytes: int = 0


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

    @property
    def held_bytes(self) -> int:
        return sum(model.size_bytes for model in self.models)

    def best_tier(self, model_id: str, revision: int) -> Tier | None:
        """Fastest tier holding the model; revision 0 matches any revision held."""
        tiers = [
            model.tier
            for model in self.models
            if model.model_id == model_id
            and (revision == 0 or model.revision == revision)
            and model.tier != Tier.UNSPECIFIED
        ]
        return min(tiers) if tiers else None


@dataclass(eq=False)
class Candidate:
    """An executor as placement sees it: its last status and the router's own traffic to it."""

    snapshot: ExecutorSnapshot | None = None
    connected: bool = False
    inflight: int = 0
    """Requests the router has sent there that have not finished."""
    sent_since_status: int = 0
    """Requests the router has sent there since `snapshot` arrived (not yet counted in its queue_depth)."""

    @property
    def executor_id(self) -> str:
        return self.snapshot.executor_id if self.snapshot is not None else ""

    @property
    def live(self) -> bool:
        """Connected and READY: may take requests when it has room."""
        return self.connected and self.snapshot is not None and self.snapshot.ready

    @property
    def effective_depth(self) -> int:
        """Queue depth counting what the router sent since the status. A burst is spread before the executor's
        next status arrives; the router's own in-flight count is a floor, in case that status is late."""
        assert self.snapshot is not None
        return max(self.snapshot.queue_depth + self.sent_since_status, self.inflight)


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    reason: str


class Placement:
    """Chooses an executor for a model: one holding it ACTIVE, then STANDBY, then in HOST memory, then the
    least-loaded (which will load it). Within a tier the least-loaded wins; ties go to the executor holding the
    fewest bytes (most room to load), then to the smallest id, so the choice is deterministic."""

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

    def load(self, candidate: Candidate) -> float:
        """Effective queue depth relative to capacity, so executors with different queue sizes compare fairly.
        An executor that reports no capacity is measured against the router's per-executor bound."""
        assert candidate.snapshot is not None
        capacity = candidate.snapshot.queue_capacity
        if capacity <= 0:
            capacity = self.max_inflight_per_executor
        return candidate.effective_depth / capacity

    def choose(
        self,
        model_id: str,
        revision: int,
        candidates: Iterable[Candidate],
        *,
        exclude: Collection[str] = (),
        need_room: bool = True,
    ) -> Choice | None:
        """The best live executor not in `exclude` (executor ids); with `need_room` only those with room.
        None when there is none."""
        best: tuple | None = None
        best_choice: Choice | None = None
        for candidate in candidates:
            if not candidate.live or candidate.executor_id in exclude:
                continue
            if need_room and not self.has_room(candidate):
                continue
            snapshot = candidate.snapshot
            assert snapshot is not None
            tier = snapshot.best_tier(model_id, revision)
            rank, reason = _PREFERRED_TIERS.get(tier, (_LEAST_LOADED_RANK, REASON_LEAST_LOADED))
            key = (rank, self.load(candidate), snapshot.held_bytes, snapshot.executor_id)
            if best is None or key < best:
                best, best_choice = key, Choice(candidate, reason)
        return best_choice


def held_anywhere(model_id: str, revision: int, candidates: Iterable[Candidate]) -> bool:
    """Whether a live executor holds the model in a tier placement prefers (so it is known to exist)."""
    return any(
        candidate.live and candidate.snapshot.best_tier(model_id, revision) in _PREFERRED_TIERS  # type: ignore[union-attr]
        for candidate in candidates
    )
