"""storage-cache core with fakes: single-flight fetches (counted reads), views, dedupe across a family, DATA_LOSS and
refetch, refusals, leases, progress, Verify, and write-through uploads that leave nothing behind when they fail."""
from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import BinaryIO

import pytest

from hotslot.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from hotslot.manifest import FileEntry, Manifest
from hotslot.services.storage_cache import fill
from hotslot.services.storage_cache.backing import BackingStore
from hotslot.services.storage_cache.blobstore import BlobStore
from hotslot.services.storage_cache.core import (
    EnsureResult,
    FileSource,
    ManifestTarget,
    ModelResolver,
    ModelTarget,
    Progress,
    ResolvedModel,
    StorageCacheCore,
)
from hotslot.services.storage_cache.put import PutHeader

CHUNK = 4096


# -- fakes ---------------------------------------------------------------------------------------------------
class FakeResolver(ModelResolver):
    def __init__(self) -> None:
        self.models: dict[str, ResolvedModel] = {}

    async def resolve(self, model_id: str, revision: int) -> ResolvedModel:
        if model_id not in self.models:
            raise NotFound(f"model {model_id!r} is not registered")
        return self.models[model_id]


class _CountingReader:
    def __init__(self, inner: BinaryIO, backing: CountingBackingStore, path: Path) -> None:
        self.inner, self.backing, self.path = inner, backing, path

    def readinto(self, buf) -> int:
        if self.backing.gate is not None:
            self.backing.gate.acquire()
        n = self.inner.readinto(buf)
        with self.backing.lock:
            self.backing.bytes_read[str(self.path)] += n
        if self.backing.corrupt_reads.get(str(self.path), 0) > 0 and n:
            buf[0] ^= 0xFF  # a flaky read: the bytes arrive changed
        return n

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.backing.corrupt_reads.get(str(self.path), 0) > 0:
            self.backing.corrupt_reads[str(self.path)] -= 1
        self.inner.close()


