"""The bootstrap's metrics and reflection on an in-process server: every RPC is counted by method and status code
on the Prometheus endpoint, and reflection (v1alpha and v1) sends the contracts with their comments."""
from __future__ import annotations

import asyncio
import logging
import socket
import urllib.request

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from hotslot.bootstrap.metrics import MetricsEndpoint
from hotslot.bootstrap.reflection import documented_files
from hotslot.bootstrap.server import ServiceRegistration, create_server, run_server
from hotslot.bootstrap.settings import ServiceSettings
from hotslot.errors import NotFound
from hotslot.registry.v1 import registry_service_pb2, registry_service_pb2_grpc

REGISTRY = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name
REGISTRY_FILE = registry_service_pb2.DESCRIPTOR.name


class MissingModels(registry_service_pb2_grpc.RegistryServiceServicer):
    """GetModel finds nothing; the other methods are UNIMPLEMENTED, as generated."""

    async def GetModel(self, request, context):
        raise NotFound(f"model {request.model_id!r} does not exist")


@pytest.fixture
async def served():
    endpoint = MetricsEndpoint("hotslot-test")
    metrics_port = endpoint.serve("127.0.0.1", 0)
    registrations = [ServiceRegistration(REGISTRY, MissingModels(),
                                         registry_service_pb2_grpc.add_RegistryServiceServicer_to_server)]
    server, port, _ = await create_server("127.0.0.1:0", registrations, settings=ServiceSettings(),
                                          meter=endpoint.meter("test"))
    await server.start()
    yield port, metrics_port
    await server.stop(None)
    endpoint.close()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, from the Prometheus text the endpoint serves."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_every_rpc_is_counted_and_timed_by_method_and_status_code(served):
    port, metrics_port = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await registry.GetModel(registry_service_pb2.GetModelRequest(model_id="nope"))
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError):
            await registry.ListModels(registry_service_pb2.ListModelsRequest())
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

    samples = await asyncio.to_thread(scrape, metrics_port)
    requests = "hotslot_grpc_server_requests_total"
    assert sample(samples, requests, grpc_service=REGISTRY, grpc_method="GetModel", grpc_code="NOT_FOUND") == 2
    assert sample(samples, requests, grpc_service=REGISTRY, grpc_method="ListModels", grpc_code="UNIMPLEMENTED") == 1
    assert sample(samples, requests, grpc_service="grpc.health.v1.Health", grpc_method="Check", grpc_code="OK") == 1
    assert sample(samples, "hotslot_grpc_server_duration_seconds_count",
                  grpc_service=REGISTRY, grpc_method="GetModel", grpc_code="NOT_FOUND") == 2
    assert sample(samples, "hotslot_grpc_server_in_flight", grpc_service=REGISTRY, grpc_method="GetModel") == 0


def leading_comment(file: descriptor_pb2.FileDescriptorProto, service: str, method: str) -> str:
    """The comment above `rpc method` in `file`, from its source info."""
    s = next(i for i, svc in enumerate(file.service) if svc.name == service)
    m = next(i for i, rpc in enumerate(file.service[s].method) if rpc.name == method)
    path = [6, s, 2, m]  # FileDescriptorProto.service = 6, ServiceDescriptorProto.method = 2
    return next((loc.leading_comments for loc in file.source_code_info.location if list(loc.path) == path), "")


def test_the_descriptor_set_make_protos_writes_has_the_contracts_comments():
    documented = descriptor_pb2.FileDescriptorProto.FromString(documented_files()[REGISTRY_FILE])
    assert "NOT_FOUND" in leading_comment(documented, "RegistryService", "GetModel")


async def test_reflection_v1alpha_sends_the_rpc_comments(served):
    port, _ = served

    def ask() -> descriptor_pb2.FileDescriptorProto:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return ProtoReflectionDescriptorDatabase(channel).FindFileContainingSymbol(REGISTRY)

    file = await asyncio.to_thread(ask)
    assert "NOT_FOUND" in leading_comment(file, "RegistryService", "GetModel")


async def test_reflection_v1_lists_services_and_sends_the_rpc_comments(served):
    port, _ = served
    # grpc.reflection.v1's messages are v1alpha's, field for field: a v1 client's bytes are these.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )(iter([reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=f"{REGISTRY}.GetModel"),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection")]))
        listed, found, itself = [response async for response in call]
    names = {service.name for service in listed.list_services_response.service}
    assert {REGISTRY, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = {f.name: f for f in map(descriptor_pb2.FileDescriptorProto.FromString,
                                    found.file_descriptor_response.file_descriptor_proto)}
    assert "NOT_FOUND" in leading_comment(files[REGISTRY_FILE], "RegistryService", "GetModel")
    assert "common.proto" in " ".join(files), "the imports come along, so a client can build the descriptors"
    v1_file = descriptor_pb2.FileDescriptorProto.FromString(itself.file_descriptor_response.file_descriptor_proto[0])
    assert v1_file.package == "grpc.reflection.v1"
    assert [m.name for m in v1_file.service[0].method] == ["ServerReflectionInfo"]


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_a_metrics_port_in_use_stops_the_service_at_start_naming_the_port(restore_logging):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = ServiceSettings(metrics_port=port)
        with pytest.raises(OSError, match=f"cannot listen for metrics on 127.0.0.1:{port}"):
            await run_server([], settings=settings, service_name="test")
