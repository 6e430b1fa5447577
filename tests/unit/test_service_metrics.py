"""The services' metrics objects on a real Prometheus endpoint: each method shows up under its documented name,
type and labels, refusals carry the status code their error reaches the client with, the storage gauges are read
from the blob store at scrape time, and the README's metric table is exactly what the services serve."""
from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hotslot.bootstrap.metrics import MetricsEndpoint
from hotslot.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from hotslot.loading.hostpool import HostPool
from hotslot.services.executor.metrics import ExecutorMetrics
from hotslot.services.executor.slots import Tier, TierUsage
from hotslot.services.router.metrics import RouterMetrics
from hotslot.services.router.placement import PlacementReason
from hotslot.services.storage_cache.blobstore import StoreUsage
from hotslot.services.storage_cache.metrics import StorageCacheMetrics
from tests.unit.test_router_core import call, settle
from tests.unit.test_router_core import cluster as router_cluster  # noqa: F401 - a fixture

ROOT = Path(__file__).resolve().parents[2]
# Served by the bootstrap's gRPC interceptor (tests/unit/test_bootstrap_metrics.py covers them).
GRPC_METRICS = {"hotslot_grpc_server_requests_total": "counter", "hotslot_grpc_server_duration_seconds": "histogram",
                "hotslot_grpc_server_in_flight": "gauge"}


@pytest.fixture
def endpoint():
    endpoint = MetricsEndpoint("hotslot-test")
    yield endpoint
    endpoint.close()


def families(endpoint: MetricsEndpoint) -> dict:
    text = generate_latest(endpoint.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text) if f.name != "target_info"}


def exposed(family) -> str:
    """The name a user queries: counters with their _total."""
    return f"{family.name}_total" if family.type == "counter" else family.name


def samples(family) -> dict[frozenset, float]:
    return {frozenset(s.labels.items()): s.value for s in family.samples
            if s.name in (family.name, f"{family.name}_total", f"{family.name}_count")}


def record_everything(endpoint: MetricsEndpoint, usage: StoreUsage) -> None:
    executor = ExecutorMetrics(endpoint.meter("executor"))
    executor.state(3, [TierUsage(Tier.ACTIVE, 100, 1000), TierUsage(Tier.HOST, 0, 5000)])
    executor.served(Tier.ACTIVE)
    executor.served(Tier.LOCAL_DISK)
    executor.load_phase("read", 0.2, Tier.LOCAL_DISK)
    executor.swapped(0.0001)
    executor.denoised(1.5)
    executor.preloader_restarted()
    pool = HostPool(0)
    pool.allocate(1024)  # created, then dropped at once: a pool without room keeps nothing
    executor.observe_host_pool(pool)
    router = RouterMetrics(endpoint.meter("router"))
    router.placed(PlacementReason.SPREAD)
    router.retried("generate")
    for error, reason in ((ResourceExhausted("full"), "queue_full"), (DeadlineExceeded("late"), "deadline"),
                          (Unavailable("none"), "no_executor")):
        assert router.refused(error, reason) is error
    router.queue_depth(2)
    storage = StorageCacheMetrics(endpoint.meter("storage"))
    storage.observe_store(lambda: usage)
    storage.ensured(hits=3, misses=2)
    storage.filled(64 * 2**20, 0.5)


