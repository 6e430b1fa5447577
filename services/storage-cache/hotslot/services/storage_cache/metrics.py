"""The storage-cache's metrics: counters and histograms its core records into where each thing happens (an Ensure
finds or misses files, a fetch copies bytes), and gauges read from the blob store at each scrape (its own lock
makes that safe from the scrape thread). Built on an OpenTelemetry Meter; no grpc here."""
from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry import metrics

from hotslot.metering import BANDWIDTH_BUCKETS, SECONDS_BUCKETS, no_meter

from .blobstore import StoreUsage


class StorageCacheMetrics:
    """Prometheus names (README "Metrics"): hotslot_storage_cache_hits_total, _misses_total,
    _fetched_bytes_total, _fill_duration_seconds, _fill_bandwidth_bytes_per_second, _evictions_total, _used_bytes,
    _capacity_bytes, _pinned_bytes, _blobs."""

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        self._meter = meter = meter or no_meter()
        self._hits = meter.create_counter(
            "hotslot_storage_cache_hits", unit="{file}",
            description="Files an Ensure found in the local cache.",
        )
        self._misses = meter.create_counter(
            "hotslot_storage_cache_misses", unit="{file}",
            description="Files an Ensure did not find locally (fetched from the backing store, or joined a fetch "
            "already running).",
        )
        self._fetched = meter.create_counter(
            "hotslot_storage_cache_fetched", unit="By",
            description="Bytes copied from the backing store into the cache (a re-read after a mismatch counts).",
        )
        self._fill_seconds = meter.create_histogram(
            "hotslot_storage_cache_fill_duration", unit="s",
            description="Seconds to copy and hash one file from the backing store.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self._fill_bandwidth = meter.create_histogram(
            "hotslot_storage_cache_fill_bandwidth", unit="By/s",
            description="Bytes per second of each file copied from the backing store.",
            explicit_bucket_boundaries_advisory=BANDWIDTH_BUCKETS,
        )
        for counter in (self._hits, self._misses, self._fetched):
            counter.add(0)  # at 0 from the start, so rate() sees them before the first Ensure

    def observe_store(self, usage: Callable[[], StoreUsage]) -> None:
        """Gauges (and the evictions counter) read from `usage()` at each scrape."""

        def reading(field: str) -> Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]:
            return lambda _options: [metrics.Observation(getattr(usage(), field))]

        self._meter.create_observable_counter(
            "hotslot_storage_cache_evictions", [reading("evictions")], unit="{blob}",
            description="Blobs evicted (least recently used first) to make room.",
        )
        for name, field, description in (
            ("hotslot_storage_cache_used_bytes", "used_bytes", "Bytes of blobs in the cache."),
            ("hotslot_storage_cache_capacity_bytes", "capacity_bytes", "Bytes of blobs the cache may hold."),
            ("hotslot_storage_cache_pinned_bytes", "pinned_bytes", "Bytes of blobs pinned by leases (not evictable)."),
        ):
            self._meter.create_observable_gauge(name, [reading(field)], unit="By", description=description)
        self._meter.create_observable_gauge(
            "hotslot_storage_cache_blobs", [reading("blob_count")], unit="{blob}", description="Blobs in the cache."
        )

    def ensured(self, hits: int, misses: int) -> None:
        self._hits.add(hits)
        self._misses.add(misses)

    def filled(self, size: int, seconds: float) -> None:
        """One copy of a file from the backing store: `size` bytes in `seconds`."""
        self._fetched.add(size)
        self._fill_seconds.record(seconds)
        if seconds > 0:
            self._fill_bandwidth.record(size / seconds)
