"""What the executor core needs from the loading machinery on its own machine, as Protocols (no grpc here; what it
needs from other services is in `downstream`): the loader that reads weights through the preloader and builds
pipelines around them (`loader.ModelLoader`), and the preloader subprocess as far as the core supervises it
(`hotslot.loading.preloader.Preloader`). The unit tests' fakes satisfy them too."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .loader import HostWeights
    from .lora import AdapterWeights

# A diffusers pipeline. Duck-typed on purpose: `generation` calls it and `lora` loads adapters into it, and the core
# only hands it from the loader to the slot and back.
Pipeline = Any


class Weights(Protocol):
    """A model's or a LoRA adapter's weights as the host tier holds them (`loader.HostWeights`,
    `lora.AdapterWeights`). Those made of components other models may share are `SharedParts` too."""

    @property
    def nbytes(self) -> int: ...


@runtime_checkable
class SharedParts(Protocol):
    """Weights made of components that other held models may have byte for byte (`loader.HostWeights`): the
    budgets count each shared component once, and the last model to leave frees it."""

    def part_sizes(self) -> dict[str, int]:
        """Component id -> bytes, for every component these weights hold."""
        ...

    def release(self) -> None:
        """These weights left the executor: each component loses a user."""
        ...


class ReadOutcome(Protocol):
    """What a read returns (`loader.ReadResult`)."""

    @property
    def weights(self) -> Weights: ...

    @property
    def handoff_s(self) -> float:
        """Child done -> tensors usable here."""
        ...


@runtime_checkable
class Loader(Protocol):
    """Reads weights and builds pipelines. Every method blocks: the core calls them in worker threads."""

    def warmup(self) -> float:
        """Imports the pipeline classes before the first request; returns the seconds it took."""
        ...

    def read(self, key: str, view_path: str, timeout_s: float,
             digests: Mapping[str, str] | None = None, hashed: frozenset[str] = frozenset()) -> ReadOutcome:
        """Reads a pipeline's weights from the view (`digests`: path -> sha256, so components other held models
        have byte for byte are shared, not read; `hashed`: paths whose bytes the storage-cache hashed for this very
        load, read without checking them again). Raises CorruptRead when a file fails its read checksum,
        Unavailable when the preloader died."""
        ...

    def read_adapter(self, key: str, view_path: str, timeout_s: float) -> ReadOutcome:
        """Reads a LoRA adapter's weights from the view."""
        ...

    def materialize(self, host: HostWeights) -> tuple[Pipeline, float]:
        """A pipeline around the held weights, and the seconds it took."""
        ...

    def demote(self, host: HostWeights) -> None:
        """The pipeline around these weights was dropped (STANDBY -> HOST)."""
        ...

    def apply_adapters(self, pipeline: Pipeline, wanted: list[tuple[str, AdapterWeights, float]],
                       held: dict[str, AdapterWeights]) -> None:
        """Makes `pipeline` run with exactly `wanted` (name, weights, scale); `held`: the adapters the host tier
        holds, by name."""
        ...


@runtime_checkable
class PreloaderHandle(Protocol):
    """The preloader subprocess as the core supervises it: status, and a restart when a read found it dead."""

    @property
    def pid(self) -> int | None: ...

    @property
    def restarts(self) -> int:
        """Children started after the first one."""
        ...

    @property
    def restarting(self) -> bool:
        """A restart is under way: wait for it instead of starting another."""
        ...

    def is_alive(self) -> bool: ...

    def restart(self) -> None:
        """Stops the current child and starts a fresh one (raises when it cannot)."""
        ...
