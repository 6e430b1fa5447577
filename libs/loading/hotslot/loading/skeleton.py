"""Pipeline components built from their config files with parameters on the `meta` device (no memory, no
initialisation work), cached per (class, config digest); plus the resolution of the class names model_index.json
gives, restricted to diffusers and transformers.

A skeleton's parameters are meta tensors that `materialize` replaces by the loaded ones (`assign=True`). Its
buffers are real, small CPU tensors built by the model's own constructor: non-persistent buffers (CLIP's
`position_ids`, rotary tables) are not in the weight files, so their constructor-computed values are the only
correct ones. (This is what accelerate's `init_empty_weights(include_buffers=False)` does, which diffusers uses.)

Sharing rule of the cache: a skeleton is mutated by assignment, so the cached original is never handed out. Each
use gets a fresh copy from `Skeleton.instantiate`, which clones the module tree by a plan made once per skeleton
(new module objects, their own hook dicts, configs and buffers; see `Skeleton`) instead of `copy.deepcopy`, which
re-discovers the same tree through `__reduce_ex__` on every use (~70 ms for the three skeletons of the small SD
pipeline of bench/profile_materialize.py, ~4 ms by plan).

Plain components (tokenizers, schedulers) are cached beside the skeletons, per file identity: a tokenizer is
shared (read-only for a request); a scheduler is a fresh copy of a cached one every time, because
`set_timesteps` writes to it.
"""
from __future__ import annotations

import copy
import copyreg
import enum
import functools
import hashlib
import os
import threading
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import nn

from hotslot.errors import InvalidArgument, NotFound
from hotslot.loading.layout import ALLOWED_LIBRARIES

__all__ = [
    "DEFAULT_SKELETON_CACHE_ENTRIES",
    "Skeleton",
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


def keep_fp32_modules(cls: type[Any], dtype: torch.dtype | None) -> tuple[str, ...]:
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


# torch.nn.init's initialisers (and transformers' table of them), which a module constructor runs on its parameters:
# on a meta tensor they change nothing, yet each costs Python-level meta kernels (about half of building an SD 1.5
# skeleton). While `meta_parameters()` is in use they return a meta tensor untouched; any other tensor (in any
# thread) is initialised as before. (diffusers' `no_init_weights` skips them for every tensor, process-wide.)
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")
_original_inits: dict[str, Callable[..., Any]] = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS
                                                  if hasattr(nn.init, name)}


