"""Registry domain logic: validates and scans sources, keeps revisions in a ModelStore, and tells watchers about
changes. No transport code here."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from opentelemetry import trace

from hotslot.errors import InvalidArgument, Unavailable
from hotslot.manifest import scan_model_dir, validate_model_id, validate_relative_path

from .store import KIND_LORA, KIND_PIPELINE, ModelRecord, ModelStore

log = logging.getLogger(__name__)

LABEL_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
MAX_LABEL_VALUE_CHARS = 256
MAX_LABELS = 64
KINDS = (KIND_PIPELINE, KIND_LORA)


@dataclass(frozen=True)
class ModelEvent:
    """A change watchers are told about: EXISTING, SYNCED, REGISTERED or DELETED."""

    type: str
    model: ModelRecord | None


@dataclass(frozen=True)
class Page:
    models: list[ModelRecord]
    next_page_token: str


class RegistryCore:
    def __init__(
        self,
        store: ModelStore,
        models_root: Path,
        *,
        hash_chunk_bytes: int = 8 * 1024 * 1024,
        default_page_size: int = 100,
        max_page_size: int = 1000,
        watch_queue_size: int = 1024,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.store = store
        self.models_root = Path(models_root)
        self.hash_chunk_bytes = hash_chunk_bytes
        self.default_page_size = default_page_size
        self.max_page_size = max_page_size
        self.watch_queue_size = watch_queue_size
        self._watchers: set[asyncio.Queue[ModelEvent | None]] = set()
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)

    # -- register ----------------------------------------------------------------------------------------
    async def register(
        self, model_id: str, kind: str, base_model_id: str, source: str, labels: dict[str, str]
    ) -> tuple[ModelRecord, bool]:
        validate_model_id(model_id)
        kind = kind or KIND_PIPELINE
        if kind not in KINDS:
            raise InvalidArgument.field("kind", f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        if kind == KIND_LORA:
            if not base_model_id:
                raise InvalidArgument.field("base_model_id", "is required for a LORA_ADAPTER")
            validate_model_id(base_model_id, "base_model_id")
            if base_model_id == model_id:
                raise InvalidArgument.field("base_model_id", "a LoRA adapter cannot be its own base")
        elif base_model_id:
            raise InvalidArgument.field("base_model_id", f"must be empty for a {kind}")
        validate_labels(labels)
        source = validate_relative_path(source, "source").as_posix()
        with self._tracer.start_as_current_span("registry.scan") as span:
            span.set_attribute("hotslot.model_id", model_id)
            span.set_attribute("hotslot.source", source)
            manifest = await asyncio.to_thread(
                scan_model_dir,
                self.models_root,
                source,
                require_model_index=(kind == KIND_PIPELINE),
                chunk_bytes=self.hash_chunk_bytes,
            )
            span.set_attribute("hotslot.files", len(manifest.files))
            span.set_attribute("hotslot.bytes", manifest.total_bytes)
        if kind == KIND_LORA and not any(f.path.endswith(".safetensors") for f in manifest.files):
            raise InvalidArgument.field("source", f"{source!r} holds no .safetensors file for the LoRA adapter")
        record = ModelRecord(
            model_id=model_id,
            revision=0,
            kind=kind,
            base_model_id=base_model_id,
            source=source,
            labels=dict(labels),
            manifest=manifest,
        )
        stored, created = await asyncio.to_thread(self.store.add_revision, record)
        log.info(
            "registered model",
            extra={"model_id": model_id, "revision": stored.revision, "new_revision": created,
                   "files": len(manifest.files), "bytes": manifest.total_bytes},
        )
        if created:
            self._publish(ModelEvent("REGISTERED", stored))
        return stored, created

    # -- read --------------------------------------------------------------------------------------------
    async def get(self, model_id: str, revision: int = 0) -> ModelRecord:
        validate_model_id(model_id)
        if revision < 0:
            raise InvalidArgument.field("revision", "must be >= 0 (0 means the latest)")
        return await asyncio.to_thread(self.store.get, model_id, revision)

    async def list(
        self, page_size: int, page_token: str, kind: str | None, labels: dict[str, str]
    ) -> Page:
        if page_size < 0:
            raise InvalidArgument.field("page_size", "must be >= 0")
        if kind is not None and kind not in KINDS:
            raise InvalidArgument.field("kind", f"unknown kind {kind!r}")
        limit = min(page_size or self.default_page_size, self.max_page_size)
        filter_key = _filter_key(kind, labels)
        after_id = _decode_page_token(page_token, filter_key) if page_token else ""
        models = await asyncio.to_thread(
            self.store.list_latest, after_id=after_id, limit=limit + 1, kind=kind, labels=labels
        )
        next_token = ""
        if len(models) > limit:
            models = models[:limit]
            next_token = _encode_page_token(models[-1].model_id, filter_key)
        return Page(models, next_token)

    # -- delete ------------------------------------------------------------------------------------------
    async def delete(self, model_id: str) -> int:
        validate_model_id(model_id)
        last, count = await asyncio.to_thread(self.store.delete, model_id)
        log.info("deleted model", extra={"model_id": model_id, "revisions": count})
        self._publish(ModelEvent("DELETED", last))
        return count

    # -- watch -------------------------------------------------------------------------------------------
    async def watch(self, kind: str | None = None) -> AsyncIterator[ModelEvent]:
        """Existing models, one SYNCED, then changes. Subscribes before reading the snapshot so no change falls
        between the two; a change already in the snapshot may then be sent again as REGISTERED."""
        if kind is not None and kind not in KINDS:
            raise InvalidArgument.field("kind", f"unknown kind {kind!r}")
        queue: asyncio.Queue[ModelEvent | None] = asyncio.Queue(self.watch_queue_size)
        self._watchers.add(queue)
        try:
            after = ""
            while True:
                batch = await asyncio.to_thread(
                    self.store.list_latest, after_id=after, limit=self.max_page_size, kind=kind, labels={}
                )
                for record in batch:
                    yield ModelEvent("EXISTING", record)
                if len(batch) < self.max_page_size:
                    break
                after = batch[-1].model_id
            yield ModelEvent("SYNCED", None)
            while True:
                event = await queue.get()
                if event is None:
                    raise Unavailable("watch fell behind (too many unread changes); start a new watch")
                if kind is None or (event.model is not None and event.model.kind == kind):
                    yield event
        finally:
            self._watchers.discard(queue)

    def _publish(self, event: ModelEvent) -> None:
        for queue in list(self._watchers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                # A watcher that cannot keep up is cut off rather than slowing every writer down.
                self._watchers.discard(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)

    def close_watchers(self) -> None:
        for queue in list(self._watchers):
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(None)


def validate_labels(labels: dict[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument.field("labels", f"at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels.items():
        if not LABEL_KEY_PATTERN.fullmatch(key):
            raise InvalidArgument.field(
                f"labels[{key!r}]", "label keys are 1-63 characters of [A-Za-z0-9._/-], starting alphanumeric"
            )
        if len(value) > MAX_LABEL_VALUE_CHARS:
            raise InvalidArgument.field(f"labels[{key!r}]", f"value longer than {MAX_LABEL_VALUE_CHARS} characters")


def _filter_key(kind: str | None, labels: dict[str, str]) -> str:
    raw = json.dumps([kind, sorted(labels.items())])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _encode_page_token(after_id: str, filter_key: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"a": after_id, "f": filter_key}).encode()).decode()


def _decode_page_token(token: str, filter_key: str) -> str:
    try:
        raw = json.loads(base64.urlsafe_b64decode(token.encode()))
        after_id, key = raw["a"], raw["f"]
        if not isinstance(after_id, str):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument.field("page_token", "is not a token issued by ListModels") from None
    if key != filter_key:
        raise InvalidArgument.field("page_token", "was issued for a different filter; keep kind and labels the same")
    return after_id
