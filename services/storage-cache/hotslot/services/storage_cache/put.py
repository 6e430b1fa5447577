"""Write-through uploads: one file written at once to the backing store and into the local blob store, both as temp
files that are checked (size, sha256), fsynced and renamed only when complete. A failed or cancelled upload removes
both temp files and any directory it created, so neither place ever shows a partial file."""
from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from opentelemetry import trace

from hotslot import checksum
from hotslot.errors import AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, ResourceExhausted
from hotslot.manifest import SHA256_PATTERN, validate_relative_path

from .backing import BackingStore, write_all
from .blobstore import BlobStore

log = logging.getLogger(__name__)

# The backing temp file sits beside its destination (so the rename is atomic on NFS too) under a name the
# registry's scan skips: a dot-file ending in .tmp.
BACKING_TEMP_FORMAT = ".{name}.{token}.tmp"
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_CONFLICT = frozenset({errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY})
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV})


@dataclass(frozen=True)
class PutHeader:
    path: str
    expected_sha256: str = ""
    size_bytes: int = 0
    overwrite: bool = False
    """Replace an existing file (never one a registered manifest names); without it an existing file is refused."""


@dataclass(frozen=True)
class PutResult:
    path: str
    sha256: str
    size_bytes: int
    cached: bool
    """False when the blob store had no room next to pinned blobs; the backing copy is written regardless."""


class _UploadFiles:
    """The two temp files of one upload, written from worker threads. The lock makes a cancelled upload wait for
    the write in progress before it removes the files, so nothing is written after the cleanup."""

    def __init__(self, backing: BackingStore, backing_temp: Path, blob_temp: Path) -> None:
        self.backing = backing
        self.backing_temp = backing_temp
        self.blob_temp = blob_temp
        self.lock = threading.Lock()
        self.backing_file: BinaryIO | None = None
        self.blob_file: BinaryIO | None = None
        self.digest = hashlib.sha256()
        self.blocks = checksum.BlockHasher()  # recorded on the local copy: readers check it while they read
        self.size = 0
        self.discarded = False

    def open(self) -> None:
        with self.lock:
            if self.discarded:
                return
            self.blob_file = open(self.blob_temp, "xb", buffering=0)  # noqa: SIM115 - closed by finish/discard
            self.backing_file = self.backing.open_for_write(self.backing_temp)

    def write(self, chunk: bytes) -> None:
        with self.lock:
            if self.discarded or self.backing_file is None:
                return
            self.digest.update(chunk)
            self.blocks.update(chunk)
            write_all(self.backing_file, chunk)
            if self.blob_file is not None:
                try:
                    write_all(self.blob_file, chunk)
                except OSError as error:
                    if error.errno not in _FULL:
                        raise
                    self._drop_local_copy(error)
            self.size += len(chunk)

    def _drop_local_copy(self, error: OSError) -> None:
        """The cache disk is full: the upload goes on to the backing store without a local copy (as when pinned
        blobs leave the cache no room), and no partial blob stays behind."""
        assert self.blob_file is not None
        self.blob_file.close()
        self.blob_file = None
        self.blob_temp.unlink(missing_ok=True)
        log.warning("cache disk full (%s): the uploaded file is written through without a local copy",
                    error.strerror, extra={"path": str(self.blob_temp.parent)})

    @property
    def cached_locally(self) -> bool:
        return self.blob_file is not None or self.blob_temp.exists()

    def finish(self, fsync: bool) -> None:
        with self.lock:
            if self.blob_file is not None:
                checksum.record(self.blob_file.fileno(), self.blocks.value())
            for f in (self.backing_file, self.blob_file):
                if f is None:
                    continue
                if fsync:
                    os.fsync(f.fileno())
                f.close()

    def discard(self) -> None:
        with self.lock:
            self.discarded = True
            for f in (self.backing_file, self.blob_file):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass
            for path in (self.backing_temp, self.blob_temp):
                try:
                    path.unlink(missing_ok=True)
                except OSError as error:
                    log.warning("could not remove temp file %s: %s", path, error)


