"""The hot-swap slot: which models an executor holds in which tier (active, standby, host), measured in bytes
against a budget per tier, with reference counts so nothing a request uses is ever demoted or evicted.

The tier machine is `TRANSITIONS` below (adapters: `ADAPTER_TRANSITIONS`): every change of an entry's tier goes
through `SlotManager._move`, which refuses a move the table lacks (`IllegalTransition`). All moves happen under the
manager's lock, between requests.
Models may share parts (components equal byte for byte: `components.ComponentPool`): an entry lists them with their
bytes, and a part is counted once, in the fastest tier of the entries that hold it.
LoRA adapters are entries too, always in HOST (their weights; the base's pipeline loads them when a request uses
them), counted in the host budget and evicted least recently used like the rest.
This module holds no torch code: what a tier change does to memory is the loader's business (`demote`, `drop`
callbacks). The `Tier` enum is hotslot-core's (`hotslot.tiers`, equal to hotslot.common.v1.Tier)."""
from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hotslot.errors import NotFound, Reason, ResourceExhausted
from hotslot.tiers import Tier

__all__ = ["ADAPTER_TRANSITIONS", "NOT_HELD", "TRANSITIONS", "HeldModel", "IllegalTransition", "ModelKey", "Move",
           "SlotEntry", "SlotManager", "Tier", "TierUsage", "check_transition"]


NOT_HELD = None
"""The "tier" of a model before it is loaded and after it is evicted, in `TRANSITIONS`."""


class Move(enum.StrEnum):
    """What moves an entry between tiers: each `SlotManager` method that changes a tier names its move."""

    LOAD = "load"
    """`add_host`: weights arrived from the preloader (shared memory / device)."""
    MATERIALIZE = "materialize"
    """`set_standby`: a pipeline built around the host weights."""
    ACTIVATE = "activate"
    """`activate`: the model becomes the one inference runs on."""
    SWAP_OUT = "swap out"
    """`activate` of another model: the previous active one steps back."""
    DEMOTE = "demote"
    """Over the standby budget (or no room for a new standby pipeline): the pipeline dropped, the weights kept."""
    DROP = "drop"
    """Over the host budget (least recently used, unreferenced), `evict` or `clear`: everything dropped, view unpinned."""


TRANSITIONS: Mapping[tuple[Tier | None, Tier | None], Move] = {
    # from          to                 by
    (NOT_HELD,      Tier.HOST):        Move.LOAD,
    (Tier.HOST,     Tier.STANDBY):     Move.MATERIALIZE,
    (Tier.HOST,     Tier.ACTIVE):      Move.ACTIVATE,     # materialized straight into the active slot (no standby room)
    (Tier.STANDBY,  Tier.ACTIVE):      Move.ACTIVATE,     # the swap: a pointer assignment, no I/O, no copy
    (Tier.ACTIVE,   Tier.STANDBY):     Move.SWAP_OUT,
    (Tier.STANDBY,  Tier.HOST):        Move.DEMOTE,
    (Tier.HOST,     NOT_HELD):         Move.DROP,
    (Tier.STANDBY,  NOT_HELD):         Move.DROP,
    (Tier.ACTIVE,   NOT_HELD):         Move.DROP,         # evict or clear only: budgets never drop the active model
}
"""The executor's tier machine for pipelines: (from, to) -> the move that makes it; any other change raises
`IllegalTransition`. A tier it does not name is not held by an executor (LOCAL_DISK and BACKING_STORE are where a
load comes from: `costs.LOAD_TIERS`). To add a tier: README "Adding a tier"."""

ADAPTER_TRANSITIONS: Mapping[tuple[Tier | None, Tier | None], Move] = {
    (NOT_HELD, Tier.HOST): Move.LOAD,
    (Tier.HOST, NOT_HELD): Move.DROP,
}
"""LoRA adapters stay in HOST from load to eviction (the base pipeline loads them when a request uses them)."""


class IllegalTransition(ValueError):
    """A tier change `TRANSITIONS` does not allow: a bug in the caller."""


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


def check_transition(source: Tier | None, to: Tier | None, move: Move, *, adapter: bool = False,
                     key: ModelKey | None = None) -> None:
    """Raises `IllegalTransition` unless `TRANSITIONS` (for an adapter `ADAPTER_TRANSITIONS`) has source -> to by
    `move`."""
    table = ADAPTER_TRANSITIONS if adapter else TRANSITIONS
    if table.get((source, to)) != move:
        what = f"{'LoRA adapter' if adapter else 'model'}{f' {key}' if key else ''}"
        allowed = ", ".join(f"{_name(a)} -> {_name(b)} ({m})" for (a, b), m in table.items())
        raise IllegalTransition(f"{what} cannot move from {_name(source)} to {_name(to)} by {move}; the tier machine "
                                f"allows {allowed}" + ("; adapters stay in the host tier" if adapter else ""))


def _name(tier: Tier | None) -> str:
    return "not held" if tier is None else tier.name


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
        check_transition(NOT_HELD, Tier.HOST, Move.LOAD, adapter=base is not None)
        entry = SlotEntry(key, size_bytes, weights, Tier.HOST, lease_id=lease_id, view_path=view_path,
                          last_used=self._clock(), refs=1, base=base, parts=dict(parts or {}))
        self._entries[key] = entry
        self._enforce(Tier.HOST)
        return entry

    def set_standby(self, entry: SlotEntry, pipeline: Any) -> bool:
        """HOST -> STANDBY. Returns False (and stays HOST, pipeline dropped) when the standby budget cannot make
        room for it; the caller may still activate it directly."""
        self._require(entry)
        self._move(entry, Tier.STANDBY, Move.MATERIALIZE)
        entry.pipeline = pipeline
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
        self._move(entry, Tier.ACTIVE, Move.ACTIVATE)
        self.active = entry
        entry.last_used = self._clock()
        if previous is not None:
            self._move(previous, Tier.STANDBY, Move.SWAP_OUT)
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
    @staticmethod
    def _move(entry: SlotEntry, to: Tier | None, move: Move) -> None:
        """The one place an entry's tier changes (NOT_HELD: it is being dropped; its `tier` keeps the last one)."""
        check_transition(entry.tier, to, move, adapter=entry.is_adapter, key=entry.key)
        if to is not None:
            entry.tier = to

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
        self._move(entry, Tier.HOST, Move.DEMOTE)
        entry.pipeline = None
        self.on_demote(entry)
        self._enforce(Tier.HOST)

    def _drop(self, entry: SlotEntry) -> None:
        self._move(entry, NOT_HELD, Move.DROP)
        self._entries.pop(entry.key, None)
        entry.pipeline = None
        self.on_evict(entry)
        entry.weights = None
