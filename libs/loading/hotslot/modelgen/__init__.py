"""Tiny random-weight Stable-Diffusion pipelines in diffusers layout, for tests and demos.

`write_tiny_pipeline` writes one complete `StableDiffusionPipeline` directory (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/) of about 6.8 MB (fp32) that loads offline with
`StableDiffusionPipeline.from_pretrained(path, local_files_only=True)` and generates a 64x64 image in well
under a second on CPU. Nothing is downloaded: the tokenizer's byte-level BPE vocabulary is built here.

Everything is a pure function of the arguments: the same arguments give byte-identical files. `shared_seed`
fixes the components a family shares (vae, text encoder, tokenizer, scheduler, model_index.json) and `seed`
fixes the UNet, so `write_family` gives n models that differ only in unet/ weights, the way many fine-tunes of
one base model do.

Weights are written only as safetensors; a pickle-format file (.bin, .pt, ...) in the output is an error.
Each model is written into a temporary sibling directory and renamed into place, so a reader never sees a
half-written model under `dest`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hotslot.manifest import PICKLE_SUFFIXES

if TYPE_CHECKING:  # the heavy imports happen inside the functions, so importing this module stays cheap
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

__all__ = [
    "PICKLE_SUFFIXES",
    "TinyComponents",
    "build_shared_components",
    "build_unet",
    "family_member_seed",
    "tree_stats",
    "write_family",
    "write_tiny_pipeline",
]

# Suffixes of pickle-based weight formats. None of them may appear in a written model.

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# Text-encoder width; the UNet's cross-attention width must match it.
TEXT_HIDDEN_SIZE = 32
# With two VAE blocks the VAE downsamples by 2 ** (2 - 1) = 2 (real SD: 8), so a 64x64 image has 32x32 latents.
VAE_BLOCK_OUT_CHANNELS = (32, 64)
VAE_SCALE_FACTOR = 2 ** (len(VAE_BLOCK_OUT_CHANNELS) - 1)

# Words the BPE merges spell out whole, so common prompts tokenize to word tokens. Any other text still
# tokenizes, byte by byte, because every byte (alone and as a word end) is in the vocabulary.
_BPE_WORDS = (
    "a an and at in of on the to with photo picture painting portrait drawing render art style "
    "cat dog bird horse fish tree flower house car city street mountain river sea sky sun moon "
    "red green blue white black yellow big small old new beautiful cute"
).split()


@dataclass(frozen=True)
class TinyComponents:
    """The components of a tiny pipeline that a family shares (everything but the UNet)."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer_files: dict[str, bytes]
    scheduler: DDIMScheduler


# --------------------------------------------------------------------------------------------------------------
# building the components


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seeds torch's CPU RNG with `seed` for the block, then restores the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters (byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Applies BPE merges (lowest rank first) to a word's symbols, as the tokenizer does."""
    while len(symbols) > 1:
        pairs = [
            (ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:], strict=False))
        ]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def _bpe_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP-style byte-level BPE: every byte alone and as a word end (`</w>`), merges that make each of
    `_BPE_WORDS` a single token, then the two special tokens last (as in CLIP)."""
    byte_chars = [_bytes_to_unicode()[b] for b in range(256)]
    vocab: dict[str, int] = {}
    for c in byte_chars:
        vocab[c] = len(vocab)
    for c in byte_chars:
        vocab[c + "</w>"] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    for word in _BPE_WORDS:
        # What the merges so far make of the word, then new (lower-priority) merges joining it left to right;
        # the new merges cannot change how earlier words tokenize, those are single tokens before they apply.
        symbols = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            vocab.setdefault(symbols[0] + symbols[1], len(vocab))
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, list(ranks)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _tokenizer_files() -> dict[str, bytes]:
    """The tokenizer/ folder: vocab.json + merges.txt (what CLIPTokenizer needs, in transformers 4 and 5 alike)
    and the configs naming the special tokens. Written by hand rather than by `save_pretrained`: transformers 5
    would write only tokenizer.json, with machine-specific keys such as `is_local` in tokenizer_config.json."""
    vocab, merges = _bpe_vocab_and_merges()
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    tokenizer_config = {
        **special,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
    }
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return {
        "vocab.json": _json_bytes(vocab),
        "merges.txt": merges_txt.encode("utf-8"),
        "special_tokens_map.json": _json_bytes(special),
        "tokenizer_config.json": _json_bytes(tokenizer_config),
    }