class CountingBackingStore(BackingStore):
    """Counts the bytes read from each backing file; can hold reads at a gate and corrupt the next N reads."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.lock = threading.Lock()
        self.bytes_read: Counter[str] = Counter()
        self.corrupt_reads: dict[str, int] = {}
        self.gate: threading.Semaphore | None = None

    def open_for_read(self, path: Path) -> BinaryIO:
        return _CountingReader(super().open_for_read(path), self, path)  # type: ignore[return-value]


class _FailingWriter:
    def __init__(self, inner: BinaryIO, fail_after: int) -> None:
        self.inner, self.left = inner, fail_after

    def write(self, data) -> int:
        if len(data) > self.left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.inner.write(data)

    def fileno(self) -> int:
        return self.inner.fileno()

    def close(self) -> None:
        self.inner.close()


class FullBackingStore(CountingBackingStore):
    """A backing store that runs out of space after `fail_after` bytes of an upload."""

    def __init__(self, root: Path, fail_after: int) -> None:
        super().__init__(root)
        self.fail_after = fail_after

    def open_for_write(self, path: Path) -> BinaryIO:
        return _FailingWriter(super().open_for_write(path), self.fail_after)  # type: ignore[return-value]


# -- helpers -------------------------------------------------------------------------------------------------
def write_model(share: Path, source: str, files: dict[str, bytes]) -> Manifest:
    entries = []
    for rel, data in files.items():
        path = share / source / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        entries.append(FileEntry(rel, len(data), hashlib.sha256(data).hexdigest()))
    return Manifest(files=tuple(sorted(entries)), pipeline_class="StableDiffusionPipeline")


def family_files(i: int) -> dict[str, bytes]:
    """Models that differ only in their UNet, like fine-tunes of one base."""
    return {
        "model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
        "unet/config.json": b'{"unet": %d}' % i,
        "unet/diffusion_pytorch_model.safetensors": os.urandom(9 * CHUNK + 7),
        "vae/diffusion_pytorch_model.safetensors": b"vae" * 5000,
        "text_encoder/model.safetensors": b"text" * 4000,
    }


def distinct_bytes(*manifests: Manifest) -> int:
    return sum({f.sha256: f.size_bytes for m in manifests for f in m.files}.values())


@pytest.fixture
def share(tmp_path: Path) -> Path:
    (tmp_path / "share").mkdir()
    return tmp_path / "share"


@pytest.fixture
def backing(share: Path) -> CountingBackingStore:
    return CountingBackingStore(share)


@pytest.fixture
def resolver() -> FakeResolver:
    return FakeResolver()


def make_core(tmp_path: Path, backing: BackingStore, resolver: ModelResolver, capacity: int = 10**9, **kw):
    store = BlobStore(tmp_path / "cache", capacity, hash_chunk_bytes=CHUNK)
    return StorageCacheCore(store, backing, resolver, read_chunk_bytes=CHUNK, parallel_fetches=2, **kw)


@pytest.fixture
async def core(tmp_path: Path, backing: CountingBackingStore, resolver: FakeResolver):
    c = make_core(tmp_path, backing, resolver)
    yield c
    await c.close()


def sources(result: EnsureResult) -> dict[str, FileSource]:
    return {f.path: f.source for f in result.files}


def nothing_partial(core: StorageCacheCore) -> None:
    assert list(core.store.tmp_dir.iterdir()) == []


# -- Ensure --------------------------------------------------------------------------------------------------
async def test_eight_concurrent_ensures_read_each_backing_file_once(core, backing, resolver, share) -> None:
    manifest = write_model(share, "models/a", family_files(0))
    resolver.models["a"] = ResolvedModel("a", 3, "models/a", manifest)
    backing.gate = threading.Semaphore(0)  # every chunk read waits for a permit
    big = "unet/diffusion_pytorch_model.safetensors"
    seen: list[set[int]] = [set() for _ in range(8)]

    def listener(i: int):
        def on_progress(p: Progress) -> None:
            if p.path == big and 0 < p.file_bytes_done < p.file_bytes_total:
                seen[i].add(p.file_bytes_done)
        return on_progress

    tasks = [asyncio.ensure_future(core.ensure(ModelTarget("a"), on_progress=listener(i))) for i in range(8)]
    # Let the big file through one chunk at a time until all eight callers are watching its one fetch.
    for _ in range(100):
        if all(seen):
            break
        backing.gate.release()
        await asyncio.sleep(0.01)
    backing.gate.release(10_000)
    results = await asyncio.gather(*tasks)

    for entry in manifest.files:
        assert backing.bytes_read[str(share / "models/a" / entry.path)] == entry.size_bytes, entry.path
    assert core.usage().bytes_fetched == manifest.total_bytes
    assert len({r.view_path for r in results}) == 1
    for path in (f.path for f in manifest.files):
        counts = Counter(sources(r)[path] for r in results)
        assert counts[FileSource.FETCHED] == 1, (path, counts)
    assert Counter(sources(r)[big] for r in results)[FileSource.JOINED] == 7
    assert sum(r.bytes_fetched for r in results) == manifest.total_bytes
    view = results[0].view_path
    for entry in manifest.files:
        assert (view / entry.path).read_bytes() == (share / "models/a" / entry.path).read_bytes()
    assert (results[0].model_id, results[0].revision) == ("a", 3)


async def test_a_warm_ensure_is_all_local_hits_and_reads_nothing(core, backing, share) -> None:
    manifest = write_model(share, "models/a", family_files(0))
    first = await core.ensure(ManifestTarget("models/a", manifest))
    assert set(sources(first).values()) == {FileSource.FETCHED}
    before = sum(backing.bytes_read.values())
    second = await core.ensure(ManifestTarget("models/a", manifest, name="again"))
    assert set(sources(second).values()) == {FileSource.LOCAL_HIT}
    assert second.bytes_fetched == 0 and sum(backing.bytes_read.values()) == before
    assert second.view_path == first.view_path == core.store.view_path(manifest.digest)
    usage = core.usage()
    assert (usage.hits, usage.misses) == (5, 5)


async def test_a_family_stores_shared_files_once(core, share) -> None:
    manifests = [write_model(share, f"models/m{i}", family_files(i)) for i in range(3)]
    results = [await core.ensure(ManifestTarget(f"models/m{i}", m)) for i, m in enumerate(manifests)]
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert [sources(r)[vae] for r in results] == [FileSource.FETCHED, FileSource.LOCAL_HIT, FileSource.LOCAL_HIT]
    assert sources(results[2])["text_encoder/model.safetensors"] is FileSource.LOCAL_HIT
    usage = core.usage().store
    assert usage.used_bytes == distinct_bytes(*manifests) < sum(m.total_bytes for m in manifests)
    assert usage.blob_count == 3 + 3 * 2  # shared: index, vae, text encoder; per model: unet config + weights
    inodes = {os.stat(r.view_path / vae).st_ino for r in results}
    assert len(inodes) == 1


async def test_a_corrupt_backing_file_is_read_twice_then_data_loss_naming_it(core, backing, share) -> None:
    manifest = write_model(share, "models/a", family_files(0))
    target = share / "models/a/vae/diffusion_pytorch_model.safetensors"
    target.write_bytes(b"VAE" * 5000)  # same size, other bytes
    with pytest.raises(DataLoss) as err:
        await core.ensure(ManifestTarget("models/a", manifest))
    assert "models/a/vae/diffusion_pytorch_model.safetensors" in err.value.message
    assert backing.bytes_read[str(target)] == 2 * 15000
    vae = next(f for f in manifest.files if f.path.startswith("vae/"))
    assert not core.store.has(vae.sha256)
    assert not core.store.view_path(manifest.digest).exists()
    nothing_partial(core)


async def test_a_mismatch_that_heals_on_the_second_read_succeeds(core, backing, share) -> None:
    manifest = write_model(share, "models/a", family_files(0))
    path = share / "models/a/unet/config.json"
    backing.corrupt_reads[str(path)] = 1
    result = await core.ensure(ManifestTarget("models/a", manifest))
    assert (result.view_path / "unet/config.json").read_bytes() == path.read_bytes()
    assert backing.bytes_read[str(path)] == 2 * path.stat().st_size


async def test_a_file_longer_than_its_manifest_is_not_copied_past_its_size(core, backing, share) -> None:
    manifest = write_model(share, "models/a", {"w.safetensors": b"x" * 100})
    (share / "models/a/w.safetensors").write_bytes(b"x" * (50 * CHUNK))
    with pytest.raises(DataLoss, match="does not match its manifest") as refused:
        await core.ensure(ManifestTarget("models/a", manifest))
    assert "101" not in refused.value.message  # what was read stays in the log (no oracle for share files)
    assert backing.bytes_read[str(share / "models/a/w.safetensors")] == 2 * 101


# -- cold fill: kernel copy, its fallbacks, fsync ------------------------------------------------------------
class KernelCopies:
    """Records the kernel copies a fill makes (os.copy_file_range and os.sendfile, patched), and can refuse them
    with an errno or make them misbehave."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        self.copied: Counter[str] = Counter()
        self.refuse: dict[str, int] = {}
        self.report_eof: set[str] = set()
        self.corrupt_copy = False
        for name in ("copy_file_range", "sendfile"):
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name: str, real):
        def kernel_copy(*args, **kwargs) -> int:
            self.calls[name] += 1
            if name in self.refuse:
                raise OSError(self.refuse[name], os.strerror(self.refuse[name]))
            if name in self.report_eof:
                return 0  # as copy_file_range does on procfs: "nothing to copy" although there is
            n = real(*args, **kwargs)
            self.copied[name] += n
            if self.corrupt_copy and n:
                dst = args[1] if name == "copy_file_range" else args[0]
                os.pwrite(dst, b"\0", os.lseek(dst, 0, os.SEEK_CUR) - 1)  # the copy, not the source, goes wrong
            return n
        return kernel_copy


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> KernelCopies:
    return KernelCopies(monkeypatch)