class WriteThroughUploader:
    def __init__(
        self,
        backing: BackingStore,
        store: BlobStore,
        *,
        fsync: bool = True,
        tracer_provider: trace.TracerProvider | None = None,
        registered: Callable[[str], Awaitable[str | None]] | None = None,
    ) -> None:
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        # Which registered model (if any) names a path: its files are immutable, a new revision goes to a new path.
        self._registered = registered
        self.backing = backing
        self.store = store
        self.fsync = fsync

    async def put(self, header: PutHeader, chunks: AsyncIterable[bytes]) -> PutResult:
        """Writes `chunks` to header.path on the backing store and into the blob store; returns once both are
        durable. Raises InvalidArgument (bad header, size mismatch), DataLoss (sha256 mismatch),
        FailedPrecondition (the path collides with a directory or file, or a registered model names it),
        AlreadyExists (the file exists and header.overwrite is not set), ResourceExhausted (backing store full)."""
        rel = _check_header(header)
        with self._tracer.start_as_current_span("storage.put") as span:
            span.set_attribute("hotslot.path", rel)
            try:
                dest, created = await asyncio.to_thread(self._prepare, rel)
            except OSError as error:
                raise _backing_error(error, rel, self.backing.root) from error
            try:
                # Checked before any byte is received, and again when the file is published (another upload
                # may create it meanwhile).
                await self._check_replace(header, rel, dest)
            except BaseException:
                _remove_dirs(created)
                raise
            files = _UploadFiles(
                self.backing,
                dest.with_name(BACKING_TEMP_FORMAT.format(name=dest.name, token=uuid.uuid4().hex[:12])),
                self.store.new_temp_path("put"),
            )
            try:
                await asyncio.to_thread(files.open)
                async for chunk in chunks:
                    if header.size_bytes and files.size + len(chunk) > header.size_bytes:
                        raise InvalidArgument.field(
                            "header.size_bytes", f"says {header.size_bytes} bytes but more were sent; nothing was written"
                        )
                    await asyncio.to_thread(files.write, chunk)
                digest, size = files.digest.hexdigest(), files.size
                if header.size_bytes and size != header.size_bytes:
                    raise InvalidArgument.field(
                        "header.size_bytes", f"says {header.size_bytes} bytes but {size} were sent; nothing was written"
                    )
                if header.expected_sha256 and digest != header.expected_sha256:
                    raise DataLoss(
                        f"{rel}: the bytes received hash to {digest}, not the expected {header.expected_sha256}; "
                        "nothing was written, send the file again"
                    )
                await asyncio.to_thread(files.finish, self.fsync)
                await asyncio.to_thread(self._publish, files.backing_temp, dest, header.overwrite)
            except BaseException as error:
                # Synchronous on purpose: a cancelled upload must not leave its cleanup to a later await.
                files.discard()
                _remove_dirs(created)
                if isinstance(error, FileExistsError) and not header.overwrite:
                    raise _exists(rel) from None
                if isinstance(error, OSError):
                    raise _backing_error(error, rel, self.backing.root, header.size_bytes or files.size) from error
                raise
            cached = files.cached_locally and await asyncio.to_thread(self._cache, files.blob_temp, digest, size)
            span.set_attribute("hotslot.size_bytes", size)
        log.info("wrote file through", extra={"path": rel, "sha256": digest, "bytes": size, "cached": cached})
        return PutResult(rel, digest, size, cached)

    def _prepare(self, rel: str) -> tuple[Path, list[Path]]:
        """Creates the missing parent directories of `rel` (returned, so a failed upload removes them), refusing
        a parent that is a file or a symlink out of the root, and a destination that is a directory."""
        root = self.backing.root.resolve()
        parts = PurePosixPath(rel).parts
        current = root
        created: list[Path] = []
        try:
            for i, part in enumerate(parts[:-1]):
                current = current / part
                shown = "/".join(parts[: i + 1])
                try:
                    current.mkdir()
                    created.append(current)
                    continue
                except FileExistsError:
                    pass
                resolved = current.resolve()
                if resolved != root and root not in resolved.parents:
                    raise InvalidArgument.field("header.path", f"{shown!r} leaves the backing root through a symlink")
                if not resolved.is_dir():
                    raise FailedPrecondition(
                        f"{shown!r} is a file on the backing store, so {rel!r} cannot be written under it"
                    )
                current = resolved
            dest = current / parts[-1]
            if dest.is_dir():
                raise FailedPrecondition(f"{rel!r} is a directory on the backing store; upload to a file path")
        except BaseException:
            _remove_dirs(created)
            raise
        return dest, created

    async def _check_replace(self, header: PutHeader, rel: str, dest: Path) -> None:
        exists = await asyncio.to_thread(os.path.lexists, dest)
        if not exists:
            return
        if not header.overwrite:
            raise _exists(rel)
        if self._registered is not None:
            model = await self._registered(rel)
            if model is not None:
                raise FailedPrecondition(
                    f"{rel!r} is a file of registered model {model}, and registered files are immutable: upload "
                    "the new version to a new path and register it (a new revision), or delete the model first"
                )

    def _publish(self, temp: Path, dest: Path, overwrite: bool) -> None:
        if overwrite:
            os.replace(temp, dest)
        else:
            # link() fails if dest exists, so create-only holds even against an upload racing this one.
            try:
                os.link(temp, dest)
            except OSError as error:
                if error.errno not in _NO_HARD_LINKS:
                    raise
                # A filesystem without hard links: checked, then renamed (a racing upload could slip between).
                if os.path.lexists(dest):
                    raise FileExistsError(errno.EEXIST, "File exists", str(dest)) from None
                os.replace(temp, dest)
            else:
                os.unlink(temp)
        if self.fsync:
            # The rename itself must survive a crash before the upload is acknowledged.
            _fsync_dir(dest.parent)

    def _cache(self, blob_temp: Path, digest: str, size: int) -> bool:
        try:
            self.store.commit(blob_temp, digest, size)
        except ResourceExhausted as error:
            # The backing store holds the file, which is what the upload promised; the local copy is an extra.
            log.warning("uploaded file not cached locally: %s", error.message, extra={"sha256": digest})
            return False
        return True


