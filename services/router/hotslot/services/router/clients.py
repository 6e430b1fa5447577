"""gRPC adapters behind the router's downstream interfaces: executor and registry clients over traced channels.
Failures come back as hotslot errors with the downstream's status code and message, so the core never sees
grpc."""
from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

import grpc
import grpc.aio

from hotslot import errors
from hotslot.bootstrap.registry_client import ChannelFactory, RegistryClient
from hotslot.bootstrap.rpc_errors import error_from_rpc as _error_from_rpc
from hotslot.common.v1 import common_pb2
from hotslot.executor.v1 import executor_service_pb2 as executor_pb
from hotslot.executor.v1 import executor_service_pb2_grpc as executor_grpc

from .downstream import (
    Evicted,
    ExecutorClient,
    ExecutorConnector,
    ExecutorUnavailable,
    GenerateCall,
    ModelCatalog,
    ProgressEvent,
    ResultEvent,
    StreamEvent,
)
from .placement import CostEstimates, ExecutorSnapshot, HeldModel, QueuedRequest, Tier, TierCost


def error_from_rpc(error: grpc.aio.AioRpcError, peer: str) -> errors.HotslotError:
    """A failed executor or registry call as a hotslot error; UNAVAILABLE becomes ExecutorUnavailable, the one
    failure the core retries elsewhere."""
    return _error_from_rpc(error, peer, unavailable=ExecutorUnavailable)


def snapshot_from_proto(status: executor_pb.ExecutorStatus, address: str) -> ExecutorSnapshot:
    """Placement's view of an ExecutorStatus. The message is kept as `raw` for GetClusterStatus, with the address
    filled in when the executor left it empty."""
    if not status.address:
        status.address = address
    return ExecutorSnapshot(
        executor_id=status.executor_id or address,
        address=status.address,
        ready=status.state == common_pb2.EXECUTOR_STATE_READY,
        models=tuple(
            HeldModel(held.model.model_id, held.model.revision, _tier(held.tier), held.size_bytes)
            for held in status.models
        ),
        adapters=tuple(
            HeldModel(held.model.model_id, held.model.revision, _tier(held.tier), held.size_bytes)
            for held in status.adapters
        ),
        queue_depth=status.queue_depth,
        queue_capacity=status.queue_capacity,
        version=status.version,
        raw=status,
        queue=tuple(
            QueuedRequest(queued.model.model_id, queued.model.revision) for queued in status.queue
        ),
        costs=costs_from_proto(status.costs),
    )


def costs_from_proto(costs: executor_pb.CostEstimates) -> CostEstimates:
    """Placement's view of an executor's CostEstimates; an executor that sends none gives all zeros, which placement
    reads as "not measured"."""
    return CostEstimates(
        seconds_per_work_unit=costs.seconds_per_work_unit,
        seconds_per_request=costs.seconds_per_request,
        backlog_seconds=costs.backlog_seconds,
        load_costs=tuple(
            TierCost(_tier(cost.tier), cost.fixed_seconds, cost.seconds_per_gib, cost.samples)
            for cost in costs.load_costs
        ),
        default_steps=costs.default_steps,
        default_width=costs.default_width,
        default_height=costs.default_height,
    )


def _tier(value: int) -> Tier:
    try:
        return Tier(value)
    except ValueError:  # a tier newer than this router: never preferred
        return Tier.UNSPECIFIED


class GrpcExecutorClient(ExecutorClient):
    def __init__(self, address: str, channel: grpc.aio.Channel) -> None:
        self.address = address
        self._channel = channel
        self._stub = executor_grpc.ExecutorServiceStub(channel)

    async def watch_status(self) -> AsyncIterator[ExecutorSnapshot]:
        call = self._stub.WatchStatus(executor_pb.WatchStatusRequest())
        try:
            async for response in call:
                yield snapshot_from_proto(response.status, self.address)
        except grpc.aio.AioRpcError as error:
            raise ExecutorUnavailable(f"status stream of {self.address} broke: {error.code().name}") from None
        finally:
            call.cancel()

    async def generate(self, call: GenerateCall, timeout_s: float | None) -> executor_pb.GenerateResponse:
        request = executor_pb.GenerateRequest(
            model=common_pb2.ModelRef(model_id=call.model_id, revision=call.revision),
            params=call.params,
            request_id=call.request_id,
            adapters=call.adapters,
        )
        try:
            return await self._stub.Generate(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, f"executor at {self.address}") from None

    async def generate_stream(self, call: GenerateCall, timeout_s: float | None) -> AsyncGenerator[StreamEvent, None]:
        request = executor_pb.GenerateStreamRequest(
            model=common_pb2.ModelRef(model_id=call.model_id, revision=call.revision),
            params=call.params,
            request_id=call.request_id,
            adapters=call.adapters,
        )
        rpc = self._stub.GenerateStream(request, timeout=timeout_s)
        try:
            async for response in rpc:
                kind = response.WhichOneof("event")
                if kind == "result":
                    # The result is the last message, and the caller closes this stream as soon as it has it: wait
                    # for the executor's status first, or the cancel in `finally` can overtake it and the executor
                    # ends (and counts, and logs) a served request as CANCELLED.
                    await rpc.code()
                    yield ResultEvent(response.result)
                elif kind is not None:
                    yield ProgressEvent(kind, getattr(response, kind))
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, f"executor at {self.address}") from None
        finally:
            rpc.cancel()

    async def preload(self, model_id: str, revision: int, timeout_s: float | None) -> executor_pb.PreloadResponse:
        request = executor_pb.PreloadRequest(model=common_pb2.ModelRef(model_id=model_id, revision=revision))
        try:
            return await self._stub.Preload(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, f"executor at {self.address}") from None

    async def evict(self, model_id: str, revision: int, timeout_s: float | None) -> Evicted:
        request = executor_pb.EvictRequest(model=common_pb2.ModelRef(model_id=model_id, revision=revision))
        try:
            response = await self._stub.Evict(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, f"executor at {self.address}") from None
        return Evicted(response.freed_bytes, response.pending_bytes)

    async def close(self) -> None:
        await self._channel.close()


class GrpcExecutorConnector(ExecutorConnector):
    def __init__(self, channel_factory: ChannelFactory) -> None:
        self._channel_factory = channel_factory

    def connect(self, address: str) -> GrpcExecutorClient:
        return GrpcExecutorClient(address, self._channel_factory(address))


class GrpcModelCatalog(RegistryClient, ModelCatalog):
    """The router's catalog port is the shared registry client as is: get_model and list_models return the
    registry's messages, and a registry outage is errors.Unavailable (not ExecutorUnavailable: it is no reason to
    try another executor)."""
