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

# Every (code, reason) the router refuses with.
REFUSALS = (("RESOURCE_EXHAUSTED", "queue_full"), ("RESOURCE_EXHAUSTED", "queue_timeout"),
            ("DEADLINE_EXCEEDED", "deadline"), ("UNAVAILABLE", "no_executor"))


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
        # Counters start at 0 for every label value, so rate() and increase() see them before the first event.
        for reason in PlacementReason:
            if reason is not PlacementReason.UNSPECIFIED:
                self._placements.add(0, {"reason": reason.label})
        for call in ("generate", "preload"):
            self._retries.add(0, {"call": call})
        for code, refusal in REFUSALS:
            self._refusals.add(0, {"code": code, "reason": refusal})

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
