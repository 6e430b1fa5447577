"""The values the executor core hands out and takes in: request and load events, outcomes, phase timings, the queue
and status snapshots. Plain data, no behaviour; the servicer turns them into protobuf."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from hotslot.tiers import ExecutorState as ExecutorState
from hotslot.tiers import LoadPhase as LoadPhase

from .costs import CostSnapshot
from .slots import HeldModel, ModelKey, Tier, TierUsage

# The phases a request's time is split into, in order; each is also the name of its span.
PHASES = ("queue", "ensure", "read", "materialize", "swap", "denoise", "encode")
LOAD_PHASES = ("ensure", "read", "materialize")


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
