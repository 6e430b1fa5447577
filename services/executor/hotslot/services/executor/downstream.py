"""What the executor needs from the rest of the cluster, as interfaces the core calls (no grpc here): the
registry resolves a model reference, the node's storage-cache makes its files present and pins them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ResolvedModel:
    model_id: str
    revision: int
    kind: str  # DIFFUSERS_PIPELINE or LORA_ADAPTER
    total_bytes: int
    pipeline_class: str
    base_model_id: str = ""  # LORA_ADAPTER: the pipeline it applies to


@dataclass(frozen=True)
class EnsuredView:
    view_path: str
    lease_id: str
    bytes_fetched: int
    all_local: bool  # every file was already in the node-local cache
    sha256_by_path: dict[str, str] = field(default_factory=dict)  # path relative to the view -> its blob's sha256
    # Paths relative to the view that this call (or a concurrent one it waited for) copied from the share: the
    # storage-cache hashed every byte of the copy a moment ago, so the read need not hash them again.
    fetched: frozenset[str] = frozenset()


class ModelResolver(Protocol):
    async def resolve(self, model_id: str, revision: int) -> ResolvedModel:
        """Raises NotFound for an unknown model, Unavailable when the registry cannot be reached."""
        ...


class ViewProvider(Protocol):
    async def ensure(self, model_id: str, revision: int, lease_ttl_s: float) -> EnsuredView:
        """Makes every file present locally and pins the view under a new lease."""
        ...

    async def renew(self, lease_id: str, lease_ttl_s: float) -> None: ...

    async def unpin(self, lease_id: str) -> None: ...

    async def report_corrupt(self, sha256: str, path: str) -> bool:
        """Tells the storage-cache that the blob's bytes no longer match its read checksum; it re-hashes the blob
        and drops it (with its views) when it is corrupt. Returns whether it was dropped."""
        ...
