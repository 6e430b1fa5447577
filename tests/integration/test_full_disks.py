"""Full disks through real processes on small tmpfs mounts: the storage-cache answers RESOURCE_EXHAUSTED naming
the disk and the bytes needed when its cache disk fills mid-fetch, leaves no temp file, and keeps serving the
models it holds; the registry answers RESOURCE_EXHAUSTED when its database disk is full and keeps answering reads.
Mounting needs root (CAP_SYS_ADMIN): elsewhere these tests skip."""
from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hotslot.common.v1 import common_pb2
from hotslot.registry.v1 import registry_service_pb2 as rpb
from hotslot.registry.v1 import registry_service_pb2_grpc as rgrpc
from hotslot.storage.v1 import storage_cache_service_pb2 as spb
from hotslot.storage.v1 import storage_cache_service_pb2_grpc as sgrpc
from tests.support.procs import start_service

pytestmark = pytest.mark.integration

PAGE = 4096


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    size = -(-size_bytes // PAGE) * PAGE
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a tmpfs: {error}")
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _pages(path: Path) -> int:
    return sum(-(-f.stat().st_size // PAGE) * PAGE for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def share(tmp_path_factory: pytest.TempPathFactory, tiny_family: list[Path]) -> Path:
    root = tmp_path_factory.mktemp("full") / "share"
    for model in tiny_family[:2]:
        shutil.copytree(model, root / "models" / model.name)
    return root


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, share: Path):
    root = tmp_path_factory.mktemp("full-registry")
    svc = start_service("registry", ["--models-root", str(share), "--database", str(root / "registry.db")],
                        log_path=root / "registry.log")
    with grpc.insecure_channel(svc.address) as channel:
        stub = rgrpc.RegistryServiceStub(channel)
        for model in ("tiny-sd-0", "tiny-sd-1"):
            stub.RegisterModel(rpb.RegisterModelRequest(model_id=model, source=f"models/{model}"), timeout=60)
    yield svc
    svc.stop()


def _ensure(stub, model_id: str) -> spb.EnsureModelResponse:
    return stub.EnsureModel(spb.EnsureModelRequest(model=common_pb2.ModelRef(model_id=model_id)), timeout=60)


def test_a_full_cache_disk_answers_resource_exhausted_and_keeps_serving_cached_models(
    tmp_path: Path, share: Path, registry
) -> None:
    first = share / "models" / "tiny-sd-0"
    unet = first / "unet" / "diffusion_pytorch_model.safetensors"
    # room for all of tiny-sd-0 and half of tiny-sd-1's own UNet (its other files are tiny-sd-0's, shared)
    size = _pages(first) + unet.stat().st_size // 2 + 16 * PAGE
    with tmpfs(tmp_path / "cache", size) as cache:
        svc = start_service("storage-cache", ["--backing-root", str(share), "--cache-dir", str(cache),
                                              "--registry-address", registry.address],
                            log_path=tmp_path / "storage-cache.log")
        try:
            with grpc.insecure_channel(svc.address) as channel:
                stub = sgrpc.StorageCacheServiceStub(channel)
                _ensure(stub, "tiny-sd-0")
                with pytest.raises(grpc.RpcError) as caught:
                    _ensure(stub, "tiny-sd-1")
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
                assert str(cache) in caught.value.details() and "needed" in caught.value.details()
                assert not any((cache / "tmp").iterdir())  # nothing half-written is left
                again = _ensure(stub, "tiny-sd-0")  # the cached model still serves
                assert {f.source for f in again.files} == {spb.FILE_SOURCE_LOCAL_HIT}
        finally:
            svc.stop()
        assert "Traceback" not in svc.log()


def test_a_full_registry_disk_answers_resource_exhausted_and_keeps_answering_reads(tmp_path: Path, share: Path) -> None:
    with tmpfs(tmp_path / "db", 2 * 1024 * 1024) as db:
        svc = start_service("registry", ["--models-root", str(share), "--database", str(db / "registry.db")],
                            log_path=tmp_path / "registry.log")
        try:
            with grpc.insecure_channel(svc.address) as channel:
                stub = rgrpc.RegistryServiceStub(channel)
                stub.RegisterModel(rpb.RegisterModelRequest(model_id="tiny-sd-0", source="models/tiny-sd-0"),
                                   timeout=60)
                with open(db / "filler", "wb", buffering=0) as filler:  # fill the disk to the last byte
                    with contextlib.suppress(OSError):
                        while filler.write(b"\0" * PAGE):
                            pass
                with pytest.raises(grpc.RpcError) as caught:
                    stub.RegisterModel(rpb.RegisterModelRequest(model_id="tiny-sd-1", source="models/tiny-sd-1"),
                                       timeout=60)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
                assert str(db / "registry.db") in caught.value.details()
                got = stub.GetModel(rpb.GetModelRequest(model_id="tiny-sd-0"), timeout=30)
                assert got.model.model_id == "tiny-sd-0"
        finally:
            svc.stop()
        assert "Traceback" not in svc.log()


def _put(stub, path: str, data: bytes):
    def parts():
        yield spb.PutFileRequest(header=spb.PutFileHeader(path=path, size_bytes=len(data)))
        for lo in range(0, len(data), 256 * 1024):
            yield spb.PutFileRequest(chunk=data[lo : lo + 256 * 1024])

    return stub.PutFile(parts(), timeout=60)


def test_put_file_to_a_full_cache_disk_writes_through_without_a_local_copy(tmp_path: Path, share: Path) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB
    with tmpfs(tmp_path / "cache", 512 * 1024) as cache:
        svc = start_service("storage-cache", ["--backing-root", str(share), "--cache-dir", str(cache)],
                            log_path=tmp_path / "storage-cache.log")
        try:
            with grpc.insecure_channel(svc.address) as channel:
                stub = sgrpc.StorageCacheServiceStub(channel)
                reply = _put(stub, "uploads/big.bin", data)
                assert reply.size_bytes == len(data)
                assert (share / "uploads" / "big.bin").read_bytes() == data
                assert stub.GetUsage(spb.GetUsageRequest(), timeout=30).blob_count == 0
                assert not any((cache / "tmp").iterdir())
        finally:
            svc.stop()
        assert "cache disk full" in svc.log() and "Traceback" not in svc.log()


def test_put_file_to_a_full_backing_disk_answers_resource_exhausted_naming_it(tmp_path: Path) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB
    with tmpfs(tmp_path / "backing", 1024 * 1024) as backing:
        svc = start_service("storage-cache", ["--backing-root", str(backing), "--cache-dir", str(tmp_path / "cache")],
                            log_path=tmp_path / "storage-cache.log")
        try:
            with grpc.insecure_channel(svc.address) as channel:
                stub = sgrpc.StorageCacheServiceStub(channel)
                with pytest.raises(grpc.RpcError) as caught:
                    _put(stub, "uploads/big.bin", data)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
                assert str(backing) in caught.value.details() and f"{len(data)} bytes needed" in caught.value.details()
                assert not [p for p in backing.rglob("*") if p.is_file()]  # no partial file left
                assert not any((tmp_path / "cache" / "tmp").iterdir())
                assert _put(stub, "uploads/small.bin", b"fits").size_bytes == 4  # still serving
        finally:
            svc.stop()
