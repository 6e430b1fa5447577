"""Phase spans recorded after the fact: a phase is measured where it happens (a load task, a worker thread) and
recorded as a span with those times, in the trace of the request it was for."""
from __future__ import annotations

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.util.types import Attributes


class SpanRecorder:
    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def record(self, name: str, start_ns: int, end_ns: int, ctx: Context | None, attributes: Attributes) -> None:
        span = self._tracer.start_span(name, context=ctx, start_time=start_ns, attributes=attributes)
        span.end(end_time=max(end_ns, start_ns))