def test_each_recording_appears_under_its_name_with_its_labels(endpoint):
    usage = StoreUsage(capacity_bytes=1000, used_bytes=600, pinned_bytes=100, reserved_bytes=0, blob_count=4,
                       view_count=1, leases=1, evictions=7)
    record_everything(endpoint, usage)
    found = families(endpoint)

    def value(name: str, **labels: str) -> float:
        return samples(found[name])[frozenset(labels.items())]

    assert value("hotslot_executor_queue_depth") == 3
    assert value("hotslot_executor_tier_bytes", tier="ACTIVE") == 100
    assert value("hotslot_executor_tier_budget_bytes", tier="HOST") == 5000
    assert value("hotslot_executor_requests", tier="LOCAL_DISK") == 1
    assert value("hotslot_executor_load_duration_seconds", phase="read", from_tier="LOCAL_DISK") == 1
    assert value("hotslot_executor_preloader_restarts") == 1
    assert value("hotslot_executor_host_pool_allocations", result="created") == 1
    assert value("hotslot_executor_host_pool_allocations", result="reused") == 0
    assert value("hotslot_executor_host_pool_free_bytes") == 0
    assert value("hotslot_router_placements", reason="spread") == 1
    assert value("hotslot_router_refusals", code="RESOURCE_EXHAUSTED", reason="queue_full") == 1
    assert value("hotslot_router_refusals", code="DEADLINE_EXCEEDED", reason="deadline") == 1
    assert value("hotslot_router_refusals", code="UNAVAILABLE", reason="no_executor") == 1
    assert value("hotslot_router_queue_depth") == 2
    assert (value("hotslot_storage_cache_hits"), value("hotslot_storage_cache_misses")) == (3, 2)
    assert value("hotslot_storage_cache_fetched_bytes") == 64 * 2**20
    assert value("hotslot_storage_cache_fill_bandwidth_bytes_per_second") == 1  # one file, 128 MiB/s
    assert value("hotslot_storage_cache_evictions") == 7
    assert value("hotslot_storage_cache_used_bytes") == 600
    assert value("hotslot_storage_cache_capacity_bytes") == 1000


def test_storage_gauges_follow_the_store_at_each_scrape(endpoint):
    usage = {"used": 10}
    storage = StorageCacheMetrics(endpoint.meter("storage"))
    storage.observe_store(lambda: StoreUsage(1000, usage["used"], 0, 0, 1, 1, 0, 0))
    assert samples(families(endpoint)["hotslot_storage_cache_used_bytes"])[frozenset()] == 10
    usage["used"] = 900
    assert samples(families(endpoint)["hotslot_storage_cache_used_bytes"])[frozenset()] == 900


def readme_metrics() -> dict[str, str]:
    """Metric name -> type, from the table in the README's Metrics section."""
    section = (ROOT / "README.md").read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(hotslot_\w+)` \| (\w+) \|", section, re.MULTILINE))


def test_the_readme_lists_exactly_the_metrics_the_services_serve_with_their_types(endpoint):
    usage = StoreUsage(1, 1, 1, 1, 1, 1, 1, 1)
    record_everything(endpoint, usage)
    served = {exposed(f): f.type for f in families(endpoint).values()} | GRPC_METRICS
    assert readme_metrics() == served


async def test_the_router_core_counts_placements_refusals_and_its_queue(endpoint, router_cluster) -> None:  # noqa: F811
    router_cluster.core.metrics = RouterMetrics(endpoint.meter("router"))
    a, b = router_cluster["exec-a"], router_cluster["exec-b"]
    a.script, b.script = ["hold"], ["hold"]
    first = router_cluster.start(router_cluster.core.generate(call("alpha", "first"), None))
    second = router_cluster.start(router_cluster.core.generate(call("beta", "second"), None))
    await settle(lambda: a.holding == 1 and b.holding == 1)
    waiting = router_cluster.start(router_cluster.core.generate(call("alpha", "waiting"), None))
    await settle(lambda: router_cluster.core.cluster_status().router_queue_depth == 1)
    assert samples(families(endpoint)["hotslot_router_queue_depth"])[frozenset()] == 1
    with pytest.raises(ResourceExhausted):
        await router_cluster.core.generate(call("alpha", "refused"), None)

    a.release.set()
    b.release.set()
    await asyncio.gather(first, second, waiting)
    found = families(endpoint)
    placements = samples(found["hotslot_router_placements"])
    assert placements[frozenset({("reason", "active")})] == 2  # first and waiting
    assert placements[frozenset({("reason", "standby")})] == 1  # second
    refusals = samples(found["hotslot_router_refusals"])
    assert refusals[frozenset({("code", "RESOURCE_EXHAUSTED"), ("reason", "queue_full")})] == 1
    assert sum(refusals.values()) == 1
    assert samples(found["hotslot_router_queue_depth"])[frozenset()] == 0
