"""Where a diffusers pipeline directory keeps its parts: model_index.json's components, each component's config
file and its safetensors weight files. Pure JSON and file-system work (no torch), so the preloader child and the
parent agree on the same files without importing diffusers."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotslot.errors import InvalidArgument, NotFound
from hotslot.manifest import MODEL_INDEX, PICKLE_SUFFIXES

__all__ = [
    "ALLOWED_LIBRARIES",
    "SKIPPED_COMPONENTS",
    "ComponentLayout",
    "PipelineLayout",
    "read_layout",
    "weight_files",
]

# model_index.json may name classes from these libraries only; anything else would mean importing a module named
# by a file we did not write. (A diffusers pipeline sub-package such as "stable_diffusion" is resolved inside
# diffusers, see skeleton.resolve_class.)
ALLOWED_LIBRARIES = ("diffusers", "transformers")
# Component names become directory names under the view, so they must be plain identifiers.
_COMPONENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_LIBRARY_NAME = re.compile(r"[a-z_][a-z0-9_]{0,127}")
# Components hotslot never loads: the serving path has no safety checker (its 1.2 GB would be read for nothing),
# so its feature extractor is not needed either. The pipeline gets None for both.
SKIPPED_COMPONENTS = frozenset({"safety_checker", "feature_extractor"})
_VARIANT = re.compile(r"[A-Za-z0-9_-]{1,32}")
# The weight file stems diffusers and transformers write (diffusers models; transformers models).
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
CONFIG_NAMES = ("config.json", "scheduler_config.json", "tokenizer_config.json", "preprocessor_config.json")
SAFETENSORS_SUFFIX = ".safetensors"
SHARD_INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class ComponentLayout:
    """One entry of model_index.json: its library and class, its directory and the files in it that matter."""

    name: str
    library: str
    class_name: str
    directory: Path
    config_file: Path | None
    weight_files: tuple[Path, ...]

    @property
    def has_weights(self) -> bool:
        return bool(self.weight_files)


@dataclass(frozen=True)
class PipelineLayout:
    """A pipeline directory: the pipeline class, its components (None for ones model_index.json leaves out and
    for SKIPPED_COMPONENTS) and the other model_index.json settings (e.g. force_zeros_for_empty_prompt)."""

    root: Path
    pipeline_class: str
    components: dict[str, ComponentLayout | None]
    settings: dict[str, Any] = field(default_factory=dict)

    def weight_components(self) -> dict[str, ComponentLayout]:
        return {n: c for n, c in self.components.items() if c is not None and c.has_weights}

    def component(self, name: str) -> ComponentLayout:
        """The component `name`, which the pipeline has (KeyError for one it leaves out)."""
        comp = self.components[name]
        if comp is None:
            raise KeyError(name)
        return comp

    def relative(self, path: str | Path) -> str:
        """A path under the pipeline directory as manifests and the storage-cache name it ("unet/x.safetensors")."""
        return Path(path).relative_to(self.root).as_posix()


def _refuse_pickles(directory: Path, rel: str) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidArgument(
            f"{rel}/{pickles[0]} is a pickle-format weight file; hotslot loads safetensors only and never "
            "unpickles (convert it with `safetensors` or save with safe_serialization=True)"
        )


def weight_files(directory: Path, *, variant: str | None = None, rel: str | None = None) -> tuple[Path, ...]:
    """The safetensors files of one component directory, in shard order: those a `*.safetensors.index.json`
    names, or the single `diffusion_pytorch_model[.variant].safetensors` / `model[.variant].safetensors`, or the
    only `.safetensors` file there is. Empty when the directory holds no weights (tokenizer, scheduler).
    Refuses pickle-format files outright, even next to safetensors: the registry never admits them."""
    rel = rel or directory.name
    _refuse_pickles(directory, rel)
    suffix = f".{variant}{SAFETENSORS_SUFFIX}" if variant else SAFETENSORS_SUFFIX
    for stem in WEIGHT_STEMS:
        index = directory / f"{stem}{suffix}.index.json"
        if index.is_file():
            return _shards_from_index(index, directory, rel)
    for stem in WEIGHT_STEMS:
        single = directory / f"{stem}{suffix}"
        if single.is_file():
            return (single,)
    candidates = sorted(p for p in directory.iterdir() if p.name.endswith(SAFETENSORS_SUFFIX) and p.is_file())
    if not variant:
        # `unet.fp16.safetensors` is a variant of `unet.safetensors`; without a variant asked, ignore variants
        candidates = [p for p in candidates if p.name.count(".") == 1]
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise InvalidArgument(f"{rel}: several safetensors files and no shard index to order them ({names})")
    return tuple(candidates)


def _shards_from_index(index: Path, directory: Path, rel: str) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise InvalidArgument(f"{rel}/{index.name} is not a valid shard index: {err}") from None
    shards = []
    for name in names:
        if not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(SAFETENSORS_SUFFIX):
            raise InvalidArgument(f"{rel}/{index.name} names {name!r}; shards must be .safetensors files beside it")
        path = directory / name
        if not path.is_file():
            raise NotFound(f"{rel}/{name} (listed in {index.name}) is missing")
        shards.append(path)
    return tuple(shards)


def _read_model_index(root: Path) -> dict[str, Any]:
    path = root / MODEL_INDEX
    if not root.is_dir():
        raise NotFound(f"model directory {root} does not exist")
    if not path.is_file():
        raise NotFound(f"{root}/{MODEL_INDEX} is missing: a diffusers pipeline directory needs one")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidArgument(f"{root}/{MODEL_INDEX} is not valid JSON: {err}") from None
    if not isinstance(index, dict):
        raise InvalidArgument(f"{root}/{MODEL_INDEX} must hold a JSON object")
    return index


def read_layout(view_path: str | Path, *, variant: str | None = None) -> PipelineLayout:
    """Reads model_index.json under `view_path` and finds each component's config and weight files.

    Raises NotFound for a missing directory, model_index.json or component directory; InvalidArgument for a
    malformed model_index.json or pickle-format weights. Library and class names are only checked for shape
    here; `skeleton.resolve_class` decides whether they may be used (diffusers/transformers only).
    """
    root = Path(view_path)
    if variant is not None and not _VARIANT.fullmatch(variant):
        raise InvalidArgument.field("variant", f"{variant!r} is not a valid weight variant name")
    index = _read_model_index(root)
    pipeline_class = index.get("_class_name")
    if not isinstance(pipeline_class, str) or not _CLASS_NAME.fullmatch(pipeline_class):
        raise InvalidArgument(f"{root}/{MODEL_INDEX}: '_class_name' must name a pipeline class, got {pipeline_class!r}")
    components: dict[str, ComponentLayout | None] = {}
    settings: dict[str, Any] = {}
    for name, value in sorted(index.items()):
        if name.startswith("_"):
            continue
        if not isinstance(value, list):
            settings[name] = value
            continue
        if len(value) != 2:
            raise InvalidArgument(f"{root}/{MODEL_INDEX}: component {name!r} must be [library, class], got {value!r}")
        library, class_name = value
        if (library is None and class_name is None) or name in SKIPPED_COMPONENTS:
            components[name] = None
            continue
        components[name] = _component(root, name, library, class_name, variant)
    return PipelineLayout(root=root, pipeline_class=pipeline_class, components=components, settings=settings)


def _component(root: Path, name: str, library: Any, class_name: Any, variant: str | None) -> ComponentLayout:
    where = f"{root}/{MODEL_INDEX}: component {name!r}"
    if not _COMPONENT_NAME.fullmatch(name):
        raise InvalidArgument(f"{where}: not a plain component name")
    if not isinstance(library, str) or not _LIBRARY_NAME.fullmatch(library):
        raise InvalidArgument(f"{where}: library {library!r} is not a plain module name")
    if not isinstance(class_name, str) or not _CLASS_NAME.fullmatch(class_name):
        raise InvalidArgument(f"{where}: class {class_name!r} is not a plain class name")
    directory = root / name
    if not directory.is_dir():
        # Components without files (a scheduler could, in principle, be configured inline) do not exist in
        # diffusers' layout; every listed component has a directory.
        raise NotFound(f"{where}: directory {directory} is missing")
    config = next((directory / c for c in CONFIG_NAMES if (directory / c).is_file()), None)
    weights = weight_files(directory, variant=variant, rel=f"{root.name}/{name}")
    return ComponentLayout(name, library, class_name, directory, config, weights)
