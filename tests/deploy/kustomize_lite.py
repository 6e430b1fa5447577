"""Renders the kustomize subset that deploy/k8s uses, offline and in pure Python, so the tests can check the manifests
exactly as `kubectl apply -k` would create them, on machines with no kustomize binary.

Supported, and nothing else (anything outside it raises instead of being ignored, so a new kustomize feature in an
overlay fails the tests until this renderer learns it):
- kustomization fields `resources` (YAML files inside the kustomization's directory, and directories holding a
  kustomization.yaml), `namespace`, `images` (name, newName, newTag, digest) and `patches` (entries with only a
  `path` to a strategic-merge patch of one object, matched by kind and name);
- strategic merge as Kubernetes defines it: maps merge, `null` deletes a field, lists whose schema declares
  `x-kubernetes-patch-strategy: merge` merge item by item on their `x-kubernetes-patch-merge-key` (containers by
  name, volumeMounts by mountPath, ...), other lists are replaced. The merge keys come from the Kubernetes OpenAPI
  schemas that kubernetes-validate ships, so they are the API server's own, not a hand-written table.
Transformers run in kustomize's order: a kustomization's resources (bases rendered first), then its patches, then
its namespace, then its images.
"""
from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SCHEMA_VERSION = "1.28.0"

KUSTOMIZATION_FIELDS = frozenset({"apiVersion", "kind", "resources", "namespace", "images", "patches"})

# Objects that live outside namespaces: the namespace transformer leaves them alone. Kinds that need more than
# metadata.namespace set (RoleBinding subjects, webhooks...) are refused rather than half-transformed.
CLUSTER_SCOPED_KINDS = frozenset({
    "Namespace", "PersistentVolume", "StorageClass", "PriorityClass", "RuntimeClass", "IngressClass",
    "ClusterRole", "CustomResourceDefinition",
})
UNSUPPORTED_KINDS = frozenset({
    "RoleBinding", "ClusterRoleBinding", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
    "APIService",
})

