"""The one client every service uses to call the model registry (and the base of its other downstream clients): a
grpc.aio channel made on first use from the service's channel factory (security, tracing, message limits and the
retry policy for idempotent calls come with it, see channels.downstream_options), a timeout on every call, and
failures turned into hotslot errors that keep the peer's message, ErrorInfo reason and BadRequest violations.
Each service converts the registry's messages into its own domain types in a small adapter of its own."""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio

from hotslot import errors
from hotslot.bootstrap.rpc_errors import error_from_rpc, reason_of
from hotslot.registry.v1 import registry_service_pb2 as registry_pb
from hotslot.registry.v1 import registry_service_pb2_grpc as registry_grpc

ChannelFactory = Callable[[str], grpc.aio.Channel]
"""Makes the channel to an address; the services pass their `service_channel(...)` with downstream_options."""

UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
"""Codes that mean "the peer is not there right now" (its outage, or no answer within the call's timeout): they
become Unavailable, which callers may wait out or serve around."""

LIST_PAGE_SIZE = 1000
"""Models asked for per ListModels page when a client walks the whole registry."""


class DownstreamPeer:
    """A lazily connected channel to one hotslot service this one calls, with the error mapping of its failures."""

    unreachable_codes: frozenset[grpc.StatusCode] = UNREACHABLE_CODES
    """Codes of this peer's failures that mean it is not there (Unavailable naming it)."""

    def __init__(self, what: str, address: str, *, channel_factory: ChannelFactory, timeout_s: float) -> None:
        self.what = what
        self.address = address
        self.timeout_s = timeout_s
        self._channel_factory = channel_factory
        self._channel: grpc.aio.Channel | None = None

    @property
    def connected(self) -> bool:
        """Whether the channel has been made (the first call makes it)."""
        return self._channel is not None

    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:  # made on first use: a grpc.aio channel needs the running event loop
            self._channel = self._channel_factory(self.address)
        return self._channel

    def error(self, error: grpc.aio.AioRpcError) -> errors.HotslotError:
        """The hotslot error for a failed call to this peer. Unreachable (unreachable_codes, or an UNKNOWN with no
        message, as a broken connection may give) is Unavailable naming the peer and its address,
        with the peer's reason kept; every other code keeps the peer's code, message and rich details."""
        code = error.code()
        details = error.details() or ""
        if code in self.unreachable_codes or (code == grpc.StatusCode.UNKNOWN and not details):
            said = f": {details}" if details else ""
            return errors.Unavailable(f"{self.what} at {self.address} unreachable ({code.name}){said}",
                                      reason=reason_of(error))
        return error_from_rpc(error, f"{self.what} at {self.address}")

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()


class RegistryClient(DownstreamPeer):
    """The registry's read calls, returning its messages; errors as DownstreamPeer.error says (a model that is not
    registered: NotFound with the registry's MODEL_NOT_FOUND reason)."""

    def __init__(self, address: str, *, channel_factory: ChannelFactory, timeout_s: float) -> None:
        super().__init__("registry", address, channel_factory=channel_factory, timeout_s=timeout_s)
        self._stub: registry_grpc.RegistryServiceStub | None = None

    def _registry(self) -> registry_grpc.RegistryServiceStub:
        if self._stub is None or not self.connected:
            # the generated stub is untyped; its calls are typed by the variables they are assigned to
            self._stub = registry_grpc.RegistryServiceStub(self.channel())  # type: ignore[no-untyped-call]
        return self._stub

    async def get_model(self, model_id: str, revision: int = 0) -> registry_pb.Model:
        """The registered model; revision 0 asks for the latest."""
        request = registry_pb.GetModelRequest(model_id=model_id, revision=revision)
        try:
            reply: registry_pb.GetModelResponse = await self._registry().GetModel(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            raise self.error(error) from None
        return reply.model

    async def list_models(self, request: registry_pb.ListModelsRequest) -> registry_pb.ListModelsResponse:
        """One page of ListModels, as the request asks."""
        try:
            page: registry_pb.ListModelsResponse = await self._registry().ListModels(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            raise self.error(error) from None
        return page

    async def all_models(self, page_size: int = LIST_PAGE_SIZE) -> AsyncIterator[registry_pb.Model]:
        """Every registered model (the latest revision of each), page by page."""
        page_token = ""
        while True:
            reply = await self.list_models(registry_pb.ListModelsRequest(page_size=page_size, page_token=page_token))
            for model in reply.models:
                yield model
            page_token = reply.next_page_token
            if not page_token:
                return
