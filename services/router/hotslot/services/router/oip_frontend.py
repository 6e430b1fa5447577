"""The Open Inference Protocol front-end of the router: answers the protocol's calls (readiness, metadata, the
model repository, inference and streaming) with the router core, in oip.py's types. No transport code."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

from hotslot.common.v1 import common_pb2
from hotslot.convert import kind_from_proto
from hotslot.errors import FailedPrecondition, HotslotError, InvalidArgument, NotFound
from hotslot.registry.v1 import registry_service_pb2 as registry_pb
from hotslot.tiers import LoadPhase

from .core import EvictOutcome, Routed, RouterCore
from .downstream import GenerateCall, ProgressEvent
from .oip import (
    IMAGE,
    PLATFORM_LORA,
    PLATFORM_PIPELINE,
    SERVER_NAME,
    InferOutcome,
    InferRequest,
    ModelMetadata,
    OutputTensor,
    ParamValue,
    RepositoryEntry,
    ServerMetadata,
    StreamFailure,
    StreamItem,
    TextToImage,
    encode_bytes_tensor,
    parse_text_to_image,
    parse_version,
    require_model_name,
    type_name,
)
from .placement import RequestWork, Tier

_HELD_TIERS = frozenset({Tier.ACTIVE, Tier.STANDBY, Tier.HOST})


# -- the core's inputs and outputs -------------------------------------------------------------------------------
def generate_call(model_id: str, revision: int, request: TextToImage) -> GenerateCall:
    """The router's GenerateCall for a parsed request: only what the client gave is set, so the executor's defaults
    (and its bounds) apply to the rest. The request id is the router's own: Triton ids are free text, echoed back
    in the response instead."""
    params = common_pb2.GenerationParams(prompt=request.prompt, negative_prompt=request.negative_prompt)
    for name in ("seed", "steps", "guidance_scale", "width", "height"):
        value = getattr(request, name)
        if value is not None:
            setattr(params, name, value)
    adapters = []
    for adapter_id, scale in request.adapters:
        ref = common_pb2.AdapterRef(model=common_pb2.ModelRef(model_id=adapter_id))
        if scale is not None:
            ref.scale = scale
        adapters.append(ref)
    return GenerateCall(
        model_id=model_id,
        revision=revision,
        params=params,
        request_id="",
        work=RequestWork(steps=params.steps, width=params.width, height=params.height, num_images=1),
        adapters=tuple(adapters),
    )


def image_outcome(request: InferRequest, routed: Routed) -> InferOutcome:
    """The response for a routed generation: the PNG as the `image` output, and where and how it was made as
    response parameters."""
    result = routed.result
    images = [image.data for image in result.images]
    parameters: dict[str, ParamValue] = {
        "executor_id": result.executor_id,
        "tier": _tier_name(result.tier),
        "placement_reason": routed.placement_reason.label,
        "hotslot_request_id": result.request_id,
    }
    if result.adapters:
        # As the `lora` parameter is written, revisions resolved: what ran.
        parameters["lora"] = ",".join(f"{a.model.model_id}:{a.scale:g}" for a in result.adapters)
    if result.images:
        parameters["seed"] = int(result.images[0].seed)
        parameters["width"] = int(result.images[0].width)
        parameters["height"] = int(result.images[0].height)
    return InferOutcome(
        model_name=request.model_name,
        model_version=str(result.model.revision) if result.model.revision else request.model_version,
        id=request.id,
        outputs=(OutputTensor(IMAGE, "BYTES", (len(images),), encode_bytes_tensor(images)),),
        parameters=parameters,
    )


def progress_outcome(request: InferRequest, event: ProgressEvent) -> InferOutcome:
    """A progress update of ModelStreamInfer as a response with no outputs: `progress` is "load" (with load_phase,
    bytes_done, bytes_total, queue_position) or "step" (with step and total_steps)."""
    payload = event.payload
    parameters: dict[str, ParamValue]
    if event.kind == "step":
        parameters = {"progress": "step", "step": int(payload.step), "total_steps": int(payload.total_steps)}
    else:
        parameters = {
            "progress": event.kind,
            "load_phase": _label(LoadPhase, int(payload.phase)),
            "bytes_done": int(payload.bytes_done),
            "bytes_total": int(payload.bytes_total),
            "queue_position": int(payload.queue_position),
        }
    return InferOutcome(request.model_name, request.model_version, request.id, parameters=parameters, final=False)


def _tier_name(value: int) -> str:
    return _label(Tier, value)


def _label(enum_type: type[Tier] | type[LoadPhase], value: int) -> str:
    """The value's lower-case name (hotslot.tiers), "unspecified" for a value this router does not know."""
    try:
        return enum_type(value).label
    except ValueError:
        return "unspecified"


