"""The shared registry client: it connects on first use, answers with the registry's messages, and turns the
registry's failures into hotslot errors that keep the code, message, ErrorInfo reason and BadRequest violations."""
from __future__ import annotations

import asyncio
import socket

import grpc
import grpc.aio
import pytest

from hotslot import errors
from hotslot.bootstrap.channels import retry_options
from hotslot.bootstrap.interceptors import to_grpc_status
from hotslot.bootstrap.registry_client import RegistryClient
from hotslot.registry.v1 import registry_service_pb2 as registry_pb
from hotslot.registry.v1 import registry_service_pb2_grpc as registry_grpc


class FakeRegistry(registry_grpc.RegistryServiceServicer):
    """Knows model "m" (revision 3, source "models/m"), lists "a", "b", "c" in pages of two, and fails a GetModel
    with the hotslot error set in `fail`."""

    def __init__(self) -> None:
        self.fail: errors.HotslotError | None = None
        self.unavailable_first = 0  # GetModel calls answered UNAVAILABLE before it answers
        self.list_requests: list[registry_pb.ListModelsRequest] = []

    async def GetModel(self, request, context):
        if self.unavailable_first > 0:
            self.unavailable_first -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "starting up")
        if self.fail is not None:
            await context.abort_with_status(to_grpc_status(self.fail))
        if request.model_id == "slow":
            await asyncio.sleep(30)
        if request.model_id != "m":
            await context.abort_with_status(to_grpc_status(
                errors.NotFound(f"model {request.model_id!r} is not registered", reason=errors.Reason.MODEL_NOT_FOUND)
            ))
        return registry_pb.GetModelResponse(model=registry_pb.Model(model_id="m", revision=3, source="models/m"))

    async def ListModels(self, request, context):
        self.list_requests.append(request)
        names = ["a", "b", "c"]
        start = int(request.page_token or 0)
        end = start + 2
        return registry_pb.ListModelsResponse(
            models=[registry_pb.Model(model_id=name, revision=1) for name in names[start:end]],
            next_page_token=str(end) if end < len(names) else "",
        )


@pytest.fixture
async def registry():
    fake = FakeRegistry()
    server = grpc.aio.server()
    registry_grpc.add_RegistryServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield fake, f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
async def client(registry):
    made: list[str] = []

    def factory(address: str) -> grpc.aio.Channel:
        made.append(address)
        return grpc.aio.insecure_channel(address)

    client = RegistryClient(registry[1], channel_factory=factory, timeout_s=5)
    client.made = made  # type: ignore[attr-defined]
    yield client
    await client.close()


async def test_the_channel_is_made_on_the_first_call_and_reused(client, registry) -> None:
    assert client.made == [] and not client.connected
    model = await client.get_model("m", 0)
    assert (model.model_id, model.revision, model.source) == ("m", 3, "models/m")
    await client.get_model("m", 3)
    assert client.made == [registry[1]]


async def test_a_closed_client_connects_again_when_used(client, registry) -> None:
    await client.get_model("m")
    await client.close()
    assert not client.connected
    assert (await client.get_model("m")).model_id == "m"
    assert client.made == [registry[1], registry[1]]


async def test_an_unknown_model_is_not_found_with_the_registrys_message_and_reason(client) -> None:
    with pytest.raises(errors.NotFound) as caught:
        await client.get_model("nope", 0)
    assert caught.value.message == "model 'nope' is not registered"
    assert caught.value.reason == "MODEL_NOT_FOUND"


async def test_a_refused_request_keeps_its_field_violations_and_reason(client, registry) -> None:
    registry[0].fail = errors.InvalidArgument(
        "revision: must not be negative", [errors.FieldViolation("revision", "must not be negative")],
        reason="INVALID_REVISION",
    )
    with pytest.raises(errors.InvalidArgument) as caught:
        await client.get_model("m", -1)
    assert caught.value.message == "revision: must not be negative"
    assert [(v.field, v.description) for v in caught.value.violations] == [("revision", "must not be negative")]
    assert caught.value.reason == "INVALID_REVISION"


async def test_a_registry_that_is_shutting_down_is_unavailable_with_its_reason(client, registry) -> None:
    registry[0].fail = errors.Unavailable("the registry is shutting down", reason="SHUTTING_DOWN")
    with pytest.raises(errors.Unavailable) as caught:
        await client.get_model("m")
    assert caught.value.message.startswith(f"registry at {registry[1]} unreachable (UNAVAILABLE)")
    assert "shutting down" in caught.value.message and caught.value.reason == "SHUTTING_DOWN"


async def test_a_registry_that_is_not_there_is_unavailable_naming_its_address() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    client = RegistryClient(address, channel_factory=grpc.aio.insecure_channel, timeout_s=5)
    try:
        with pytest.raises(errors.Unavailable, match=f"registry at {address} unreachable") as caught:
            await client.list_models(registry_pb.ListModelsRequest())
        assert caught.value.reason == "UNAVAILABLE"
    finally:
        await client.close()


async def test_other_codes_name_the_registry_and_keep_its_message(client, registry) -> None:
    registry[0].fail = errors.HotslotError("internal error (request id 7)")
    with pytest.raises(errors.HotslotError) as caught:
        await client.get_model("m")
    assert type(caught.value) is errors.HotslotError
    assert caught.value.message == f"registry at {registry[1]} failed with UNKNOWN: internal error (request id 7)"


async def test_all_models_walks_every_page(client, registry) -> None:
    assert [model.model_id async for model in client.all_models(page_size=2)] == ["a", "b", "c"]
    assert [(r.page_size, r.page_token) for r in registry[0].list_requests] == [(2, ""), (2, "2")]


async def test_a_registry_that_does_not_answer_within_the_timeout_is_unavailable(registry) -> None:
    client = RegistryClient(registry[1], channel_factory=grpc.aio.insecure_channel, timeout_s=0.2)
    try:
        with pytest.raises(errors.Unavailable, match=r"unreachable \(DEADLINE_EXCEEDED\)"):
            await client.get_model("slow")
    finally:
        await client.close()


async def test_a_channel_with_the_downstream_retry_policy_rides_out_a_brief_outage(registry) -> None:
    registry[0].unavailable_first = 2
    client = RegistryClient(registry[1], timeout_s=10,
                            channel_factory=lambda address: grpc.aio.insecure_channel(address, options=retry_options(3)))
    try:
        assert (await client.get_model("m")).model_id == "m"
        assert registry[0].unavailable_first == 0
    finally:
        await client.close()
