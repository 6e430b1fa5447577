"""gRPC adapter of the storage-cache: converts protobuf to core calls and back, nothing else."""
from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from hotslot.common.v1 import common_pb2
from hotslot.convert import manifest_from_proto
from hotslot.errors import InvalidArgument
from hotslot.storage.v1 import storage_cache_service_pb2 as pb
from hotslot.storage.v1 import storage_cache_service_pb2_grpc as pb_grpc

from .blobstore import Lease
from .core import EnsureResult, FileSource, ManifestTarget, ModelTarget, Progress, StorageCacheCore, Usage
from .put import PutHeader

_FILE_SOURCES = {
    FileSource.LOCAL_HIT: pb.FILE_SOURCE_LOCAL_HIT,
    FileSource.FETCHED: pb.FILE_SOURCE_FETCHED,
    FileSource.JOINED: pb.FILE_SOURCE_JOINED,
}


def target_from_proto(request: pb.EnsureModelRequest) -> ModelTarget | ManifestTarget:
    which = request.WhichOneof("target")
    if which == "model":
        return ModelTarget(request.model.model_id, request.model.revision)
    if which == "manifest":
        target = request.manifest
        return ManifestTarget(target.source, manifest_from_proto(target.manifest), target.name)
    raise InvalidArgument.field("target", "is required: set model (a registered model) or manifest")


def seconds_or_none(request, field: str) -> float | None:
    """A Duration field in seconds, or None when the request leaves it unset (the core's default applies)."""
    return getattr(request, field).ToNanoseconds() / 1e9 if request.HasField(field) else None


def duration(seconds: float) -> Duration:
    value = Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def timestamp(epoch_s: float) -> Timestamp:
    value = Timestamp()
    value.FromNanoseconds(int(epoch_s * 1e9))
    return value


def result_to_proto(result: EnsureResult) -> pb.EnsureModelResponse:
    reply = pb.EnsureModelResponse(
        view_path=str(result.view_path),
        view_id=result.view_id,
        files=[
            pb.EnsuredFile(path=f.path, sha256=f.sha256, size_bytes=f.size_bytes, source=_FILE_SOURCES[f.source])
            for f in result.files
        ],
        bytes_fetched=result.bytes_fetched,
        elapsed=duration(result.elapsed_s),
    )
    if result.revision:  # resolved through the registry; an explicit manifest has no model reference
        reply.model.CopyFrom(common_pb2.ModelRef(model_id=result.model_id, revision=result.revision))
    if result.lease is not None:
        reply.lease_id = result.lease.lease_id
        reply.lease_expire_time.CopyFrom(timestamp(result.lease.expire_time))
    return reply


def progress_to_proto(progress: Progress) -> pb.EnsureProgress:
    return pb.EnsureProgress(
        bytes_done=progress.bytes_done,
        bytes_total=progress.bytes_total,
        files_done=progress.files_done,
        files_total=progress.files_total,
        path=progress.path,
        file_bytes_done=progress.file_bytes_done,
        file_bytes_total=progress.file_bytes_total,
    )


def usage_to_proto(usage: Usage) -> pb.GetUsageResponse:
    return pb.GetUsageResponse(
        capacity_bytes=usage.store.capacity_bytes,
        used_bytes=usage.store.used_bytes,
        pinned_bytes=usage.store.pinned_bytes,
        blob_count=usage.store.blob_count,
        hits=usage.hits,
        misses=usage.misses,
        bytes_fetched=usage.bytes_fetched,
        evictions=usage.store.evictions,
        leases=usage.store.leases,
    )


async def upload_from_proto(requests: AsyncIterator[pb.PutFileRequest]) -> tuple[PutHeader, AsyncIterator[bytes]]:
    """The header (first message) and an iterator over the chunks that follow it."""
    messages = aiter(requests)
    first = await anext(messages, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument.field("header", "the first PutFile message must carry the header")
    header = PutHeader(first.header.path, first.header.expected_sha256, first.header.size_bytes,
                       first.header.overwrite)

    async def chunks() -> AsyncIterator[bytes]:
        async for message in messages:
            if message.WhichOneof("part") == "header":
                raise InvalidArgument.field("header", "only the first PutFile message may carry a header")
            yield message.chunk

    return header, chunks()


def lease_expiry(lease: Lease) -> Timestamp:
    return timestamp(lease.expire_time)


class StorageCacheServicer(pb_grpc.StorageCacheServiceServicer):
    def __init__(self, core: StorageCacheCore) -> None:
        self.core = core

    async def EnsureModel(self, request: pb.EnsureModelRequest, context) -> pb.EnsureModelResponse:
        result = await self.core.ensure(target_from_proto(request), pin_ttl_s=seconds_or_none(request, "pin_ttl"))
        return result_to_proto(result)

    async def EnsureModelStream(
        self, request: pb.EnsureModelStreamRequest, context
    ) -> AsyncIterator[pb.EnsureModelStreamResponse]:
        inner = request.request
        async for item in self.core.ensure_stream(target_from_proto(inner), pin_ttl_s=seconds_or_none(inner, "pin_ttl")):
            if isinstance(item, Progress):
                yield pb.EnsureModelStreamResponse(progress=progress_to_proto(item))
            else:
                yield pb.EnsureModelStreamResponse(result=result_to_proto(item))

    async def PutFile(self, request_iterator: AsyncIterator[pb.PutFileRequest], context) -> pb.PutFileResponse:
        header, chunks = await upload_from_proto(request_iterator)
        result = await self.core.put(header, chunks)
        return pb.PutFileResponse(path=result.path, sha256=result.sha256, size_bytes=result.size_bytes)

    async def Pin(self, request: pb.PinRequest, context) -> pb.PinResponse:
        lease = await self.core.pin(request.view_id, seconds_or_none(request, "ttl"))
        return pb.PinResponse(lease_id=lease.lease_id, expire_time=lease_expiry(lease))

    async def RenewLease(self, request: pb.RenewLeaseRequest, context) -> pb.RenewLeaseResponse:
        lease = await self.core.renew(request.lease_id, seconds_or_none(request, "ttl"))
        return pb.RenewLeaseResponse(expire_time=lease_expiry(lease))

    async def Unpin(self, request: pb.UnpinRequest, context) -> pb.UnpinResponse:
        await self.core.unpin(request.lease_id)
        return pb.UnpinResponse()

    async def Verify(self, request: pb.VerifyRequest, context) -> pb.VerifyResponse:
        report = await self.core.verify()
        return pb.VerifyResponse(
            blobs_checked=report.blobs_checked,
            bytes_checked=report.bytes_checked,
            dropped_digests=list(report.dropped_digests),
        )

    async def ReportCorrupt(self, request: pb.ReportCorruptRequest, context) -> pb.ReportCorruptResponse:
        return pb.ReportCorruptResponse(dropped=await self.core.report_corrupt(request.sha256, request.path))

    async def GetUsage(self, request: pb.GetUsageRequest, context) -> pb.GetUsageResponse:
        return usage_to_proto(self.core.usage())
