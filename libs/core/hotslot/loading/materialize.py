"""Turns meta skeletons plus loaded state dicts into live modules (`load_state_dict(assign=True)`: the loaded
tensors become the parameters, nothing is copied), and assembles the diffusers pipeline from them.

Key names: the safetensors names must become `module.state_dict()` names. Three differences occur in practice and
are handled: diffusers' legacy attention-block names (`query/key/value/proj_attn`, via the model's own
`_fix_state_dict_keys_on_load`), transformers' renamings between versions (transformers 5 drops CLIP's
`text_model.` prefix that files written by transformers 4 carry; its own rename rules are applied), and
non-persistent buffers that old files contain (CLIP's `position_ids`), which are dropped because the skeleton's
constructor already computed them. Anything else that does not match fails loudly, as does any parameter or
buffer still on `meta` afterwards.
"""
from __future__ import annotations

import inspect
import re
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hotslot.errors import InvalidArgument
from hotslot.loading.layout import SKIPPED_COMPONENTS, PipelineLayout
from hotslot.loading.skeleton import (
    SkeletonCache,
    is_model_class,
    load_plain_component,
    resolve_class,
    resolve_pipeline_class,
)

__all__ = [
    "assemble_pipeline",
    "build_pipeline",
    "materialize_module",
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


def _non_persistent_buffers(module: nn.Module) -> set[str]:
    names = set()
    for prefix, sub in module.named_modules():
        for b in sub._non_persistent_buffers_set:
            names.add(f"{prefix}.{b}" if prefix else b)
    return names


def _transformers_renames(module: nn.Module, keys: list[str], expected: set[str]) -> dict[str, str]:
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


def _align_keys(module: nn.Module, state_dict: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    from transformers import PreTrainedModel

    expected = set(module.state_dict().keys())
    sd = dict(state_dict)
    if set(sd) == expected:
        return sd  # the common case: a file written by the same library version
    fix = getattr(module, "_fix_state_dict_keys_on_load", None)
    if callable(fix) and not isinstance(module, PreTrainedModel):
        fix(sd)  # diffusers: legacy attention block names, renamed in place
    if isinstance(module, PreTrainedModel):
        unknown = [k for k in sd if k not in expected]
        if unknown:
            for old, new in _transformers_renames(module, unknown, expected).items():
                if new in sd and new != old:
                    raise InvalidArgument(f"{name}: weights {old!r} and {new!r} both map to {new!r}")
                sd[new] = sd.pop(old)
    unexpected = set(sd) - expected
    if unexpected:
        droppable = _non_persistent_buffers(module)
        ignore = [re.compile(p) for p in (getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ())]
        for k in list(unexpected):
            if k in droppable or any(p.search(k) for p in ignore):
                del sd[k]
                unexpected.discard(k)
    if unexpected:
        raise InvalidArgument(
            f"{name}: the weight files hold tensors {type(module).__name__} does not have: {_names(unexpected)}"
        )
    return sd


def materialize_module(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    name: str = "module",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Assigns `state_dict` to the meta skeleton `module` (the tensors become its parameters, no copy) and returns
    it in eval mode. Non-persistent buffers move to the weights' device (cast to `dtype` when floating and a
    dtype is given, as `module.to(dtype)` would). Raises InvalidArgument when names or shapes do not match or
    anything is left on meta."""
    sd = _align_keys(module, dict(state_dict), name)
    missing = set(module.state_dict().keys()) - set(sd)
    try:
        # strict unless keys are missing; those may be tied weights, and the meta check below catches the rest
        module.load_state_dict(sd, strict=not missing, assign=True)
    except RuntimeError as err:
        raise InvalidArgument(f"{name}: weights do not fit {type(module).__name__}: {err}") from None
    if missing or getattr(module, "_tied_weights_keys", None):
        tie = getattr(module, "tie_weights", None)
        if callable(tie):
            tie()
    device = next(iter(sd.values())).device if sd else torch.device("cpu")
    for sub in module.modules():
        for bname, buf in list(sub._buffers.items()):
            if buf is None or buf.is_meta:
                continue
            target_dtype = dtype if dtype is not None and buf.is_floating_point() else buf.dtype
            if buf.device != device or buf.dtype != target_dtype:
                sub._buffers[bname] = buf.to(device=device, dtype=target_dtype)
    left = meta_tensors(module)
    if left:
        raise InvalidArgument(
            f"{name}: no weights for {_names(left)} of {type(module).__name__} (still on the meta device)"
        )
    return module.eval()


def assemble_pipeline(layout: PipelineLayout, components: Mapping[str, Any]) -> Any:
    """`PipelineClass(**components)` for the class model_index.json names, with safety_checker and
    feature_extractor None, requires_safety_checker False, and model_index.json's other settings (e.g. SDXL's
    force_zeros_for_empty_prompt) passed where the constructor takes them."""
    cls = resolve_pipeline_class(layout.pipeline_class)
    params = inspect.signature(cls.__init__).parameters
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


def build_pipeline(
    layout: PipelineLayout,
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    skeletons: SkeletonCache | None = None,
    dtype: torch.dtype | None = None,
    config_digests: Mapping[str, str] | None = None,
) -> tuple[Any, float]:
    """The pipeline from loaded weights: skeletons (from `skeletons`, cached), plain components (tokenizers,
    schedulers) from their files, assignment of `state_dicts[component]`, assembly. Returns (pipeline, seconds).
    `config_digests` (component -> sha256 of its config.json, from the manifest) spares hashing the configs."""
    t0 = time.perf_counter()
    skeletons = SkeletonCache() if skeletons is None else skeletons
    components: dict[str, Any] = {}
    for cname, comp in layout.components.items():
        if comp is None:
            continue
        cls = resolve_class(comp.library, comp.class_name)
        if not is_model_class(cls):
            components[cname] = load_plain_component(cls, comp.directory)
            continue
        if cname not in state_dicts:
            raise InvalidArgument(f"{layout.root}: no weights were loaded for component {cname!r}")
        digest = (config_digests or {}).get(cname)
        skeleton = skeletons.get(cls, comp.directory, digest=digest)
        components[cname] = materialize_module(skeleton, state_dicts[cname], name=cname, dtype=dtype)
    pipeline = assemble_pipeline(layout, components)
    return pipeline, time.perf_counter() - t0
