"""Tiny real LoRA adapters for a pipeline directory, for tests and demos: `write_lora` writes one safetensors file
of low-rank factors for the base's attention projections (UNet; optionally the text encoder too) in diffusers/PEFT
naming (`unet.<module>.lora_A.weight`) or kohya/A1111 naming (`lora_unet_<module>.lora_down.weight` + `.alpha`),
which diffusers' loaders read as they read real adapters. A pure function of the arguments and the base's configs:
the same arguments give byte-identical files. The base's weights are never read (the shapes come from configs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hotslot.modelgen import _write_atomically

__all__ = ["LORA_FILE", "LoraTarget", "lora_targets", "write_lora"]

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights writes
# The projections diffusers' LoRA trainers target: attention in the UNet, self-attention in the text encoder.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
FORMATS = ("peft", "kohya")


@dataclass(frozen=True)
class LoraTarget:
    """One Linear an adapter adapts."""

    component: str  # unet, text_encoder
    name: str  # module name inside the component
    in_features: int
    out_features: int


def _meta_module(component_dir: Path):
    """The component built on the meta device from its config (no memory, no weights read)."""
    import torch

    config = json.loads((component_dir / "config.json").read_text())
    with torch.device("meta"):
        if "_diffusers_version" in config:
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config)
        from transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig.from_dict(config))


def lora_targets(base: Path, *, unet: bool = True, text_encoder: bool = False) -> list[LoraTarget]:
    """The Linear modules of `base`'s UNet (and text encoder) that a LoRA of this module adapts, in module order."""
    import torch

    picked = []
    for component, wanted, suffixes in (("unet", unet, UNET_TARGETS), ("text_encoder", text_encoder,
                                                                        TEXT_ENCODER_TARGETS)):
        if not wanted:
            continue
        module = _meta_module(Path(base) / component)
        for name, sub in module.named_modules():
            if isinstance(sub, torch.nn.Linear) and any(name == s or name.endswith(f".{s}") for s in suffixes):
                picked.append(LoraTarget(component, name, sub.in_features, sub.out_features))
    return picked


def write_lora(
    dest: Path,
    base: Path,
    *,
    rank: int = 4,
    seed: int = 0,
    text_encoder: bool = False,
    unet: bool = True,
    strength: float = 0.5,
    fmt: str = "peft",
    overwrite: bool = False,
) -> Path:
    """Writes a random LoRA adapter for the pipeline directory `base` into the directory `dest` (one file,
    `pytorch_lora_weights.safetensors`) and returns `dest`.

    Each adapted Linear gets lora_A ~ N(0, 1/in) and lora_B ~ N(0, strength^2/rank), so the update B @ A is about
    `strength` times a freshly initialised weight: visible in the images, not saturating them. `fmt` "kohya" writes
    the same factors in kohya/A1111 naming with an alpha equal to the rank (the same scaling as PEFT's default),
    so both formats give the same images. Raises ValueError for a bad rank or format, or a non-empty `dest`
    unless `overwrite`."""
    import torch
    from safetensors.torch import save_file

    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not (unet or text_encoder):
        raise ValueError("an adapter needs at least one of the UNet and the text encoder")
    targets = lora_targets(Path(base), unet=unet, text_encoder=text_encoder)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for target in targets:
        down = torch.randn(rank, target.in_features, generator=generator) / target.in_features ** 0.5
        up = torch.randn(target.out_features, rank, generator=generator) * (strength / rank ** 0.5)
        if fmt == "peft":
            tensors[f"{target.component}.{target.name}.lora_A.weight"] = down.contiguous()
            tensors[f"{target.component}.{target.name}.lora_B.weight"] = up.contiguous()
        else:
            prefix = "lora_unet" if target.component == "unet" else "lora_te"
            stem = f"{prefix}_{target.name.replace('.', '_')}"
            tensors[f"{stem}.lora_down.weight"] = down.contiguous()
            tensors[f"{stem}.lora_up.weight"] = up.contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
    return _write_atomically(Path(dest), overwrite, lambda tmp: save_file(tensors, str(tmp / LORA_FILE)))
