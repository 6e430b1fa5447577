"""The router's refusal log on a fake clock: one line per reason per interval, with the count of those left out."""
from __future__ import annotations

import logging

import pytest

from hotslot import errors
from hotslot.services.router.refusals import RefusalLog, RefusalReason
from tests.unit.test_router_core import Cluster, call, cluster, settle  # noqa: F401 (the cluster fixture)


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "refusals-test"]


def test_refusals_are_logged_once_per_interval_per_reason_with_a_count_of_the_rest(caplog) -> None:
    clock = FakeClock()
    refusals = RefusalLog(logging.getLogger("refusals-test"), interval_s=10, clock=clock)
    with caplog.at_level(logging.WARNING, logger="refusals-test"):
        refusals.refused(RefusalReason.QUEUE_FULL, "256 wait")
        for _ in range(41):
            clock.now += 0.2
            refusals.refused(RefusalReason.QUEUE_FULL, "256 wait")
        refusals.refused(RefusalReason.EXECUTOR_REFUSED, "executor exec-a: queue is full")  # another reason
        clock.now += 2  # 10.2 s after the first line
        refusals.refused(RefusalReason.QUEUE_FULL, "256 wait")
        clock.now += 30
        refusals.refused(RefusalReason.QUEUE_FULL, "256 wait")
    assert lines(caplog) == [
        "refused a request with RESOURCE_EXHAUSTED, router queue full: 256 wait",
        "refused a request with RESOURCE_EXHAUSTED, executor refused: executor exec-a: queue is full",
        "refused a request with RESOURCE_EXHAUSTED, router queue full: 256 wait (41 more refused for this reason "
        "in the 10 s before)",
        "refused a request with RESOURCE_EXHAUSTED, router queue full: 256 wait",
    ]
    assert caplog.records[0].refusal_reason == "QUEUE_FULL"


async def test_the_core_logs_a_full_router_queue_and_an_executors_refusal(  # noqa: F811
    cluster: Cluster, caplog  # noqa: F811 (the fixture imported above)
) -> None:
    clock = FakeClock()
    cluster.core.refusals = RefusalLog(logging.getLogger("refusals-test"), interval_s=10, clock=clock)
    a, b = cluster["exec-a"], cluster["exec-b"]
    with caplog.at_level(logging.WARNING, logger="refusals-test"):
        a.script = [errors.ResourceExhausted("executor exec-a queue is full (4); retry later", retry_after_s=1)]
        with pytest.raises(errors.ResourceExhausted):
            await cluster.core.generate(call("alpha"), None)

        a.script, b.script = ["hold"], ["hold"]
        cluster.start(cluster.core.generate(call("alpha", "first"), None))
        cluster.start(cluster.core.generate(call("beta", "second"), None))
        await settle(lambda: a.holding == 1 and b.holding == 1)
        cluster.start(cluster.core.generate(call("alpha", "waiting"), None))
        await settle(lambda: cluster.core.cluster_status().router_queue_depth == 1)
        for _ in range(3):
            with pytest.raises(errors.ResourceExhausted, match="router queue is full"):
                await cluster.core.generate(call("alpha"), None)
    assert lines(caplog) == [
        "refused a request with RESOURCE_EXHAUSTED, executor refused: executor exec-a: executor exec-a queue is "
        "full (4); retry later",
        "refused a request with RESOURCE_EXHAUSTED, router queue full: every executor is busy and 1 requests wait "
        "already (max_queue)",
    ]
