"""The registry as a separate process, called through the generated stub: every RPC, every refusal with its status
code, restarts, and graceful shutdown."""
from __future__ import annotations

import hashlib
import shutil
import signal
import threading
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from hotslot.common.v1 import common_pb2
from hotslot.registry.v1 import registry_service_pb2 as pb
from hotslot.registry.v1 import registry_service_pb2_grpc as pb_grpc
from tests.support.procs import ServiceProcess, start_service

pytestmark = pytest.mark.integration


@pytest.fixture
def share(tmp_path: Path, tiny_family: list[Path]) -> Path:
    root = tmp_path / "share"
    for model in tiny_family:
        shutil.copytree(model, root / "models" / model.name)
    return root


def start_registry(tmp_path: Path, share: Path) -> ServiceProcess:
    return start_service(
        "registry",
        ["--models-root", str(share), "--database", str(tmp_path / "state" / "registry.db")],
        log_path=tmp_path / "registry.log",
    )


@pytest.fixture
def registry(tmp_path: Path, share: Path):
    svc = start_registry(tmp_path, share)
    yield svc
    svc.stop()


@pytest.fixture
def stub(registry: ServiceProcess):
    with grpc.insecure_channel(registry.address) as channel:
        yield pb_grpc.RegistryServiceStub(channel)


def register(stub, model_id: str, source: str, **kw) -> pb.RegisterModelResponse:
    return stub.RegisterModel(pb.RegisterModelRequest(model_id=model_id, source=source, **kw), timeout=60)