def _check_image_size(image_size: int) -> None:
    if image_size < 16 or image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8 and at least 16, got {image_size}")


# Stable Diffusion 1.5's UNet layout (cross-attention in every block but the deepest), for `block_out_channels`.
def _sd_block_types(n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return down, up


def build_unet(
    seed: int, *, image_size: int = 64, block_out_channels: tuple[int, ...] | None = None
) -> UNet2DConditionModel:
    """A random UNet2DConditionModel; its weights are a function of `seed` (and the shape).

    By default the tiny one (~1M parameters, 4 MB in fp32). With `block_out_channels` (each a multiple of 32,
    at least two), SD 1.5's layout at those widths instead: cross-attention in every block but the deepest, two
    layers per block, 8 attention heads; SD 1.5 itself is (320, 640, 1280, 1280). Its size grows with the square
    of the widths, e.g. (64, 128, 256, 256) is ~34M parameters.
    """
    _check_image_size(image_size)
    from diffusers import UNet2DConditionModel

    if block_out_channels is None:
        config: dict[str, Any] = dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
        )
    else:
        widths = tuple(int(w) for w in block_out_channels)
        if len(widths) < 2 or any(w < 32 or w % 32 for w in widths):
            raise ValueError(
                f"block_out_channels must be at least two multiples of 32, got {block_out_channels}"
            )
        down, up = _sd_block_types(len(widths))
        config = dict(
            block_out_channels=widths,
            layers_per_block=2,
            down_block_types=down,
            up_block_types=up,
            attention_head_dim=8,
        )
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=image_size // VAE_SCALE_FACTOR,
            in_channels=4,
            out_channels=4,
            cross_attention_dim=TEXT_HIDDEN_SIZE,
            norm_num_groups=32,
            **config,
        )
    return unet.eval()


def build_shared_components(shared_seed: int, *, image_size: int = 64) -> TinyComponents:
    """The vae, text encoder, tokenizer and scheduler; the random weights are a function of `shared_seed`."""
    _check_image_size(image_size)
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = _bpe_vocab_and_merges()
    with _seeded(shared_seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
            up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
            block_out_channels=VAE_BLOCK_OUT_CHANNELS,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=image_size,
        )
        text_config = CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=TEXT_HIDDEN_SIZE,
            intermediate_size=37,
            projection_dim=TEXT_HIDDEN_SIZE,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MODEL_MAX_LENGTH,
            layer_norm_eps=1e-5,
            bos_token_id=vocab[BOS_TOKEN],
            eos_token_id=vocab[EOS_TOKEN],
            pad_token_id=vocab[EOS_TOKEN],
        )
        text_encoder = CLIPTextModel(text_config)
    # Stable Diffusion's own schedule; DDIM gives a clean image path with as few as 1-2 steps.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return TinyComponents(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer_files=_tokenizer_files(),
        scheduler=scheduler,
    )


# --------------------------------------------------------------------------------------------------------------
# writing


def _model_index(components: TinyComponents) -> dict[str, Any]:
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(components.scheduler).__name__],
        "text_encoder": ["transformers", type(components.text_encoder).__name__],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", type(components.vae).__name__],
    }


def _save_components(root: Path, unet: UNet2DConditionModel, components: TinyComponents) -> None:
    """Writes a full pipeline directory into the (existing, empty) directory `root`."""
    (root / "model_index.json").write_bytes(_json_bytes(_model_index(components)))
    unet.save_pretrained(root / "unet", safe_serialization=True)
    components.vae.save_pretrained(root / "vae", safe_serialization=True)
    components.text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    components.scheduler.save_pretrained(root / "scheduler")
    tokenizer_dir = root / "tokenizer"
    tokenizer_dir.mkdir()
    for name, data in components.tokenizer_files.items():
        (tokenizer_dir / name).write_bytes(data)
    for path in root.rglob("*"):
        # safetensors writes through a 0600 temporary file; give every file the same ordinary mode
        path.chmod(0o755 if path.is_dir() else 0o644)
    pickles = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise RuntimeError(f"pickle-format files were written, refusing to keep them: {pickles}")


