"""The retry policy every downstream channel carries: idempotent calls (registry GetModel) are sent again when the
peer answers UNAVAILABLE, others (DeleteModel) never; with one attempt configured, nothing is retried."""
from __future__ import annotations

import grpc
import grpc.aio
import pytest

from hotslot.bootstrap.channels import IDEMPOTENT_METHODS, retry_options
from hotslot.bootstrap.telemetry import insecure_channel
from hotslot.registry.v1 import registry_service_pb2 as pb
from hotslot.registry.v1 import registry_service_pb2_grpc as pb_grpc


class FlakyRegistry(pb_grpc.RegistryServiceServicer):
    """Answers UNAVAILABLE to the first `failures` calls of each method, then OK."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}

    async def _answer(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "briefly away")

    async def GetModel(self, request, context):
        await self._answer("GetModel", context)
        return pb.GetModelResponse(model=pb.Model(model_id=request.model_id))

    async def DeleteModel(self, request, context):
        await self._answer("DeleteModel", context)
        return pb.DeleteModelResponse()


@pytest.fixture
async def flaky():
    registry = FlakyRegistry(failures=2)
    server = grpc.aio.server()
    pb_grpc.add_RegistryServiceServicer_to_server(registry, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield registry, f"127.0.0.1:{port}"
    await server.stop(None)


async def test_idempotent_calls_are_retried_on_unavailable_and_others_are_not(flaky) -> None:
    registry, address = flaky
    async with insecure_channel(address, tracer_provider=None, options=retry_options(3)) as channel:
        stub = pb_grpc.RegistryServiceStub(channel)
        reply = await stub.GetModel(pb.GetModelRequest(model_id="alpha"), timeout=10)
        assert reply.model.model_id == "alpha" and registry.calls["GetModel"] == 3
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.DeleteModel(pb.DeleteModelRequest(model_id="alpha"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE and registry.calls["DeleteModel"] == 1


async def test_one_attempt_turns_retries_off(flaky) -> None:
    registry, address = flaky
    assert retry_options(1) == []
    async with insecure_channel(address, tracer_provider=None, options=retry_options(1)) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await pb_grpc.RegistryServiceStub(channel).GetModel(pb.GetModelRequest(model_id="alpha"), timeout=10)
    assert registry.calls["GetModel"] == 1


def test_the_policy_names_methods_that_exist() -> None:
    from hotslot.storage.v1 import storage_cache_service_pb2 as storage_pb

    services = {s.full_name: s for f in (pb.DESCRIPTOR, storage_pb.DESCRIPTOR) for s in f.services_by_name.values()}
    for service, methods in IDEMPOTENT_METHODS.items():
        for method in methods:
            assert method in services[service].methods_by_name, (service, method)
