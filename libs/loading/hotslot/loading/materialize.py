"""Turns meta skeletons plus loaded state dicts into live modules (the loaded tensors become the parameters,
nothing is copied), and assembles the diffusers pipeline from them.

A pipeline gets fresh instances of the cached skeletons (`Skeleton.instantiate`) with the tensors put straight into
the parameter slots the skeleton lists, which is what `load_state_dict(assign=True)` does for modules without
loading code of their own; modules with some (BatchNorm, load hooks) go through `load_state_dict` itself. That,
cached key sets and cached tokenizers/scheduler prototypes is what makes materializing an SD-sized pipeline cost
less than a memcpy of its weights (bench/profile_materialize.py).

Key names: the safetensors names must become `module.state_dict()` names. Three differences occur in practice and
are handled: diffusers' legacy attention-block names (`query/key/value/proj_attn`, via the model's own
`_fix_state_dict_keys_on_load`), transformers' renamings between versions (transformers 5 drops CLIP's
`text_model.` prefix that files written by transformers 4 carry; its own rename rules are applied), and
non-persistent buffers that old files contain (CLIP's `position_ids`), which are dropped because the skeleton's
constructor already computed them. Anything else that does not match fails loudly, as does any parameter or
buffer still on `meta` afterwards.
"""
from __future__ import annotations

import functools
import inspect
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
from torch import nn

from hotslot.errors import InvalidArgument
from hotslot.loading.layout import SKIPPED_COMPONENTS, PipelineLayout
from hotslot.loading.skeleton import (
    Skeleton,
    SkeletonCache,
    is_model_class,
    resolve_class,
    resolve_pipeline_class,
)

__all__ = [
    "assemble_pipeline",
    "build_component",
    "build_pipeline",
    "materialize_module",
    "materialize_skeleton",
    "meta_tensors",
]

# How many offending names an error message lists before it says "and N more".
MAX_NAMES_IN_ERROR = 8


def _names(names: list[str] | set[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:MAX_NAMES_IN_ERROR])
    more = len(names) - MAX_NAMES_IN_ERROR
    return f"{shown} and {more} more" if more > 0 else shown


def meta_tensors(module: nn.Module) -> list[str]:
    """Names of parameters and buffers (including non-persistent ones) still on the meta device."""
    out = [n for n, p in module.named_parameters(remove_duplicate=False) if p.is_meta]
    out += [n for n, b in module.named_buffers(remove_duplicate=False) if b.is_meta]
    return out


def _transformers_renames(module: nn.Module, keys: list[str], expected: frozenset[str]) -> dict[str, str]:
    """old name -> new name for keys transformers' own loader would rename for this model (transformers 5:
    `conversion_mapping`); falls back to adding/stripping `base_model_prefix` on older transformers."""
    prefix = getattr(module, "base_model_prefix", "") or ""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        renames = {}
        for k in keys:
            if prefix and k.startswith(prefix + ".") and k[len(prefix) + 1 :] in expected:
                renames[k] = k[len(prefix) + 1 :]
            elif prefix and f"{prefix}.{k}" in expected:
                renames[k] = f"{prefix}.{k}"
        return renames
    transforms = get_model_conversion_mapping(module, None, None)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_sd = dict.fromkeys(expected, True)
    renames = {}
    for k in keys:
        new, converter = rename_source_key(k, renamings, converters, prefix or None, meta_sd)
        if converter is not None:
            # a converter changes tensor contents (merges, splits, permutes); that would copy, and we refuse it
            raise InvalidArgument(
                f"weight {k!r} needs transformers' tensor conversion {converter!r} to load into "
                f"{type(module).__name__}; hotslot loads only weights stored in the model's own layout"
            )
        if new != k:
            renames[k] = new
    return renames


def _cached_renames(skeleton: Skeleton, unknown: list[str]) -> dict[str, str]:
    """`_transformers_renames`, once per skeleton and set of unknown keys: the same weight files (a text encoder
    written by transformers 4, shared by many fine-tunes) come back again and again, and the rules are regex work
    per key. They read only the class and config, so the skeleton's own module answers."""
    key = frozenset(unknown)
    renames = skeleton.renames.get(key)
    if renames is None:
        renames = skeleton.renames[key] = _transformers_renames(skeleton.module, unknown, skeleton.keys)
    return renames


