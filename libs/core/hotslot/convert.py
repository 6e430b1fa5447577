"""Converters between the shared protobuf messages (hotslot.common.v1) and domain types."""
from __future__ import annotations

from hotslot.common.v1 import common_pb2
from hotslot.manifest import Component, FileEntry, Manifest

_KIND_TO_PROTO = {
    "DIFFUSERS_PIPELINE": common_pb2.MODEL_KIND_DIFFUSERS_PIPELINE,
    "LORA_ADAPTER": common_pb2.MODEL_KIND_LORA_ADAPTER,
}
_KIND_FROM_PROTO: dict[int, str] = {v: k for k, v in _KIND_TO_PROTO.items()}


def kind_to_proto(kind: str) -> common_pb2.ModelKind:
    return _KIND_TO_PROTO[kind]


def kind_from_proto(kind: int) -> str | None:
    """None for UNSPECIFIED; the enum value's name for values this build does not know (so the core can name it
    in its error)."""
    if kind == common_pb2.MODEL_KIND_UNSPECIFIED:
        return None
    return _KIND_FROM_PROTO.get(kind, f"ModelKind({kind})")


def manifest_to_proto(manifest: Manifest) -> common_pb2.Manifest:
    return common_pb2.Manifest(
        files=[common_pb2.FileEntry(path=f.path, size_bytes=f.size_bytes, sha256=f.sha256) for f in manifest.files],
        pipeline_class=manifest.pipeline_class,
        components=[
            common_pb2.Component(name=c.name, library=c.library, class_name=c.class_name) for c in manifest.components
        ],
        total_bytes=manifest.total_bytes,
        digest=manifest.digest,
    )


def manifest_from_proto(msg: common_pb2.Manifest) -> Manifest:
    return Manifest(
        files=tuple(sorted(FileEntry(f.path, f.size_bytes, f.sha256) for f in msg.files)),
        pipeline_class=msg.pipeline_class,
        components=tuple(sorted(Component(c.name, c.library, c.class_name) for c in msg.components)),
    )
