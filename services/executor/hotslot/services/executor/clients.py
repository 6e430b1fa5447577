"""gRPC implementations of the executor's downstream interfaces, over traced channels so the request's trace
continues into the registry and storage-cache: the registry through the shared RegistryClient, the storage-cache on
the same DownstreamPeer base. Failures come back as hotslot errors with the peer's code, message and details."""
from __future__ import annotations

import grpc
import grpc.aio
from google.protobuf.duration_pb2 import Duration

from hotslot.bootstrap.registry_client import ChannelFactory, DownstreamPeer, RegistryClient
from hotslot.common.v1 import common_pb2
from hotslot.convert import kind_from_proto
from hotslot.errors import NotFound
from hotslot.storage.v1 import storage_cache_service_pb2 as storage_pb
from hotslot.storage.v1 import storage_cache_service_pb2_grpc as storage_grpc

from .downstream import EnsuredView, ResolvedModel


class RegistryResolver:
    """The core's resolver port over the shared registry client: the registered model as a ResolvedModel."""

    def __init__(self, registry: RegistryClient) -> None:
        self.registry = registry

    async def resolve(self, model_id: str, revision: int) -> ResolvedModel:
        m = await self.registry.get_model(model_id, revision)
        return ResolvedModel(m.model_id, m.revision, kind_from_proto(m.kind) or "", m.manifest.total_bytes,
                             m.manifest.pipeline_class, m.base_model_id)

    async def close(self) -> None:
        await self.registry.close()


class StorageClient(DownstreamPeer):
    # An Ensure that outlives its timeout is slow, not gone: DEADLINE_EXCEEDED stays DeadlineExceeded.
    unreachable_codes = frozenset({grpc.StatusCode.UNAVAILABLE})

    def __init__(self, address: str, *, channel_factory: ChannelFactory, timeout_s: float) -> None:
        super().__init__("storage-cache", address, channel_factory=channel_factory, timeout_s=timeout_s)

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
            fetched=frozenset(f.path for f in reply.files
                              if f.source in (storage_pb.FILE_SOURCE_FETCHED, storage_pb.FILE_SOURCE_JOINED)),
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
