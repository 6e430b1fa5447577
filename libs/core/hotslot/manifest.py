"""Model manifests: every file of a model as (path, size, sha256), how to scan a directory into one, and the
path rules that keep a source inside its root. Shared by the registry (which scans) and storage-cache (which
fetches by manifest)."""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from hotslot.errors import InvalidArgument, NotFound, Reason

MODEL_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
# Weight formats that unpickle on load and so can run arbitrary code. hotslot serves safetensors only.
PICKLE_SUFFIXES = frozenset({".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"})
MODEL_INDEX = "model_index.json"
DEFAULT_HASH_CHUNK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, order=True)
class FileEntry:
    path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True, order=True)
class Component:
    name: str
    library: str
    class_name: str


@dataclass(frozen=True)
class Manifest:
    files: tuple[FileEntry, ...]
    pipeline_class: str = ""
    components: tuple[Component, ...] = field(default_factory=tuple)

    @property
    def total_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    @property
    def digest(self) -> str:
        """sha256 over the sorted (path, size, sha256) triples: equal file sets have equal digests."""
        h = hashlib.sha256()
        for f in sorted(self.files):
            h.update(f"{f.path}\0{f.size_bytes}\0{f.sha256}\n".encode())
        return h.hexdigest()

    def to_json(self) -> str:
        return json.dumps(
            {
                "files": [[f.path, f.size_bytes, f.sha256] for f in self.files],
                "pipeline_class": self.pipeline_class,
                "components": [[c.name, c.library, c.class_name] for c in self.components],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        return cls(
            files=tuple(FileEntry(p, s, d) for p, s, d in raw["files"]),
            pipeline_class=raw.get("pipeline_class", ""),
            components=tuple(Component(n, lib, c) for n, lib, c in raw.get("components", [])),
        )


def _quoted(text: str, limit: int = 200) -> str:
    """repr of user text for a message, cut to `limit` characters with "…" (a 10 kB id need not come back whole)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}… ({len(text)} characters)"


def validate_model_id(model_id: str, field_name: str = "model_id") -> str:
    if not model_id:
        raise InvalidArgument.field(field_name, "is required")
    if not MODEL_ID_PATTERN.fullmatch(model_id):
        raise InvalidArgument.field(
            field_name,
            f"{_quoted(model_id)} is not a valid model id: use 1-128 characters of [a-z0-9._-], starting with a letter "
            "or digit",
        )
    return model_id


def validate_relative_path(rel: str, field_name: str) -> PurePosixPath:
    """A path that is relative and has no `..` component; lexical check only (see resolve_under_root)."""
    if not rel:
        raise InvalidArgument.field(field_name, "is required")
    if "\\" in rel or "\0" in rel:
        raise InvalidArgument.field(field_name, f"{rel!r} must use '/' separators and no NUL bytes")
    p = PurePosixPath(rel)
    if p.is_absolute():
        raise InvalidArgument.field(field_name, f"{rel!r} is absolute; give a path relative to the root")
    if ".." in p.parts:
        raise InvalidArgument.field(field_name, f"{rel!r} contains '..'; give a path inside the root")
    return p


def resolve_under_root(root: Path, rel: str, field_name: str) -> Path:
    """Resolves `rel` under `root`, following symlinks, and refuses anything that ends up outside the root."""
    p = validate_relative_path(rel, field_name)
    real_root = root.resolve()
    resolved = (real_root / p).resolve()
    if resolved != real_root and real_root not in resolved.parents:
        raise InvalidArgument.field(field_name, f"{rel!r} leaves the root through a symlink")
    return resolved


def sha256_file(path: Path, chunk_bytes: int = DEFAULT_HASH_CHUNK_BYTES) -> tuple[str, int]:
    """Streams the file through sha256 with bounded memory; returns (hex digest, size)."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
    return h.hexdigest(), size


def parse_model_index(path: Path, field_name: str = "source") -> tuple[str, tuple[Component, ...]]:
    """Reads the pipeline class and component list of a diffusers model_index.json."""
    if not path.is_file():
        raise InvalidArgument.field(field_name, f"{MODEL_INDEX} is missing: a diffusers pipeline directory needs one")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidArgument.field(field_name, f"{MODEL_INDEX} is not valid JSON: {err}") from None
    if not isinstance(index, dict):
        raise InvalidArgument.field(field_name, f"{MODEL_INDEX} must hold a JSON object")
    pipeline_class = index.get("_class_name")
    if not isinstance(pipeline_class, str) or not pipeline_class:
        raise InvalidArgument.field(field_name, f"{MODEL_INDEX} has no '_class_name' string")
    components = []
    for name, value in sorted(index.items()):
        if name.startswith("_") or not isinstance(value, list):
            continue
        if len(value) != 2:
            raise InvalidArgument.field(
                field_name, f"{MODEL_INDEX}: component {name!r} must be [library, class], got {value!r}"
            )
        library, class_name = value
        if library is None and class_name is None:
            continue  # an optional component left out, e.g. safety_checker
        if not isinstance(library, str) or not isinstance(class_name, str):
            raise InvalidArgument.field(
                field_name, f"{MODEL_INDEX}: component {name!r} must be [library, class], got {value!r}"
            )
        components.append(Component(name, library, class_name))
    return pipeline_class, tuple(components)


def scan_model_dir(
    root: Path,
    source: str,
    *,
    require_model_index: bool = True,
    chunk_bytes: int = DEFAULT_HASH_CHUNK_BYTES,
    on_file: Callable[[str, int], None] | None = None,
) -> Manifest:
    """Scans every file under root/source into a manifest, refusing pickle formats and anything that escapes the
    root. Validation of every path happens before any hashing so a bad tree fails fast."""
    directory = resolve_under_root(root, source, "source")
    if not directory.is_dir():
        raise NotFound(f"source {source!r} does not exist under the models root (or is not a directory)")
    real_root = root.resolve()
    found: list[tuple[str, Path]] = []
    visited = {directory}
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames.sort()
        for name in list(dirnames):
            full = Path(dirpath) / name
            target = full.resolve()
            if real_root not in target.parents and target != real_root:
                rel = full.relative_to(directory).as_posix()
                raise InvalidArgument.field("source", f"{rel!r} is a symlink that leaves the models root")
            if target in visited:  # a symlink loop inside the root
                dirnames.remove(name)
            visited.add(target)
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(directory).as_posix()
            if name.startswith(".") and name.endswith(".tmp"):
                continue
            target = full.resolve()
            if real_root not in target.parents:
                raise InvalidArgument.field("source", f"{rel!r} is a symlink that leaves the models root")
            if not target.is_file():
                raise InvalidArgument.field("source", f"{rel!r} is not a regular file")
            if full.suffix.lower() in PICKLE_SUFFIXES:
                raise InvalidArgument.field(
                    "source",
                    f"{rel!r} is a pickle-format weight file; hotslot loads safetensors only "
                    "(convert it with `safetensors` or save with safe_serialization=True)",
                    reason=Reason.UNSAFE_FILE_FORMAT,
                )
            found.append((rel, target))
    if not found:
        raise InvalidArgument.field("source", f"{source!r} contains no files")
    pipeline_class = ""
    components: tuple[Component, ...] = ()
    if require_model_index:
        pipeline_class, components = parse_model_index(directory / MODEL_INDEX)
    entries = []
    for rel, target in sorted(found):
        digest, size = sha256_file(target, chunk_bytes)
        entries.append(FileEntry(rel, size, digest))
        if on_file is not None:
            on_file(rel, size)
    return Manifest(files=tuple(entries), pipeline_class=pipeline_class, components=components)
