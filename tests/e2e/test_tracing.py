"""One trace per request across all four services, checked at a real OTLP/gRPC receiver: a TraceService server in
this process that the services export to with the standard OTEL_* variables, as they would to a collector. The
client sends a W3C traceparent; every span the request causes — router, executor (with its phase spans queue,
ensure, read, materialize, swap, denoise, encode), storage-cache, registry — must land in that one trace, each
parented where the work happened."""
from __future__ import annotations

import secrets
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from hotslot.common.v1 import common_pb2
from hotslot.router.v1 import router_service_pb2 as pb
from hotslot.router.v1 import router_service_pb2_grpc as pb_grpc
from tests.support.stack import Stack, start_stack

pytestmark = pytest.mark.integration

SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT
PHASES = ("queue", "ensure", "read", "materialize", "swap", "denoise", "encode")
ROUTER_GENERATE = "/hotslot.router.v1.RouterService/Generate"
EXECUTOR_GENERATE = "/hotslot.executor.v1.ExecutorService/Generate"
ENSURE_MODEL = "/hotslot.storage.v1.StorageCacheService/EnsureModel"
GET_MODEL = "/hotslot.registry.v1.RegistryService/GetModel"


@dataclass(frozen=True)
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    start_ns: int = 0
    end_ns: int = 0

    def __str__(self) -> str:
        kind = trace_pb2.Span.SpanKind.Name(self.kind).removeprefix("SPAN_KIND_").lower()
        return f"{self.service} {kind} {self.name} {self.span_id}<-{self.parent_id or '-'}"