Obj = dict[str, Any]


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not support, or is malformed."""


def render(directory: str | Path, schema_version: str = SCHEMA_VERSION) -> list[Obj]:
    """Every object the kustomization in `directory` produces, in resource order."""
    return _render(Path(directory).resolve(), schema_version)


def _render(root: Path, schema_version: str) -> list[Obj]:
    kustomization_file = root / "kustomization.yaml"
    if not kustomization_file.is_file():
        raise KustomizeError(f"{root}: no kustomization.yaml")
    spec = yaml.safe_load(kustomization_file.read_text()) or {}
    unknown = set(spec) - KUSTOMIZATION_FIELDS
    if unknown:
        raise KustomizeError(f"{kustomization_file}: unsupported fields {sorted(unknown)}")

    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        path = (root / entry).resolve()
        if path.is_dir():
            objects.extend(_render(path, schema_version))
        else:
            _check_inside(root, path, kustomization_file)
            objects.extend(_load_objects(path))
    _check_unique(objects, kustomization_file)

    for entry in spec.get("patches", []):
        if set(entry) != {"path"}:
            raise KustomizeError(f"{kustomization_file}: only `patches: - path: FILE` is supported, got {entry}")
        path = (root / entry["path"]).resolve()
        _check_inside(root, path, kustomization_file)
        for patch in _load_objects(path):
            _apply_patch(objects, patch, path, schema_version)

    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] in UNSUPPORTED_KINDS:
                raise KustomizeError(f"{obj['kind']}: the namespace transformer for it is not implemented here")
            if obj["kind"] not in CLUSTER_SCOPED_KINDS:
                obj["metadata"]["namespace"] = spec["namespace"]

    for image in spec.get("images", []):
        if not set(image) <= {"name", "newName", "newTag", "digest"} or "name" not in image:
            raise KustomizeError(f"{kustomization_file}: unsupported image entry {image}")
        for obj in objects:
            _set_image(obj, image)
    return objects


def _check_inside(root: Path, path: Path, kustomization_file: Path) -> None:
    # kustomize's default load restrictor: a kustomization reads files from its own directory tree only.
    if not path.is_relative_to(root):
        raise KustomizeError(f"{kustomization_file}: {path} is outside {root}; reference a kustomization directory")
    if not path.is_file():
        raise KustomizeError(f"{kustomization_file}: {path} does not exist")


def _load_objects(path: Path) -> list[Obj]:
    objects = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for obj in objects:
        if not isinstance(obj, dict) or not {"apiVersion", "kind", "metadata"} <= set(obj):
            raise KustomizeError(f"{path}: every document needs apiVersion, kind and metadata")
    return objects


def _identity(obj: Obj) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def _check_unique(objects: list[Obj], kustomization_file: Path) -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        key = _identity(obj)
        if key in seen:
            raise KustomizeError(f"{kustomization_file}: {key} is defined twice")
        seen.add(key)


# ---------------------------------------------------------------------------------------------------------------
# strategic merge


def _apply_patch(objects: list[Obj], patch: Obj, path: Path, schema_version: str) -> None:
    kind, name = patch["kind"], patch["metadata"]["name"]
    namespace = patch["metadata"].get("namespace")
    matches = [
        i for i, obj in enumerate(objects)
        if obj["kind"] == kind and obj["metadata"]["name"] == name
        and (namespace is None or obj["metadata"].get("namespace") == namespace)
    ]
    if len(matches) != 1:
        raise KustomizeError(f"{path}: patch of {kind}/{name} matches {len(matches)} objects, not 1")
    target = objects[matches[0]]
    if patch["apiVersion"] != target["apiVersion"]:
        raise KustomizeError(f"{path}: patch apiVersion {patch['apiVersion']} != {target['apiVersion']}")
    objects[matches[0]] = merge(target, patch, object_schema(kind, patch["apiVersion"], schema_version))


def merge(original: Any, patch: Any, schema: SchemaNode | None) -> Any:
    """`original` with the strategic-merge `patch` applied; `schema` describes both (None: unknown, so maps merge
    and lists are replaced). Neither argument is modified."""
    if isinstance(original, dict) and isinstance(patch, dict):
        return _merge_maps(original, patch, schema)
    if isinstance(original, list) and isinstance(patch, list):
        return _merge_lists(original, patch, schema)
    return _without_nulls(patch)


def _merge_maps(original: dict, patch: dict, schema: SchemaNode | None) -> dict:
    result = copy.deepcopy(original)
    for key, value in patch.items():
        if key.startswith("$"):
            raise KustomizeError(f"patch directive {key} is not supported")
        if value is None:
            result.pop(key, None)
        elif key in result:
            result[key] = merge(result[key], value, schema.field(key) if schema else None)
        else:
            result[key] = _without_nulls(value)
    return result


def _merge_lists(original: list, patch: list, schema: SchemaNode | None) -> list:
    strategy = schema.get("x-kubernetes-patch-strategy", "") if schema else ""
    key = schema.get("x-kubernetes-patch-merge-key") if schema else None
    if "merge" not in strategy.split(","):
        return _without_nulls(patch)
    if key is None:
        raise KustomizeError(f"merging a list of scalars ({patch}) is not supported")
    item_schema = schema.items()
    by_key = {item.get(key): item for item in original}
    merged = []
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise KustomizeError(f"list item {item} lacks its merge key {key!r}")
        old = by_key.get(item[key])
        merged.append(_without_nulls(item) if old is None else _merge_maps(old, item, item_schema))
    # kustomize's order: the patch's items first, in the patch's order, then the untouched ones in theirs. It
    # matters for env: $(VAR) refers only to variables listed before it.
    patched = {item[key] for item in patch}
    return merged + [copy.deepcopy(item) for item in original if item.get(key) not in patched]


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------------
# schemas (read only for the merge keys and strategies of lists)


@dataclass(frozen=True)
class SchemaNode:
    """One node of an object's OpenAPI schema, its `$ref`s resolved against the shared definitions."""

    node: dict
    definitions: dict

    @classmethod
    def of(cls, node: dict | None, definitions: dict) -> SchemaNode | None:
        if node is None:
            return None
        while "$ref" in node:
            # Keys beside a $ref (a field's own x-kubernetes-patch-strategy) take precedence over the target's.
            outer = {key: value for key, value in node.items() if key != "$ref"}
            node = {**definitions[node["$ref"].rsplit("/", 1)[-1]], **outer}
        return cls(node, definitions)

    def get(self, key: str, default: Any = None) -> Any:
        return self.node.get(key, default)

    def field(self, key: str) -> SchemaNode | None:
        field = self.node.get("properties", {}).get(key)
        if field is None and isinstance(self.node.get("additionalProperties"), dict):
            field = self.node["additionalProperties"]  # a map such as labels: every value has this schema
        return SchemaNode.of(field, self.definitions)

    def items(self) -> SchemaNode | None:
        return SchemaNode.of(self.node.get("items"), self.definitions)


def _schema_dir(schema_version: str):
    return importlib.resources.files("kubernetes_validate").joinpath(
        "kubernetes-json-schema", f"v{schema_version}-local"
    )


@functools.cache
def _definitions(schema_version: str) -> dict:
    return json.loads(_schema_dir(schema_version).joinpath("_definitions.json").read_text())["$defs"]


@functools.cache
def object_schema(kind: str, api_version: str, schema_version: str = SCHEMA_VERSION) -> SchemaNode | None:
    """The schema of a whole object; None for kinds the schemas do not know (custom resources)."""
    # kubernetes-validate's file naming: apps/v1 -> apps-v1, rbac.authorization.k8s.io/v1 -> rbac-v1.
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    ref = _schema_dir(schema_version).joinpath(f"{kind.lower()}-{group_version}.json")
    if not ref.is_file():
        return None
    return SchemaNode.of(json.loads(ref.read_text()), _definitions(schema_version))


# ---------------------------------------------------------------------------------------------------------------
# images

_IMAGE = re.compile(r"^(?P<name>[^@]+?)(?::(?P<tag>[^:/@]+))?(?:@(?P<digest>.+))?$")


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry port (host:5000/x) is part of the name."""
    match = _IMAGE.match(image)
    if match is None:
        raise KustomizeError(f"cannot parse image {image!r}")
    return match["name"], match["tag"], match["digest"]


def _set_image(node: Any, image: dict) -> None:
    if isinstance(node, list):
        for item in node:
            _set_image(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                name, tag, digest = split_image(container["image"])
                if name != image["name"]:
                    continue
                name = image.get("newName", name)
                if "digest" in image:
                    container["image"] = f"{name}@{image['digest']}"
                else:
                    tag = image.get("newTag", tag)
                    container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
        else:
            _set_image(value, image)
