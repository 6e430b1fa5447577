"""gRPC implementations of the executor's downstream interfaces, over traced channels so the request's trace
continues into the registry and storage-cache. Failures come back as hotslot errors with the peer's code and
message."""
from __future__ import annotations

from collections.abc import Callable

import grpc
import grpc.aio
from google.protobuf.duration_pb2 import Duration

from hotslot.bootstrap.rpc_errors import error_from_rpc
from hotslot.common.v1 import common_pb2
from hotslot.convert import kind_from_proto
from hotslot.errors import NotFound, Unavailable
from hotslot.registry.v1 import registry_service_pb2 as registry_pb
from hotslot.registry.v1 import registry_service_pb2_grpc as registry_grpc
from hotslot.storage.v1 import storage_cache_service_pb2 as storage_pb
from hotslot.storage.v1 import storage_cache_service_pb2_grpc as storage_grpc

from .downstream import EnsuredView, ResolvedModel

ChannelFactory = Callable[[str], grpc.aio.Channel]


class _Peer:
    def __init__(self, what: str, address: str, channel_factory: ChannelFactory, timeout_s: float) -> None:
        self.what = what
        self.address = address
        self.timeout_s = timeout_s
        self._channel_factory = channel_factory
        self._channel: grpc.aio.Channel | None = None

    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:  # made on first use: an aio channel needs the running loop
            self._channel = self._channel_factory(self.address)
        return self._channel

    def error(self, error: grpc.aio.AioRpcError):
        if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN) and not error.details():
            return Unavailable(f"{self.what} at {self.address} is unreachable")
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"{self.what} at {self.address} is unavailable: {error.details()}")
        return error_from_rpc(error, f"{self.what} at {self.address}")

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class RegistryClient(_Peer):
    def __init__(self, address: str, *, channel_factory: ChannelFactory, timeout_s: float) -> None:
        super().__init__("registry", address, channel_factory, timeout_s)

    async def resolve(self, model_id: str, revision: int) -> ResolvedModel:
        stub = registry_grpc.RegistryServiceStub(self.channel())
        try:
            reply = await stub.GetModel(
                registry_pb.GetModelRequest(model_id=model_id, revision=revision), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise self.error(error) from None
        m = reply.model
        return ResolvedModel(m.model_id, m.revision, kind_from_proto(m.kind) or "", m.manifest.total_bytes,
                             m.manifest.pipeline_class, m.base_model_id)


class StorageClient(_Peer):
    def __init__(self, address: str, *, channel_factory: ChannelFactory, timeout_s: float) -> None:
        super().__init__("storage-cache", address, channel_factory, timeout_s)

    async def ensure(self, model_id: str, revision: int, lease_ttl_s: float) -> EnsuredView:
        stub = storage_grpc.StorageCacheServiceStub(self.channel())
        ttl = Duration()
        ttl.FromNanoseconds(int(lease_ttl_s * 1e9))
        try:
            reply = await stub.EnsureModel(
                storage_pb.EnsureModelRequest(
                    model=common_pb2.ModelRef(model_id=model_id, revision=revision), pin_ttl=ttl
                ),
                timeout=self.timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            raise self.error(error) from None
        return EnsuredView(
            view_path=reply.view_path,
            lease_id=reply.lease_id,
            bytes_fetched=reply.bytes_fetched,
            all_local=all(f.source == storage_pb.FILE_SOURCE_LOCAL_HIT for f in reply.files),
            sha256_by_path={f.path: f.sha256 for f in reply.files},
        )

    async def report_corrupt(self, sha256: str, path: str) -> bool:
        stub = storage_grpc.StorageCacheServiceStub(self.channel())
        try:
            reply = await stub.ReportCorrupt(storage_pb.ReportCorruptRequest(sha256=sha256, path=path),
                                             timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            raise self.error(error) from None
        return reply.dropped

    async def renew(self, lease_id: str, lease_ttl_s: float) -> None:
        ttl = Duration()
        ttl.FromNanoseconds(int(lease_ttl_s * 1e9))
        stub = storage_grpc.StorageCacheServiceStub(self.channel())
        try:
            await stub.RenewLease(storage_pb.RenewLeaseRequest(lease_id=lease_id, ttl=ttl), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            raise self.error(error) from None

    async def unpin(self, lease_id: str) -> None:
        stub = storage_grpc.StorageCacheServiceStub(self.channel())
        try:
            await stub.Unpin(storage_pb.UnpinRequest(lease_id=lease_id), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            err = self.error(error)
            if not isinstance(err, NotFound):  # an expired lease is already gone
                raise err from None
