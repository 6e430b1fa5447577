"""Tracing through the registry: the server span continues the W3C trace context the client sends in its metadata,
and the core's scan span is its child."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from hotslot.bootstrap.server import create_server
from hotslot.bootstrap.telemetry import configure_tracing, insecure_channel
from hotslot.registry.v1 import registry_service_pb2 as pb
from hotslot.registry.v1 import registry_service_pb2_grpc as pb_grpc
from hotslot.services.registry.core import RegistryCore
from hotslot.services.registry.store import SQLiteModelStore
from hotslot.services.registry.wiring import RegistrySettings, registrations

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture
async def traced_registry(tmp_path: Path, tiny_family: list[Path]):
    share = tmp_path / "share"
    shutil.copytree(tiny_family[0], share / "models" / "tiny-sd-0")
    exporter = InMemorySpanExporter()
    provider = configure_tracing("hotslot-registry-test", exporter=exporter)
    store = SQLiteModelStore(tmp_path / "registry.db")
    core = RegistryCore(store, share, tracer_provider=provider)
    server, port, _ = await create_server(
        "127.0.0.1:0", registrations(core), settings=RegistrySettings(), tracer_provider=provider
    )
    await server.start()
    yield f"127.0.0.1:{port}", exporter, provider
    await server.stop(None)
    store.close()


async def test_server_span_continues_the_callers_trace(traced_registry) -> None:
    address, exporter, _ = traced_registry
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RegistryServiceStub(channel)
        await stub.RegisterModel(
            pb.RegisterModelRequest(model_id="tiny-sd-0", source="models/tiny-sd-0"),
            metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01")],
        )
    spans = {s.name: s for s in exporter.get_finished_spans()}
    server_span = spans["/hotslot.registry.v1.RegistryService/RegisterModel"]
    assert server_span.kind == SpanKind.SERVER
    assert format(server_span.context.trace_id, "032x") == TRACE_ID
    assert format(server_span.parent.span_id, "016x") == PARENT_SPAN_ID
    assert server_span.resource.attributes["service.name"] == "hotslot-registry-test"
    scan = spans["registry.scan"]
    assert scan.parent.span_id == server_span.context.span_id
    assert scan.context.trace_id == server_span.context.trace_id
    assert scan.attributes["hotslot.model_id"] == "tiny-sd-0"


async def test_traced_client_channel_links_client_and_server_spans(traced_registry) -> None:
    address, exporter, provider = traced_registry
    async with insecure_channel(address, tracer_provider=provider) as channel:
        stub = pb_grpc.RegistryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetModel(pb.GetModelRequest(model_id="ghost"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # A failed call's client span may end a moment after the error reaches the caller: wait for both spans.
    for _ in range(200):
        spans = [s for s in exporter.get_finished_spans() if s.name.endswith("/GetModel")]
        if {s.kind for s in spans} >= {SpanKind.CLIENT, SpanKind.SERVER}:
            break
        await asyncio.sleep(0.01)
    client = next(s for s in spans if s.kind == SpanKind.CLIENT)
    server = next(s for s in spans if s.kind == SpanKind.SERVER)
    assert server.parent.span_id == client.context.span_id
    assert server.context.trace_id == client.context.trace_id
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