class Receiver(otlp_grpc.TraceServiceServicer):
    """The OTLP/gRPC trace endpoint of a collector, keeping every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    def Export(self, request: otlp.ExportTraceServiceRequest, context) -> otlp.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    received.append(Span(attributes.get("service.name", ""), s.trace_id.hex(), s.span_id.hex(),
                                         s.parent_span_id.hex(), s.name, s.kind, s.start_time_unix_nano,
                                         s.end_time_unix_nano))
        with self.lock:
            self.spans.extend(received)
        return otlp.ExportTraceServiceResponse()

    def snapshot(self) -> list[Span]:
        with self.lock:
            return list(self.spans)


@pytest.fixture(scope="module")
def receiver():
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    otlp_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_family: list[Path], receiver):
    _, port = receiver
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms: spans reach the receiver soon after they end
    }
    s = start_stack(tmp_path_factory.mktemp("e2e-tracing"), tiny_family, env=env)
    try:
        # A capped read rate makes every load last over a second, so a second request reliably arrives while the
        # first one's model is still loading (see the lookahead test).
        s.start_executor("--preload-read-bytes-per-s", "4MB", "--no-map-view-files")  # mapped files load at once
        s.start_router()
        yield s
    finally:
        s.stop()


def by_id(spans: list[Span]) -> dict[str, Span]:
    return {s.span_id: s for s in spans}


def ancestors(span: Span, index: dict[str, Span]) -> list[Span]:
    chain = []
    while span.parent_id in index:
        span = index[span.parent_id]
        chain.append(span)
    return chain


def one(spans: list[Span], service: str, name: str, kind: int) -> Span:
    found = [s for s in spans if s.service == service and s.name == name and s.kind == kind]
    assert len(found) == 1, f"expected one {service} {name}, got:\n" + "\n".join(map(str, spans))
    return found[0]


def test_one_trace_across_all_four_services(stack: Stack, receiver) -> None:
    spans_at, _ = receiver
    assert stack.router is not None
    trace_id, client_span_id = secrets.token_hex(16), secrets.token_hex(8)
    with grpc.insecure_channel(stack.router.address) as channel:
        router = pb_grpc.RouterServiceStub(channel)
        deadline = time.monotonic() + 30
        while not router.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10).executors:
            assert time.monotonic() < deadline, "the router never connected to the executor"
            time.sleep(0.05)
        reply = router.Generate(
            pb.GenerateRequest(model=common_pb2.ModelRef(model_id="tiny-sd-2"),  # never loaded here: every phase
                               params=common_pb2.GenerationParams(prompt="a lighthouse", steps=2, seed=1)),
            metadata=[("traceparent", f"00-{trace_id}-{client_span_id}-01")], timeout=300,
        )
    assert reply.tier in (common_pb2.TIER_BACKING_STORE, common_pb2.TIER_LOCAL_DISK)

    # The router's server span ends last; wait for it and for the executor's last phase.
    deadline = time.monotonic() + 30
    while True:
        spans = [s for s in spans_at.snapshot() if s.trace_id == trace_id]
        names = {(s.service, s.name) for s in spans}
        if {("hotslot-router", ROUTER_GENERATE), ("hotslot-executor", "encode"),
            ("hotslot-executor", EXECUTOR_GENERATE)} <= names:
            break
        assert time.monotonic() < deadline, "spans never arrived:\n" + "\n".join(map(str, spans))
        time.sleep(0.1)
    time.sleep(1.0)  # one more export round for stragglers
    everything = spans_at.snapshot()
    spans = [s for s in everything if s.trace_id == trace_id]
    index = by_id(spans)
    listing = "\n".join(map(str, spans))

    # One trace: nothing this request caused went into another trace.
    request_names = {ROUTER_GENERATE, EXECUTOR_GENERATE, ENSURE_MODEL, GET_MODEL, *PHASES}
    strays = [s for s in everything if s.trace_id != trace_id and s.name in request_names]
    assert not strays, "spans of the request in other traces:\n" + "\n".join(map(str, strays))
    assert {s.service for s in spans} == {"hotslot-router", "hotslot-executor", "hotslot-storage-cache",
                                          "hotslot-registry"}, listing
    # Every parent is in the trace, except the root's: the client's span, which the client does not export.
    assert all(s.parent_id in index or s.parent_id == client_span_id for s in spans), listing

    router_server = one(spans, "hotslot-router", ROUTER_GENERATE, SERVER)
    assert router_server.parent_id == client_span_id
    router_client = one(spans, "hotslot-router", EXECUTOR_GENERATE, CLIENT)
    assert router_server in ancestors(router_client, index), listing
    executor_server = one(spans, "hotslot-executor", EXECUTOR_GENERATE, SERVER)
    assert executor_server.parent_id == router_client.span_id, listing

    for phase in PHASES:
        span = one(spans, "hotslot-executor", phase, trace_pb2.Span.SPAN_KIND_INTERNAL)
        assert executor_server in ancestors(span, index), f"{phase} is not under the executor's server span\n{listing}"

    ensure_client = one(spans, "hotslot-executor", ENSURE_MODEL, CLIENT)
    assert executor_server in ancestors(ensure_client, index), listing
    ensure_server = one(spans, "hotslot-storage-cache", ENSURE_MODEL, SERVER)
    assert ensure_server.parent_id == ensure_client.span_id, listing

    registry = [s for s in spans if s.service == "hotslot-registry" and s.name == GET_MODEL and s.kind == SERVER]
    assert registry, listing
    for s in registry:  # asked by the router (is it registered?), the executor (resolve) or storage (manifest)
        caller = index[s.parent_id]
        assert caller.kind == CLIENT and caller.name == GET_MODEL, listing
        assert router_server in ancestors(caller, index), listing
    callers = {index[s.parent_id].service for s in registry}
    assert "hotslot-executor" in callers, listing


def test_a_model_loaded_by_lookahead_stays_in_its_own_requests_trace(stack: Stack, receiver) -> None:
    """B waits behind A, so the executor loads B's model while A's is still loading or computing (lookahead); that
    load is started from A's work, yet B's storage-cache and registry calls must be in B's trace, not A's."""
    spans_at, _ = receiver
    assert stack.router is not None
    traces = {name: (secrets.token_hex(16), secrets.token_hex(8)) for name in ("a", "b")}

    def metadata(name: str) -> list[tuple[str, str]]:
        trace_id, span_id = traces[name]
        return [("traceparent", f"00-{trace_id}-{span_id}-01")]

    with grpc.insecure_channel(stack.router.address) as channel:
        router = pb_grpc.RouterServiceStub(channel)
        a = router.GenerateStream(
            pb.GenerateStreamRequest(model=common_pb2.ModelRef(model_id="tiny-sd-0"),
                                     params=common_pb2.GenerationParams(prompt="first", steps=2)),
            metadata=metadata("a"), timeout=300)
        next(a)  # A is queued on the executor and its model is loading (the read is rate-capped: >1 s)
        b = router.Generate.future(
            pb.GenerateRequest(model=common_pb2.ModelRef(model_id="tiny-sd-1"),
                               params=common_pb2.GenerationParams(prompt="second", steps=2)),
            metadata=metadata("b"), timeout=300)
        assert any(event.HasField("result") for event in a)
        assert b.result().images

    def in_trace(name: str) -> list[Span]:
        return [s for s in spans_at.snapshot() if s.trace_id == traces[name][0]]

    methods = {"a": "GenerateStream", "b": "Generate"}
    deadline = time.monotonic() + 30
    while not all({f"/hotslot.router.v1.RouterService/{methods[n]}", "encode"} <= {s.name for s in in_trace(n)}
                  for n in traces):
        assert time.monotonic() < deadline, "spans never arrived:\n" + "\n".join(map(str, spans_at.snapshot()))
        time.sleep(0.1)
    time.sleep(1.0)
    # What makes this case: B's load began only after A's load ended, so it was started from A's (lookahead).
    a_loaded = one(in_trace("a"), "hotslot-executor", "materialize", trace_pb2.Span.SPAN_KIND_INTERNAL)
    b_ensure = one(in_trace("b"), "hotslot-executor", "ensure", trace_pb2.Span.SPAN_KIND_INTERNAL)
    assert b_ensure.start_ns >= a_loaded.end_ns
    for name in traces:
        spans = in_trace(name)
        index = by_id(spans)
        listing = f"trace of {name}:\n" + "\n".join(map(str, spans))
        executor_server = one(spans, "hotslot-executor", f"/hotslot.executor.v1.ExecutorService/{methods[name]}", SERVER)
        ensure_client = one(spans, "hotslot-executor", ENSURE_MODEL, CLIENT)
        assert executor_server in ancestors(ensure_client, index), listing
        ensure_server = one(spans, "hotslot-storage-cache", ENSURE_MODEL, SERVER)
        assert ensure_server.parent_id == ensure_client.span_id, listing
        for phase in PHASES:
            assert executor_server in ancestors(one(spans, "hotslot-executor", phase, trace_pb2.Span.SPAN_KIND_INTERNAL),
                                                index), listing
