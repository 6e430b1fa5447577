"""Which queued requests run next: first in, first out, except that a request whose model is held may overtake
earlier ones whose models are still loading, within an overtake budget per passed request, and that requests for the
same model with compatible parameters run as one pipeline call. Pure functions over the queue; no asyncio."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from .generation import GenerationParams, batch_key
from .slots import ModelKey

_EPS = 1e-9


class Queued(Protocol):
    key: ModelKey
    adapters: tuple[Any, ...]  # the LoRA adapters (and scales) it applies on `key`
    params: GenerationParams
    overtaken_s: float  # budget spent so far by requests that overtook it


Q = TypeVar("Q", bound=Queued)
"""The queue's entries: whatever the caller queues, given back as they are."""


@dataclass(frozen=True)
class Plan(Generic[Q]):
    """`run`: requests to serve now as one pipeline call (empty when none can run); `passed`: earlier requests they
    overtake, each to be charged the call's cost; `head`: the first request, whose model must be loading when it is
    not held (whether or not something overtakes it)."""

    run: list[Q] = field(default_factory=list)
    passed: list[Q] = field(default_factory=list)
    head: Q | None = None


def same_call(a: Queued, b: Queued) -> bool:
    """Whether two requests can share one pipeline call: the same model with the same adapters at the same scales
    (a call runs with one adapter set), and equal batch keys."""
    return a.key == b.key and a.adapters == b.adapters and batch_key(a.params) == batch_key(b.params)


def plan_next(
    queue: Sequence[Q],
    *,
    ready: Callable[[Q], bool],
    call_seconds: Callable[[list[GenerationParams]], float | None],
    max_overtake_s: float,
    max_batch_images: int,
) -> Plan[Q]:
    """The next pipeline call. The head runs when its model is ready; otherwise the first ready request behind it
    runs if its call's estimated seconds fit in the remaining budget of every request it passes, none of which may
    be ready (a ready request is never overtaken). The call then takes compatible requests for the same model from
    behind, up to `max_batch_images` images, as long as the requests they pass can afford the larger call too."""
    if not queue:
        return Plan()
    head = queue[0]
    passed: list[Q] = []
    for index, leader in enumerate(queue):
        if ready(leader):
            if passed and not _affordable([leader.params], passed, call_seconds, max_overtake_s):
                return Plan(head=head)
            run, more = _batch(queue, index, passed, ready, call_seconds, max_overtake_s, max_batch_images)
            return Plan(run=run, passed=passed + more, head=head)
        if max_overtake_s <= 0:
            return Plan(head=head)
        passed.append(leader)
    return Plan(head=head)


def _batch(
    queue: Sequence[Q],
    index: int,
    passed: list[Q],
    ready: Callable[[Q], bool],
    call_seconds: Callable[[list[GenerationParams]], float | None],
    max_overtake_s: float,
    max_batch_images: int,
) -> tuple[list[Q], list[Q]]:
    leader = queue[index]
    run: list[Q] = [leader]
    skipped: list[Q] = []
    images = leader.params.num_images
    for job in queue[index + 1:]:
        if images >= max_batch_images:
            break
        joins = same_call(job, leader) and images + job.params.num_images <= max_batch_images
        if not joins:
            if ready(job) or max_overtake_s <= 0:
                break  # a ready request is not overtaken, and without a budget nothing is
            skipped.append(job)
            continue
        charged = passed + skipped
        if charged and not _affordable([j.params for j in (*run, job)], charged, call_seconds, max_overtake_s):
            break
        run.append(job)
        images += job.params.num_images
    last = queue.index(run[-1])
    return run, [j for j in skipped if queue.index(j) < last]  # those behind the last one taken are not passed


def _affordable(
    params: list[GenerationParams],
    passed: Sequence[Queued],
    call_seconds: Callable[[list[GenerationParams]], float | None],
    max_overtake_s: float,
) -> bool:
    seconds = call_seconds(params)
    if seconds is None:
        return False
    return all(p.overtaken_s + seconds <= max_overtake_s + _EPS for p in passed)


def service_order(
    queue: Sequence[Q],
    *,
    ready: Callable[[Q], bool],
    call_seconds: Callable[[list[GenerationParams]], float | None],
    max_overtake_s: float,
    max_batch_images: int,
) -> list[Q]:
    """The queue in the order `plan_next` would serve it if nothing else arrived or finished loading meanwhile: the
    calls it would make one after another, and a head that nothing may overtake once its model has loaded."""
    left = list(queue)
    spent = {id(j): j.overtaken_s for j in left}
    order: list[Q] = []

    class _View:  # the request with the budget it would have spent by then
        __slots__ = ("key", "adapters", "params", "overtaken_s", "job")

        def __init__(self, job: Q) -> None:
            self.key, self.adapters, self.params = job.key, job.adapters, job.params
            self.overtaken_s, self.job = spent[id(job)], job

    while left:
        views = [_View(j) for j in left]
        plan: Plan[_View] = plan_next(views, ready=lambda v: ready(v.job), call_seconds=call_seconds,
                         max_overtake_s=max_overtake_s, max_batch_images=max_batch_images)
        taken = [v.job for v in plan.run] or [views[0].job]
        if plan.run:
            seconds = call_seconds([j.params for j in taken]) or 0.0
            for v in plan.passed:
                spent[id(v.job)] += seconds
        order.extend(taken)
        left = [j for j in left if all(j is not t for t in taken)]
    return order
