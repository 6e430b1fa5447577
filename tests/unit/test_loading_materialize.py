"""Materialized pipelines: the same images as diffusers' from_pretrained (SD and SDXL), weights assigned without a
copy, key-name differences handled, and every mismatch a loud error rather than a silently meta parameter."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as reference_load
from safetensors.torch import save_file

from hotslot.errors import InvalidArgument
from hotslot.loading.layout import read_layout
from hotslot.loading.materialize import build_pipeline, materialize_module, meta_tensors
from hotslot.loading.pipeline_loader import load_pipeline
from hotslot.loading.reader import read_safetensors
from hotslot.loading.skeleton import SkeletonCache, build_skeleton

PROMPT = "a photo of a cat"


def _image(pipe, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(
        PROMPT, num_inference_steps=2, height=64, width=64, output_type="np", generator=generator, **kwargs
    ).images


def _reference(path: Path, **kwargs):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path, local_files_only=True, **kwargs)


def _state_dicts(path: Path, **kwargs) -> dict[str, dict[str, torch.Tensor]]:
    layout = read_layout(path)
    return {
        name: {k: v for f in comp.weight_files for k, v in read_safetensors(f, **kwargs).tensors().items()}
        for name, comp in layout.weight_components().items()
    }


@pytest.fixture
def model_copy(tiny_family: list[Path], tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(tiny_family[0], dest)
    return dest


def test_image_is_bit_identical_to_from_pretrained(tiny_family: list[Path]) -> None:
    pipe, report = load_pipeline(tiny_family[0])
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert report.bytes == report.bytes_read > 0 and report.files == 3 and not report.via_preloader
    np.testing.assert_array_equal(_image(pipe), _image(_reference(tiny_family[0])))


def test_parameters_are_the_loaded_tensors_not_copies(tiny_family: list[Path]) -> None:
    layout = read_layout(tiny_family[0])
    loaded = read_safetensors(layout.components["unet"].weight_files[0])
    views = loaded.tensors()
    from diffusers import UNet2DConditionModel

    unet = materialize_module(build_skeleton(UNet2DConditionModel, layout.components["unet"].directory), views)
    for name, param in unet.named_parameters():
        assert param.data_ptr() == views[name].data_ptr(), name
        assert param.untyped_storage().data_ptr() == loaded.buffer.untyped_storage().data_ptr()
    assert meta_tensors(unet) == []


def test_fp16_weights_equal_from_pretrained_fp16(tiny_family: list[Path]) -> None:
    pipe, report = load_pipeline(tiny_family[0], dtype=torch.float16)
    ref = _reference(tiny_family[0], torch_dtype=torch.float16)
    assert report.bytes < report.bytes_read  # converted once, while reading
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert ours.keys() == theirs.keys()
        for k in theirs:
            assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), f"{name}.{k}"
        buffers = dict(getattr(pipe, name).named_buffers())
        for k, b in getattr(ref, name).named_buffers():  # non-persistent ones too (position_ids)
            assert torch.equal(buffers[k], b) and buffers[k].dtype == b.dtype, f"{name}.{k}"


def test_text_encoder_written_by_transformers_4_loads_identically(model_copy: Path, tiny_family: list[Path]) -> None:
    # transformers 4 wrote CLIP's weights under `text_model.` and included the position_ids buffer; real SD 1.5
    # and SDXL checkpoints look like that. transformers 5 keeps neither; both must still load to the same image.
    path = model_copy / "text_encoder" / "model.safetensors"
    tensors = reference_load(str(path))
    old = {f"text_model.{k}": v for k, v in tensors.items()}
    old["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    save_file(old, str(path), metadata={"format": "pt"})
    pipe, _ = load_pipeline(model_copy)
    np.testing.assert_array_equal(_image(pipe), _image(_reference(tiny_family[0])))


def test_missing_weight_fails_loudly_instead_of_staying_on_meta(model_copy: Path) -> None:
    path = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = reference_load(str(path))
    del tensors["conv_in.weight"]
    save_file(tensors, str(path))
    with pytest.raises(InvalidArgument, match=r"unet: no weights for conv_in\.weight .*meta"):
        load_pipeline(model_copy)


def test_unexpected_weight_fails_loudly(model_copy: Path) -> None:
    path = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = reference_load(str(path))
    tensors["decoder.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(path))
    with pytest.raises(InvalidArgument, match=r"vae: .*does not have: decoder\.extra\.weight"):
        load_pipeline(model_copy)


def test_shape_mismatch_fails_loudly(model_copy: Path) -> None:
    path = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = reference_load(str(path))
    tensors["conv_in.bias"] = torch.zeros(tensors["conv_in.bias"].numel() + 1)
    save_file(tensors, str(path))
    with pytest.raises(InvalidArgument, match=r"(?s)unet: weights do not fit .*conv_in\.bias"):
        load_pipeline(model_copy)


def test_skeleton_cache_is_reused_across_loads(tiny_family: list[Path]) -> None:
    cache = SkeletonCache()
    a, _ = build_pipeline(read_layout(tiny_family[0]), _state_dicts(tiny_family[0]), skeletons=cache)
    b, _ = build_pipeline(read_layout(tiny_family[1]), _state_dicts(tiny_family[1]), skeletons=cache)
    assert (cache.stats.misses, cache.stats.hits) == (3, 3)  # the family shares every config
    assert a.unet is not b.unet
    assert not torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)  # each got its own weights


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny StableDiffusionXLPipeline: two text encoders (one with projection) and two tokenizers."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from hotslot.modelgen import build_shared_components

    root = tmp_path_factory.mktemp("sdxl")
    tok_dir = root / "tok"
    tok_dir.mkdir()
    for name, data in build_shared_components(0).tokenizer_files.items():
        (tok_dir / name).write_bytes(data)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=64,
    )
    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        projection_dim=32,
        hidden_act="gelu",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=CLIPTextModel(config).eval(),
        text_encoder_2=CLIPTextModelWithProjection(config).eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1),
    )
    dest = root / "sdxl"
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


def test_sdxl_image_is_bit_identical_to_from_pretrained(tiny_sdxl: Path) -> None:
    layout = read_layout(tiny_sdxl)
    assert sorted(layout.weight_components()) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    pipe, _ = load_pipeline(tiny_sdxl)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    np.testing.assert_array_equal(_image(pipe), _image(_reference(tiny_sdxl)))


def test_tied_weights_are_tied_after_assignment(tmp_path: Path) -> None:
    # T5 (SD3 and Flux text encoders) stores the shared embedding once; the encoder's copy is tied to it.
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    (weights,) = tmp_path.glob("*.safetensors")
    ours = materialize_module(build_skeleton(T5EncoderModel, tmp_path), read_safetensors(weights).tensors())
    assert ours.encoder.embed_tokens.weight is ours.shared.weight
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(ours(ids).last_hidden_state, model(ids).last_hidden_state)