def _align_keys(
    skeleton: Skeleton, module: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str
) -> tuple[Mapping[str, torch.Tensor], bool]:
    """`state_dict` with its names turned into the module's state_dict names, and whether the model's own key
    fixer ran (diffusers' `_fix_state_dict_keys_on_load`, which may also change the module, so its keys must be
    asked again)."""
    from transformers import PreTrainedModel

    expected = skeleton.keys
    if state_dict.keys() == expected:
        return state_dict, False  # the common case: a file written by the same library version
    sd = dict(state_dict)
    fixed = False
    fix = getattr(module, "_fix_state_dict_keys_on_load", None)
    if callable(fix) and not isinstance(module, PreTrainedModel):
        fix(sd)  # diffusers: legacy attention block names, renamed in place
        fixed = True
    if isinstance(module, PreTrainedModel):
        unknown = [k for k in sd if k not in expected]
        if unknown:
            for old, new in _cached_renames(skeleton, unknown).items():
                if new in sd and new != old:
                    raise InvalidArgument(f"{name}: weights {old!r} and {new!r} both map to {new!r}")
                sd[new] = sd.pop(old)
    unexpected = set(sd) - expected
    if unexpected:
        ignore = [re.compile(p) for p in (getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ())]
        for k in list(unexpected):
            if k in skeleton.non_persistent or any(p.search(k) for p in ignore):
                del sd[k]
                unexpected.discard(k)
    if unexpected:
        raise InvalidArgument(
            f"{name}: the weight files hold tensors {type(module).__name__} does not have: {_names(unexpected)}"
        )
    return sd, fixed


def _assign(
    skeleton: Skeleton, modules: tuple[nn.Module, ...], sd: Mapping[str, torch.Tensor], name: str
) -> list[str]:
    """What `load_state_dict(sd, strict=False, assign=True)` does for modules without loading code of their own
    (`Skeleton.plain_assign`), straight into the slots: each loaded tensor becomes the parameter (wrapped as an
    nn.Parameter, no copy) or the persistent buffer. Returns the keys `sd` lacks; their parameters get meta
    placeholders of their own (never the skeleton's). Raises InvalidArgument on shape mismatches, worded as torch
    words them."""
    missing: list[str] = []
    mismatched: list[str] = []
    make = torch.Tensor._make_subclass  # what nn.Parameter(t) does for a plain tensor, minus a Python frame
    for i, pname, slot_key, shape, requires_grad in skeleton.params:
        key = cast(str, slot_key)  # parameters are persistent: only buffers may have no state_dict key
        t = sd.get(key)
        if t is None:
            missing.append(key)
            placeholder = modules[i]._parameters[pname]  # the skeleton's own: replace it by one of our own
            modules[i]._parameters[pname] = nn.Parameter(
                torch.empty_like(placeholder, device="meta"), requires_grad  # type: ignore[arg-type]  # a slot is set
            )
        elif t.shape != shape:
            mismatched.append(_size_mismatch(key, t.shape, shape))
        elif type(t) is torch.Tensor:
            modules[i]._parameters[pname] = make(nn.Parameter, t, requires_grad)
        elif isinstance(t, nn.Parameter):
            modules[i]._parameters[pname] = t.requires_grad_(requires_grad)  # type: ignore[assignment]  # itself
        else:
            modules[i]._parameters[pname] = nn.Parameter(t, requires_grad)
    for i, bname, buffer_key, shape, _ in skeleton.buffers:
        if buffer_key is None:
            continue  # non-persistent: the constructor's value, copied below
        t = sd.get(buffer_key)
        if t is None:
            missing.append(buffer_key)
        elif t.shape != shape:
            mismatched.append(_size_mismatch(buffer_key, t.shape, shape))
        else:
            modules[i]._buffers[bname] = t
    if mismatched:
        cls = type(modules[0]).__name__
        details = "\n\t".join(mismatched)
        raise InvalidArgument(
            f"{name}: weights do not fit {cls}: Error(s) in loading state_dict for {cls}:\n\t{details}"
        )
    return missing


