"""Pipeline components built from their config files with parameters on the `meta` device (no memory, no
initialisation work), cached per (class, config digest); plus the resolution of the class names model_index.json
gives, restricted to diffusers and transformers.

A skeleton's parameters are meta tensors that `materialize` replaces by the loaded ones (`assign=True`). Its
buffers are real, small CPU tensors built by the model's own constructor: non-persistent buffers (CLIP's
`position_ids`, rotary tables) are not in the weight files, so their constructor-computed values are the only
correct ones. (This is what accelerate's `init_empty_weights(include_buffers=False)` does, which diffusers uses.)

Sharing rule of the cache: a skeleton is mutated by assignment, so `SkeletonCache.get` returns a fresh deep copy
each time; the cached original is never handed out.
"""
from __future__ import annotations

import copy
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from hotslot.errors import InvalidArgument, NotFound
from hotslot.loading.layout import ALLOWED_LIBRARIES

__all__ = [
    "DEFAULT_SKELETON_CACHE_ENTRIES",
    "SkeletonCache",
    "SkeletonCacheStats",
    "build_skeleton",
    "config_digest",
    "is_model_class",
    "keep_fp32_modules",
    "load_plain_component",
    "meta_parameters",
    "resolve_class",
    "resolve_pipeline_class",
]

# Distinct (class, config) skeletons kept. A skeleton costs a few kB of Python objects plus its real buffers
# (small), so this bounds memory only loosely; it matters for a fleet of hundreds of distinct architectures.
DEFAULT_SKELETON_CACHE_ENTRIES = 64


# --------------------------------------------------------------------------------------------------------------
# class resolution


def _library(library: str) -> ModuleType:
    if library == "diffusers":
        import diffusers

        return diffusers
    if library == "transformers":
        import transformers

        return transformers
    # diffusers' own layout names pipeline sub-packages as libraries (SD 1.x: ["stable_diffusion",
    # "StableDiffusionSafetyChecker"]). Resolve those inside diffusers.pipelines only; nothing is imported by a
    # name outside the two libraries.
    import diffusers.pipelines

    module = getattr(diffusers.pipelines, library, None) if library.isidentifier() else None
    if isinstance(module, ModuleType) and module.__name__.startswith("diffusers.pipelines."):
        return module
    raise InvalidArgument(
        f"library {library!r} is not allowed: model_index.json may name classes from "
        f"{' or '.join(ALLOWED_LIBRARIES)} only"
    )


def resolve_class(library: str, class_name: str) -> type:
    """The class model_index.json names as [library, class_name], from diffusers or transformers only."""
    if not class_name.isidentifier() or class_name.startswith("_"):
        raise InvalidArgument(f"{class_name!r} is not a class name")
    module = _library(library)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise InvalidArgument(f"{library} has no class {class_name!r} (diffusers or transformers too old?)")
    return cls


def resolve_pipeline_class(class_name: str) -> type:
    """The diffusers pipeline class named by model_index.json's `_class_name`."""
    from diffusers import DiffusionPipeline

    cls = resolve_class("diffusers", class_name)
    if not issubclass(cls, DiffusionPipeline):
        raise InvalidArgument(f"{class_name!r} is not a diffusers pipeline class")
    return cls


def is_model_class(cls: type) -> bool:
    """Whether instances hold weights loaded from safetensors (diffusers models, transformers models)."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    return issubclass(cls, (ModelMixin, PreTrainedModel))


def keep_fp32_modules(cls: type, dtype: torch.dtype | None) -> tuple[str, ...]:
    """Module names whose weights stay float32 when loading as `dtype`, as diffusers' and transformers' own
    from_pretrained decide it (diffusers: whenever a dtype is given; transformers: for fp16, and the `_strict`
    list for bf16 as well). A weight matches when one of these is a component of its dotted name."""
    if dtype is None:
        return ()
    from diffusers import ModelMixin

    names: set[str] = set()
    if issubclass(cls, ModelMixin):
        names.update(cls._keep_in_fp32_modules or ())
    else:
        if dtype == torch.float16:
            names.update(getattr(cls, "_keep_in_fp32_modules", None) or ())
        if dtype in (torch.float16, torch.bfloat16):
            names.update(getattr(cls, "_keep_in_fp32_modules_strict", None) or ())
    return tuple(sorted(names))


# --------------------------------------------------------------------------------------------------------------
# building on meta

_meta_state = threading.local()
_patch_lock = threading.Lock()
_patch_users = 0
_original_register_parameter = nn.Module.register_parameter


def _register_parameter_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _original_register_parameter(self, name, param)
    # Only threads inside `meta_parameters()` are affected, so inference running in another thread while a
    # skeleton is built never gets a meta parameter.
    if param is None or not getattr(_meta_state, "active", False):
        return
    registered = self._parameters[name]
    if registered is not None and registered.device.type != "meta":
        self._parameters[name] = type(registered)(registered.to("meta"), requires_grad=registered.requires_grad)


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Within the block (in this thread), every parameter a module registers moves to the meta device; buffers
    stay real. The constructor's parameter tensors are allocated uninitialised and dropped at once, and the
    initialisers then run on meta tensors, which costs nothing."""
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            nn.Module.register_parameter = _register_parameter_on_meta
        _patch_users += 1
    previous = getattr(_meta_state, "active", False)
    _meta_state.active = True
    try:
        yield
    finally:
        _meta_state.active = previous
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                nn.Module.register_parameter = _original_register_parameter


