"""Resolves a model reference through the registry's GetModel over a traced gRPC channel, turning the registry's
status codes back into hotslot errors so the core stays free of transport types."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePosixPath

import grpc
import grpc.aio

from hotslot.convert import manifest_from_proto
from hotslot.errors import FailedPrecondition, InvalidArgument, NotFound, Reason, Unavailable
from hotslot.registry.v1 import registry_service_pb2 as registry_pb
from hotslot.registry.v1 import registry_service_pb2_grpc as registry_grpc

from .core import ModelResolver, ResolvedModel

# Codes that mean "the registry is not there right now"; the Ensure caller may retry.
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class RegistryResolver(ModelResolver):
    def __init__(
        self, address: str, *, timeout_s: float, channel_factory: Callable[[str], grpc.aio.Channel]
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel_factory = channel_factory
        self._channel: grpc.aio.Channel | None = None
        self._stub: registry_grpc.RegistryServiceStub | None = None

    def _registry(self) -> registry_grpc.RegistryServiceStub:
        if not self.address:
            raise FailedPrecondition(
                "no registry is configured, so a model reference cannot be resolved: set registry_address "
                "(HOTSLOT_STORAGE_CACHE_REGISTRY_ADDRESS) or Ensure by manifest"
            )
        if self._stub is None:
            # Created on first use: a grpc.aio channel must be made with the event loop running.
            self._channel = self._channel_factory(self.address)
            self._stub = registry_grpc.RegistryServiceStub(self._channel)
        return self._stub

    async def resolve(self, model_id: str, revision: int) -> ResolvedModel:
        stub = self._registry()
        try:
            reply = await stub.GetModel(
                registry_pb.GetModelRequest(model_id=model_id, revision=revision), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code == grpc.StatusCode.NOT_FOUND:
                raise NotFound(error.details() or f"model {model_id!r} is not registered",
                               reason=Reason.MODEL_NOT_FOUND) from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(error.details() or "the registry refused the model reference") from None
            if code in _UNREACHABLE:
                raise Unavailable(
                    f"the registry at {self.address} did not answer ({code.name}); check registry_address and "
                    "that the registry is running"
                ) from None
            raise Unavailable(f"the registry at {self.address} failed to resolve {model_id!r} ({code.name})") from None
        model = reply.model
        return ResolvedModel(model.model_id, model.revision, model.source, manifest_from_proto(model.manifest))

    async def model_naming(self, path: str) -> str | None:
        """Pages through the registry's models (latest revision of each) for one whose manifest names `path`.
        Asked only to overwrite an existing file, which is rare; no registry configured: nothing is registered."""
        if not self.address:
            return None
        stub = self._registry()
        wanted = PurePosixPath(path)
        page_token = ""
        while True:
            try:
                reply = await stub.ListModels(
                    registry_pb.ListModelsRequest(page_size=1000, page_token=page_token), timeout=self.timeout_s
                )
            except grpc.aio.AioRpcError as error:
                # Refuse rather than risk replacing a registered file: the caller may retry.
                raise Unavailable(
                    f"cannot check with the registry at {self.address} whether a registered model names {path!r} "
                    f"({error.code().name}); nothing was written, try again"
                ) from None
            for model in reply.models:
                source = PurePosixPath(model.source)
                if any(source / f.path == wanted for f in model.manifest.files):
                    return f"{model.model_id}@{model.revision}"
            page_token = reply.next_page_token
            if not page_token:
                return None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
