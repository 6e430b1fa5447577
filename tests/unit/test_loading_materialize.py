"""Materialized pipelines: the same images as diffusers' from_pretrained (SD and SDXL), weights assigned without a
copy, key-name differences handled, and every mismatch a loud error rather than a silently meta parameter."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as reference_load
from safetensors.torch import save_file

from hotslot.errors import InvalidArgument
from hotslot.loading.layout import read_layout
from hotslot.loading.materialize import build_pipeline, materialize_module, materialize_skeleton, meta_tensors
from hotslot.loading.pipeline_loader import load_pipeline
from hotslot.loading.reader import read_safetensors
from hotslot.loading.skeleton import Skeleton, SkeletonCache, build_skeleton, meta_parameters, resolve_class

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
    cache = SkeletonCache()
    pipe, _ = load_pipeline(model_copy, skeletons=cache)
    expected = _image(_reference(tiny_family[0]))
    np.testing.assert_array_equal(_image(pipe), expected)
    again, _ = load_pipeline(model_copy, skeletons=cache)  # the renames worked out the first time, reused
    np.testing.assert_array_equal(_image(again), expected)


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


def test_pipelines_from_one_cache_share_no_module_state_with_each_other_or_the_skeleton(
    tiny_family: list[Path],
) -> None:
    cache = SkeletonCache()
    layout = read_layout(tiny_family[0])
    weights = _state_dicts(tiny_family[0])
    a, _ = build_pipeline(layout, weights, skeletons=cache)
    b, _ = build_pipeline(layout, weights, skeletons=cache)
    np.testing.assert_array_equal(_image(a), _image(b))
    for cname in ("unet", "vae", "text_encoder"):
        comp = layout.components[cname]
        skeleton = cache.skeleton(resolve_class(comp.library, comp.class_name), comp.directory)
        assert all(p.is_meta for p in skeleton.module.parameters()), cname  # the cached original stays empty
        trees = [list(m.modules()) for m in (getattr(a, cname), getattr(b, cname), skeleton.module)]
        assert len({len(t) for t in trees}) == 1
        for mine, theirs, original in zip(*trees, strict=True):
            assert mine is not theirs and mine is not original
            for attr in ("_forward_hooks", "_forward_pre_hooks", "_parameters", "_buffers", "_modules"):
                ids = {id(getattr(m, attr)) for m in (mine, theirs, original)}
                assert len(ids) == 3, attr
        buffers = [dict(m.named_buffers()) for m in (getattr(a, cname), getattr(b, cname), skeleton.module)]
        for key in buffers[2]:  # position_ids: a copy each, not the skeleton's tensor
            assert len({bufs[key].data_ptr() for bufs in buffers}) == 3, key
    assert a.unet.config is not b.unet.config and dict(a.unet.config) == dict(b.unet.config)
    assert a.unet.config.block_out_channels is not b.unet.config.block_out_channels  # attribute view of the dict
    assert a.unet.config.block_out_channels == b.unet.config.block_out_channels == a.unet.config["block_out_channels"]
    assert a.text_encoder.config is not b.text_encoder.config
    # state a request could leave behind stays in its own pipeline
    a.unet.conv_in.register_forward_hook(lambda *args: None)
    a.text_encoder.config.output_hidden_states = True
    assert not b.unet.conv_in._forward_hooks and not b.text_encoder.config.output_hidden_states
    c, _ = build_pipeline(layout, weights, skeletons=cache)
    assert not c.unet.conv_in._forward_hooks and not c.text_encoder.config.output_hidden_states


def test_tokenizers_are_shared_and_schedulers_are_fresh(tiny_family: list[Path]) -> None:
    cache = SkeletonCache()
    a, _ = build_pipeline(read_layout(tiny_family[0]), _state_dicts(tiny_family[0]), skeletons=cache)
    b, _ = build_pipeline(read_layout(tiny_family[0]), _state_dicts(tiny_family[0]), skeletons=cache)
    assert a.tokenizer is b.tokenizer  # read-only for a request: built once
    assert a.scheduler is not b.scheduler
    a.scheduler.set_timesteps(3)
    assert b.scheduler.num_inference_steps is None
    c, _ = build_pipeline(read_layout(tiny_family[0]), _state_dicts(tiny_family[0]), skeletons=cache)
    assert c.scheduler.num_inference_steps is None  # the cached scheduler was never the one handed out
    assert dict(c.scheduler.config) == dict(_reference(tiny_family[0]).scheduler.config)
    assert (cache.stats.plain_misses, cache.stats.plain_hits) == (2, 4)


def test_rewritten_tokenizer_files_are_loaded_again(model_copy: Path) -> None:
    cache = SkeletonCache()
    a, _ = build_pipeline(read_layout(model_copy), _state_dicts(model_copy), skeletons=cache)
    config_file = model_copy / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_max_length"] = 33
    config_file.write_text(json.dumps(config))
    b, _ = build_pipeline(read_layout(model_copy), _state_dicts(model_copy), skeletons=cache)
    assert a.tokenizer is not b.tokenizer and b.tokenizer.model_max_length == 33


def test_modules_with_loading_code_of_their_own_still_load_through_load_state_dict() -> None:
    # BatchNorm has its own _load_from_state_dict (num_batches_tracked); the direct assignment must not bypass it
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
    reference[1].running_mean.normal_()
    weights = {k: v.clone() for k, v in reference.state_dict().items()}
    with meta_parameters():
        skeleton = Skeleton(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval())
    assert not skeleton.plain_assign
    ours = materialize_skeleton(skeleton, weights)
    x = torch.randn(2, 4)
    assert torch.equal(ours(x), reference(x))
    assert ours[1].running_mean.data_ptr() == weights["1.running_mean"].data_ptr()
    del weights["0.bias"]
    with pytest.raises(InvalidArgument, match=r"no weights for 0\.bias"):
        materialize_skeleton(skeleton, weights)
