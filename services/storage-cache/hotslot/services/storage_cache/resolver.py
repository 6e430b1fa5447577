"""Resolves a model reference through the registry over the shared RegistryClient (traced channel, timeout, errors
with the registry's code, message, reason and details), turning its Model into the core's ResolvedModel so the core
stays free of transport types."""
from __future__ import annotations

from pathlib import PurePosixPath

from hotslot.bootstrap.registry_client import ChannelFactory, RegistryClient
from hotslot.convert import manifest_from_proto
from hotslot.errors import FailedPrecondition, HotslotError, Unavailable

from .core import ModelResolver, ResolvedModel


class RegistryResolver(ModelResolver):
    def __init__(self, address: str, *, timeout_s: float, channel_factory: ChannelFactory) -> None:
        self.address = address
        self.registry = RegistryClient(address, channel_factory=channel_factory, timeout_s=timeout_s)

    async def resolve(self, model_id: str, revision: int) -> ResolvedModel:
        if not self.address:
            raise FailedPrecondition(
                "no registry is configured, so a model reference cannot be resolved: set registry_address "
                "(HOTSLOT_STORAGE_CACHE_REGISTRY_ADDRESS) or Ensure by manifest"
            )
        try:
            model = await self.registry.get_model(model_id, revision)
        except Unavailable as error:
            raise Unavailable(f"{error.message}; check registry_address and that the registry is running",
                              reason=error.reason) from None
        return ResolvedModel(model.model_id, model.revision, model.source, manifest_from_proto(model.manifest))

    async def model_naming(self, path: str) -> str | None:
        """Pages through the registry's models (latest revision of each) for one whose manifest names `path`.
        Asked only to overwrite an existing file, which is rare; no registry configured: nothing is registered."""
        if not self.address:
            return None
        wanted = PurePosixPath(path)
        try:
            async for model in self.registry.all_models():
                source = PurePosixPath(model.source)
                if any(source / f.path == wanted for f in model.manifest.files):
                    return f"{model.model_id}@{model.revision}"
        except HotslotError as error:
            # Refuse rather than risk replacing a registered file: the caller may retry.
            raise Unavailable(
                f"cannot check with the registry at {self.address} whether a registered model names {path!r} "
                f"({error.message}); nothing was written, try again"
            ) from None
        return None

    async def close(self) -> None:
        await self.registry.close()
