"""The registry's answers as the executor uses them: cached for a few seconds (a burst of requests costs one
lookup), kept serving a held model while the registry is unreachable, and a request's model and LoRA adapters
resolved and checked against each other."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

from hotslot.errors import FieldViolation, InvalidArgument, Unavailable
from hotslot.manifest import validate_model_id

from .downstream import ModelResolver, ResolvedModel
from .slots import ModelKey, SlotManager

log = logging.getLogger(__name__)

KIND_PIPELINE, KIND_LORA = "DIFFUSERS_PIPELINE", "LORA_ADAPTER"

# A request's LoRA adapter reference: (model id, revision, scale or None for 1.0).
AdapterRef = tuple[str, int, float | None]
# A resolved adapter a request applies: (key, scale, bytes).
AdapterLoad = tuple[ModelKey, float, int]


def check_adapter_refs(adapters: Sequence[AdapterRef], max_adapters: int) -> None:
    """Refuses malformed adapter references before anything is resolved, every violation at once."""
    bad: list[FieldViolation] = []
    if len(adapters) > max_adapters:
        bad.append(FieldViolation("adapters", f"names {len(adapters)} LoRA adapters; this executor applies at most "
                                              f"{max_adapters}"))
    for i, (adapter_id, adapter_revision, scale) in enumerate(adapters):
        try:
            validate_model_id(adapter_id, f"adapters[{i}].model.model_id")
        except InvalidArgument as err:
            bad.extend(err.violations or [FieldViolation(f"adapters[{i}].model.model_id", err.message)])
        if adapter_revision < 0:
            bad.append(FieldViolation(f"adapters[{i}].model.revision", "must be >= 0 (0 means the latest)"))
        if scale is not None and not math.isfinite(scale):
            bad.append(FieldViolation(f"adapters[{i}].scale", f"is {scale}; use a finite number"))
    if bad:
        raise InvalidArgument("; ".join(f"{v.field} {v.description}" for v in bad), bad)


class CachingResolver:
    def __init__(self, resolver: ModelResolver, slots: SlotManager, cache_s: float, max_adapters: int) -> None:
        self.resolver = resolver
        self.slots = slots
        self.cache_s = cache_s
        self.max_adapters = max_adapters
        self._resolved: dict[tuple[str, int], tuple[ResolvedModel, float]] = {}

    async def resolve(self, model_id: str, revision: int) -> ResolvedModel:
        """The registry's answer for (model, revision), reused for `cache_s` so a burst of requests costs one
        lookup. When the registry is unreachable, a model this executor holds keeps serving on the last answer (a
        new revision registered meanwhile is picked up once the registry is back)."""
        cache_key = (model_id, revision)
        cached = self._resolved.get(cache_key)
        now = time.monotonic()
        if cached is not None and now - cached[1] < self.cache_s:
            return cached[0]
        try:
            resolved = await self.resolver.resolve(model_id, revision)
        except Unavailable as err:
            if cached is not None and self.slots.get(ModelKey(cached[0].model_id, cached[0].revision)) is not None:
                log.warning("registry unreachable (%s); serving %s from the last answer", err.message, model_id)
                return cached[0]
            raise
        self._resolved[cache_key] = (resolved, now)
        return resolved

    async def resolve_request(self, model_id: str, revision: int,
                              adapters: Sequence[AdapterRef]) -> tuple[ResolvedModel, list[AdapterLoad]]:
        """The base pipeline a request runs on and its adapters as (key, scale, bytes): the model itself first when
        it is an adapter. Refuses adapters that are not LoRA adapters, on another base, or on a base that is not a
        pipeline (InvalidArgument)."""
        resolved = await self.resolve(model_id, revision)
        uses: list[AdapterLoad] = []
        if resolved.kind == KIND_LORA:
            uses.append((ModelKey(resolved.model_id, resolved.revision), 1.0, resolved.total_bytes))
            base_id = resolved.base_model_id
            resolved = await self.resolve(base_id, 0)
            if resolved.kind and resolved.kind != KIND_PIPELINE:
                raise InvalidArgument.field("model.model_id", f"the base {base_id!r} of LoRA adapter {model_id!r} is a "
                                                              f"{resolved.kind}, not a {KIND_PIPELINE}")
        elif resolved.kind and resolved.kind != KIND_PIPELINE:
            raise InvalidArgument.field(
                "model.model_id", f"{model_id!r} is a {resolved.kind}; generate with a {KIND_PIPELINE} model"
            )
        for i, (adapter_id, adapter_revision, scale) in enumerate(adapters):
            field_name = f"adapters[{i}].model.model_id"
            adapter = await self.resolve(adapter_id, adapter_revision)
            if adapter.kind != KIND_LORA:
                raise InvalidArgument.field(field_name, f"{adapter_id!r} is a {adapter.kind or 'model'}, not a "
                                                        f"{KIND_LORA}")
            if adapter.base_model_id != resolved.model_id:
                raise InvalidArgument.field(
                    field_name, f"LoRA adapter {adapter_id!r} is on base {adapter.base_model_id!r}, but this request "
                                f"runs on {resolved.model_id!r}; all adapters of a request must share one base")
            uses.append((ModelKey(adapter.model_id, adapter.revision), 1.0 if scale is None else float(scale),
                         adapter.total_bytes))
        if len(uses) > self.max_adapters:
            raise InvalidArgument.field("adapters", f"{len(uses)} LoRA adapters (the model counts when it is one); "
                                                    f"this executor applies at most {self.max_adapters}")
        return resolved, uses

    async def adapter_base(self, adapter: ResolvedModel, model_id: str) -> ModelKey:
        """The pipeline a LoRA adapter applies to (InvalidArgument when its base is not a pipeline)."""
        base_model = await self.resolve(adapter.base_model_id, 0)
        if base_model.kind and base_model.kind != KIND_PIPELINE:
            raise InvalidArgument.field("model.model_id", f"the base {adapter.base_model_id!r} of LoRA adapter "
                                                          f"{model_id!r} is not a {KIND_PIPELINE}")
        return ModelKey(base_model.model_id, base_model.revision)