@pytest.fixture
async def real_core(tmp_path: Path, share: Path, resolver: FakeResolver):
    """A core over the real BackingStore, whose readers are files: fills take the kernel path where it works."""
    c = make_core(tmp_path, BackingStore(share), resolver)
    yield c
    await c.close()


def fetch_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The temp files of fetches that get fsynced, recorded by a patched os.fsync."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith("fetch-"):
            synced.append(name)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def assert_view_matches_share(result: EnsureResult, share: Path, source: str, manifest: Manifest) -> None:
    for entry in manifest.files:
        assert (result.view_path / entry.path).read_bytes() == (share / source / entry.path).read_bytes(), entry.path


async def ensure_family_and_close(core: StorageCacheCore, share: Path) -> Manifest:
    """Ensures a family model with a core of the test's own, closes it, and checks the view holds the share's bytes."""
    try:
        manifest = write_model(share, "models/a", family_files(0))
        result = await core.ensure(ManifestTarget("models/a", manifest))
    finally:
        await core.close()
    assert_view_matches_share(result, share, "models/a", manifest)
    return manifest


async def test_a_fill_copies_in_the_kernel_and_the_blobs_are_bit_identical(real_core, kernel, share) -> None:
    manifest = write_model(share, "models/a", family_files(0))
    result = await real_core.ensure(ManifestTarget("models/a", manifest))
    assert_view_matches_share(result, share, "models/a", manifest)
    assert kernel.copied["copy_file_range"] == manifest.total_bytes  # every byte, none through user space
    assert kernel.calls["sendfile"] == 0
    assert real_core.usage().bytes_fetched == manifest.total_bytes
    nothing_partial(real_core)


