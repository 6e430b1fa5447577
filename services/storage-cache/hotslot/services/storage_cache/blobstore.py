"""The node-local, content-addressed blob store: blobs at `blobs/sha256/<2 hex>/<digest>`, partial writes in `tmp/`,
views (diffusers-layout directories of links to blobs) in `views/<view_id>`, a byte budget kept by LRU eviction
among blobs no lease pins and no running Ensure holds, and leases that expire unless renewed.

The index lives in memory and is rebuilt from disk when the store opens, so the files are the only state: a crash
leaves at worst temp files (removed on open) and blobs whose bytes Verify re-hashes. No transport code here; every
method is synchronous and thread-safe (fetch threads commit blobs while the event loop reserves and pins)."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hotslot import checksum
from hotslot.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from hotslot.manifest import DEFAULT_HASH_CHUNK_BYTES, SHA256_PATTERN, sha256_file

log = logging.getLogger(__name__)

BLOBS_DIR = "blobs/sha256"
TMP_DIR = "tmp"
VIEWS_DIR = "views"
# Blobs are shared by every view that links them: read-only so a loader that opens a view file for writing fails
# instead of corrupting every model that shares the file (root ignores modes, hence Verify).
BLOB_MODE = 0o444
# Errors of os.link that mean "no hard link here" rather than a broken store: another filesystem, a filesystem
# without hard links, or an inode at its link limit (a VAE shared by very many views).
_NO_HARD_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP})


@dataclass(frozen=True)
class Lease:
    """A pin on the blobs of one view until `expire_time` (seconds since the epoch) unless renewed."""

    lease_id: str
    view_id: str
    digests: frozenset[str]
    expire_time: float


@dataclass(frozen=True)
class StoreUsage:
    capacity_bytes: int
    used_bytes: int
    pinned_bytes: int
    reserved_bytes: int
    blob_count: int
    view_count: int
    leases: int
    evictions: int


@dataclass(frozen=True)
class VerifyReport:
    blobs_checked: int
    bytes_checked: int
    dropped_digests: tuple[str, ...]


class Reservation:
    """Room promised to a blob being written; counted against capacity until it is committed or released."""

    __slots__ = ("size", "released")

    def __init__(self, size: int) -> None:
        self.size = size
        self.released = False


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns at GiB


class BlobStore:
    def __init__(
        self,
        root: Path,
        capacity_bytes: int,
        *,
        clock: Callable[[], float] = time.time,
        hash_chunk_bytes: int = DEFAULT_HASH_CHUNK_BYTES,
    ) -> None:
        if capacity_bytes <= 0:
            raise InvalidArgument.field(
                "capacity_bytes",
                f"must be > 0, got {capacity_bytes}; give the bytes of local disk the cache may use "
                "(HOTSLOT_STORAGE_CACHE_CAPACITY_BYTES or --capacity-bytes, e.g. 50GiB)",
            )
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.hash_chunk_bytes = hash_chunk_bytes
        self._clock = clock
        self._lock = threading.RLock()
        # digest -> size, least recently used first.
        self._blobs: OrderedDict[str, int] = OrderedDict()
        self._used = 0
        self._reserved = 0
        self._holds: Counter[str] = Counter()
        self._views: dict[str, frozenset[str]] = {}
        self._views_by_digest: dict[str, set[str]] = {}
        self._leases: dict[str, Lease] = {}
        self.evictions = 0
        self._open()

    # -- layout ------------------------------------------------------------------------------------------
    @property
    def blobs_dir(self) -> Path:
        return self.root / BLOBS_DIR

    @property
    def tmp_dir(self) -> Path:
        return self.root / TMP_DIR

    @property
    def views_dir(self) -> Path:
        return self.root / VIEWS_DIR

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / digest[:2] / digest

    def view_path(self, view_id: str) -> Path:
        return self.views_dir / view_id

    def new_temp_path(self, kind: str) -> Path:
        """A fresh path in tmp/ (same filesystem as the blobs, so the final rename is atomic)."""
        return self.tmp_dir / f"{kind}-{uuid.uuid4().hex}"

    # -- open: rebuild the index from disk ---------------------------------------------------------------
    def _open(self) -> None:
        for directory in (self.blobs_dir, self.tmp_dir, self.views_dir):
            directory.mkdir(parents=True, exist_ok=True)
        removed_tmp = 0
        for entry in self.tmp_dir.iterdir():
            _remove_path(entry)
            removed_tmp += 1
        found: list[tuple[float, str, int]] = []
        inodes: dict[tuple[int, int], str] = {}
        for sub in self.blobs_dir.iterdir():
            if not (sub.is_dir() and len(sub.name) == 2):
                log.warning("removing %s: not a blob directory", sub)
                _remove_path(sub)
                continue
            for entry in sub.iterdir():
                st = entry.lstat()
                if not (SHA256_PATTERN.fullmatch(entry.name) and entry.name[:2] == sub.name and entry.is_file()):
                    log.warning("removing %s: not a blob", entry)
                    _remove_path(entry)
                    continue
                found.append((st.st_mtime, entry.name, st.st_size))
                inodes[(st.st_dev, st.st_ino)] = entry.name
        # The order of use is not persisted; blob age is the best guess of it after a restart.
        for _, digest, size in sorted(found):
            self._blobs[digest] = size
            self._used += size
        for entry in self.views_dir.iterdir():
            digests = self._view_digests_on_disk(entry, inodes)
            if digests is None:
                log.warning("removing view %s: it links to blobs that are gone", entry.name)
                _remove_path(entry)
            else:
                self._add_view_locked(entry.name, digests)
        if self._used > self.capacity_bytes:
            self._evict_locked(self._used - self.capacity_bytes)
        log.info(
            "blob store open",
            extra={"cache_dir": str(self.root), "blobs": len(self._blobs), "used_bytes": self._used,
                   "views": len(self._views), "temp_files_removed": removed_tmp},
        )

    def _view_digests_on_disk(self, view: Path, inodes: dict[tuple[int, int], str]) -> frozenset[str] | None:
        if not (view.is_dir() and not view.is_symlink() and SHA256_PATTERN.fullmatch(view.name)):
            return None
        digests: set[str] = set()
        for dirpath, _dirnames, filenames in os.walk(view):
            for name in filenames:
                path = Path(dirpath) / name
                if path.is_symlink():
                    target = Path(os.readlink(path))
                    digest = target.name
                    if target != self.blob_path(digest) or digest not in self._blobs:
                        return None
                else:
                    st = path.lstat()
                    known = inodes.get((st.st_dev, st.st_ino))
                    if known is None:
                        return None
                    digest = known
                digests.add(digest)
        return frozenset(digests) if digests else None

    # -- queries -----------------------------------------------------------------------------------------
    def has(self, digest: str) -> bool:
        with self._lock:
            return digest in self._blobs

    def touch(self, digests: Iterable[str]) -> None:
        with self._lock:
            for digest in digests:
                if digest in self._blobs:
                    self._blobs.move_to_end(digest)

    def ready_view(self, view_id: str, digests: Iterable[str]) -> Path | None:
        """The view's path if it exists with every blob present (marking them used), else None."""
        with self._lock:
            if view_id not in self._views or any(d not in self._blobs for d in digests):
                return None
            self.touch(self._views[view_id])
            return self.view_path(view_id)

    def usage(self) -> StoreUsage:
        with self._lock:
            self._sweep_leases_locked()
            pinned = self._pinned_locked()
            return StoreUsage(
                capacity_bytes=self.capacity_bytes,
                used_bytes=self._used,
                pinned_bytes=sum(self._blobs.get(d, 0) for d in pinned),
                reserved_bytes=self._reserved,
                blob_count=len(self._blobs),
                view_count=len(self._views),
                leases=len(self._leases),
                evictions=self.evictions,
            )

    # -- holds: blobs a running Ensure needs ------------------------------------------------------------
    @contextmanager
    def hold(self, digests: Iterable[str]) -> Iterator[None]:
        """Keeps `digests` (present or still to come) from eviction while the block runs, so an Ensure does not
        evict its own first files to make room for its last ones."""
        held = list(set(digests))
        with self._lock:
            self._holds.update(held)
        try:
            yield
        finally:
            with self._lock:
                self._holds.subtract(held)
                for digest in held:
                    if self._holds[digest] <= 0:
                        del self._holds[digest]

    # -- capacity ----------------------------------------------------------------------------------------
    def reserve(self, size: int, purpose: str) -> Reservation:
        """Makes room for `size` bytes, evicting least recently used unprotected blobs if needed. Raises
        ResourceExhausted (evicting nothing) when pinned, held and in-flight blobs leave too little room."""
        with self._lock:
            self._make_room_locked(size, purpose)
            self._reserved += size
            return Reservation(size)

    def release(self, reservation: Reservation) -> None:
        with self._lock:
            self._release_locked(reservation)

    def _release_locked(self, reservation: Reservation) -> None:
        if not reservation.released:
            reservation.released = True
            self._reserved -= reservation.size

    def _make_room_locked(self, size: int, purpose: str) -> None:
        self._sweep_leases_locked()
        excess = self._used + self._reserved + size - self.capacity_bytes
        if excess <= 0:
            return
        protected = self._pinned_locked() | set(self._holds)
        evictable = sum(s for d, s in self._blobs.items() if d not in protected)
        if evictable < excess:
            pinned = sum(self._blobs.get(d, 0) for d in self._pinned_locked())
            raise ResourceExhausted(
                f"the cache cannot make room for {purpose} ({format_bytes(size)}): capacity is "
                f"{format_bytes(self.capacity_bytes)}, of which {format_bytes(pinned)} is pinned by leases, "
                f"{format_bytes(self._used - evictable - pinned)} is in use by running Ensures and "
                f"{format_bytes(self._reserved)} is being fetched; unpin views you no longer use or raise "
                "capacity_bytes"
            )
        self._evict_locked(excess)

    def _evict_locked(self, excess: int) -> None:
        protected = self._pinned_locked() | set(self._holds)
        freed = 0
        for digest in list(self._blobs):
            if freed >= excess:
                break
            if digest in protected:
                continue
            freed += self._blobs[digest]
            self._drop_locked(digest)
            self.evictions += 1
            log.info("evicted blob", extra={"digest": digest})

    def _drop_locked(self, digest: str) -> None:
        """Removes a blob and every view that links it: a hard link in a view would otherwise keep the bytes on
        disk (uncounted), and a symlink would dangle."""
        size = self._blobs.pop(digest)
        self._used -= size
        for view_id in list(self._views_by_digest.get(digest, ())):
            self._remove_view_locked(view_id)
        _remove_path(self.blob_path(digest))

    # -- writing blobs -----------------------------------------------------------------------------------
    def commit(self, temp: Path, digest: str, size: int, reservation: Reservation | None = None) -> bool:
        """Moves a fully written, fsynced, verified temp file into place as blob `digest`. Returns False (and
        removes the temp file) when the blob was already present. Without a reservation it makes room first
        and raises ResourceExhausted if it cannot."""
        with self._lock:
            try:
                if reservation is not None:
                    self._release_locked(reservation)
                if digest in self._blobs:
                    self._blobs.move_to_end(digest)
                    return False
                if reservation is None:
                    self._make_room_locked(size, f"blob {digest[:12]}")
                path = self.blob_path(digest)
                path.parent.mkdir(exist_ok=True)
                os.chmod(temp, BLOB_MODE)
                # No fsync of the directory: losing a just-renamed blob in a crash costs one refetch, and the
                # blob's bytes were fsynced before the rename, so a blob that survives is whole.
                os.rename(temp, path)
                self._blobs[digest] = size
                self._used += size
                return True
            finally:
                _remove_path(temp)

    # -- views -------------------------------------------------------------------------------------------
    def build_view(self, view_id: str, files: Sequence[tuple[str, str]]) -> Path:
        """Creates views/<view_id> holding `files` (relative path, digest) as links to blobs, built in tmp/ and
        renamed into place so a reader sees the whole view or none. The caller holds the digests."""
        digests = frozenset(d for _, d in files)
        temp = self.new_temp_path("view")
        try:
            temp.mkdir()
            for rel, digest in files:
                dest = temp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._link(self.blob_path(digest), dest)
            with self._lock:
                missing = [d for d in digests if d not in self._blobs]
                if missing:
                    raise Unavailable(
                        f"blob {missing[0]} was dropped while view {view_id} was being built (Verify found it "
                        "corrupt); retry the Ensure"
                    )
                final = self.view_path(view_id)
                if view_id in self._views:
                    return final
                if final.exists() or final.is_symlink():
                    _remove_path(final)  # left over from a view whose removal failed; not in the index
                os.rename(temp, final)
                self._add_view_locked(view_id, digests)
                return final
        finally:
            _remove_path(temp)

    def _link(self, blob: Path, dest: Path) -> None:
        try:
            os.link(blob, dest)
        except OSError as error:
            if error.errno not in _NO_HARD_LINK:
                raise
            os.symlink(blob, dest)

    def _add_view_locked(self, view_id: str, digests: frozenset[str]) -> None:
        self._views[view_id] = digests
        for digest in digests:
            self._views_by_digest.setdefault(digest, set()).add(view_id)

    def _remove_view_locked(self, view_id: str) -> None:
        digests = self._views.pop(view_id, frozenset())
        for digest in digests:
            owners = self._views_by_digest.get(digest)
            if owners is not None:
                owners.discard(view_id)
                if not owners:
                    del self._views_by_digest[digest]
        _remove_path(self.view_path(view_id))

    # -- leases ------------------------------------------------------------------------------------------
    def pin(self, view_id: str, ttl_s: float) -> Lease:
        with self._lock:
            digests = self._views.get(view_id)
            if digests is None:
                raise NotFound(
                    f"view {view_id!r} does not exist on this node; call EnsureModel first (a view is removed "
                    "when one of its blobs is evicted, so pin it in the Ensure with pin_ttl)"
                )
            lease = Lease(uuid.uuid4().hex, view_id, digests, self._clock() + ttl_s)
            self._leases[lease.lease_id] = lease
            return lease

    def renew(self, lease_id: str, ttl_s: float) -> Lease:
        with self._lock:
            lease = self._live_lease_locked(lease_id)
            renewed = Lease(lease.lease_id, lease.view_id, lease.digests, self._clock() + ttl_s)
            self._leases[lease_id] = renewed
            return renewed

    def unpin(self, lease_id: str) -> None:
        with self._lock:
            self._live_lease_locked(lease_id)
            del self._leases[lease_id]

    def _live_lease_locked(self, lease_id: str) -> Lease:
        self._sweep_leases_locked()
        lease = self._leases.get(lease_id)
        if lease is None:
            raise NotFound(f"lease {lease_id!r} does not exist or has expired; pin the view again")
        return lease

    def _sweep_leases_locked(self) -> None:
        now = self._clock()
        for lease_id, lease in list(self._leases.items()):
            if lease.expire_time <= now:
                del self._leases[lease_id]
                log.info("lease expired", extra={"lease_id": lease_id, "view_id": lease.view_id})

    def _pinned_locked(self) -> set[str]:
        pinned: set[str] = set()
        for lease in self._leases.values():
            pinned |= lease.digests
        return pinned

    # -- verify ------------------------------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Re-hashes every blob and drops (with the views linking it) each one whose bytes or size do not match
        its name. Hashing runs outside the lock, so the store keeps serving meanwhile."""
        with self._lock:
            snapshot = list(self._blobs.items())
        checked = checked_bytes = 0
        dropped: list[str] = []
        backfill = checksum.available()
        for digest, size in snapshot:
            good, actual_size = self._check_one(digest, size)
            checked += 1
            checked_bytes += actual_size
            if not good:
                dropped.append(digest)
            elif backfill and checksum.read_recorded(self.blob_path(digest)) is None:
                # a blob cached before read checksums existed gets one (stop where the filesystem keeps none)
                backfill = self._record_checksum(digest)
        return VerifyReport(checked, checked_bytes, tuple(dropped))

    def check_blob(self, digest: str) -> bool:
        """Re-hashes one blob that a reader found changed (its read checksum did not match) and drops it, with
        the views linking it, when its sha256 no longer matches; a blob that still matches gets its read checksum
        recorded anew (then the recorded value was what was wrong). Returns whether it was dropped. Raises
        NotFound for a blob the store does not hold (dropped or evicted already)."""
        with self._lock:
            size = self._blobs.get(digest)
        if size is None:
            raise NotFound(f"blob {digest} is not in the cache (dropped or evicted already)")
        good, _ = self._check_one(digest, size)
        if good:
            self._record_checksum(digest)
            log.warning("a reader reported a blob corrupt, but its sha256 matches: recorded its checksum anew",
                        extra={"digest": digest})
        return not good

    def _record_checksum(self, digest: str) -> bool:
        """(Re)computes and records a blob's read checksum (hotslot.checksum); False when it cannot."""
        path = self.blob_path(digest)
        try:
            with open(path, "rb", buffering=0) as f:
                value = checksum.of_file(f.fileno(), chunk_bytes=self.hash_chunk_bytes)
            os.chmod(path, BLOB_MODE | 0o200)  # a read-only file takes no user xattr from its non-root owner
            try:
                return checksum.record(path, value)
            finally:
                os.chmod(path, BLOB_MODE)
        except OSError as error:
            log.warning("could not record the read checksum of blob %s: %s", digest, error.strerror)
            return False

    def _check_one(self, digest: str, size: int) -> tuple[bool, int]:
        """(whether the blob matches its name and size, its size on disk); drops it when it does not."""
        try:
            actual, actual_size = sha256_file(self.blob_path(digest), self.hash_chunk_bytes)
        except FileNotFoundError:
            actual, actual_size = "", 0
        if actual == digest and actual_size == size:
            return True, actual_size
        with self._lock:
            if digest in self._blobs:
                self._drop_locked(digest)
                log.warning("dropped corrupt blob", extra={"digest": digest, "actual_sha256": actual})
        return False, actual_size


def _remove_path(path: Path) -> None:
    """Removes a file, link or directory tree; a path already gone is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError as error:
        log.warning("could not remove %s: %s", path, error)
