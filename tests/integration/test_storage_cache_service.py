"""The storage-cache and the registry as separate processes over real files, called through the generated stubs:
single-flight fetches, dedupe across a family, eviction with pins and lease expiry, Verify, DATA_LOSS, write-through
uploads that leave nothing behind, restarts, and refusals with their status codes. The last test runs both servers
in this process, on one in-memory span exporter, to follow one Ensure's trace into the registry."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hotslot.common.v1 import common_pb2
from hotslot.registry.v1 import registry_service_pb2 as registry_pb
from hotslot.registry.v1 import registry_service_pb2_grpc as registry_grpc
from hotslot.storage.v1 import storage_cache_service_pb2 as pb
from hotslot.storage.v1 import storage_cache_service_pb2_grpc as pb_grpc
from tests.support.procs import HOTSLOT, ServiceProcess, start_service

pytestmark = pytest.mark.integration

MODELS = ("tiny-sd-0", "tiny-sd-1", "tiny-sd-2")
SHARED = ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


@pytest.fixture(scope="module")
def share(tmp_path_factory: pytest.TempPathFactory, tiny_family: list[Path]) -> Path:
    root = tmp_path_factory.mktemp("storage") / "share"
    for model in tiny_family:
        shutil.copytree(model, root / "models" / model.name)
    return root


@pytest.fixture(scope="module")
def registry(share: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    state = tmp_path_factory.mktemp("registry")
    svc = start_service(
        "registry",
        ["--models-root", str(share), "--database", str(state / "registry.db")],
        log_path=state / "registry.log",
    )
    with grpc.insecure_channel(svc.address) as channel:
        stub = registry_grpc.RegistryServiceStub(channel)
        for model_id in MODELS:
            stub.RegisterModel(registry_pb.RegisterModelRequest(model_id=model_id, source=f"models/{model_id}"))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def manifests(registry: ServiceProcess) -> dict[str, common_pb2.Manifest]:
    with grpc.insecure_channel(registry.address) as channel:
        stub = registry_grpc.RegistryServiceStub(channel)
        return {m: stub.GetModel(registry_pb.GetModelRequest(model_id=m)).model.manifest for m in MODELS}


def start_cache(tmp_path: Path, share: Path, registry: ServiceProcess, *args: str) -> ServiceProcess:
    return start_service(
        "storage-cache",
        ["--backing-root", str(share), "--cache-dir", str(tmp_path / "cache"),
         "--registry-address", registry.address, "--read-chunk-bytes", "256KiB", *args],
        log_path=tmp_path / "storage-cache.log",
    )


@pytest.fixture
def cache(tmp_path: Path, share: Path, registry: ServiceProcess) -> Iterator[ServiceProcess]:
    svc = start_cache(tmp_path, share, registry)
    yield svc
    svc.stop()


@pytest.fixture
def stub(cache: ServiceProcess) -> Iterator[pb_grpc.StorageCacheServiceStub]:
    with grpc.insecure_channel(cache.address) as channel:
        yield pb_grpc.StorageCacheServiceStub(channel)


def ensure(stub, model_id: str, pin_ttl_s: float | None = None) -> pb.EnsureModelResponse:
    request = pb.EnsureModelRequest(model=common_pb2.ModelRef(model_id=model_id))
    if pin_ttl_s is not None:
        request.pin_ttl.CopyFrom(Duration(seconds=int(pin_ttl_s), nanos=int(pin_ttl_s % 1 * 1e9)))
    return stub.EnsureModel(request, timeout=60)


def distinct(*manifests: common_pb2.Manifest) -> dict[str, int]:
    return {f.sha256: f.size_bytes for m in manifests for f in m.files}


def usage(stub) -> pb.GetUsageResponse:
    return stub.GetUsage(pb.GetUsageRequest())


def assert_view_matches(reply: pb.EnsureModelResponse, share: Path, source: str) -> None:
    view = Path(reply.view_path)
    for f in reply.files:
        assert (view / f.path).read_bytes() == (share / source / f.path).read_bytes(), f.path


def test_eight_concurrent_ensures_read_each_backing_file_once(stub, share, manifests) -> None:
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: ensure(stub, "tiny-sd-0"), range(8)))
    manifest = manifests["tiny-sd-0"]
    # Bytes read from the backing store, counted by the service: each file exactly once.
    assert usage(stub).bytes_fetched == sum(distinct(manifest).values()) == manifest.total_bytes
    assert sum(r.bytes_fetched for r in replies) == manifest.total_bytes
    assert len({r.view_path for r in replies}) == 1 and len({r.view_id for r in replies}) == 1
    for path in (f.path for f in manifest.files):
        counts = Counter(next(f.source for f in r.files if f.path == path) for r in replies)
        assert counts[pb.FILE_SOURCE_FETCHED] == 1, (path, counts)
    assert (replies[0].model.model_id, replies[0].model.revision) == ("tiny-sd-0", 1)
    assert_view_matches(replies[0], share, "models/tiny-sd-0")


def test_a_family_stores_the_shared_vae_and_text_encoder_once(stub, manifests) -> None:
    replies = [ensure(stub, m) for m in MODELS]
    for path in SHARED:
        got = [next(f.source for f in r.files if f.path == path) for r in replies]
        assert got == [pb.FILE_SOURCE_FETCHED, pb.FILE_SOURCE_LOCAL_HIT, pb.FILE_SOURCE_LOCAL_HIT], path
        assert len({os.stat(Path(r.view_path) / path).st_ino for r in replies}) == 1
    blobs = distinct(*manifests.values())
    now = usage(stub)
    assert now.blob_count == len(blobs) and now.used_bytes == now.bytes_fetched == sum(blobs.values())
    assert now.used_bytes < sum(m.total_bytes for m in manifests.values())


def test_eviction_stays_under_capacity_spares_pinned_views_and_expired_leases_free_them(
    tmp_path, share, registry, manifests
) -> None:
    capacity = sum(distinct(manifests["tiny-sd-0"], manifests["tiny-sd-1"]).values()) + 1024
    svc = start_cache(tmp_path, share, registry, "--capacity-bytes", str(capacity))
    try:
        with grpc.insecure_channel(svc.address) as channel:
            stub = pb_grpc.StorageCacheServiceStub(channel)
            kept = ensure(stub, "tiny-sd-0", pin_ttl_s=600)
            short = ensure(stub, "tiny-sd-1", pin_ttl_s=1)
            assert kept.lease_id and short.lease_id
            with pytest.raises(grpc.RpcError) as err:
                ensure(stub, "tiny-sd-2")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in err.value.details()
            assert usage(stub).evictions == 0

            deadline = time.monotonic() + 30
            while usage(stub).leases > 1:  # the one-second lease runs out; nothing renews it
                assert time.monotonic() < deadline, "lease did not expire"
                time.sleep(0.1)
            third = ensure(stub, "tiny-sd-2")
            now = usage(stub)
            assert now.used_bytes <= capacity and now.evictions >= 1
            assert not Path(short.view_path).exists()  # its unet was evicted, so its view went with it
            assert_view_matches(kept, share, "models/tiny-sd-0")
            assert_view_matches(third, share, "models/tiny-sd-2")
            assert now.pinned_bytes == manifests["tiny-sd-0"].total_bytes and now.leases == 1

            stub.Unpin(pb.UnpinRequest(lease_id=kept.lease_id))
            for call, request in [
                (stub.Unpin, pb.UnpinRequest(lease_id=kept.lease_id)),
                (stub.RenewLease, pb.RenewLeaseRequest(lease_id=short.lease_id)),
                (stub.Pin, pb.PinRequest(view_id=short.view_id)),
            ]:
                with pytest.raises(grpc.RpcError) as err:
                    call(request)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
            ensure(stub, "tiny-sd-1")  # room again: the unpinned tiny-sd-0 unet is evicted
            assert usage(stub).used_bytes <= capacity
    finally:
        svc.stop()


def test_verify_drops_a_corrupted_blob_and_ensure_fetches_it_again(stub, cache, tmp_path, share) -> None:
    first = ensure(stub, "tiny-sd-0")
    vae = next(f for f in first.files if f.path == SHARED[0])
    blob = tmp_path / "cache" / "blobs" / "sha256" / vae.sha256[:2] / vae.sha256
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    report = stub.Verify(pb.VerifyRequest(), timeout=60)
    assert list(report.dropped_digests) == [vae.sha256] and report.blobs_checked == len(first.files)
    again = ensure(stub, "tiny-sd-0")
    sources = {f.path: f.source for f in again.files}
    assert sources[vae.path] == pb.FILE_SOURCE_FETCHED
    assert {s for p, s in sources.items() if p != vae.path} == {pb.FILE_SOURCE_LOCAL_HIT}
    assert_view_matches(again, share, "models/tiny-sd-0")


def test_verify_on_start_drops_a_corrupted_blob_before_serving(tmp_path, share, registry) -> None:
    first = start_cache(tmp_path, share, registry)
    with grpc.insecure_channel(first.address) as channel:
        ensured = ensure(pb_grpc.StorageCacheServiceStub(channel), "tiny-sd-0")
    assert first.stop() == 0
    vae = next(f for f in ensured.files if f.path == SHARED[0])
    blob = tmp_path / "cache" / "blobs" / "sha256" / vae.sha256[:2] / vae.sha256
    os.chmod(blob, 0o644)
    blob.write_bytes(b"rotten" + blob.read_bytes()[6:])
    second = start_cache(tmp_path, share, registry, "--verify-on-start")  # SERVING only after the verification
    try:
        assert not blob.exists()
        with grpc.insecure_channel(second.address) as channel:
            again = ensure(pb_grpc.StorageCacheServiceStub(channel), "tiny-sd-0")
        assert {f.path: f.source for f in again.files}[vae.path] == pb.FILE_SOURCE_FETCHED
    finally:
        second.stop()
    assert "ready" in second.log()


def test_a_corrupted_backing_file_is_data_loss_naming_the_file(stub, registry, share) -> None:
    shutil.copytree(share / "models/tiny-sd-0", share / "models/rotten")
    with grpc.insecure_channel(registry.address) as channel:
        registry_grpc.RegistryServiceStub(channel).RegisterModel(
            registry_pb.RegisterModelRequest(model_id="rotten", source="models/rotten")
        )
    weights = share / "models/rotten/unet/diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(grpc.RpcError) as err:
        ensure(stub, "rotten")
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "models/rotten/unet/diffusion_pytorch_model.safetensors" in err.value.details()
    assert usage(stub).bytes_fetched >= 2 * len(data)  # read, mismatch, read again, then gave up


def test_put_writes_through_and_a_cancelled_or_failed_put_leaves_nothing(stub, tmp_path, share) -> None:
    data = os.urandom(3 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    blobs_dir = tmp_path / "cache" / "blobs" / "sha256"

    def blob_files() -> list[Path]:
        return [p for p in blobs_dir.rglob("*") if p.is_file()]

    def messages(path: str, chunks: list[bytes], stall: threading.Event | None = None):
        yield pb.PutFileRequest(header=pb.PutFileHeader(path=path, expected_sha256=digest, size_bytes=len(data)))
        for chunk in chunks:
            yield pb.PutFileRequest(chunk=chunk)
        if stall is not None:
            stall.wait(30)

    chunks = [data[i : i + 1024 * 1024] for i in range(0, len(data), 1024 * 1024)]
    # Cancelled mid-stream: one chunk sent, then the client gives up.
    stall = threading.Event()
    future = stub.PutFile.future(messages("uploads/cancelled/w.safetensors", chunks[:1], stall), timeout=60)
    temp_dir = share / "uploads/cancelled"
    deadline = time.monotonic() + 30
    while not (temp_dir.exists() and any(p.stat().st_size > 0 for p in temp_dir.iterdir())):
        assert time.monotonic() < deadline, "upload never started"
        time.sleep(0.02)
    future.cancel()
    stall.set()
    while (share / "uploads").exists():  # the server notices the cancel and cleans up
        assert time.monotonic() < deadline, f"left behind: {list((share / 'uploads').rglob('*'))}"
        time.sleep(0.02)
    assert blob_files() == [] and list((tmp_path / "cache" / "tmp").iterdir()) == []

    # The backing write fails: the destination is an existing directory.
    (share / "uploads/taken").mkdir(parents=True)
    with pytest.raises(grpc.RpcError) as err:
        stub.PutFile(messages("uploads/taken", chunks), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "is a directory" in err.value.details()
    assert list((share / "uploads").rglob("*")) == [share / "uploads/taken"]
    assert blob_files() == []

    # A wrong checksum is refused before anything is visible.
    wrong = [b"x" * len(data)]
    with pytest.raises(grpc.RpcError) as err:
        stub.PutFile(messages("uploads/wrong/w.safetensors", wrong), timeout=60)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert not (share / "uploads/wrong").exists() and blob_files() == []

    reply = stub.PutFile(messages("uploads/new/unet/w.safetensors", chunks), timeout=60)
    assert (reply.sha256, reply.size_bytes) == (digest, len(data))
    assert (share / "uploads/new/unet/w.safetensors").read_bytes() == data
    manifest = common_pb2.Manifest(files=[common_pb2.FileEntry(path="unet/w.safetensors", size_bytes=len(data),
                                                                sha256=digest)])
    ensured = stub.EnsureModel(pb.EnsureModelRequest(
        manifest=pb.ManifestTarget(source="uploads/new", manifest=manifest)))
    assert [f.source for f in ensured.files] == [pb.FILE_SOURCE_LOCAL_HIT]  # written through into the cache
    assert usage(stub).bytes_fetched == 0


def put_messages(path: str, data: bytes, overwrite: bool = False):
    yield pb.PutFileRequest(header=pb.PutFileHeader(path=path, expected_sha256=hashlib.sha256(data).hexdigest(),
                                                    size_bytes=len(data), overwrite=overwrite))
    yield pb.PutFileRequest(chunk=data)


def test_put_refuses_to_replace_an_existing_file_unless_asked(stub, share) -> None:
    stub.PutFile(put_messages("uploads/once/config.json", b'{"v": 1}'), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        stub.PutFile(put_messages("uploads/once/config.json", b'{"v": 2}'), timeout=60)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "overwrite" in err.value.details()
    assert (share / "uploads/once/config.json").read_bytes() == b'{"v": 1}'
    assert [p.name for p in (share / "uploads/once").iterdir()] == ["config.json"]  # no temp file left

    stub.PutFile(put_messages("uploads/once/config.json", b'{"v": 2}', overwrite=True), timeout=60)
    assert (share / "uploads/once/config.json").read_bytes() == b'{"v": 2}'


def test_put_never_replaces_a_file_a_registered_model_names_even_with_overwrite(stub, share, manifests) -> None:
    target = share / "models/tiny-sd-1/scheduler/scheduler_config.json"
    before = target.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(grpc.RpcError) as err:
            stub.PutFile(put_messages("models/tiny-sd-1/scheduler/scheduler_config.json", b"{}", overwrite),
                         timeout=60)
        expected = grpc.StatusCode.FAILED_PRECONDITION if overwrite else grpc.StatusCode.ALREADY_EXISTS
        assert err.value.code() == expected, err.value.details()
    assert "tiny-sd-1@1" in err.value.details() and "new path" in err.value.details()
    assert target.read_bytes() == before
    # A new revision goes to a new path, which is fine.
    reply = stub.PutFile(put_messages("models/tiny-sd-1-v2/scheduler/scheduler_config.json", b"{}"), timeout=60)
    assert reply.size_bytes == 2


def test_data_loss_for_an_explicit_manifest_does_not_reveal_the_files_digest_or_size(stub, share) -> None:
    real = share / "models/tiny-sd-2/unet/config.json"
    real_digest = hashlib.sha256(real.read_bytes()).hexdigest()
    guess = common_pb2.Manifest(files=[common_pb2.FileEntry(path="unet/config.json", size_bytes=1, sha256="0" * 64)])
    with pytest.raises(grpc.RpcError) as err:
        stub.EnsureModel(pb.EnsureModelRequest(
            manifest=pb.ManifestTarget(source="models/tiny-sd-2", manifest=guess)), timeout=60)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "does not match" in err.value.details()
    assert real_digest not in err.value.details() and str(real.stat().st_size) not in err.value.details()


def test_the_stream_reports_progress_then_the_result(stub, manifests) -> None:
    request = pb.EnsureModelStreamRequest(request=pb.EnsureModelRequest(model=common_pb2.ModelRef(model_id="tiny-sd-1")))
    events = list(stub.EnsureModelStream(request, timeout=60))
    *progress, last = events
    assert last.WhichOneof("event") == "result" and progress
    assert all(e.WhichOneof("event") == "progress" for e in progress)
    done = [e.progress.bytes_done for e in progress]
    total = manifests["tiny-sd-1"].total_bytes
    assert done == sorted(done) and done[-1] == total == progress[-1].progress.bytes_total
    unet = [e.progress for e in progress if e.progress.path == "unet/diffusion_pytorch_model.safetensors"]
    assert len(unet) > 2 and unet[-1].file_bytes_done == unet[-1].file_bytes_total  # per chunk, then done


def test_a_restart_rebuilds_the_index_and_removes_temp_files(tmp_path, share, registry, manifests) -> None:
    first = start_cache(tmp_path, share, registry)
    with grpc.insecure_channel(first.address) as channel:
        view = ensure(pb_grpc.StorageCacheServiceStub(channel), "tiny-sd-0").view_path
    first.stop()
    leftover = tmp_path / "cache" / "tmp" / "fetch-crashed"
    leftover.write_bytes(b"half a blob")
    second = start_cache(tmp_path, share, registry)
    try:
        with grpc.insecure_channel(second.address) as channel:
            stub = pb_grpc.StorageCacheServiceStub(channel)
            assert not leftover.exists()
            assert usage(stub).used_bytes == manifests["tiny-sd-0"].total_bytes
            again = ensure(stub, "tiny-sd-0")
            assert again.view_path == view and again.bytes_fetched == 0
            assert {f.source for f in again.files} == {pb.FILE_SOURCE_LOCAL_HIT}
    finally:
        second.stop()


@pytest.mark.parametrize(
    ("request_kwargs", "code", "field", "needle"),
    [
        ({"manifest": pb.ManifestTarget(source="../outside")}, "INVALID_ARGUMENT", "manifest.source", "'..'"),
        (
            {"manifest": pb.ManifestTarget(source="models/tiny-sd-0", manifest=common_pb2.Manifest(
                files=[common_pb2.FileEntry(path="../../etc/passwd", size_bytes=1, sha256="0" * 64)]))},
            "INVALID_ARGUMENT", "manifest.files[0].path", "'..'",
        ),
        ({}, "INVALID_ARGUMENT", "target", "set model"),
        ({"model": common_pb2.ModelRef(model_id="ghost")}, "NOT_FOUND", None, "'ghost' is not registered"),
        ({"model": common_pb2.ModelRef(model_id="tiny-sd-0", revision=9)}, "NOT_FOUND", None, "no revision 9"),
    ],
)
def test_bad_input_gets_a_clear_status(stub, request_kwargs, code, field, needle) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.EnsureModel(pb.EnsureModelRequest(**request_kwargs), timeout=30)
    assert err.value.code() == getattr(grpc.StatusCode, code)
    assert needle in err.value.details()
    status = rpc_status.from_call(err.value)
    assert status is not None
    [info] = [i for d in status.details if d.Unpack(i := error_details_pb2.ErrorInfo())]
    assert info.domain == "hotslot.dev"
    assert info.reason == ("MODEL_NOT_FOUND" if code == "NOT_FOUND" else "INVALID_PARAMETER")
    if field is not None:
        [bad_request] = [b for d in status.details if d.Unpack(b := error_details_pb2.BadRequest())]
        assert bad_request.field_violations[0].field == field
    assert usage(stub).blob_count == 0


def test_put_paths_outside_the_root_are_invalid_argument(stub, share) -> None:
    for path in ("../escape.safetensors", "/etc/passwd"):
        header = pb.PutFileRequest(header=pb.PutFileHeader(path=path))
        with pytest.raises(grpc.RpcError) as err:
            stub.PutFile(iter([header, pb.PutFileRequest(chunk=b"x")]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "header.path" in err.value.details()
    assert not (share.parent / "escape.safetensors").exists()


def test_zero_capacity_refuses_to_start_with_a_clear_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*HOTSLOT, "serve", "storage-cache", "--port", "0", "--capacity-bytes", "0",
         "--cache-dir", str(tmp_path / "cache"), "--backing-root", str(tmp_path / "share")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "INVALID_ARGUMENT" in proc.stderr and "capacity_bytes" in proc.stderr
    assert "must be greater than 0" in proc.stderr
    assert not (tmp_path / "cache").exists()


async def test_an_ensure_by_reference_is_one_trace_across_storage_cache_and_registry(tmp_path, share) -> None:
    """In one process (both servers on one in-memory exporter): the registry lookup rides the Ensure's trace."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from hotslot.bootstrap.server import create_server
    from hotslot.bootstrap.telemetry import configure_tracing
    from hotslot.services.registry.core import RegistryCore
    from hotslot.services.registry.store import SQLiteModelStore
    from hotslot.services.registry.wiring import RegistrySettings
    from hotslot.services.registry.wiring import registrations as registry_registrations
    from hotslot.services.storage_cache.wiring import StorageCacheSettings, build_core, registrations

    exporter = InMemorySpanExporter()
    provider = configure_tracing("hotslot-storage-test", exporter=exporter)
    models = SQLiteModelStore(tmp_path / "registry.db")
    registry_core = RegistryCore(models, share, tracer_provider=provider)
    await registry_core.register("tiny-sd-0", "", "", "models/tiny-sd-0", {})
    registry_server, registry_port, _ = await create_server(
        "127.0.0.1:0", registry_registrations(registry_core), settings=RegistrySettings(), tracer_provider=provider
    )
    settings = StorageCacheSettings(backing_root=share, cache_dir=tmp_path / "cache",
                                    registry_address=f"127.0.0.1:{registry_port}")
    core, resolver = build_core(settings, tracer_provider=provider)
    server, port, _ = await create_server("127.0.0.1:0", registrations(core), settings=settings,
                                          tracer_provider=provider)
    await registry_server.start()
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await pb_grpc.StorageCacheServiceStub(channel).EnsureModel(
                pb.EnsureModelRequest(model=common_pb2.ModelRef(model_id="tiny-sd-0"))
            )
        assert reply.model.revision == 1
    finally:
        await server.stop(None)
        await registry_server.stop(None)
        await core.close()
        await resolver.close()
        models.close()
    spans = exporter.get_finished_spans()
    by_name = {(s.name, s.kind): s for s in spans}
    ensure_rpc = by_name[("/hotslot.storage.v1.StorageCacheService/EnsureModel", SpanKind.SERVER)]
    ensure_core = by_name[("storage.ensure", SpanKind.INTERNAL)]
    lookup = by_name[("/hotslot.registry.v1.RegistryService/GetModel", SpanKind.CLIENT)]
    served = by_name[("/hotslot.registry.v1.RegistryService/GetModel", SpanKind.SERVER)]
    assert ensure_core.parent.span_id == ensure_rpc.context.span_id
    assert lookup.parent.span_id == ensure_core.context.span_id
    assert served.parent.span_id == lookup.context.span_id
    assert len({s.context.trace_id for s in (ensure_rpc, ensure_core, lookup, served)}) == 1
    fetches = [s for s in spans if s.name == "storage.fetch"]
    assert fetches and all(s.context.trace_id == ensure_rpc.context.trace_id for s in fetches)