async def test_chunks_that_are_not_page_multiples_are_hashed_right(tmp_path, share, resolver, kernel) -> None:
    store = BlobStore(tmp_path / "cache", 10**9)
    core = StorageCacheCore(store, BackingStore(share), resolver, read_chunk_bytes=5000)  # mappings start unaligned
    manifest = await ensure_family_and_close(core, share)
    assert kernel.copied["copy_file_range"] == manifest.total_bytes


async def test_the_copy_method_is_on_the_fetch_span(tmp_path, share, resolver, kernel) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from hotslot.bootstrap.telemetry import configure_tracing

    exporter = InMemorySpanExporter()
    kernel.refuse["copy_file_range"] = errno.EXDEV
    core = make_core(tmp_path, BackingStore(share), resolver,
                     tracer_provider=configure_tracing("hotslot-fill-test", exporter=exporter))
    try:
        manifest = write_model(share, "models/a", {"w.safetensors": os.urandom(3 * CHUNK)})
        await core.ensure(ManifestTarget("models/a", manifest))
    finally:
        await core.close()
    fetches = [s for s in exporter.get_finished_spans() if s.name == "storage.fetch"]
    assert [s.attributes["hotslot.copy_method"] for s in fetches] == ["sendfile"]


@pytest.mark.parametrize(
    ("refused", "expected"),
    [
        # Another filesystem (NFS to a local disk) refuses copy_file_range: sendfile copies across filesystems.
        ({"copy_file_range": errno.EXDEV}, "sendfile"),
        ({"copy_file_range": errno.ENOSYS}, "sendfile"),
        # No kernel copy at all (an old kernel, a sandbox): user-space reads and writes.
        ({"copy_file_range": errno.EXDEV, "sendfile": errno.EINVAL}, None),
        ({"copy_file_range": errno.ENOSYS, "sendfile": errno.ENOSYS}, None),
    ],
)
async def test_a_refused_kernel_copy_falls_back_with_identical_blobs(real_core, kernel, share, refused, expected):
    kernel.refuse.update(refused)
    manifest = write_model(share, "models/a", family_files(0))
    result = await real_core.ensure(ManifestTarget("models/a", manifest))
    assert_view_matches_share(result, share, "models/a", manifest)
    for name in ("copy_file_range", "sendfile"):
        assert kernel.copied[name] == (manifest.total_bytes if name == expected else 0), name
    nothing_partial(real_core)


async def test_a_kernel_copy_that_wrongly_reports_the_end_is_finished_by_reads(real_core, kernel, share) -> None:
    kernel.report_eof.update({"copy_file_range", "sendfile"})
    manifest = write_model(share, "models/a", family_files(0))
    result = await real_core.ensure(ManifestTarget("models/a", manifest))
    assert_view_matches_share(result, share, "models/a", manifest)