def _check_dest(dest: Path, overwrite: bool) -> None:
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise ValueError(f"destination {dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ValueError(f"destination {dest} exists and is not empty; pass overwrite=True to replace it")


def _write_atomically(dest: Path, overwrite: bool, fill: Callable[[Path], None]) -> Path:
    """Calls `fill(tmp)` on a fresh sibling directory of `dest`, then renames it to `dest`."""
    _check_dest(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dest.parent / f".{dest.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        tmp.chmod(0o755)
        fill(tmp)
        old = None
        if dest.exists():
            _check_dest(dest, overwrite)  # again: it may have been filled while we were writing
            old = dest.parent / f".{dest.name}.old-{tag}"
            dest.rename(old)
        try:
            tmp.rename(dest)
        except BaseException:
            if old is not None:
                old.rename(dest)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def write_tiny_pipeline(
    dest: Path,
    *,
    seed: int = 0,
    shared_seed: int | None = None,
    image_size: int = 64,
    unet_block_out_channels: tuple[int, ...] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a tiny random StableDiffusionPipeline directory at `dest` and returns `dest`.

    `seed` fixes the UNet weights; `shared_seed` (default: `seed`) fixes the vae and text encoder weights.
    `image_size` is the pipeline's default height and width (a multiple of 8). `unet_block_out_channels` gives
    the UNet SD 1.5's layout at those widths (see `build_unet`); the other components stay the same. The same
    arguments always give byte-identical files. Raises ValueError if `dest` exists and is not empty, unless
    `overwrite` is true.
    """
    dest = Path(dest)
    _check_image_size(image_size)
    _check_dest(dest, overwrite)
    shared = build_shared_components(seed if shared_seed is None else shared_seed, image_size=image_size)
    unet = build_unet(seed, image_size=image_size, block_out_channels=unet_block_out_channels)
    return _write_atomically(dest, overwrite, lambda tmp: _save_components(tmp, unet, shared))


def family_member_seed(seed: int, index: int) -> int:
    """The UNet seed of member `index` of the family written by `write_family(..., seed=seed)`."""
    digest = hashlib.sha256(f"hotslot.modelgen.family:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: a valid torch seed


def write_family(
    dest_root: Path,
    n: int,
    *,
    prefix: str = "tiny-sd",
    seed: int = 0,
    shared_seed: int | None = None,
    image_size: int = 64,
    unet_block_out_channels: tuple[int, ...] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Writes n tiny pipelines `dest_root/<prefix>-0 .. <prefix>-{n-1}` and returns their paths.

    The members share vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json byte for byte (from
    `shared_seed`, default `seed`) and differ only in unet/ weights (member i: `family_member_seed(seed, i)`;
    `unet_block_out_channels` as in `build_unet`). Every destination is checked before anything is written; each member is written atomically.
    """
    if n < 1:
        raise ValueError(f"a family needs at least one member, got n={n}")
    if not prefix or "/" in prefix or os.sep in prefix or prefix.startswith("."):
        raise ValueError(f"prefix must be a plain, non-hidden file name, got {prefix!r}")
    _check_image_size(image_size)
    dest_root = Path(dest_root)
    dests = [dest_root / f"{prefix}-{i}" for i in range(n)]
    for dest in dests:
        _check_dest(dest, overwrite)
    shared = build_shared_components(seed if shared_seed is None else shared_seed, image_size=image_size)
    written = []
    for i, dest in enumerate(dests):
        unet = build_unet(
            family_member_seed(seed, i), image_size=image_size, block_out_channels=unet_block_out_channels
        )
        written.append(
            _write_atomically(dest, overwrite, functools.partial(_save_components, unet=unet, components=shared))
        )
    return written


def tree_stats(path: Path) -> tuple[int, int]:
    """(number of files, total bytes) under `path`."""
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)
