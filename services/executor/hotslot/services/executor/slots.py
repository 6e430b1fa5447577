"""The hot-swap slot: which models an executor holds in which tier (active, standby, host), measured in bytes
against a budget per tier, with reference counts so nothing a request uses is ever demoted or evicted.

Transitions (all under the manager's lock, between requests):
  load      -> HOST      weights arrived from the preloader (shared memory / device)
  HOST      -> STANDBY   pipeline materialized around those weights
  STANDBY   -> ACTIVE    swap: a pointer assignment, no I/O, no copy
  ACTIVE    -> STANDBY   the previous active model when another is swapped in
  STANDBY   -> HOST      over the standby budget: least recently used unreferenced pipeline dropped, weights kept
  HOST      -> evicted   over the host budget: least recently used unreferenced weights dropped, view unpinned
Models may share parts (components equal byte for byte: `components.ComponentPool`): an entry lists them with their
bytes, and a part is counted once, in the fastest tier of the entries that hold it.
LoRA adapters are entries too, always in HOST (their weights; the base's pipeline loads them when a request uses
them), counted in the host budget and evicted least recently used like the rest.
This module holds no torch code: what a tier change does to memory is the loader's business (`demote`, `drop`
callbacks)."""
from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hotslot.errors import NotFound, Reason, ResourceExhausted


class Tier(enum.IntEnum):
    # Values match hotslot.common.v1.Tier so converters stay trivial.
    ACTIVE = 1
    STANDBY = 2
    HOST = 3
    LOCAL_DISK = 4
    BACKING_STORE = 5


@dataclass(frozen=True, order=True)
class ModelKey:
    model_id: str
    revision: int

    def __str__(self) -> str:
        return f"{self.model_id}@{self.revision}"


@dataclass(eq=False)
class SlotEntry:
    key: ModelKey
    size_bytes: int
    weights: Any  # what the loader returned (LoadedWeights); host tier data
    tier: Tier = Tier.HOST
    pipeline: Any = None  # set in STANDBY and ACTIVE
    lease_id: str = ""
    view_path: str = ""
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)
    base: ModelKey | None = None  # set for a LoRA adapter: the pipeline it applies to
    parts: dict[str, int] = field(default_factory=dict)  # part id -> bytes: parts other entries may hold too
    evicting: bool = False  # marked by `evict` while in use: dropped when its last reference is released

    @property
    def is_adapter(self) -> bool:
        return self.base is not None


@dataclass(frozen=True)
class HeldModel:
    key: ModelKey
    tier: Tier
    size_bytes: int
    refs: int
    evicting: bool = False
    unique_bytes: int = 0  # held for this model alone
    shared_bytes: int = 0  # held once for this model and others (size_bytes = unique_bytes + shared_bytes)


@dataclass(frozen=True)
class TierUsage:
    tier: Tier
    used_bytes: int
    budget_bytes: int