async def test_a_corrupt_backing_file_is_data_loss_through_the_kernel_copy_too(real_core, kernel, share) -> None:
    manifest = write_model(share, "models/a", family_files(0))
    unet = next(f for f in manifest.files if f.path.startswith("unet/diffusion"))
    target = share / "models/a" / unet.path
    data = bytearray(target.read_bytes())
    data[5 * CHUNK] ^= 0xFF  # one bit in the middle of a chunk
    target.write_bytes(bytes(data))
    with pytest.raises(DataLoss, match=unet.path):
        await real_core.ensure(ManifestTarget("models/a", manifest))
    assert kernel.copied["copy_file_range"] > 0
    assert not real_core.store.has(unet.sha256)
    assert not real_core.store.view_path(manifest.digest).exists()
    nothing_partial(real_core)


async def test_a_copy_that_goes_wrong_in_the_kernel_is_caught_by_hashing_the_local_copy(real_core, kernel, share):
    kernel.corrupt_copy = True  # the source is right; the bytes landing in the temp file are not
    manifest = write_model(share, "models/a", {"w.safetensors": os.urandom(4 * CHUNK + 3)})
    with pytest.raises(DataLoss, match="w.safetensors"):
        await real_core.ensure(ManifestTarget("models/a", manifest))
    assert not real_core.store.has(manifest.files[0].sha256)
    nothing_partial(real_core)


async def test_a_file_longer_than_its_manifest_is_not_kernel_copied_past_its_size(real_core, kernel, share) -> None:
    manifest = write_model(share, "models/a", {"w.safetensors": b"x" * 100})
    (share / "models/a/w.safetensors").write_bytes(b"x" * (50 * CHUNK))
    with pytest.raises(DataLoss, match="does not match its manifest"):
        await real_core.ensure(ManifestTarget("models/a", manifest))
    assert kernel.copied["copy_file_range"] == 2 * 101


async def test_a_failing_kernel_copy_is_an_error_and_leaves_nothing(real_core, kernel, share) -> None:
    kernel.refuse["copy_file_range"] = errno.EIO  # a read error, not "unsupported": no fallback hides it
    manifest = write_model(share, "models/a", family_files(0))
    with pytest.raises(OSError, match="Input/output error"):
        await real_core.ensure(ManifestTarget("models/a", manifest))
    assert kernel.calls["sendfile"] == 0
    assert real_core.usage().store.blob_count == 0
    nothing_partial(real_core)


async def test_a_local_copy_that_cannot_be_mapped_is_hashed_from_reads(real_core, kernel, share, monkeypatch) -> None:
    def no_mmap(*args, **kwargs):
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(fill.mmap, "mmap", no_mmap)
    manifest = write_model(share, "models/a", family_files(0))
    result = await real_core.ensure(ManifestTarget("models/a", manifest))
    assert_view_matches_share(result, share, "models/a", manifest)
    assert kernel.copied["copy_file_range"] == manifest.total_bytes


@pytest.mark.parametrize("kernel_copy", [True, False])
@pytest.mark.parametrize("fsync", [True, False])
async def test_fsync_setting_is_honoured_by_every_copy_path(
    tmp_path, share, resolver, kernel, monkeypatch, fsync, kernel_copy
) -> None:
    if not kernel_copy:
        kernel.refuse.update({"copy_file_range": errno.ENOSYS, "sendfile": errno.ENOSYS})
    synced = fetch_fsyncs(monkeypatch)
    writebacks: list[tuple[int, int]] = []
    real_sync_file_range = fill._SYNC_FILE_RANGE
    assert real_sync_file_range is not None  # Linux

    def sync_file_range(fd: int, offset: int, n: int, flags: int) -> int:
        writebacks.append((offset, n))
        return real_sync_file_range(fd, offset, n, flags)

    monkeypatch.setattr(fill, "_SYNC_FILE_RANGE", sync_file_range)
    core = make_core(tmp_path, BackingStore(share), resolver, fsync=fsync)
    manifest = await ensure_family_and_close(core, share)
    assert len(synced) == (len(manifest.files) if fsync else 0)
    assert len(set(synced)) == len(synced)  # one fsync per fetched blob
    # With fsync on, the writeback of each chunk starts as soon as it is hashed.
    assert sum(n for _, n in writebacks) == (manifest.total_bytes if fsync else 0)