def held_by(snapshot: Any, model_id: str, revision: int) -> bool:
    """Whether an executor's status lists the model (pipeline or adapter) active, standby or in host memory;
    revision 0 matches any."""
    return any(
        held.model_id == model_id and (revision == 0 or held.revision == revision) and held.tier in _HELD_TIERS
        for held in (*snapshot.models, *snapshot.adapters)
    )


# -- the front-end -----------------------------------------------------------------------------------------------
STATUS_WAIT_S = 5.0
"""Default of InferenceFrontend.status_wait_s."""


class InferenceFrontend:
    """Answers the Open Inference Protocol with the router core.

    Readiness: the server is ready when at least one executor is connected and READY. A model is ready when the
    registry knows it and a ready executor holds it active, standby or in host memory, so RepositoryModelLoad
    makes it ready and RepositoryModelUnload makes it not ready, as Triton clients expect. ModelInfer does not
    need a ready model: one that is not held is loaded by the request, as every hotslot request is.

    RepositoryModelLoad and Unload return once the executors' status (which the router follows) shows the change,
    or after `status_wait_s`, so that a ModelReady right after them agrees."""

    def __init__(self, core: RouterCore, *, server_version: str, status_wait_s: float = STATUS_WAIT_S) -> None:
        self.core = core
        self.server_version = server_version
        self.status_wait_s = status_wait_s
        self._change_waiters: list[asyncio.Future[None]] = []
        core.membership.add_listener(self._on_membership_change)

    # -- server ----------------------------------------------------------------------------------------------
    def server_live(self) -> bool:
        return True

    def server_ready(self) -> bool:
        return any(link.live for link in self.core.membership.placeable())

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(SERVER_NAME, self.server_version)

    # -- models ----------------------------------------------------------------------------------------------
    def holders(self, model_id: str, revision: int) -> list[str]:
        """Ids of the ready executors holding the model (see held_by)."""
        return [
            link.executor_id for link in self.core.membership.placeable()
            if link.live and link.snapshot is not None and held_by(link.snapshot, model_id, revision)
        ]

    async def model_ready(self, name: str, version: str) -> bool:
        """False for a model the registry does not know (as Triton answers for an unknown model)."""
        revision = parse_version(version)
        if not self.holders(require_model_name(name), revision):
            return False
        try:
            await self.core.get_model(name, revision)
        except NotFound:
            return False
        return True

    async def model_metadata(self, name: str, version: str) -> ModelMetadata:
        """Raises NotFound for a model the registry does not know."""
        model = await self.core.get_model(require_model_name(name), parse_version(version))
        platform = PLATFORM_LORA if kind_from_proto(model.kind) == "LORA_ADAPTER" else PLATFORM_PIPELINE
        return ModelMetadata(name=model.model_id, versions=(str(model.revision),), platform=platform)

    async def repository_index(self, ready_only: bool, page_size: int = 1000) -> list[RepositoryEntry]:
        """Every model of the registry (its latest revision), READY where held; with `ready_only` only those."""
        entries: list[RepositoryEntry] = []
        token = ""
        while True:
            page = await self.core.list_models(registry_pb.ListModelsRequest(page_size=page_size, page_token=token))
            for model in page.models:
                if self.holders(model.model_id, 0):
                    entries.append(RepositoryEntry(model.model_id, str(model.revision), "READY"))
                elif not ready_only:
                    entries.append(RepositoryEntry(
                        model.model_id, str(model.revision), "UNAVAILABLE",
                        "not held by any executor; RepositoryModelLoad or the first request loads it",
                    ))
            token = page.next_page_token
            if not token:
                return entries

    async def load(self, name: str, parameters: Mapping[str, ParamValue], time_remaining_s: float | None) -> None:
        """Preloads the latest revision into standby on `replicas` executors (parameter, default 1). Triton's
        `config` and `file:` overrides are refused: hotslot loads what the registry lists."""
        require_model_name(name)
        for key in parameters:
            if key == "config" or key.startswith("file:"):
                raise InvalidArgument.field(
                    f"parameters.{key}", "hotslot loads models as the registry lists them: config and file overrides "
                    "are not supported; register a new revision instead"
                )
        replicas = parameters.get("replicas", 1)
        if isinstance(replicas, bool) or not isinstance(replicas, int):
            raise InvalidArgument.field("parameters.replicas", f"must be an integer, got {type_name(replicas)}")
        await self.core.preload(name, 0, replicas, time_remaining_s)
        await self._until(lambda: bool(self.holders(name, 0)))

    async def unload(self, name: str, time_remaining_s: float | None) -> None:
        """Evicts every revision of the model from every executor holding it. Raises NotFound for a model the
        registry does not know, FailedPrecondition naming the executors that refused (e.g. the model is in use)."""
        await self.core.get_model(require_model_name(name), 0)
        answers = await self.core.evict(name, 0, "", time_remaining_s)
        failed = [answer for answer in answers if answer.outcome is EvictOutcome.FAILED]
        if failed:
            raise FailedPrecondition(
                f"could not unload {name!r} from "
                + "; ".join(f"executor {answer.executor_id}: {answer.message}" for answer in failed)
            )
        await self._until(lambda: not self.holders(name, 0))

    # -- inference -------------------------------------------------------------------------------------------
    async def infer(self, request: InferRequest, time_remaining_s: float | None) -> InferOutcome:
        text_to_image = parse_text_to_image(request)
        call = generate_call(require_model_name(request.model_name), parse_version(request.model_version),
                             text_to_image)
        return image_outcome(request, await self.core.generate(call, time_remaining_s))

    async def infer_stream(
        self, requests: AsyncIterator[InferRequest], time_remaining: Callable[[], float | None]
    ) -> AsyncGenerator[StreamItem, None]:
        """ModelStreamInfer: every request runs as it arrives (several at once), each answered by its progress
        updates (if it asked) and its image, or by a StreamFailure; the stream itself goes on. An unexpected error
        ends the stream."""
        queue: asyncio.Queue[StreamItem | BaseException | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def run(request: InferRequest) -> None:
            try:
                async for item in self._stream_one(request, time_remaining()):
                    queue.put_nowait(item)
            except HotslotError as error:
                queue.put_nowait(StreamFailure(request.model_name, request.id, error))
            except Exception as error:  # noqa: BLE001 - handed to the stream, which ends with it
                queue.put_nowait(error)

        async def read() -> None:
            try:
                async for request in requests:
                    task = asyncio.create_task(run(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.wait(set(running))
            except Exception as error:  # noqa: BLE001 - handed to the stream, which ends with it
                queue.put_nowait(error)
            finally:
                queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            tasks = [reader, *running]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream_one(self, request: InferRequest, time_remaining_s: float | None) -> AsyncIterator[InferOutcome]:
        text_to_image = parse_text_to_image(request, streaming=True)
        call = generate_call(require_model_name(request.model_name), parse_version(request.model_version),
                             text_to_image)
        events = self.core.generate_stream(call, time_remaining_s)
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Routed):
                    yield image_outcome(request, event)
                    return
                if text_to_image.progress:
                    yield progress_outcome(request, event)

    # -- waiting for the executors' status -------------------------------------------------------------------
    def _on_membership_change(self) -> None:
        waiters, self._change_waiters = self._change_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _until(self, condition: Callable[[], bool]) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.status_wait_s
        while not condition():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            waiter = loop.create_future()
            self._change_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return condition()
        return True
