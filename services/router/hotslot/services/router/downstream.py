"""What the router needs from the services behind it (executors, registry), as interfaces free of transport types:
the gRPC adapters in clients.py implement them, tests subclass them with fakes."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from hotslot.errors import Unavailable

from .placement import DEFAULT_WORK, ExecutorSnapshot, RequestWork


class ExecutorUnavailable(Unavailable):
    """The executor could not be reached, went away during the call, or answered UNAVAILABLE itself (draining,
    preloader or storage-cache down). The one failure the router retries on another executor."""


@dataclass(frozen=True)
class GenerateCall:
    """One generation as the router forwards it. `params` is the client's GenerationParams message, passed on
    untouched: the executor owns their bounds, so the router does not validate them; `work` carries their size
    (steps, width, height, images) for placement's estimate."""

    model_id: str
    revision: int
    params: Any
    request_id: str
    work: RequestWork = DEFAULT_WORK
    """Steps, size and images of `params`, for placement's estimate (zeros: the executor's defaults)."""
    adapters: tuple = ()
    """The request's LoRA adapters (AdapterRef messages), passed on untouched: the executor resolves and checks them."""
    place_model: tuple[str, int] | None = None
    """(model id, revision) placement places: the base pipeline when the model is a LoRA adapter; None: the model."""
    place_adapters: tuple[tuple[str, int], ...] = ()
    """(model id, revision) of every adapter the request applies (the model first when it is one), for placement."""


@dataclass(frozen=True)
class ProgressEvent:
    """A progress message of GenerateStream; `kind` is "load" or "step", `payload` the executor's message."""

    kind: str
    payload: Any


@dataclass(frozen=True)
class ResultEvent:
    """The final message of GenerateStream: the executor's GenerateResponse."""

    payload: Any


StreamEvent = ProgressEvent | ResultEvent


@dataclass(frozen=True)
class Evicted:
    """An executor's answer to Evict."""

    freed_bytes: int
    """Released now."""
    pending_bytes: int
    """Of models in use: marked, released when their last request ends."""


class ExecutorClient(ABC):
    """Calls to one executor. Every method raises hotslot.errors classes carrying the executor's status code and
    message; a broken connection or an UNAVAILABLE answer raises ExecutorUnavailable. `timeout_s` None means no
    deadline."""

    address: str

    @abstractmethod
    def watch_status(self) -> AsyncIterator[ExecutorSnapshot]:
        """The executor's status now, then after every change, until the stream breaks (raises) or ends."""

    @abstractmethod
    async def generate(self, call: GenerateCall, timeout_s: float | None) -> Any:
        """Runs one generation; returns the executor's GenerateResponse."""

    @abstractmethod
    def generate_stream(self, call: GenerateCall, timeout_s: float | None) -> AsyncGenerator[StreamEvent, None]:
        """Runs one generation, yielding progress and then one ResultEvent. Closing the iterator cancels the call."""

    @abstractmethod
    async def preload(self, model_id: str, revision: int, timeout_s: float | None) -> Any:
        """Loads a model into standby; returns the executor's PreloadResponse."""

    @abstractmethod
    async def evict(self, model_id: str, revision: int, timeout_s: float | None) -> Evicted:
        """Drops the model (revision 0: every revision held), or marks it where a request uses it. Raises NotFound
        when the executor does not hold it."""

    async def close(self) -> None:  # noqa: B027 - optional hook: fakes have nothing to release
        """Releases the connection."""


class ExecutorConnector(ABC):
    """Makes the client of an executor address (host:port) when the router learns of it."""

    @abstractmethod
    def connect(self, address: str) -> ExecutorClient: ...


class ModelCatalog(ABC):
    """The registry as the router uses it. Raises the registry's errors (NotFound, InvalidArgument) with its
    messages, and Unavailable naming the registry when it cannot be reached."""

    @abstractmethod
    async def list_models(self, request: Any) -> Any:
        """Passes a registry ListModelsRequest; returns its ListModelsResponse."""

    @abstractmethod
    async def get_model(self, model_id: str, revision: int) -> Any:
        """Returns the registry's Model for (model_id, revision); revision 0 is the latest."""

    async def close(self) -> None:  # noqa: B027 - optional hook: fakes have nothing to release
        """Releases the connection."""
