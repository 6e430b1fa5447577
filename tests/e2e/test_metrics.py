"""Every service's Prometheus endpoint, scraped over HTTP after real traffic: all four run as separate processes
(registry, storage-cache, one real executor, router), a client generates through the router (a cold load: ensure,
read, materialize, swap, denoise), generates again (the model is active now), asks for an unknown model and lists
the registry; each service's counters, histograms and gauges then say so."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest

from hotslot.registry.v1 import registry_service_pb2 as rpb
from hotslot.registry.v1 import registry_service_pb2_grpc as rgrpc
from tests.support.metrics import Scrape
from tests.support.procs import HOTSLOT, ServiceProcess
from tests.support.stack import running_cluster
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

REGISTRY = "hotslot.registry.v1.RegistryService"
STORAGE = "hotslot.storage.v1.StorageCacheService"
EXECUTOR = "hotslot.executor.v1.ExecutorService"
ROUTER = "hotslot.router.v1.RouterService"


def generate(router: ServiceProcess, model: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*HOTSLOT, "generate", "--router", router.address, "-m", model, "--steps", "2", "--width", "64",
         "--height", "64", "--quiet", "--json", "-o", str(out), "a lighthouse at dusk"],
        capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
def test_every_service_serves_prometheus_metrics_that_move_with_real_traffic(tmp_path: Path, tiny_family) -> None:
    with running_cluster(tmp_path, tiny_family[:1], executors=1) as stack:
        assert stack.router is not None
        before = {svc.name: Scrape(svc) for svc in (stack.registry, stack.storage, stack.executors[0], stack.router)}
        assert before["executor"].value("hotslot_executor_requests_total") == 0

        model = tiny_family[0].name
        for attempt in range(2):
            done = generate(stack.router, model, tmp_path / f"out-{attempt}.png")
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)
        unknown = generate(stack.router, "no-such-model", tmp_path / "never.png")
        assert unknown.returncode != 0
        with grpc.insecure_channel(stack.registry.address) as channel:
            listed = rgrpc.RegistryServiceStub(channel).ListModels(rpb.ListModelsRequest(), timeout=10)
        assert [m.model_id for m in listed.models] == [model]

        requests = "hotslot_grpc_server_requests_total"
        registry = Scrape(stack.registry)
        storage = Scrape(stack.storage)
        # A stream's call is counted when the server side finishes it, which may come just after the client has
        # its last message: scrape until both generates are counted.
        executor = wait_for(lambda: (s := Scrape(stack.executors[0])).value(
            requests, grpc_service=EXECUTOR, grpc_code="OK") >= 2 and s, "the executor to count both generates", 10)
        router = wait_for(lambda: (s := Scrape(stack.router)).value(
            requests, grpc_service=ROUTER, grpc_code="OK") >= 2 and s, "the router to count both generates", 10)

    # Every service: its RPCs by method and status code, with their latency.
    assert registry.value(requests, grpc_service=REGISTRY, grpc_method="ListModels", grpc_code="OK") == 1
    assert registry.value(requests, grpc_service=REGISTRY, grpc_method="GetModel", grpc_code="NOT_FOUND") >= 1
    assert registry.value(requests, grpc_service=REGISTRY, grpc_method="GetModel", grpc_code="OK") >= 1
    assert storage.value(requests, grpc_service=STORAGE, grpc_code="OK") >= 1
    assert executor.value(requests, grpc_service=EXECUTOR, grpc_code="OK") >= 2
    # The router waits for the executor's status before closing its stream: no served request counts as cancelled.
    assert executor.value(requests, grpc_service=EXECUTOR, grpc_code="CANCELLED") == 0
    assert router.value(requests, grpc_service=ROUTER, grpc_code="OK") >= 2
    assert router.value(requests, grpc_service=ROUTER, grpc_code="NOT_FOUND") == 1
    for scrape in (registry, storage, executor, router):
        assert scrape.type_of("hotslot_grpc_server_requests") == "counter"
        assert scrape.type_of("hotslot_grpc_server_duration_seconds") == "histogram"
        assert scrape.value("hotslot_grpc_server_duration_seconds_count") >= 1

    # Storage-cache: the first Ensure missed every file and fetched it; the cache holds it within its capacity.
    assert storage.value("hotslot_storage_cache_misses_total") >= 1
    fetched = storage.value("hotslot_storage_cache_fetched_bytes_total")
    assert fetched > 0
    assert storage.value("hotslot_storage_cache_fill_duration_seconds_count") >= 1
    assert storage.value("hotslot_storage_cache_fill_bandwidth_bytes_per_second_count") >= 1
    assert 0 < storage.value("hotslot_storage_cache_used_bytes") <= storage.value("hotslot_storage_cache_capacity_bytes")
    assert storage.value("hotslot_storage_cache_evictions_total") == 0

    # Executor: a cold load through every phase, then the model served from the active slot.
    for phase in ("ensure", "read", "materialize"):
        assert executor.value("hotslot_executor_load_duration_seconds_count", phase=phase) == 1, phase
    assert executor.value("hotslot_executor_requests_total") == 2
    assert executor.value("hotslot_executor_requests_total", tier="ACTIVE") == 1
    assert executor.value("hotslot_executor_swap_duration_seconds_count") == 1
    assert executor.value("hotslot_executor_denoise_duration_seconds_count") == 2
    assert executor.value("hotslot_executor_queue_depth") == 0
    assert executor.value("hotslot_executor_tier_bytes", tier="ACTIVE") > 0
    assert executor.value("hotslot_executor_tier_budget_bytes", tier="ACTIVE") > 0
    assert executor.value("hotslot_executor_preloader_restarts_total") == 0

    # Router: the cold request loaded where it fit, the warm one went where the model was active.
    assert router.value("hotslot_router_placements_total", reason="load") == 1
    assert router.value("hotslot_router_placements_total", reason="active") == 1
    assert router.value("hotslot_router_queue_depth") == 0
    assert router.value("hotslot_router_refusals_total") == 0
    assert router.value("hotslot_router_retries_total") == 0