@pytest.mark.parametrize(
    ("source", "files", "field", "needle"),
    [
        ("../outside", None, "manifest.source", "'..'"),
        ("/etc", None, "manifest.source", "absolute"),
        ("", None, "manifest.source", "is required"),
        ("models/escape", None, "manifest.source", "symlink"),
        ("models/a", [FileEntry("../../etc/passwd", 1, "0" * 64)], "manifest.files[0].path", "'..'"),
        ("models/a", [FileEntry("unet/w", 1, "NOT-HEX")], "manifest.files[0].sha256", "64 lower-case hex"),
        ("models/a", [], "manifest.files", "empty"),
        ("models/a", [FileEntry("a", 1, "0" * 64), FileEntry("a/b", 1, "1" * 64)], "manifest.files", "is a file"),
    ],
)
async def test_bad_targets_are_invalid_argument_naming_the_field(
    core, share, tmp_path, source, files, field, needle
) -> None:
    manifest = write_model(share, "models/a", {"w": b"w"})
    (tmp_path / "outside").mkdir()
    (share / "models/escape").symlink_to(tmp_path / "outside")
    if files is not None:
        manifest = Manifest(files=tuple(files))
    with pytest.raises(InvalidArgument) as err:
        await core.ensure(ManifestTarget(source, manifest))
    assert err.value.violations[0].field == field and needle in err.value.message


