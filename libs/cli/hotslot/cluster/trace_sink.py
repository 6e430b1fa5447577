"""A minimal OTLP/gRPC trace receiver that writes every span it gets as one JSON line: lets `make demo` (and
anyone without a collector) see the traces hotslot exports, and summarize one trace per request."""
from __future__ import annotations

import json
import threading
from collections import defaultdict
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc


def _attr(value) -> object:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class _Receiver(tgrpc.TraceServiceServicer):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.lock = threading.Lock()
        self.spans: list[dict] = []

    def Export(self, request: tpb.ExportTraceServiceRequest, context) -> tpb.ExportTraceServiceResponse:
        rows = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _attr(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    rows.append({
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "service": resource.get("service.name", ""),
                        "start_ns": span.start_time_unix_nano,
                        "end_ns": span.end_time_unix_nano,
                        "attributes": {a.key: _attr(a.value) for a in span.attributes},
                    })
        with self.lock:
            self.spans.extend(rows)
            with open(self.out, "a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        return tpb.ExportTraceServiceResponse()


class TraceSink:
    """Receives OTLP/gRPC traces on 127.0.0.1:<port> and appends them to `out` (JSON lines)."""

    def __init__(self, out: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")
        self.receiver = _Receiver(out)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        tgrpc.add_TraceServiceServicer_to_server(self.receiver, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.endpoint = f"http://{host}:{self.port}"
        self.out = out

    def start(self) -> TraceSink:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=1).wait()

    def spans(self) -> list[dict]:
        with self.receiver.lock:
            return list(self.receiver.spans)

    def traces(self) -> dict[str, list[dict]]:
        grouped: dict[str, list[dict]] = defaultdict(list)
        for span in self.spans():
            grouped[span["trace_id"]].append(span)
        return dict(grouped)
