"""BlobStore: index rebuilt from disk, temp files removed, views as links, byte-bounded LRU eviction that spares
pinned and held blobs, lease expiry, and Verify dropping corrupt blobs."""
from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from hotslot.errors import InvalidArgument, NotFound, ResourceExhausted
from hotslot.services.storage_cache import blobstore as blobstore_module
from hotslot.services.storage_cache.blobstore import BlobStore


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def add(store: BlobStore, data: bytes) -> str:
    """Writes `data` as a blob the way a fetch does: temp file, then commit."""
    digest = hashlib.sha256(data).hexdigest()
    temp = store.new_temp_path("test")
    temp.write_bytes(data)
    store.commit(temp, digest, len(data), store.reserve(len(data), "test blob"))
    return digest


def blob(tag: str, size: int = 30) -> bytes:
    return (tag.encode() * size)[:size]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def open_store(root: Path, capacity: int = 100, clock: FakeClock | None = None) -> BlobStore:
    return BlobStore(root, capacity, clock=clock or FakeClock(), hash_chunk_bytes=16)


def test_zero_capacity_is_refused_with_the_setting_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as err:
        BlobStore(tmp_path / "cache", 0)
    assert err.value.violations[0].field == "capacity_bytes" and "must be > 0" in err.value.message


def test_blobs_live_at_their_digest_and_views_are_hard_links(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cache")
    a, b = add(store, blob("a")), add(store, blob("b"))
    assert store.blob_path(a) == tmp_path / "cache" / "blobs" / "sha256" / a[:2] / a
    view = store.build_view("f" * 64, [("unet/w.safetensors", a), ("vae/w.safetensors", b), ("model_index.json", a)])
    assert (view / "unet/w.safetensors").read_bytes() == blob("a")
    assert os.stat(view / "unet/w.safetensors").st_ino == os.stat(store.blob_path(a)).st_ino
    assert os.stat(view / "model_index.json").st_ino == os.stat(store.blob_path(a)).st_ino
    # Shared by two paths of one view and by a second view, each blob still counts once.
    store.build_view("e" * 64, [("vae/w.safetensors", b)])
    assert store.usage().used_bytes == 60 and store.usage().blob_count == 2


def test_views_fall_back_to_symlinks_where_hard_links_fail(tmp_path: Path, monkeypatch) -> None:
    store = open_store(tmp_path / "cache")
    a = add(store, blob("a"))

    def no_hard_links(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(blobstore_module.os, "link", no_hard_links)
    view = store.build_view("f" * 64, [("unet/w.safetensors", a)])
    assert (view / "unet/w.safetensors").is_symlink()
    assert (view / "unet/w.safetensors").read_bytes() == blob("a")
    monkeypatch.undo()
    reopened = open_store(tmp_path / "cache")
    assert reopened.ready_view("f" * 64, [a]) == view


def test_open_rebuilds_the_index_and_removes_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = open_store(root)
    a, b = add(store, blob("a")), add(store, blob("b"))
    store.build_view("f" * 64, [("x/a", a), ("y/b", b)])
    # What a crash leaves: half-written fetches and views in tmp/, and a stray file among the blobs.
    (root / "tmp" / "fetch-123").write_bytes(b"partial")
    (root / "tmp" / "view-456" / "unet").mkdir(parents=True)
    (root / "blobs" / "sha256" / a[:2] / "not-a-digest").write_bytes(b"junk")

    reopened = open_store(root)
    assert list((root / "tmp").iterdir()) == []
    assert not (root / "blobs" / "sha256" / a[:2] / "not-a-digest").exists()
    assert reopened.has(a) and reopened.has(b)
    assert reopened.usage().used_bytes == 60
    assert reopened.ready_view("f" * 64, [a, b]) == root / "views" / ("f" * 64)


def test_open_drops_views_whose_blobs_are_gone(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = open_store(root)
    a = add(store, blob("a"))
    store.build_view("f" * 64, [("a", a)])
    os.unlink(store.blob_path(a))  # lost outside the store's control
    reopened = open_store(root)
    assert not reopened.has(a)
    assert not (root / "views" / ("f" * 64)).exists()


def test_eviction_keeps_usage_under_capacity_in_lru_order_and_spares_pinned(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cache", capacity=100)
    a, b, c = add(store, blob("a")), add(store, blob("b")), add(store, blob("c"))
    store.build_view("a" * 64, [("a", a)])
    lease = store.pin("a" * 64, ttl_s=60)
    store.touch([b])  # b is now more recently used than c
    d = add(store, blob("d"))  # 120 > 100: the least recently used unpinned blob (c) goes
    assert store.has(a) and store.has(b) and store.has(d) and not store.has(c)
    e = add(store, blob("e"))
    assert store.has(a) and not store.has(b)  # a is older than b, but pinned
    usage = store.usage()
    assert usage.used_bytes <= usage.capacity_bytes
    assert usage.pinned_bytes == 30 and usage.leases == 1 and usage.evictions == 2
    assert store.has(d) and store.has(e)
    assert lease.digests == frozenset({a})


def test_evicting_a_blob_removes_the_views_that_link_it(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cache", capacity=60)
    a, b = add(store, blob("a")), add(store, blob("b"))
    view = store.build_view("f" * 64, [("a", a), ("b", b)])
    store.touch([b])
    add(store, blob("c"))
    assert not store.has(a) and not view.exists()
    with pytest.raises(NotFound, match="call EnsureModel first"):
        store.pin("f" * 64, ttl_s=60)


def test_room_is_refused_without_evicting_when_pins_and_holds_leave_too_little(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cache", capacity=100)
    a, b, c = add(store, blob("a")), add(store, blob("b")), add(store, blob("c"))
    store.build_view("a" * 64, [("a", a)])
    store.pin("a" * 64, ttl_s=60)
    with store.hold([b]):
        with pytest.raises(ResourceExhausted) as err:
            store.reserve(71, "unet/w.safetensors")
        assert "unet/w.safetensors" in err.value.message and "pinned" in err.value.message
        assert store.has(c), "a refused reservation must not evict anything"
        store.reserve(40, "fits after evicting c")
        assert not store.has(c) and store.has(b)
    # Reserved bytes count against capacity until committed or released.
    assert store.usage().reserved_bytes == 40


def test_an_expired_lease_becomes_evictable(tmp_path: Path, clock: FakeClock) -> None:
    store = open_store(tmp_path / "cache", capacity=60, clock=clock)
    a = add(store, blob("a"))
    store.build_view("a" * 64, [("a", a)])
    lease = store.pin("a" * 64, ttl_s=10)
    add(store, blob("b"))
    with pytest.raises(ResourceExhausted):
        store.reserve(40, "next")
    clock.now += 5
    store.renew(lease.lease_id, ttl_s=10)
    clock.now += 9
    with pytest.raises(ResourceExhausted):
        store.reserve(40, "next")  # renewed: still pinned
    clock.now += 2
    store.reserve(40, "next")
    assert not store.has(a)
    assert store.usage().leases == 0
    with pytest.raises(NotFound, match="expired"):
        store.renew(lease.lease_id, ttl_s=10)
    with pytest.raises(NotFound, match="expired"):
        store.unpin(lease.lease_id)


def test_unpin_makes_blobs_evictable(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cache", capacity=60)
    a = add(store, blob("a"))
    store.build_view("a" * 64, [("a", a)])
    lease = store.pin("a" * 64, ttl_s=60)
    store.unpin(lease.lease_id)
    add(store, blob("b"))
    add(store, blob("c"))
    assert not store.has(a)


def test_verify_drops_corrupt_blobs_and_their_views(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cache")
    good, bad = add(store, blob("g", 50)), add(store, blob("b", 40))
    store.build_view("f" * 64, [("bad", bad), ("good", good)])
    path = store.blob_path(bad)
    os.chmod(path, 0o644)
    path.write_bytes(blob("X", 40))
    report = store.verify()
    assert report.blobs_checked == 2 and report.bytes_checked == 90
    assert report.dropped_digests == (bad,)
    assert store.has(good) and not store.has(bad) and not path.exists()
    assert not (tmp_path / "cache" / "views" / ("f" * 64)).exists()
    assert store.usage().used_bytes == 50


def test_commit_of_a_present_blob_keeps_one_copy(tmp_path: Path) -> None:
    store = open_store(tmp_path / "cache")
    a = add(store, blob("a"))
    temp = store.new_temp_path("dup")
    temp.write_bytes(blob("a"))
    assert store.commit(temp, a, 30) is False
    assert not temp.exists() and store.usage().used_bytes == 30 and store.usage().blob_count == 1
