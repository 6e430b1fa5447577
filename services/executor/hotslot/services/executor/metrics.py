"""The executor's metrics: the instruments its core records into where each thing happens (a load phase ends, a
swap, a pipeline call, a request served, a state change). Built on an OpenTelemetry Meter; no grpc here."""
from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import metrics

from hotslot.loading.hostpool import HostPool
from hotslot.metering import SECONDS_BUCKETS, no_meter

from .slots import Tier, TierUsage


class ExecutorMetrics:
    """Prometheus names (README "Metrics"): hotslot_executor_queue_depth, _requests_total{tier},
    _load_duration_seconds{phase,from_tier}, _swap_duration_seconds, _denoise_duration_seconds,
    _tier_bytes{tier}, _tier_budget_bytes{tier}, _preloader_restarts_total, and with a host pool
    _host_pool_free_bytes, _host_pool_allocations_total{result}."""

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or no_meter()
        self._meter = meter
        self._queue_depth = meter.create_gauge(
            "hotslot_executor_queue_depth", unit="{request}",
            description="Requests on this executor: waiting in its queue or running on the device.",
        )
        self._requests = meter.create_counter(
            "hotslot_executor_requests", unit="{request}",
            description="Requests served, by the tier their model came from (ACTIVE, STANDBY, HOST, LOCAL_DISK, "
            "BACKING_STORE).",
        )
        self._load = meter.create_histogram(
            "hotslot_executor_load_duration", unit="s",
            description="Seconds of each load phase (ensure: files to local disk; read: weights into host memory; "
            "materialize: a pipeline on the device), by phase and the tier the model came from.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self._swap = meter.create_histogram(
            "hotslot_executor_swap_duration", unit="s",
            description="Seconds to make another model the active one (a pointer swap between two requests).",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self._denoise = meter.create_histogram(
            "hotslot_executor_denoise_duration", unit="s",
            description="Seconds of the denoising loop of each pipeline call (one call may serve a batch).",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self._tier_bytes = meter.create_gauge(
            "hotslot_executor_tier_bytes", unit="By", description="Bytes of models held in each tier."
        )
        self._tier_budget = meter.create_gauge(
            "hotslot_executor_tier_budget_bytes", unit="By", description="Byte budget of each tier."
        )
        self._preloader_restarts = meter.create_counter(
            "hotslot_executor_preloader_restarts", unit="{restart}",
            description="Times the preloader subprocess died and was started again.",
        )
        # Counters start at 0 for every label value, so rate() and increase() see them before the first event.
        self._preloader_restarts.add(0)
        for tier in Tier:
            if tier is not Tier.UNSPECIFIED:
                self._requests.add(0, {"tier": tier.name})

    def state(self, queue_depth: int, tiers: Iterable[TierUsage]) -> None:
        """The queue and the tiers after a change."""
        self._queue_depth.set(queue_depth)
        for usage in tiers:
            self._tier_bytes.set(usage.used_bytes, {"tier": usage.tier.name})
            self._tier_budget.set(usage.budget_bytes, {"tier": usage.tier.name})

    def served(self, tier: Tier) -> None:
        self._requests.add(1, {"tier": tier.name})

    def load_phase(self, phase: str, seconds: float, from_tier: Tier) -> None:
        self._load.record(seconds, {"phase": phase, "from_tier": from_tier.name})

    def swapped(self, seconds: float) -> None:
        self._swap.record(seconds)

    def denoised(self, seconds: float) -> None:
        self._denoise.record(seconds)

    def preloader_restarted(self, times: int = 1) -> None:
        self._preloader_restarts.add(times)

    def observe_host_pool(self, pool: HostPool) -> None:
        """The recycled host memory (`host_pool_bytes`), read from `pool` at each scrape."""
        self._meter.create_observable_gauge(
            "hotslot_executor_host_pool_free_bytes", [lambda _options: [metrics.Observation(pool.free_bytes)]],
            unit="By", description="Free memory of the host pool, kept for the next conversions: what dropped converted "
            "weights used, and what --host-pool-reserve made at start.",
        )
        self._meter.create_observable_counter(
            "hotslot_executor_host_pool_allocations",
            [lambda _options: [metrics.Observation(pool.reused, {"result": "reused"}),
                               metrics.Observation(pool.created, {"result": "created"})]],
            unit="{buffer}", description="Buffers of converted weights, by whether they reused pooled memory "
            "(result=reused) or were new (result=created).",
        )