def _skipping_on_meta(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def init(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "meta":
            return tensor
        return original(tensor, *args, **kwargs)

    return init


_meta_inits = {name: _skipping_on_meta(fn) for name, fn in _original_inits.items()}
_hf_originals: dict[str, Callable[..., Any]] = {}


def _hf_init_table() -> dict[str, Callable[..., Any]] | None:
    """transformers' own table of torch's initialisers (recent versions call through it, not through nn.init)."""
    try:
        from transformers import initialization
    except ImportError:
        return None
    table = getattr(initialization, "TORCH_INIT_FUNCTIONS", None)
    return table if isinstance(table, dict) else None


def _install_meta_inits(on: bool) -> None:
    for name, fn in (_meta_inits if on else _original_inits).items():
        setattr(nn.init, name, fn)
    table = _hf_init_table()
    if table is None:
        return
    if on:
        for name, fn in list(table.items()):
            if callable(fn):
                _hf_originals[name] = fn
                table[name] = _skipping_on_meta(fn)
    else:
        table.update(_hf_originals)
        _hf_originals.clear()


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Within the block (in this thread), every parameter a module registers moves to the meta device; buffers
    stay real. The constructor's parameter tensors are allocated uninitialised and dropped at once, and the
    initialisers then run on meta tensors, which costs nothing."""
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            nn.Module.register_parameter = _register_parameter_on_meta  # type: ignore[method-assign]  # the patch
            _install_meta_inits(True)
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
                nn.Module.register_parameter = _original_register_parameter  # type: ignore[method-assign]
                _install_meta_inits(False)


def build_skeleton(cls: type[Any], config_dir: str | Path) -> nn.Module:
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


# --------------------------------------------------------------------------------------------------------------
# instantiating a cached skeleton

# Values a clone may share with the cached skeleton: immutable, or holding nothing a request could change.
_ATOMIC_TYPES = frozenset({
    type(None), bool, int, float, complex, str, bytes, range, type(Ellipsis), type(NotImplemented),
    torch.dtype, torch.device, torch.layout, torch.memory_format,
    types.FunctionType, types.BuiltinFunctionType, types.BuiltinMethodType,
})
# Containers a clone gets its own shallow copy of when everything in them is atomic (hook dicts, buffer-name sets).
_COPIED_TYPES = (dict, OrderedDict, set, list)
_OWN_ENTRIES = ("_parameters", "_buffers", "_modules")


def _atomic(value: Any) -> bool:
    kind = type(value)
    if kind in _ATOMIC_TYPES or isinstance(value, (type, enum.Enum)):
        return True
    if kind in (tuple, frozenset):
        return all(_atomic(v) for v in value)
    return False


class _Slot(NamedTuple):
    """A parameter or buffer of one module of the skeleton, and its state_dict key (None: non-persistent)."""

    module: int  # index into Skeleton.modules
    name: str
    key: str | None
    shape: torch.Size
    requires_grad: bool


def _stateless(value: object) -> bool:
    """An instance of a diffusers class with no state of its own (an empty `__dict__`, no slots): its attention
    processors. A copy would be indistinguishable, and diffusers itself shares one among many modules. (Only
    Python classes of diffusers qualify: a C type, an OrderedDict say, can keep state outside `__dict__`.)"""
    kind = type(value)
    return (
        kind.__module__.startswith("diffusers.")
        and not isinstance(value, (torch.Tensor, nn.Module, Collection))
        and getattr(value, "__dict__", None) == {}
        and not copyreg._slotnames(kind)  # type: ignore[attr-defined]
    )


def _plain_values(mapping: dict) -> bool:
    return all(_atomic(v) or (type(v) is list and all(_atomic(x) for x in v)) for v in mapping.values())


def _simple_config(value: Any) -> bool:
    """A diffusers model config (FrozenDict) holding only atomic values and lists of them, which `_copy_config`
    copies as deepcopy would, in a tenth of the time."""
    from diffusers.configuration_utils import FrozenDict

    if type(value) is not FrozenDict or not _plain_values(value):
        return False
    attrs = vars(value)
    return attrs.keys() <= value.keys() | {"_FrozenDict__frozen"} and _plain_values(attrs)


def _copy_config(config: OrderedDict) -> OrderedDict:
    """A copy of a `_simple_config` FrozenDict: its own lists, its items mirrored as attributes like the original."""
    items = {k: (v.copy() if type(v) is list else v) for k, v in config.items()}
    new = type(config).__new__(type(config))
    for k, v in items.items():
        _odict_setitem(new, k, v)  # FrozenDict.update refuses, and its __setitem__ is Python code: 2.5x slower
    attrs = vars(new)
    attrs.update(vars(config))
    attrs.update((k, items[k]) for k in vars(config).keys() & items.keys())
    return new


_odict_setitem = OrderedDict.__setitem__


class _ModulePlan(NamedTuple):
    copied: tuple[str, ...]  # __dict__ entries that get a shallow copy (hook dicts, buffer-name sets)
    configs: tuple[str, ...]  # __dict__ entries that are `_simple_config`s
    deep: tuple[str, ...]  # __dict__ entries that get copy.deepcopy (transformers configs, tensors, ...)
    children: tuple[tuple[str, int], ...]  # _modules entries: name, index into Skeleton.modules (-1: None)


def _clonable(module: nn.Module) -> bool:
    """Whether a shell plus a copy of `__dict__` is what deepcopy would make of this module: no slots, and no
    pickling hooks other than torch.nn's own (Module.__setstate__ only fills in attributes that already exist)."""
    cls = type(module)
    if copyreg._slotnames(cls):  # type: ignore[attr-defined]
        return False
    for hook in ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__", "__setstate__"):
        impl = getattr(cls, hook, None)
        if impl is not getattr(nn.Module, hook, None) and not getattr(impl, "__module__", "").startswith("torch.nn"):
            return False
    return True


def _loads_plainly(module: nn.Module) -> bool:
    """Whether `load_state_dict(assign=True)` would do nothing for this module beyond setting its parameters and
    persistent buffers: no own `_load_from_state_dict`, no load hooks, no extra state."""
    cls = type(module)
    return (
        cls._load_from_state_dict is nn.Module._load_from_state_dict
        and cls.get_extra_state is nn.Module.get_extra_state
        and not module._load_state_dict_pre_hooks
        and not module._load_state_dict_post_hooks
        and not module._state_dict_hooks
        and not module._state_dict_pre_hooks
    )


def _walk(
    module: nn.Module,
) -> tuple[tuple[nn.Module, ...], dict[int, int], tuple[_Slot, ...], tuple[_Slot, ...], frozenset[str]]:
    """(modules, id -> index, parameter slots, buffer slots, non-persistent buffer names) of a module tree, walked
    as named_modules(remove_duplicate=False) walks it: a module registered twice has two key prefixes."""
    modules: list[nn.Module] = []
    index: dict[int, int] = {}
    params: list[_Slot] = []
    buffers: list[_Slot] = []
    non_persistent: set[str] = set()

    def visit(sub: nn.Module, prefix: str) -> None:
        if id(sub) not in index:
            index[id(sub)] = len(modules)
            modules.append(sub)
        i = index[id(sub)]
        for name, p in sub._parameters.items():
            if p is not None:
                params.append(_Slot(i, name, prefix + name, p.shape, p.requires_grad))
        non_persistent.update(prefix + name for name in sub._non_persistent_buffers_set)
        for name, b in sub._buffers.items():
            if b is not None:
                persistent = name not in sub._non_persistent_buffers_set
                buffers.append(_Slot(i, name, prefix + name if persistent else None, b.shape, False))
        for name, child in sub._modules.items():
            if child is not None:
                visit(child, f"{prefix}{name}.")

    visit(module, "")
    return tuple(modules), index, tuple(params), tuple(buffers), frozenset(non_persistent)


class Skeleton:
    """A meta skeleton and what using it takes, worked out once: its module tree as a flat list, every parameter
    and buffer slot with its state_dict key, the expected keys, the non-persistent buffer names, and per module
    which `__dict__` entries a clone must not share.

    `instantiate()` clones the tree from that plan: per module a new object of the same class whose `__dict__` is a
    copy of the original's, with its own hook dicts and sets, its own copy of a diffusers config, deep copies of
    anything else mutable (a transformers config, once per instance as deepcopy's memo would; tensors), its own
    children, and the original's parameter and buffer dicts copied (the parameters are meta: assignment replaces
    them). Immutable values and stateless diffusers attention processors are shared. That is what
    `copy.deepcopy` builds, at a twentieth of the cost. Modules with slots or pickling hooks of their own
    (`clonable` False) are deep-copied instead.

    `plain_assign` is True when `load_state_dict(assign=True)` would only set the slots (no module has its own
    loading code, hooks or extra state), so assignment may set them directly."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        modules, index, params, buffers, non_persistent = _walk(module)
        self.modules: tuple[nn.Module, ...] = modules
        self.params: tuple[_Slot, ...] = params
        self.buffers: tuple[_Slot, ...] = buffers
        self.non_persistent: frozenset[str] = non_persistent
        self.keys: frozenset[str] = frozenset(module.state_dict().keys())
        slot_keys = {s.key for s in params} | {s.key for s in buffers if s.key is not None}
        self.plain_assign = slot_keys == self.keys and all(_loads_plainly(m) for m in modules)
        self.clonable = all(_clonable(m) for m in modules)
        self._plans = tuple(self._plan(m, index) for m in modules) if self.clonable else ()
        self._deep = tuple(i for i, plan in enumerate(self._plans) if plan.deep)
        # per module: its __dict__ (read, never written), the entries to copy (incl. the parameter and buffer
        # dicts, whose entries assignment replaces), its children, its configs
        self._recipe = tuple(
            (m.__dict__, (*plan.copied, "_parameters", "_buffers"), plan.children, plan.configs)
            for m, plan in zip(modules, self._plans, strict=True)
        ) if self.clonable else ()
        # the skeleton's buffer tensors, which an instance must replace by copies of its own
        self.buffer_ids: frozenset[int] = frozenset(id(modules[s.module]._buffers[s.name]) for s in buffers)
        # key renames that `materialize` worked out for weight files of this skeleton (unknown keys -> renames)
        self.renames: dict[frozenset[str], dict[str, str]] = {}

    @staticmethod
    def _plan(module: nn.Module, index: dict[int, int]) -> _ModulePlan:
        copied: list[str] = []
        configs: list[str] = []
        deep: list[str] = []
        for key, value in module.__dict__.items():
            if key in _OWN_ENTRIES or _atomic(value) or _stateless(value):
                continue
            if type(value) in _COPIED_TYPES:
                items = value.items() if isinstance(value, dict) else ((v, v) for v in value)
                if all(_atomic(k) and _atomic(v) for k, v in items):
                    copied.append(key)
                    continue
            (configs if _simple_config(value) else deep).append(key)
        children = tuple((n, -1 if c is None else index[id(c)]) for n, c in module._modules.items())
        return _ModulePlan(tuple(copied), tuple(configs), tuple(deep), children)

    def instantiate(self) -> tuple[nn.Module, tuple[nn.Module, ...]]:
        """A fresh copy of the skeleton: (root module, its modules in the order of `modules`). Its parameters are
        the skeleton's meta parameters (shared, and to be replaced by assignment); its buffers are the skeleton's
        tensors (shared, and to be replaced by copies, see `materialize`). `fresh()` gives a fully independent
        copy instead."""
        if not self.clonable:
            root = copy.deepcopy(self.module)
            return root, _walk(root)[0]
        # The hot loop of materialize (~1000 modules for an SD pipeline): everything it reads is precomputed.
        shells = tuple(object.__new__(m.__class__) for m in self.modules)
        for shell, (source, copied, children, configs) in zip(shells, self._recipe, strict=True):
            d = shell.__dict__
            d.update(source)
            for key in copied:
                d[key] = source[key].copy()
            d["_modules"] = {n: (shells[i] if i >= 0 else None) for n, i in children} if children else {}
            for key in configs:
                d[key] = _copy_config(source[key])
        if self._deep:
            # after every shell is filled, so a copied object that refers back to a module finds it complete
            memo: dict[int, Any] = {id(m): s for m, s in zip(self.modules, shells, strict=True)}
            for i in self._deep:
                d = shells[i].__dict__
                for key in self._plans[i].deep:
                    d[key] = copy.deepcopy(d[key], memo)
        return shells[0], shells

    def fresh(self) -> nn.Module:
        """A copy that shares nothing mutable with the skeleton: new meta parameters, copied buffers."""
        root, modules = self.instantiate()
        for slot in self.params:
            sub = modules[slot.module]
            p = sub._parameters[slot.name]
            assert p is not None  # a slot is a parameter the module has
            sub._parameters[slot.name] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for slot in self.buffers:
            sub = modules[slot.module]
            buffer = sub._buffers[slot.name]
            assert buffer is not None  # a slot is a buffer the module has
            sub._buffers[slot.name] = buffer.clone()
        return root


@dataclass
class SkeletonCacheStats:
    hits: int = 0
    misses: int = 0
    build_s: float = 0.0  # building on misses
    copy_s: float = 0.0  # fresh copies handed out by `get`
    plain_hits: int = 0  # plain components (tokenizers, schedulers) served from the cache
    plain_misses: int = 0


class SkeletonCache:
    """Meta skeletons per (class, config digest), LRU-bounded, and plain components per (class, file identity),
    bounded alike. `get` returns a fresh copy every time; `skeleton` the cached `Skeleton` (read-only: instantiate
    it); `plain_component` a tokenizer (shared) or a fresh scheduler."""

    def __init__(self, max_entries: int = DEFAULT_SKELETON_CACHE_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.stats = SkeletonCacheStats()
        self._entries: OrderedDict[tuple[str, str, str], Skeleton] = OrderedDict()
        self._plain: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, cls: type, config_dir: str | Path, *, digest: str | None = None) -> nn.Module:
        """A fresh skeleton of `cls` for the config in `config_dir`. Pass the config file's sha256 as `digest`
        when it is known (from the model's manifest) and the config file is not even read on a hit."""
        skeleton = self.skeleton(cls, config_dir, digest=digest)
        t0 = time.perf_counter()
        fresh = skeleton.fresh()
        with self._lock:
            self.stats.copy_s += time.perf_counter() - t0
        return fresh

    def prefetch(self, cls: type, config_dir: str | Path, *, digest: str | None = None) -> None:
        """Builds and caches the skeleton without handing out a copy (e.g. while the weights are being read)."""
        self.skeleton(cls, config_dir, digest=digest)

    def skeleton(self, cls: type, config_dir: str | Path, *, digest: str | None = None) -> Skeleton:
        """The cached Skeleton of `cls` for the config in `config_dir`, built on a miss. Never mutate it: use
        `Skeleton.instantiate` (as `materialize` does) or `get`."""
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
        skeleton = Skeleton(build_skeleton(cls, config_dir))
        with self._lock:
            self.stats.misses += 1
            self.stats.build_s += time.perf_counter() - t0
            self._remember(self._entries, key, skeleton)
        return skeleton

    def plain_component(self, cls: type, directory: str | Path) -> Any:
        """The component of `cls` in `directory` (a tokenizer, scheduler, image processor): tokenizers are built
        once per (class, files) and shared, since a request only reads them; a scheduler is a new instance
        every time (requests call its `set_timesteps`): a deep copy of one built once from its files and never
        handed out (a fifth of the cost of `from_config`); anything else is loaded from its files each time.
        Files are identified by inode, size and mtime: storage-cache views link to immutable content-addressed
        blobs, so equal files of different models are one entry."""
        from diffusers import SchedulerMixin
        from transformers import PreTrainedTokenizerBase

        if issubclass(cls, SchedulerMixin):
            kind = "scheduler"
        elif issubclass(cls, PreTrainedTokenizerBase):
            kind = "tokenizer"
        else:
            return load_plain_component(cls, directory)
        key = (kind, cls.__module__, cls.__qualname__, _files_identity(directory))
        with self._lock:
            cached = self._plain.get(key)
            if cached is not None:
                self._plain.move_to_end(key)
                self.stats.plain_hits += 1
        if cached is None:
            cached = load_plain_component(cls, directory)
            with self._lock:
                self.stats.plain_misses += 1
                self._remember(self._plain, key, cached)
        return cached if kind == "tokenizer" else copy.deepcopy(cached)

    def _remember(self, entries: OrderedDict, key: tuple, value: Any) -> None:
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._plain.clear()


def _files_identity(directory: str | Path) -> tuple[tuple[str, int, int, int, int], ...]:
    """(name, device, inode, size, mtime) of each file in `directory`, following links: changes whenever a file is
    replaced or rewritten, and is the same for two views whose files link to the same blobs."""
    out = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        raise NotFound(f"{directory} is missing") from None
    for entry in entries:
        try:
            st = entry.stat()
        except FileNotFoundError:
            continue  # a dangling link: from_pretrained will not read it either
        if entry.is_file():
            out.append((entry.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


def load_plain_component(cls: type, directory: str | Path) -> Any:
    """A component without weights (tokenizer, scheduler, image processor) from its small files, offline."""
    from_pretrained = getattr(cls, "from_pretrained", None)
    if from_pretrained is None:
        raise InvalidArgument(f"{cls.__name__} cannot be loaded from a directory (no from_pretrained)")
    return from_pretrained(str(directory), local_files_only=True)