def _check_header(header: PutHeader) -> str:
    rel = validate_relative_path(header.path, "header.path").as_posix()
    if rel in (".", "") or PurePosixPath(rel).name in ("", "."):
        raise InvalidArgument.field("header.path", f"{header.path!r} names no file")
    if header.expected_sha256 and not SHA256_PATTERN.fullmatch(header.expected_sha256):
        raise InvalidArgument.field(
            "header.expected_sha256", f"{header.expected_sha256!r} is not 64 lower-case hex characters"
        )
    if header.size_bytes < 0:
        raise InvalidArgument.field("header.size_bytes", f"must be >= 0, got {header.size_bytes}")
    return rel


def _exists(rel: str) -> AlreadyExists:
    return AlreadyExists(f"{rel!r} exists on the backing store; uploads create files only: set overwrite "
                         "(`hotslot models upload --overwrite`) to replace it")


def _backing_error(error: OSError, rel: str, root: Path, needed: int = 0) -> Exception:
    if error.errno in _FULL:
        try:
            st = os.statvfs(root)
            free = f"{st.f_bavail * st.f_frsize} bytes free"
        except OSError:
            free = "free space unknown"
        need = f"{needed} bytes needed" if needed else "more room needed"
        return ResourceExhausted(
            f"the backing store disk holding {root} is full writing {rel!r} ({error.strerror}): {need}, {free}; "
            "nothing was written: free space there and upload again"
        )
    if error.errno in _CONFLICT:
        return FailedPrecondition(f"cannot write {rel!r}: {error.strerror} on the backing store")
    return error


def _remove_dirs(created: list[Path]) -> None:
    for directory in reversed(created):
        try:
            directory.rmdir()
        except OSError:
            break  # another upload put a file there meanwhile: it and its parents stay


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems that cannot sync a directory
            raise
    finally:
        os.close(fd)

