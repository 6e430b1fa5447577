"""The offline kustomize renderer the manifest tests rely on: it must produce what `kubectl apply -k` would, and
refuse what it does not implement rather than render it wrong."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from .kustomize_lite import KustomizeError, render, split_image

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      initContainers:
        - {name: init, image: hotslot, command: [chown]}
      containers:
        - name: main
          image: hotslot
          args: [serve, router, --a]
          env: [{name: A, value: "1"}, {name: B, value: "2"}, {name: C, value: "3"}]
          volumeMounts: [{name: x, mountPath: /x}]
        - {name: side, image: "localhost:5000/tools:1.0"}
      volumes: [{name: x, emptyDir: {}}]
"""

PV = """
apiVersion: v1
kind: PersistentVolume
metadata: {name: share}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteMany]
  mountOptions: [hard]
  nfs: {server: nfs.example, path: /export}
"""


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {obj["kind"]: obj for obj in objects}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    write(tmp_path, {
        "base/kustomization.yaml": "namespace: ns\nresources: [deployment.yaml, pv.yaml]\n",
        "base/deployment.yaml": DEPLOYMENT,
        "base/pv.yaml": PV,
    })
    return tmp_path


def test_a_patch_merges_lists_by_their_kubernetes_merge_key_in_kustomizes_order(base):
    write(base, {
        "overlay/kustomization.yaml": "resources: [../base]\npatches: [{path: patch.yaml}]\n",
        "overlay/patch.yaml": """
            apiVersion: apps/v1
            kind: Deployment
            metadata: {name: web}
            spec:
              template:
                spec:
                  containers:
                    - name: main
                      args: [serve, router]
                      env: [{name: D, value: "4"}, {name: B, value: "22"}]
                      volumeMounts: [{name: y, mountPath: /y}]
            """,
    })
    pod = render(base / "overlay")[0]["spec"]["template"]["spec"]
    main = pod["containers"][0]
    assert [c["name"] for c in pod["containers"]] == ["main", "side"]
    # env merges on `name`: the patch's entries first, in its order, then the untouched ones (as kustomize does).
    assert main["env"] == [{"name": "D", "value": "4"}, {"name": "B", "value": "22"},
                           {"name": "A", "value": "1"}, {"name": "C", "value": "3"}]
    assert main["volumeMounts"] == [{"name": "y", "mountPath": "/y"}, {"name": "x", "mountPath": "/x"}]
    assert main["args"] == ["serve", "router"]  # a list without a merge strategy is replaced
    assert main["image"] == "hotslot"  # fields the patch does not name are kept


def test_null_in_a_patch_deletes_the_field(base):
    write(base, {
        "overlay/kustomization.yaml": "resources: [../base]\npatches: [{path: pv.yaml}]\n",
        "overlay/pv.yaml": """
            apiVersion: v1
            kind: PersistentVolume
            metadata: {name: share}
            spec:
              mountOptions: null
              nfs: null
              hostPath: {path: /srv/share}
            """,
    })
    spec = by_kind(render(base / "overlay"))["PersistentVolume"]["spec"]
    assert "nfs" not in spec and "mountOptions" not in spec
    assert spec["hostPath"] == {"path": "/srv/share"}
    assert spec["accessModes"] == ["ReadWriteMany"]


def test_namespace_goes_on_namespaced_objects_and_images_on_every_container(base):
    write(base, {
        "overlay/kustomization.yaml": """
            namespace: other
            resources: [../base]
            images:
              - {name: hotslot, newName: registry.example/hotslot, newTag: 1.2.3}
              - {name: "localhost:5000/tools", newTag: "2.0"}
            """,
    })
    objects = by_kind(render(base / "overlay"))
    assert objects["Deployment"]["metadata"]["namespace"] == "other"
    assert "namespace" not in objects["PersistentVolume"]["metadata"]
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["image"] == "registry.example/hotslot:1.2.3"
    assert [c["image"] for c in pod["containers"]] == ["registry.example/hotslot:1.2.3", "localhost:5000/tools:2.0"]


def test_image_references_split_into_name_tag_and_digest():
    assert split_image("hotslot") == ("hotslot", None, None)
    assert split_image("localhost:5000/hotslot:0.1.0") == ("localhost:5000/hotslot", "0.1.0", None)
    assert split_image("otel/collector@sha256:abc") == ("otel/collector", None, "sha256:abc")


@pytest.mark.parametrize(
    ("kustomization", "extra", "complaint"),
    [
        ("resources: [../base]\ncommonLabels: {a: b}\n", {}, "unsupported fields"),
        ("resources: [../base/deployment.yaml]\n", {}, "outside"),
        ("resources: [../base]\npatches: [{path: p.yaml, target: {kind: Deployment}}]\n", {}, "only `patches"),
        ("resources: [../base]\npatches: [{path: p.yaml}]\n",
         {"overlay/p.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: nope}\n"}, "matches 0"),
        ("resources: [../base, again.yaml]\n", {"overlay/again.yaml": PV}, "defined twice"),
        ("resources: [../base]\npatches: [{path: p.yaml}]\n",
         {"overlay/p.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n$patch: delete\n"},
         "not supported"),
    ],
)
def test_what_the_renderer_does_not_implement_is_refused(base, kustomization, extra, complaint):
    write(base, {"overlay/kustomization.yaml": kustomization, **extra})
    with pytest.raises(KustomizeError, match=complaint):
        render(base / "overlay")