async def test_a_file_symlinked_out_of_the_root_is_refused(core, share, tmp_path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    manifest = write_model(share, "models/a", {"w": b"secret"})
    (share / "models/a/w").unlink()
    (share / "models/a/w").symlink_to(secret)
    with pytest.raises(InvalidArgument, match="symlink"):
        await core.ensure(ManifestTarget("models/a", manifest))


async def test_unknown_models_and_missing_files_are_not_found(core, resolver, share) -> None:
    with pytest.raises(NotFound, match="'ghost' is not registered"):
        await core.ensure(ModelTarget("ghost"))
    with pytest.raises(InvalidArgument, match="not a valid model id"):
        await core.ensure(ModelTarget("Bad Id"))
    manifest = write_model(share, "models/a", family_files(0))
    (share / "models/a/unet/config.json").unlink()
    with pytest.raises(NotFound, match="models/a/unet/config.json is missing"):
        await core.ensure(ManifestTarget("models/a", manifest))


async def test_a_model_larger_than_the_cache_is_resource_exhausted(tmp_path, backing, resolver, share) -> None:
    manifest = write_model(share, "models/a", family_files(0))
    core = make_core(tmp_path, backing, resolver, capacity=manifest.total_bytes // 2)
    try:
        with pytest.raises(ResourceExhausted, match="raise capacity_bytes"):
            await core.ensure(ManifestTarget("models/a", manifest, name="big"))
        assert sum(backing.bytes_read.values()) == 0
    finally:
        await core.close()


async def test_pinned_views_survive_pressure_and_unpinned_ones_are_evicted(tmp_path, backing, resolver, share):
    manifests = [write_model(share, f"models/m{i}", family_files(i)) for i in range(3)]
    capacity = distinct_bytes(manifests[0], manifests[1]) + 100
    core = make_core(tmp_path, backing, resolver, capacity=capacity)
    try:
        first = await core.ensure(ManifestTarget("models/m0", manifests[0]), pin_ttl_s=60)
        assert first.lease is not None
        second = await core.ensure(ManifestTarget("models/m1", manifests[1]))
        third = await core.ensure(ManifestTarget("models/m2", manifests[2]))  # evicts m1's unet, not m0's
        usage = core.usage().store
        assert usage.used_bytes <= capacity and usage.evictions >= 1
        assert all(core.store.has(f.sha256) for f in manifests[0].files)
        assert not second.view_path.exists() and third.view_path.exists() and first.view_path.exists()
        await core.unpin(first.lease.lease_id)
        await core.ensure(ManifestTarget("models/m1", manifests[1]))
        assert not first.view_path.exists()
    finally:
        await core.close()


async def test_lease_ttls_are_checked(core, share) -> None:
    manifest = write_model(share, "models/a", {"w": b"w"})
    result = await core.ensure(ManifestTarget("models/a", manifest))
    with pytest.raises(InvalidArgument, match="must be positive"):
        await core.pin(result.view_id, -1)
    with pytest.raises(InvalidArgument, match="longer than the longest lease"):
        await core.pin(result.view_id, 10**9)
    with pytest.raises(InvalidArgument, match="not a view id"):
        await core.pin("nope", None)
    with pytest.raises(NotFound, match="call EnsureModel first"):
        await core.pin("0" * 64, None)
    lease = await core.pin(result.view_id, None)  # unset: the default ttl
    assert lease.expire_time == pytest.approx(time.time() + core.lease_ttl_s, abs=5)
    with pytest.raises(NotFound, match="does not exist"):
        await core.renew("unknown", 10)


async def test_the_stream_reports_growing_progress_then_the_result(core, share) -> None:
    manifest = write_model(share, "models/a", family_files(0))
    items = [item async for item in core.ensure_stream(ManifestTarget("models/a", manifest))]
    *updates, result = items
    assert isinstance(result, EnsureResult) and updates and all(isinstance(u, Progress) for u in updates)
    done = [u.bytes_done for u in updates]
    assert done == sorted(done) and done[-1] == manifest.total_bytes == updates[-1].bytes_total
    assert updates[-1].files_done == updates[-1].files_total == 5
    big = [u for u in updates if u.path == "unet/diffusion_pytorch_model.safetensors"]
    assert len(big) >= 10  # one update per chunk read, not just one at the end
    assert all(u.file_bytes_done <= u.file_bytes_total for u in updates)


async def test_verify_drops_a_corrupt_blob_and_the_next_ensure_fetches_it_again(core, share) -> None:
    manifest = write_model(share, "models/a", family_files(0))
    first = await core.ensure(ManifestTarget("models/a", manifest))
    vae = next(f for f in manifest.files if f.path.startswith("vae/"))
    blob = core.store.blob_path(vae.sha256)
    os.chmod(blob, 0o644)
    blob.write_bytes(b"rot" + blob.read_bytes()[3:])  # same size, other bytes
    report = await core.verify()
    assert report.dropped_digests == (vae.sha256,) and report.blobs_checked == 5
    again = await core.ensure(ManifestTarget("models/a", manifest))
    assert sources(again)[vae.path] is FileSource.FETCHED
    assert (again.view_path / vae.path).read_bytes() == (share / "models/a" / vae.path).read_bytes()
    assert first.view_path == again.view_path


async def test_only_one_verify_runs_at_a_time(tmp_path, backing, resolver) -> None:
    release = threading.Event()

    class SlowStore(BlobStore):
        def verify(self):
            release.wait(10)
            return super().verify()

    core = StorageCacheCore(SlowStore(tmp_path / "cache", 1000), backing, resolver)
    try:
        first = asyncio.ensure_future(core.verify())
        await asyncio.sleep(0.01)
        with pytest.raises(FailedPrecondition, match="already running"):
            await core.verify()
        release.set()
        assert (await first).blobs_checked == 0
    finally:
        await core.close()


# -- Put -----------------------------------------------------------------------------------------------------
async def chunks_of(data: bytes, size: int = 1000):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def visible_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


async def test_put_writes_through_to_the_backing_store_and_the_cache(core, share) -> None:
    data = os.urandom(10_000)
    digest = hashlib.sha256(data).hexdigest()
    result = await core.put(PutHeader("models/new/unet/w.safetensors", digest, len(data)), chunks_of(data))
    assert (result.sha256, result.size_bytes, result.cached) == (digest, len(data), True)
    assert (share / "models/new/unet/w.safetensors").read_bytes() == data
    assert core.store.blob_path(digest).read_bytes() == data
    assert visible_files(share) == ["models", "models/new", "models/new/unet", "models/new/unet/w.safetensors"]
    nothing_partial(core)
    manifest = Manifest(files=(FileEntry("unet/w.safetensors", len(data), digest),))
    ensured = await core.ensure(ManifestTarget("models/new", manifest))
    assert sources(ensured) == {"unet/w.safetensors": FileSource.LOCAL_HIT}


async def test_a_cancelled_put_leaves_nothing_anywhere(core, share) -> None:
    sent = asyncio.Event()

    async def stalls_after_one_chunk():
        yield b"x" * 1000
        sent.set()
        await asyncio.Event().wait()  # the client goes quiet, then cancels

    task = asyncio.ensure_future(core.put(PutHeader("models/new/unet/w.safetensors"), stalls_after_one_chunk()))
    await sent.wait()  # set when put asks for the second chunk: the first is in both temp files
    assert [p.name for p in (share / "models/new/unet").iterdir()][0].endswith(".tmp")
    assert [p.stat().st_size for p in core.store.tmp_dir.iterdir()] == [1000]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert visible_files(share) == []
    nothing_partial(core)
    assert core.usage().store.blob_count == 0


async def test_a_put_whose_backing_write_fails_leaves_nothing_anywhere(tmp_path, resolver, share) -> None:
    core = make_core(tmp_path, FullBackingStore(share, fail_after=2500), resolver)
    (share / "models").mkdir()
    try:
        with pytest.raises(ResourceExhausted, match="backing store disk holding .* is full writing 'models/new/w'"):
            await core.put(PutHeader("models/new/w"), chunks_of(os.urandom(10_000)))
        assert visible_files(share) == ["models"]  # the directory it created is gone too
        nothing_partial(core)
        assert core.usage().store.blob_count == 0
    finally:
        await core.close()


@pytest.mark.parametrize(
    ("path", "error", "needle"),
    [
        ("models/dir", FailedPrecondition, "is a directory"),
        ("models/file/w", FailedPrecondition, "'models/file' is a file"),
        ("../w", InvalidArgument, "'..'"),
        ("/abs/w", InvalidArgument, "absolute"),
        ("models/escape/w", InvalidArgument, "symlink"),
    ],
)
async def test_puts_to_impossible_paths_are_refused_and_leave_nothing(
    core, share, tmp_path, path, error, needle
) -> None:
    (share / "models/dir").mkdir(parents=True)
    (share / "models/file").write_bytes(b"f")
    (tmp_path / "outside").mkdir()
    (share / "models/escape").symlink_to(tmp_path / "outside")
    before = visible_files(share)
    with pytest.raises(error, match=needle):
        await core.put(PutHeader(path), chunks_of(b"data"))
    assert visible_files(share) == before and list((tmp_path / "outside").iterdir()) == []
    nothing_partial(core)


async def test_put_checks_size_and_sha256_before_anything_is_visible(core, share) -> None:
    data = b"abc" * 1000
    with pytest.raises(DataLoss, match="not the expected"):
        await core.put(PutHeader("m/w", "0" * 64), chunks_of(data))
    with pytest.raises(InvalidArgument, match="3001 bytes but"):
        await core.put(PutHeader("m/w", "", 3001), chunks_of(data))
    with pytest.raises(InvalidArgument, match="more were sent"):
        await core.put(PutHeader("m/w", "", 10), chunks_of(data))
    assert visible_files(share) == []
    nothing_partial(core)


async def test_a_full_cache_disk_is_resource_exhausted_naming_it_and_leaves_no_temp_file(
    core, share, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while a fill writes (the tmpfs integration test does it for real, as root)."""
    first = write_model(share, "models/a", family_files(0))
    await core.ensure(ManifestTarget("models/a", first))
    second = write_model(share, "models/b", family_files(1))
    real_copy = fill.HashingCopy.copy

    def full_disk(self, reader, out, limit, report):
        out.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fill.HashingCopy, "copy", full_disk)
    with pytest.raises(ResourceExhausted) as raised:
        await core.ensure(ManifestTarget("models/b", second))
    assert str(core.store.root) in raised.value.message and "needed" in raised.value.message
    nothing_partial(core)
    monkeypatch.setattr(fill.HashingCopy, "copy", real_copy)
    again = await core.ensure(ManifestTarget("models/a", first))  # what is cached still serves
    assert set(sources(again).values()) == {FileSource.LOCAL_HIT}


async def test_verify_gives_a_blob_cached_without_a_read_checksum_one(core, share) -> None:
    from hotslot import checksum

    manifest = write_model(share, "models/a", family_files(0))
    await core.ensure(ManifestTarget("models/a", manifest))
    blob = core.store.blob_path(manifest.files[0].sha256)
    recorded = checksum.read_recorded(blob)
    if recorded is None:
        pytest.skip("the filesystem keeps no user xattrs")
    os.removexattr(blob, checksum.XATTR)  # as an older version left it
    await core.verify()
    assert checksum.read_recorded(blob) == recorded
