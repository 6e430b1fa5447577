"""storage-cache domain logic: Ensure (resolve a model, fetch every missing blob once however many callers ask,
build its view), leases, Verify and usage counters. Uploads live in put.py, disk layout in blobstore.py. No
transport code here: errors are hotslot.errors classes and registry access goes through ModelResolver."""
from __future__ import annotations

import asyncio
import enum
import errno
import functools
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from opentelemetry import trace

from hotslot import checksum
from hotslot.errors import (
    DataLoss,
    FailedPrecondition,
    HotslotError,
    InvalidArgument,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from hotslot.manifest import SHA256_PATTERN, FileEntry, Manifest, validate_model_id, validate_relative_path

from .backing import BackingStore
from .blobstore import BlobStore, Lease, Reservation, StoreUsage, VerifyReport, format_bytes
from .fill import CopyMethod, HashingCopy
from .metrics import StorageCacheMetrics
from .put import PutHeader, PutResult, WriteThroughUploader

log = logging.getLogger(__name__)

DEFAULT_READ_CHUNK_BYTES = 8 * 1024 * 1024
DEFAULT_PARALLEL_FETCHES = 4
DEFAULT_LEASE_TTL_S = 300.0
DEFAULT_MAX_LEASE_TTL_S = 24 * 3600.0
# Progress updates buffered per streaming Ensure; a client that reads slower than that skips intermediate updates
# (bytes_done only grows, so the next update it reads is still right).
DEFAULT_PROGRESS_BUFFER = 256


class FileSource(enum.Enum):
    LOCAL_HIT = "LOCAL_HIT"
    FETCHED = "FETCHED"
    JOINED = "JOINED"


@dataclass(frozen=True)
class ResolvedModel:
    """A registered model revision: where its files live on the backing store and what they are."""

    model_id: str
    revision: int
    source: str
    manifest: Manifest


class ModelResolver(ABC):
    """Looks a model up in the registry. The gRPC implementation is in resolver.py; tests pass a fake."""

    @abstractmethod
    async def resolve(self, model_id: str, revision: int) -> ResolvedModel:
        """The revision (latest when 0). Raises NotFound for an unknown model, Unavailable when unreachable."""

    async def model_naming(self, path: str) -> str | None:
        """`model_id@revision` of a registered model whose manifest names `path` (relative to the backing root),
        or None. Raises Unavailable when the registry cannot be asked. Without a registry nothing is registered."""
        return None


@dataclass(frozen=True)
class ModelTarget:
    model_id: str
    revision: int = 0


@dataclass(frozen=True)
class ManifestTarget:
    """An explicit manifest of files stored under `source` on the backing store; `name` is for logs only."""

    source: str
    manifest: Manifest
    name: str = ""


@dataclass(frozen=True)
class EnsuredFile:
    path: str
    sha256: str
    size_bytes: int
    source: FileSource


@dataclass(frozen=True)
class EnsureResult:
    view_path: Path
    view_id: str
    model_id: str
    revision: int
    files: tuple[EnsuredFile, ...]
    bytes_fetched: int
    elapsed_s: float
    lease: Lease | None


@dataclass(frozen=True)
class Progress:
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    path: str
    file_bytes_done: int
    file_bytes_total: int


@dataclass(frozen=True)
class Usage:
    store: StoreUsage
    hits: int
    misses: int
    bytes_fetched: int


@dataclass(frozen=True)
class _Plan:
    model_id: str
    revision: int
    source: str
    field_prefix: str  # "model" or "manifest": where the request named the source
    view_id: str
    files: tuple[FileEntry, ...]
    groups: dict[str, list[FileEntry]]  # digest -> files with that content, in path order


@dataclass(frozen=True)
class _Copied:
    temp: Path
    sha256: str
    size: int
    method: CopyMethod


class _Flight:
    """One fetch of one digest that any number of Ensures wait for; progress goes to each of them."""

    def __init__(self) -> None:
        self.task: asyncio.Task[int] | None = None
        self.bytes_done = 0
        self.listeners: list[Callable[[int], None]] = []

    def progress(self, bytes_done: int) -> None:
        self.bytes_done = bytes_done
        for listener in list(self.listeners):
            listener(bytes_done)


class _ProgressTracker:
    """Turns per-digest byte counts into per-file and overall progress for one Ensure."""

    def __init__(self, plan: _Plan, emit: Callable[[Progress], None] | None) -> None:
        self.emit = emit
        self.plan = plan
        self.total = sum(f.size_bytes for f in plan.files)
        self.done: dict[str, int] = {}
        self.files_done = 0
        self.bytes_done = 0

    def file_progress(self, digest: str, file_bytes: int) -> None:
        first = self.plan.groups[digest][0]
        self._set(first, min(file_bytes, first.size_bytes), finished=False)

    def digest_done(self, digest: str) -> None:
        for entry in self.plan.groups[digest]:
            self._set(entry, entry.size_bytes, finished=True)

    def _set(self, entry: FileEntry, file_bytes: int, *, finished: bool) -> None:
        before = self.done.get(entry.path, 0)
        if file_bytes < before and not finished:
            return  # a refetch restarting at 0: progress never goes back
        self.done[entry.path] = file_bytes
        self.bytes_done += file_bytes - before
        if finished:
            self.files_done += 1
        if self.emit is not None:
            self.emit(
                Progress(self.bytes_done, self.total, self.files_done, len(self.plan.files), entry.path,
                         file_bytes, entry.size_bytes)
            )


class StorageCacheCore:
    def __init__(
        self,
        store: BlobStore,
        backing: BackingStore,
        resolver: ModelResolver,
        *,
        parallel_fetches: int = DEFAULT_PARALLEL_FETCHES,
        read_chunk_bytes: int = DEFAULT_READ_CHUNK_BYTES,
        fsync: bool = True,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        max_lease_ttl_s: float = DEFAULT_MAX_LEASE_TTL_S,
        progress_buffer: int = DEFAULT_PROGRESS_BUFFER,
        tracer_provider: trace.TracerProvider | None = None,
        metrics: StorageCacheMetrics | None = None,
    ) -> None:
        if parallel_fetches <= 0:
            raise InvalidArgument.field("parallel_fetches", f"must be > 0, got {parallel_fetches}")
        if read_chunk_bytes <= 0:
            raise InvalidArgument.field("read_chunk_bytes", f"must be > 0, got {read_chunk_bytes}")
        self.store = store
        self.backing = backing
        self.resolver = resolver
        self.read_chunk_bytes = read_chunk_bytes
        self.fsync = fsync
        self.lease_ttl_s = lease_ttl_s
        self.max_lease_ttl_s = max_lease_ttl_s
        self.progress_buffer = progress_buffer
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        self.uploads = WriteThroughUploader(backing, store, fsync=fsync, tracer_provider=tracer_provider,
                                            registered=resolver.model_naming)
        # Copies block on disk and network, so they run on threads; the semaphore bounds how many run at once
        # and the pool is sized to match, so a fetch holding a slot always has a thread.
        self._pool = ThreadPoolExecutor(parallel_fetches, thread_name_prefix="storage-fetch")
        self._fetch_slots = asyncio.Semaphore(parallel_fetches)
        self._flights: dict[str, _Flight] = {}
        self._verify_task: asyncio.Task[VerifyReport] | None = None
        self.hits = 0
        self.misses = 0
        self.bytes_fetched = 0
        self.metrics = metrics or StorageCacheMetrics()
        self.metrics.observe_store(store.usage)

    # -- Ensure ------------------------------------------------------------------------------------------
    async def ensure(
        self,
        target: ModelTarget | ManifestTarget,
        *,
        pin_ttl_s: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> EnsureResult:
        """Makes every file of the target present locally and returns its view, optionally pinned. Concurrent
        Ensures fetch each digest once; `on_progress` is called on the event loop as bytes arrive."""
        started = time.monotonic()
        ttl = self._check_ttl(pin_ttl_s, "pin_ttl") if pin_ttl_s is not None else None
        with self._tracer.start_as_current_span("storage.ensure") as span:
            plan = await self._plan(target)
            span.set_attribute("hotslot.model_id", plan.model_id)
            span.set_attribute("hotslot.view_id", plan.view_id)
            tracker = _ProgressTracker(plan, on_progress)
            with self.store.hold(plan.groups):
                view_path = self.store.ready_view(plan.view_id, plan.groups)
                if view_path is not None:
                    sources = dict.fromkeys(plan.groups, FileSource.LOCAL_HIT)
                    fetched = 0
                    if on_progress is not None:
                        on_progress(Progress(tracker.total, tracker.total, len(plan.files), len(plan.files),
                                             "", 0, 0))
                else:
                    # Symlinks are followed only when something is to be read: a ready view needs no backing store.
                    await asyncio.to_thread(self.backing.resolve_dir, plan.source, f"{plan.field_prefix}.source")
                    self._check_fits(plan)
                    sources, fetched = await self._ensure_blobs(plan, tracker)
                    try:
                        view_path = await asyncio.to_thread(
                            self.store.build_view, plan.view_id, [(f.path, f.sha256) for f in plan.files]
                        )
                    except OSError as error:
                        raise self._disk_error(error, 0, f"the view of {plan.view_id[:12]}") from error
                lease = self.store.pin(plan.view_id, ttl) if ttl is not None else None
            files = tuple(EnsuredFile(f.path, f.sha256, f.size_bytes, sources[f.sha256]) for f in plan.files)
            hits = sum(1 for f in files if f.source is FileSource.LOCAL_HIT)
            self.hits += hits
            self.misses += len(files) - hits
            self.metrics.ensured(hits, len(files) - hits)
            span.set_attribute("hotslot.bytes_fetched", fetched)
            span.set_attribute("hotslot.local_hits", hits)
        return EnsureResult(
            view_path=view_path,
            view_id=plan.view_id,
            model_id=plan.model_id,
            revision=plan.revision,
            files=files,
            bytes_fetched=fetched,
            elapsed_s=time.monotonic() - started,
            lease=lease,
        )

    async def ensure_stream(
        self, target: ModelTarget | ManifestTarget, *, pin_ttl_s: float | None = None
    ) -> AsyncIterator[Progress | EnsureResult]:
        """Progress updates while the Ensure runs, then its result (the last item). Stopping the iteration
        cancels the Ensure; fetches other callers wait for carry on."""
        updates: asyncio.Queue[Progress] = asyncio.Queue(self.progress_buffer)

        def on_progress(update: Progress) -> None:
            if not updates.full():
                updates.put_nowait(update)

        task = asyncio.ensure_future(self.ensure(target, pin_ttl_s=pin_ttl_s, on_progress=on_progress))
        try:
            while not task.done():
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not updates.empty():
                yield updates.get_nowait()
            yield task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _plan(self, target: ModelTarget | ManifestTarget) -> _Plan:
        if isinstance(target, ModelTarget):
            validate_model_id(target.model_id, "model.model_id")
            if target.revision < 0:
                raise InvalidArgument.field("model.revision", "must be >= 0 (0 means the latest)")
            resolved = await self.resolver.resolve(target.model_id, target.revision)
            model_id, revision, source, manifest = (
                resolved.model_id, resolved.revision, resolved.source, resolved.manifest
            )
            prefix = "model"
        else:
            model_id, revision, source, manifest = target.name, 0, target.source, target.manifest
            prefix = "manifest"
        if not source:
            raise InvalidArgument.field(f"{prefix}.source", "is required: the model's directory on the backing store")
        source = validate_relative_path(source, f"{prefix}.source").as_posix()
        files = _validate_files(manifest.files)
        groups: dict[str, list[FileEntry]] = {}
        for entry in files:
            groups.setdefault(entry.sha256, []).append(entry)
        view_id = Manifest(files=files).digest
        return _Plan(model_id, revision, source, prefix, view_id, files, groups)

    def _check_fits(self, plan: _Plan) -> None:
        distinct = sum(entries[0].size_bytes for entries in plan.groups.values())
        if distinct > self.store.capacity_bytes:
            raise ResourceExhausted(
                f"model {plan.model_id or plan.view_id[:12]} needs {format_bytes(distinct)} of distinct files, "
                f"more than the cache capacity of {format_bytes(self.store.capacity_bytes)}; raise capacity_bytes",
                reason=Reason.MODEL_TOO_LARGE,
            )

    async def _ensure_blobs(self, plan: _Plan, tracker: _ProgressTracker) -> tuple[dict[str, FileSource], int]:
        outcomes = await asyncio.gather(
            *(self._ensure_blob(digest, entries[0], plan.source, tracker) for digest, entries in plan.groups.items()),
            return_exceptions=True,
        )
        sources: dict[str, FileSource] = {}
        fetched = 0
        for digest, outcome in zip(plan.groups, outcomes, strict=True):
            if isinstance(outcome, HotslotError):
                raise outcome
            if isinstance(outcome, asyncio.CancelledError):
                raise Unavailable("a fetch was cancelled because the service is shutting down; retry on restart")
            if isinstance(outcome, BaseException):
                raise outcome
            sources[digest], n = outcome
            fetched += n
        return sources, fetched

    async def _ensure_blob(
        self, digest: str, entry: FileEntry, source: str, tracker: _ProgressTracker
    ) -> tuple[FileSource, int]:
        if self.store.has(digest):
            tracker.digest_done(digest)
            return FileSource.LOCAL_HIT, 0
        flight = self._flights.get(digest)
        joined = flight is not None
        if flight is None:
            flight = _Flight()
            flight.task = asyncio.ensure_future(self._fetch(digest, entry, source, flight))
            self._flights[digest] = flight
            flight.task.add_done_callback(functools.partial(self._landed, digest, flight))
        listener = lambda n: tracker.file_progress(digest, n)  # noqa: E731
        flight.listeners.append(listener)
        try:
            # Shielded: a caller that goes away must not cancel the copy others wait for.
            assert flight.task is not None
            n = await asyncio.shield(flight.task)
        finally:
            flight.listeners.remove(listener)
        tracker.digest_done(digest)
        return (FileSource.JOINED, 0) if joined else (FileSource.FETCHED, n)

    def _landed(self, digest: str, flight: _Flight, task: asyncio.Task[int]) -> None:
        if self._flights.get(digest) is flight:
            del self._flights[digest]
        if not task.cancelled():
            task.exception()  # retrieved here so a fetch whose callers all left is not reported as unhandled

    async def _fetch(self, digest: str, entry: FileEntry, source: str, flight: _Flight) -> int:
        loop = asyncio.get_running_loop()
        name = f"{source}/{entry.path}"
        async with self._fetch_slots:
            with self._tracer.start_as_current_span("storage.fetch") as span:
                span.set_attribute("hotslot.path", name)
                span.set_attribute("hotslot.size_bytes", entry.size_bytes)
                path = await loop.run_in_executor(
                    self._pool, self.backing.resolve_file, source, entry.path, f"files[{entry.path!r}]"
                )
                reservation = self.store.reserve(entry.size_bytes, name)
                try:
                    return await self._copy_verified(loop, path, name, digest, entry.size_bytes, flight, reservation)
                finally:
                    self.store.release(reservation)

    async def _copy_verified(
        self,
        loop: asyncio.AbstractEventLoop,
        path: Path,
        name: str,
        digest: str,
        size: int,
        flight: _Flight,
        reservation: Reservation,
    ) -> int:
        def report(n: int) -> None:
            loop.call_soon_threadsafe(flight.progress, n)

        read = 0
        attempts: list[_Copied] = []
        # A mismatch is read once more: a file being replaced on NFS, or a flaky read, heals on the second try.
        for _attempt in range(2):
            started = time.perf_counter()
            copied = await loop.run_in_executor(self._pool, self._copy, path, size, report)
            self.metrics.filled(copied.size, time.perf_counter() - started)
            trace.get_current_span().set_attribute("hotslot.copy_method", copied.method.value)
            read += copied.size
            self.bytes_fetched += copied.size
            if copied.sha256 == digest and copied.size == size:
                await loop.run_in_executor(self._pool, self.store.commit, copied.temp, digest, size, reservation)
                return read
            copied.temp.unlink(missing_ok=True)
            attempts.append(copied)
            log.warning(
                "backing file does not match its manifest",
                extra={"path": name, "expected_sha256": digest, "actual_sha256": copied.sha256,
                       "expected_bytes": size, "actual_bytes": copied.size},
            )
        # What was read (its sha256 and size) goes to the log above, never to the client: with an explicit
        # manifest anyone could otherwise learn the digest and size of any file on the share.
        raise DataLoss(
            f"backing file {name} does not match its manifest on two reads; the file changed after the model was "
            "registered or the backing store is corrupt: restore it or register the model again (the service "
            "log has the details)"
        )

    def _copy(self, src: Path, expected_size: int, report: Callable[[int], None]) -> _Copied:
        """Copies src into a temp file of the blob store with large sequential chunks, hashing while copying
        (fill.py: in the kernel where it can, hashed from the local copy on a second thread). Stops one byte past
        the expected size: enough to know it is wrong, without filling the disk."""
        temp = self.store.new_temp_path("fetch")
        try:
            # The copier last: leaving it waits for the hashing thread, which reads `out`, before `out` closes.
            with self.backing.open_for_read(src) as reader, open(temp, "xb+", buffering=0) as out, \
                    HashingCopy(self.read_chunk_bytes, start_writeback=self.fsync) as copier:
                total = copier.copy(reader, out, expected_size + 1, report)
                if self.fsync:
                    # A blob becomes visible by rename; without this a crash could leave a named blob whose data
                    # never reached the disk. It runs while the last chunks are still being hashed.
                    os.fsync(out.fileno())
                sha256 = copier.hexdigest()
                if not checksum.record(out.fileno(), copier.read_checksum()):
                    _warn_no_checksums(self.store.root)
        except BaseException as error:
            temp.unlink(missing_ok=True)
            if isinstance(error, OSError):
                raise self._disk_error(error, expected_size, str(src)) from error
            raise
        return _Copied(temp, sha256, total, copier.method)

    def _disk_error(self, error: OSError, needed: int, what: str) -> Exception:
        """ENOSPC / EDQUOT on the cache disk as RESOURCE_EXHAUSTED saying which disk and how much was needed (the
        temp file is gone already; reads of cached models go on); any other OSError as it is."""
        if error.errno not in _DISK_FULL:
            return error
        try:
            st = os.statvfs(self.store.root)
            free = format_bytes(st.f_bavail * st.f_frsize)
        except OSError:
            free = "unknown"
        need = f"{format_bytes(needed)} needed" if needed else "room for a few links needed"
        log.warning("cache disk full", extra={"path": str(self.store.root), "needed_bytes": needed, "for": what})
        return ResourceExhausted(
            f"the cache disk holding {self.store.root} is full ({error.strerror}) while caching {what}: {need}, "
            f"{free} free; free space there or set capacity_bytes below the disk's free space so eviction makes room"
        )

    # -- uploads -----------------------------------------------------------------------------------------
    async def put(self, header: PutHeader, chunks: AsyncIterable[bytes]) -> PutResult:
        return await self.uploads.put(header, chunks)

    # -- leases ------------------------------------------------------------------------------------------
    async def pin(self, view_id: str, ttl_s: float | None) -> Lease:
        _check_view_id(view_id)
        return self.store.pin(view_id, self._check_ttl(ttl_s, "ttl"))

    async def renew(self, lease_id: str, ttl_s: float | None) -> Lease:
        if not lease_id:
            raise InvalidArgument.field("lease_id", "is required")
        return self.store.renew(lease_id, self._check_ttl(ttl_s, "ttl"))

    async def unpin(self, lease_id: str) -> None:
        if not lease_id:
            raise InvalidArgument.field("lease_id", "is required")
        self.store.unpin(lease_id)

    def _check_ttl(self, ttl_s: float | None, field: str) -> float:
        if ttl_s is None or ttl_s == 0:
            return self.lease_ttl_s
        if ttl_s < 0:
            raise InvalidArgument.field(field, f"must be positive, got {ttl_s:g} s (leave it unset for the default)")
        if ttl_s > self.max_lease_ttl_s:
            raise InvalidArgument.field(
                field, f"{ttl_s:g} s is longer than the longest lease ({self.max_lease_ttl_s:g} s); renew instead"
            )
        return ttl_s

    # -- verify and usage --------------------------------------------------------------------------------
    async def verify(self) -> VerifyReport:
        """Re-hashes every blob and drops the bad ones. One at a time: a second caller gets FailedPrecondition."""
        if self._verify_task is not None and not self._verify_task.done():
            raise FailedPrecondition("a verification is already running; wait for it to finish")
        with self._tracer.start_as_current_span("storage.verify"):
            # A task of its own, so a caller that goes away does not leave a second Verify free to start while
            # the first still hashes on its thread.
            self._verify_task = asyncio.ensure_future(asyncio.to_thread(self.store.verify))
            report = await asyncio.shield(self._verify_task)
        log.info(
            "verified blobs",
            extra={"blobs": report.blobs_checked, "bytes": report.bytes_checked,
                   "dropped": len(report.dropped_digests)},
        )
        return report

    async def report_corrupt(self, sha256: str, path: str = "") -> bool:
        """A reader found blob `sha256` changed (blobstore.check_blob). Returns whether it was dropped."""
        if not SHA256_PATTERN.fullmatch(sha256):
            raise InvalidArgument.field("sha256", f"{sha256!r} is not 64 lower-case hex characters")
        if len(path) > 4096:
            raise InvalidArgument.field("path", f"is {len(path)} characters long; at most 4096")
        dropped = await asyncio.get_running_loop().run_in_executor(self._pool, self.store.check_blob, sha256)
        log.warning("a reader reported a corrupt blob", extra={"digest": sha256, "path": path, "dropped": dropped})
        return dropped

    def usage(self) -> Usage:
        return Usage(self.store.usage(), self.hits, self.misses, self.bytes_fetched)

    async def close(self) -> None:
        flights = [f.task for f in self._flights.values() if f.task is not None]
        for task in flights:
            task.cancel()
        await asyncio.gather(*flights, return_exceptions=True)
        self._pool.shutdown(wait=True, cancel_futures=True)


_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


@functools.cache
def _warn_no_checksums(root: Path) -> None:
    """Once per store: its filesystem keeps no user xattrs, so executors read its blobs unchecked."""
    log.warning("the cache directory %s keeps no extended attributes: blobs get no read checksum, and executors "
                "read them unverified (use ext4, xfs or a tmpfs on Linux 6.6+)", root)


def _validate_files(entries: Sequence[FileEntry]) -> tuple[FileEntry, ...]:
    if not entries:
        raise InvalidArgument.field("manifest.files", "is empty: a model has at least one file")
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        field = f"manifest.files[{i}]"
        validate_relative_path(entry.path, f"{field}.path")
        if entry.path in seen:
            raise InvalidArgument.field(f"{field}.path", f"{entry.path!r} appears twice")
        seen.add(entry.path)
        if not SHA256_PATTERN.fullmatch(entry.sha256):
            raise InvalidArgument.field(f"{field}.sha256", f"{entry.sha256!r} is not 64 lower-case hex characters")
        if entry.size_bytes < 0:
            raise InvalidArgument.field(f"{field}.size_bytes", f"must be >= 0, got {entry.size_bytes}")
    for path in seen:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in seen:
                raise InvalidArgument.field(
                    "manifest.files", f"{'/'.join(parts[:i])!r} is a file, so {path!r} cannot be under it"
                )
    return tuple(sorted(entries))


def _check_view_id(view_id: str) -> None:
    if not view_id:
        raise InvalidArgument.field("view_id", "is required (EnsureModelResponse.view_id)")
    if not SHA256_PATTERN.fullmatch(view_id):
        raise InvalidArgument.field("view_id", f"{view_id!r} is not a view id (64 lower-case hex characters)")