def _size_mismatch(key: str, loaded: torch.Size, current: torch.Size) -> str:
    return (
        f"size mismatch for {key}: copying a param with shape {loaded} from checkpoint, "
        f"the shape in current model is {current}."
    )


def _load_generic(module: nn.Module, sd: Mapping[str, torch.Tensor], name: str) -> list[str]:
    """`load_state_dict(assign=True)` itself, for modules with loading code of their own. Returns missing keys."""
    missing = set(module.state_dict().keys()) - set(sd)
    try:
        # strict unless keys are missing; those may be tied weights, and the meta check catches the rest
        module.load_state_dict(sd, strict=not missing, assign=True)
    except RuntimeError as err:
        raise InvalidArgument(f"{name}: weights do not fit {type(module).__name__}: {err}") from None
    return sorted(missing)


def _own_buffers(
    buffers: Iterable[tuple[dict[str, torch.Tensor | None], str]],
    device: torch.device,
    dtype: torch.dtype | None,
    shared: frozenset[int],
) -> None:
    """Buffers onto the weights' device (floating ones cast to `dtype` when given, as `module.to(dtype)` would),
    and a copy of each one that is still the skeleton's tensor (id in `shared`), so no two pipelines share one."""
    for where, bname in buffers:
        buf = where[bname]
        if buf is None or buf.is_meta:
            continue
        target = dtype if dtype is not None and buf.is_floating_point() else buf.dtype
        if id(buf) in shared or buf.device != device or buf.dtype != target:
            where[bname] = buf.to(device=device, dtype=target, copy=True)


def _materialize(
    skeleton: Skeleton,
    root: nn.Module,
    modules: tuple[nn.Module, ...],
    state_dict: Mapping[str, torch.Tensor],
    name: str,
    dtype: torch.dtype | None,
) -> nn.Module:
    sd, fixed = _align_keys(skeleton, root, state_dict, name)
    generic = fixed or not skeleton.plain_assign
    missing = _load_generic(root, sd, name) if generic else _assign(skeleton, modules, sd, name)
    tied = bool(missing or getattr(root, "_tied_weights_keys", None))
    if tied:
        tie = getattr(root, "tie_weights", None)
        if callable(tie):
            tie()
    device = next(iter(sd.values())).device if sd else torch.device("cpu")
    shared = skeleton.buffer_ids if root is not skeleton.module else frozenset()
    if generic or tied:
        # the tree may have changed (the key fixer, tie_weights): walk it as it is now
        _own_buffers(((sub._buffers, b) for sub in root.modules() for b in list(sub._buffers)), device, dtype, shared)
        left = meta_tensors(root)
    else:
        _own_buffers(((modules[s.module]._buffers, s.name) for s in skeleton.buffers), device, dtype, shared)
        # nothing was missing, so only a meta tensor among the loaded ones could be left on meta
        left = [k for k, t in sd.items() if t.is_meta]
        left += [s.key or s.name for s in skeleton.buffers
                 if modules[s.module]._buffers[s.name].is_meta]  # type: ignore[union-attr]  # a slot is set
    if left:
        raise InvalidArgument(
            f"{name}: no weights for {_names(left)} of {type(root).__name__} (still on the meta device)"
        )
    return root


def materialize_module(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    name: str = "module",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Assigns `state_dict` to the meta skeleton `module` in place (the tensors become its parameters, no copy)
    and returns it in eval mode. Non-persistent buffers move to the weights' device (cast to `dtype` when
    floating and a dtype is given, as `module.to(dtype)` would). Raises InvalidArgument when names or shapes do
    not match or anything is left on meta."""
    skeleton = Skeleton(module)
    return _materialize(skeleton, module, skeleton.modules, state_dict, name, dtype).eval()


def materialize_skeleton(
    skeleton: Skeleton,
    state_dict: Mapping[str, torch.Tensor],
    *,
    name: str = "module",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A new module from the cached `skeleton` (left untouched) with `state_dict` assigned, as
    `materialize_module` would make of a deep copy of it, in eval mode."""
    root, modules = skeleton.instantiate()
    module = _materialize(skeleton, root, modules, state_dict, name, dtype)
    return module.eval() if module.training else module  # cached skeletons are built in eval mode


