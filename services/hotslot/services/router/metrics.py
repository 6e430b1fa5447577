"""The router's metrics: the instruments its core records into where each thing happens (a request placed, a retry,
a refusal, the router queue growing or shrinking). Built on an OpenTelemetry Meter; no grpc here."""
from __future__ import annotations

from opentelemetry import metrics

from hotslot.errors import DeadlineExceeded, HotslotError, ResourceExhausted, Unavailable
from hotslot.metering import no_meter

from .placement import PlacementReason

# The status code each refusal reaches the client with (the error interceptor maps the same classes).
_CODES: tuple[tuple[type[HotslotError], str], ...] = (
    (ResourceExhausted, "RESOURCE_EXHAUSTED"), (DeadlineExceeded, "DEADLINE_EXCEEDED"), (Unavailable, "UNAVAILABLE"),
)


class RouterMetrics:
    """Prometheus names (README "Metrics"): hotslot_router_placements_total{reason}, _retries_total{call},
    _refusals_total{code,reason}, _queue_depth."""

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or no_meter()
        self._placements = meter.create_counter(
            "hotslot_router_placements", unit="{request}",
            description="Requests placed on an executor, by why it was chosen (active, standby, host, load, spread).",
        )
        self._retries = meter.create_counter(
            "hotslot_router_retries", unit="{attempt}",
            description="Requests placed again on another executor after theirs failed, by call (generate, preload).",
        )
        self._refusals = meter.create_counter(
            "hotslot_router_refusals", unit="{request}",
            description="Requests the router refused without an executor answering, by status code and reason "
            "(queue_full, queue_timeout, deadline, no_executor).",
        )
        self._queue_depth = meter.create_gauge(
            "hotslot_router_queue_depth", unit="{request}",
            description="Requests waiting in the router for an executor with room.",
        )

    def placed(self, reason: PlacementReason) -> None:
        self._placements.add(1, {"reason": reason.label})

    def retried(self, call: str) -> None:
        self._retries.add(1, {"call": call})

    def refused(self, error: HotslotError, reason: str) -> HotslotError:
        """Counts the refusal and returns `error`, to be raised."""
        code = next((name for cls, name in _CODES if isinstance(error, cls)), "UNKNOWN")
        self._refusals.add(1, {"code": code, "reason": reason})
        return error

    def queue_depth(self, depth: int) -> None:
        self._queue_depth.set(depth)