def test_register_get_list_delete_round_trip(stub, share: Path) -> None:
    reply = register(stub, "tiny-sd-0", "models/tiny-sd-0", labels={"family": "tiny"})
    assert reply.created and reply.model.revision == 1
    assert reply.model.kind == common_pb2.MODEL_KIND_DIFFUSERS_PIPELINE
    manifest = reply.model.manifest
    assert manifest.pipeline_class == "StableDiffusionPipeline"
    assert {c.name for c in manifest.components} >= {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    on_disk = sorted(p for p in (share / "models/tiny-sd-0").rglob("*") if p.is_file())
    assert len(manifest.files) == len(on_disk)
    for entry in manifest.files:
        data = (share / "models/tiny-sd-0" / entry.path).read_bytes()
        assert entry.sha256 == hashlib.sha256(data).hexdigest() and entry.size_bytes == len(data)

    again = register(stub, "tiny-sd-0", "models/tiny-sd-0", labels={"family": "tiny"})
    assert not again.created and again.model.revision == 1

    got = stub.GetModel(pb.GetModelRequest(model_id="tiny-sd-0"))
    assert got.model.manifest.digest == manifest.digest and got.model.labels == {"family": "tiny"}

    register(stub, "tiny-sd-1", "models/tiny-sd-1")
    listed = stub.ListModels(pb.ListModelsRequest(page_size=1))
    assert [m.model_id for m in listed.models] == ["tiny-sd-0"] and listed.next_page_token
    rest = stub.ListModels(pb.ListModelsRequest(page_size=1, page_token=listed.next_page_token))
    assert [m.model_id for m in rest.models] == ["tiny-sd-1"] and not rest.next_page_token
    by_label = stub.ListModels(pb.ListModelsRequest(labels={"family": "tiny"}))
    assert [m.model_id for m in by_label.models] == ["tiny-sd-0"]

    assert stub.DeleteModel(pb.DeleteModelRequest(model_id="tiny-sd-1")).deleted_revisions == 1
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModel(pb.GetModelRequest(model_id="tiny-sd-1"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_changed_source_makes_a_new_revision(stub, share: Path) -> None:
    register(stub, "m", "models/tiny-sd-0")
    (share / "models/tiny-sd-0/scheduler/scheduler_config.json").write_text('{"_class_name": "PNDMScheduler"}')
    reply = register(stub, "m", "models/tiny-sd-0")
    assert reply.created and reply.model.revision == 2
    assert stub.GetModel(pb.GetModelRequest(model_id="m", revision=1)).model.revision == 1


@pytest.mark.parametrize(
    ("request_kwargs", "code", "field", "needle"),
    [
        ({"model_id": "Bad_Id", "source": "models/tiny-sd-0"}, "INVALID_ARGUMENT", "model_id", "not a valid model id"),
        ({"model_id": "m", "source": "/etc"}, "INVALID_ARGUMENT", "source", "absolute"),
        ({"model_id": "m", "source": "models/../.."}, "INVALID_ARGUMENT", "source", "'..'"),
        ({"model_id": "m", "source": "models/escape"}, "INVALID_ARGUMENT", "source", "symlink"),
        ({"model_id": "m", "source": "models/pickled"}, "INVALID_ARGUMENT", "source", "unet/model.ckpt"),
        ({"model_id": "m", "source": "models/no-index"}, "INVALID_ARGUMENT", "source", "model_index.json is missing"),
        ({"model_id": "m", "source": "models/bad-index"}, "INVALID_ARGUMENT", "source", "not valid JSON"),
        ({"model_id": "m", "source": "models/absent"}, "NOT_FOUND", None, "does not exist"),
        (
            {"model_id": "l", "source": "models/tiny-sd-0", "kind": common_pb2.MODEL_KIND_LORA_ADAPTER,
             "base_model_id": "nope"},
            "NOT_FOUND", None, "base model 'nope'",
        ),
    ],
)
def test_refusals_have_clear_codes_and_store_nothing(
    stub, share: Path, tmp_path: Path, request_kwargs, code, field, needle
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (share / "models/escape").symlink_to(outside)
    shutil.copytree(share / "models/tiny-sd-0", share / "models/pickled")
    (share / "models/pickled/unet/model.ckpt").write_bytes(b"\x80\x04pickle")
    shutil.copytree(share / "models/tiny-sd-0", share / "models/no-index")
    (share / "models/no-index/model_index.json").unlink()
    shutil.copytree(share / "models/tiny-sd-0", share / "models/bad-index")
    (share / "models/bad-index/model_index.json").write_text("{oops")

    with pytest.raises(grpc.RpcError) as err:
        stub.RegisterModel(pb.RegisterModelRequest(**request_kwargs), timeout=30)
    assert err.value.code() == getattr(grpc.StatusCode, code)
    assert needle in err.value.details()
    status = rpc_status.from_call(err.value)
    assert status is not None
    [info] = [i for d in status.details if d.Unpack(i := error_details_pb2.ErrorInfo())]
    assert info.domain == "hotslot.dev"
    expected = {"unet/model.ckpt": "UNSAFE_FILE_FORMAT", "does not exist": "NOT_FOUND",
                "base model 'nope'": "MODEL_NOT_FOUND"}.get(needle, "INVALID_PARAMETER")
    assert info.reason == expected
    if field is not None:
        [bad_request] = [b for d in status.details if d.Unpack(b := error_details_pb2.BadRequest())]
        assert bad_request.field_violations[0].field == field
    assert list(stub.ListModels(pb.ListModelsRequest()).models) == []


def test_unknown_ids_are_not_found(stub) -> None:
    for call, req in [
        (stub.GetModel, pb.GetModelRequest(model_id="ghost")),
        (stub.DeleteModel, pb.DeleteModelRequest(model_id="ghost")),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "ghost" in err.value.details()


def test_watch_streams_snapshot_then_changes(stub) -> None:
    register(stub, "tiny-sd-0", "models/tiny-sd-0")
    stream = stub.WatchModels(pb.WatchModelsRequest(), timeout=60)
    first = next(stream)
    assert (first.type, first.model.model_id) == (pb.MODEL_EVENT_TYPE_EXISTING, "tiny-sd-0")
    assert next(stream).type == pb.MODEL_EVENT_TYPE_SYNCED
    threading.Thread(target=register, args=(stub, "tiny-sd-2", "models/tiny-sd-2")).start()
    event = next(stream)
    assert (event.type, event.model.model_id, event.model.revision) == (pb.MODEL_EVENT_TYPE_REGISTERED, "tiny-sd-2", 1)
    stub.DeleteModel(pb.DeleteModelRequest(model_id="tiny-sd-0"))
    assert next(stream).type == pb.MODEL_EVENT_TYPE_DELETED
    stream.cancel()


def test_catalogue_survives_restart_and_sigterm_is_graceful(tmp_path: Path, share: Path) -> None:
    first = start_registry(tmp_path, share)
    with grpc.insecure_channel(first.address) as channel:
        reply = register(pb_grpc.RegistryServiceStub(channel), "tiny-sd-0", "models/tiny-sd-0")
    assert first.stop(signal.SIGTERM) == 0
    second = start_registry(tmp_path, share)
    try:
        with grpc.insecure_channel(second.address) as channel:
            got = pb_grpc.RegistryServiceStub(channel).GetModel(pb.GetModelRequest(model_id="tiny-sd-0"))
            assert got.model.manifest.digest == reply.model.manifest.digest
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", "hotslot.registry.v1.RegistryService"):
                status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
                assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert second.stop(signal.SIGINT) == 0