@functools.lru_cache(maxsize=256)
def _init_parameters(cls: type) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(cls.__init__).parameters  # type: ignore[misc]  # the class's own constructor


def assemble_pipeline(layout: PipelineLayout, components: Mapping[str, Any]) -> Any:
    """`PipelineClass(**components)` for the class model_index.json names, with safety_checker and
    feature_extractor None, requires_safety_checker False, and model_index.json's other settings (e.g. SDXL's
    force_zeros_for_empty_prompt) passed where the constructor takes them."""
    cls = resolve_pipeline_class(layout.pipeline_class)
    params = _init_parameters(cls)
    kwargs: dict[str, Any] = {}
    for pname, param in params.items():
        if pname == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if pname in components:
            kwargs[pname] = components[pname]
        elif pname in layout.components or pname in SKIPPED_COMPONENTS:
            kwargs[pname] = None
        elif pname in layout.settings:
            kwargs[pname] = layout.settings[pname]
        elif param.default is param.empty:
            raise InvalidArgument(f"{layout.root}: {cls.__name__} needs {pname!r}, which model_index.json lacks")
    if "requires_safety_checker" in params:
        kwargs["requires_safety_checker"] = False
    pipeline = cls(**kwargs)
    pipeline.register_to_config(_name_or_path=str(layout.root))
    return pipeline


def build_component(
    layout: PipelineLayout,
    cname: str,
    state_dict: Mapping[str, torch.Tensor],
    *,
    skeletons: SkeletonCache,
    dtype: torch.dtype | None = None,
    config_digest: str | None = None,
) -> nn.Module:
    """The module of the weight component `cname`: a fresh instance of its cached skeleton with `state_dict`
    assigned (no copy). Two calls over the same tensors give two module trees sharing every weight."""
    comp = layout.components[cname]
    assert comp is not None
    skeleton = skeletons.skeleton(resolve_class(comp.library, comp.class_name), comp.directory, digest=config_digest)
    return materialize_skeleton(skeleton, state_dict, name=cname, dtype=dtype)


def build_pipeline(
    layout: PipelineLayout,
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    skeletons: SkeletonCache | None = None,
    dtype: torch.dtype | None = None,
    config_digests: Mapping[str, str] | None = None,
    modules: Mapping[str, nn.Module] | None = None,
) -> tuple[Any, float]:
    """The pipeline from loaded weights: skeletons and plain components from `skeletons` (cached: tokenizers
    shared, schedulers fresh copies), assignment of `state_dicts[component]` to a fresh instance
    of each skeleton, assembly. Returns (pipeline, seconds).
    `config_digests` (component -> sha256 of its config.json, from the manifest) spares hashing the configs.
    `modules` (component -> module) are used as they are instead: modules another pipeline holds too."""
    t0 = time.perf_counter()
    skeletons = SkeletonCache() if skeletons is None else skeletons
    components: dict[str, Any] = {}
    for cname, comp in layout.components.items():
        if comp is None:
            continue
        if modules and cname in modules:
            components[cname] = modules[cname]
            continue
        cls = resolve_class(comp.library, comp.class_name)
        if not is_model_class(cls):
            components[cname] = skeletons.plain_component(cls, comp.directory)
            continue
        if cname not in state_dicts:
            raise InvalidArgument(f"{layout.root}: no weights were loaded for component {cname!r}")
        components[cname] = build_component(layout, cname, state_dicts[cname], skeletons=skeletons, dtype=dtype,
                                            config_digest=(config_digests or {}).get(cname))
    pipeline = assemble_pipeline(layout, components)
    return pipeline, time.perf_counter() - t0