class SlotManager:
    """Not thread-safe: the executor core calls it from its event loop only."""

    def __init__(
        self,
        *,
        active_budget_bytes: int,
        standby_budget_bytes: int,
        host_budget_bytes: int,
        on_demote: Callable[[SlotEntry], None] | None = None,
        on_evict: Callable[[SlotEntry], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budgets = {
            Tier.ACTIVE: active_budget_bytes,
            Tier.STANDBY: standby_budget_bytes,
            Tier.HOST: host_budget_bytes,
        }
        # Public: the executor core, built after the slots, installs what a demotion or eviction does.
        self.on_demote = on_demote or (lambda entry: None)
        self.on_evict = on_evict or (lambda entry: None)
        self._clock = clock
        self._entries: dict[ModelKey, SlotEntry] = {}
        self.active: SlotEntry | None = None

    # -- queries -----------------------------------------------------------------------------------------
    def get(self, key: ModelKey) -> SlotEntry | None:
        return self._entries.get(key)

    def tier_of(self, key: ModelKey) -> Tier | None:
        entry = self._entries.get(key)
        return entry.tier if entry else None

    def find(self, model_id: str, revision: int = 0) -> list[SlotEntry]:
        return [e for k, e in self._entries.items() if k.model_id == model_id and (revision == 0 or k.revision == revision)]

    def used(self, tier: Tier) -> int:
        """Bytes held in `tier`: each entry's own bytes, and each part once, in the fastest tier holding it."""
        own = sum(e.size_bytes - sum(e.parts.values()) for e in self._entries.values() if e.tier == tier)
        fastest: dict[str, tuple[Tier, int]] = {}
        for e in self._entries.values():
            for part, nbytes in e.parts.items():
                seen = fastest.get(part)
                if seen is None or e.tier < seen[0]:
                    fastest[part] = (e.tier, nbytes)
        return own + sum(nbytes for t, nbytes in fastest.values() if t == tier)

    def holders(self) -> dict[str, int]:
        """part id -> how many entries hold it."""
        counts: dict[str, int] = {}
        for e in self._entries.values():
            for part in e.parts:
                counts[part] = counts.get(part, 0) + 1
        return counts

    def held(self) -> list[HeldModel]:
        """The pipelines held (adapters: `adapters`), with the bytes each shares with other held models."""
        holders = self.holders()
        out = []
        for e in sorted(self._entries.values(), key=lambda e: (e.tier, e.key)):
            if e.is_adapter:
                continue
            shared = sum(nbytes for part, nbytes in e.parts.items() if holders[part] > 1)
            out.append(HeldModel(e.key, e.tier, e.size_bytes, e.refs, e.evicting, e.size_bytes - shared, shared))
        return out

    def adapters(self) -> list[SlotEntry]:
        """The LoRA adapters held, by key."""
        return sorted((e for e in self._entries.values() if e.is_adapter), key=lambda e: e.key)

    def usage(self) -> list[TierUsage]:
        return [TierUsage(tier, self.used(tier), budget) for tier, budget in self.budgets.items()]

    def check_fits(self, key: ModelKey, size_bytes: int) -> None:
        """Refuses a model that can never be served here, before anything is loaded."""
        if size_bytes > self.budgets[Tier.ACTIVE]:
            raise ResourceExhausted(
                f"model {key} needs {size_bytes} bytes, more than this executor's active budget "
                f"({self.budgets[Tier.ACTIVE]} bytes, HOTSLOT_EXECUTOR_ACTIVE_BUDGET_BYTES)",
                reason=Reason.MODEL_TOO_LARGE,
            )

    # -- transitions -------------------------------------------------------------------------------------
    def add_host(self, key: ModelKey, weights: Any, size_bytes: int, *, lease_id: str = "", view_path: str = "",
                 base: ModelKey | None = None, parts: dict[str, int] | None = None) -> SlotEntry:
        """Adds freshly loaded weights to the host tier and returns the entry *acquired*: the caller (who is about
        to materialize or run it) must `release` it. Other models make room now; if they cannot (all in use),
        the budget is met again when references are released. `parts` (part id -> bytes, within `size_bytes`)
        are what it may share with other entries."""
        if key in self._entries:
            raise ValueError(f"{key} is already held")
        entry = SlotEntry(key, size_bytes, weights, Tier.HOST, lease_id=lease_id, view_path=view_path,
                          last_used=self._clock(), refs=1, base=base, parts=dict(parts or {}))
        self._entries[key] = entry
        self._enforce(Tier.HOST)
        return entry

    def set_standby(self, entry: SlotEntry, pipeline: Any) -> bool:
        """HOST -> STANDBY. Returns False (and stays HOST, pipeline dropped) when the standby budget cannot make
        room for it; the caller may still activate it directly."""
        self._require(entry)
        if entry.is_adapter:
            raise ValueError(f"{entry.key} is a LoRA adapter; adapters stay in the host tier")
        entry.pipeline = pipeline
        entry.tier = Tier.STANDBY
        entry.last_used = self._clock()
        entry.refs += 1
        try:
            self._enforce(Tier.STANDBY)
            if self.used(Tier.STANDBY) > self.budgets[Tier.STANDBY]:
                self._demote(entry)
                return False
            return True
        finally:
            entry.refs -= 1

    def activate(self, entry: SlotEntry, pipeline: Any = None) -> SlotEntry | None:
        """Makes `entry` the active model: a pointer swap. The previous active model becomes STANDBY (then the
        standby budget is enforced). Returns the previous active entry."""
        self._require(entry)
        if pipeline is not None:
            entry.pipeline = pipeline
        if entry.pipeline is None:
            raise ValueError(f"{entry.key} has no pipeline to activate")
        previous = self.active
        if previous is entry:
            entry.last_used = self._clock()
            return previous
        self.active = entry
        entry.tier = Tier.ACTIVE
        entry.last_used = self._clock()
        if previous is not None:
            previous.tier = Tier.STANDBY
            self._enforce(Tier.STANDBY)
        return previous

    def touch(self, entry: SlotEntry) -> None:
        entry.last_used = self._clock()

    def acquire(self, entry: SlotEntry) -> None:
        self._require(entry)
        entry.refs += 1
        entry.last_used = self._clock()

    def release(self, entry: SlotEntry) -> None:
        entry.refs = max(0, entry.refs - 1)
        if entry.evicting and entry.refs == 0 and self._entries.get(entry.key) is entry:
            self._evict_now(entry)
        # Budgets may have been exceeded while the entry was protected.
        for tier in (Tier.STANDBY, Tier.HOST):
            self._enforce(tier)

    def evict(self, key: ModelKey) -> bool:
        """Drops a model from every tier now and returns True; a model a request uses is marked instead (False) and
        dropped when its last reference is released. Requests that acquire it meanwhile still run on it."""
        entry = self._entries.get(key)
        if entry is None:
            raise NotFound(f"model {key} is not held by this executor", reason=Reason.MODEL_NOT_HELD)
        if entry.refs:
            entry.evicting = True
            return False
        self._evict_now(entry)
        return True

    def _evict_now(self, entry: SlotEntry) -> None:
        if self.active is entry:
            self.active = None
        self._drop(entry)

    def clear(self) -> list[SlotEntry]:
        dropped = list(self._entries.values())
        for entry in dropped:
            self._drop(entry)
        self.active = None
        return dropped

    # -- internals ---------------------------------------------------------------------------------------
    def _require(self, entry: SlotEntry) -> None:
        if self._entries.get(entry.key) is not entry:
            raise NotFound(f"model {entry.key} is no longer held by this executor")

    def _enforce(self, tier: Tier) -> None:
        budget = self.budgets[tier]
        while self.used(tier) > budget:
            victims = sorted(
                (e for e in self._entries.values() if e.tier == tier and e.refs == 0 and e is not self.active),
                key=lambda e: e.last_used,
            )
            if not victims:
                return  # everything left is in use; the budget is met again once they are released
            victim = victims[0]
            if tier == Tier.STANDBY:
                self._demote(victim)
            else:
                self._drop(victim)

    def _demote(self, entry: SlotEntry) -> None:
        entry.pipeline = None
        entry.tier = Tier.HOST
        self.on_demote(entry)
        self._enforce(Tier.HOST)

    def _drop(self, entry: SlotEntry) -> None:
        self._entries.pop(entry.key, None)
        entry.pipeline = None
        self.on_evict(entry)
        entry.weights = None