def build_skeleton(cls: type, config_dir: str | Path) -> nn.Module:
    """Builds a diffusers or transformers model of class `cls` from the config.json in `config_dir`, parameters
    on meta, buffers real, in eval mode."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    config_dir = Path(config_dir)
    if not (config_dir / "config.json").is_file():
        raise NotFound(f"{config_dir}/config.json is missing")
    with meta_parameters():
        if issubclass(cls, ModelMixin):
            config = cls.load_config(str(config_dir), local_files_only=True)
            module = cls.from_config(config)
        elif issubclass(cls, PreTrainedModel):
            config = cls.config_class.from_pretrained(str(config_dir), local_files_only=True)
            module = cls(config)
        else:
            raise InvalidArgument(f"{cls.__name__} is not a diffusers or transformers model class")
    return module.eval()


def config_digest(config_file: str | Path) -> str:
    """sha256 of a config file's bytes: the skeleton cache key (equal configs build equal skeletons)."""
    return hashlib.sha256(Path(config_file).read_bytes()).hexdigest()


@dataclass
class SkeletonCacheStats:
    hits: int = 0
    misses: int = 0
    build_s: float = 0.0  # building on misses
    copy_s: float = 0.0  # deep copies handed out


class SkeletonCache:
    """Meta skeletons per (class, config digest), LRU-bounded; `get` returns a fresh deep copy every time."""

    def __init__(self, max_entries: int = DEFAULT_SKELETON_CACHE_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.stats = SkeletonCacheStats()
        self._entries: OrderedDict[tuple[str, str, str], nn.Module] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, cls: type, config_dir: str | Path, *, digest: str | None = None) -> nn.Module:
        """A fresh skeleton of `cls` for the config in `config_dir`. Pass the config file's sha256 as `digest`
        when it is known (from the model's manifest) and the config file is not even read on a hit."""
        skeleton = self._cached(cls, config_dir, digest)
        t0 = time.perf_counter()
        fresh = copy.deepcopy(skeleton)
        with self._lock:
            self.stats.copy_s += time.perf_counter() - t0
        return fresh

    def prefetch(self, cls: type, config_dir: str | Path, *, digest: str | None = None) -> None:
        """Builds and caches the skeleton without handing out a copy (e.g. while the weights are being read)."""
        self._cached(cls, config_dir, digest)

    def _cached(self, cls: type, config_dir: str | Path, digest: str | None) -> nn.Module:
        if digest is None:
            path = Path(config_dir) / "config.json"
            try:
                digest = config_digest(path)
            except FileNotFoundError:
                raise NotFound(f"{path} is missing") from None
        key = (cls.__module__, cls.__qualname__, digest)
        with self._lock:
            skeleton = self._entries.get(key)
            if skeleton is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return skeleton
        t0 = time.perf_counter()
        skeleton = build_skeleton(cls, config_dir)
        with self._lock:
            self.stats.misses += 1
            self.stats.build_s += time.perf_counter() - t0
            self._entries[key] = skeleton
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return skeleton

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def load_plain_component(cls: type, directory: str | Path) -> Any:
    """A component without weights (tokenizer, scheduler, image processor) from its small files, offline."""
    from_pretrained = getattr(cls, "from_pretrained", None)
    if from_pretrained is None:
        raise InvalidArgument(f"{cls.__name__} cannot be loaded from a directory (no from_pretrained)")
    return from_pretrained(str(directory), local_files_only=True)
