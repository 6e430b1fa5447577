"""The executor's queue as data: one queued generation request (`Job`), and the requests waiting for the device and
running on it (`RequestQueue`). The scheduler serves it, the preparations look ahead in it, the status lists it."""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry.context import Context

from .generation import GenerationParams
from .records import AdapterUse, AppliedAdapter, GenerateOutcome, LoadEvent, StepEvent
from .slots import ModelKey

if TYPE_CHECKING:
    from .preparation import Preparation

# Where a request's progress goes (on the event loop): the servicer streams it to the client.
Emit = Callable[[LoadEvent | StepEvent], None]


@dataclass(eq=False)
class Job:
    """One queued generation request."""

    request_id: str
    key: ModelKey
    params: GenerationParams
    total_bytes: int
    emit: Emit
    enqueued_at: float = field(default_factory=time.perf_counter)
    enqueued_ns: int = field(default_factory=time.time_ns)
    stop: threading.Event = field(default_factory=threading.Event)
    future: asyncio.Future[GenerateOutcome] | None = None
    context: Context | None = None
    overtaken_s: float = 0.0  # charged by the calls that overtook it
    front_at: float | None = None  # perf_counter when it first was the head (or ran)
    preps: list[Preparation] = field(default_factory=list)  # the loads it waited for as the head
    adapters: tuple[AdapterUse, ...] = ()  # applied on `key`, in order
    applied: list[AppliedAdapter] = field(default_factory=list)  # set when it runs


class RequestQueue:
    """The requests waiting for the device, in arrival order; those of the pipeline call on the device now; and the
    event that makes the worker plan again."""

    def __init__(self) -> None:
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []  # the requests of the pipeline call on the device now
        self.run_started = 0.0  # perf_counter when that call started
        self.wake = asyncio.Event()

    def depth(self) -> int:
        return len(self.waiting) + len(self.running)

    def live(self) -> list[Job]:
        """The waiting requests not cancelled."""
        return [j for j in self.waiting if not j.stop.is_set()]
