"""Meta-device skeletons and their cache, the model_index.json layout, and what the loader refuses (unknown
libraries, pickle weights)."""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from hotslot.errors import InvalidArgument, NotFound
from hotslot.loading import skeleton as skeleton_mod
from hotslot.loading.layout import read_layout
from hotslot.loading.skeleton import (
    Skeleton,
    SkeletonCache,
    build_skeleton,
    config_digest,
    keep_fp32_modules,
    meta_parameters,
    resolve_class,
    resolve_pipeline_class,
)


@pytest.fixture
def model_copy(tiny_family: list[Path], tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(tiny_family[0], dest)
    return dest


def test_layout_finds_components_configs_and_weights(tiny_family: list[Path]) -> None:
    layout = read_layout(tiny_family[0])
    assert layout.pipeline_class == "StableDiffusionPipeline"
    assert sorted(layout.weight_components()) == ["text_encoder", "unet", "vae"]
    assert layout.components["safety_checker"] is None and layout.components["feature_extractor"] is None
    unet = layout.components["unet"]
    assert (unet.library, unet.class_name) == ("diffusers", "UNet2DConditionModel")
    assert [p.name for p in unet.weight_files] == ["diffusion_pytorch_model.safetensors"]
    assert layout.components["tokenizer"].weight_files == ()
    assert layout.settings == {"requires_safety_checker": False}


def test_layout_refuses_pickle_weights(model_copy: Path) -> None:
    (model_copy / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InvalidArgument, match=r"unet/diffusion_pytorch_model\.bin is a pickle-format"):
        read_layout(model_copy)


def test_layout_reports_missing_pieces(model_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        read_layout(tmp_path / "nowhere")
    shutil.rmtree(model_copy / "vae")
    with pytest.raises(NotFound, match="component 'vae'"):
        read_layout(model_copy)


def test_layout_follows_a_shard_index(model_copy: Path) -> None:
    unet = model_copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"conv_in.weight": "diffusion_pytorch_model-00001-of-00001.safetensors"}}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert [p.name for p in read_layout(model_copy).components["unet"].weight_files] == [
        "diffusion_pytorch_model-00001-of-00001.safetensors"
    ]
    index["weight_map"]["x"] = "../escape.safetensors"
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidArgument, match="shards must be"):
        read_layout(model_copy)


@pytest.mark.parametrize("library", ["os", "subprocess", "torch", "diffusers.utils", "../x", "importlib"])
def test_only_diffusers_and_transformers_classes_resolve(library: str) -> None:
    with pytest.raises(InvalidArgument):
        resolve_class(library, "system")


def test_resolution_accepts_both_libraries_and_diffusers_pipeline_modules() -> None:
    import diffusers
    import transformers

    assert resolve_class("diffusers", "UNet2DConditionModel") is diffusers.UNet2DConditionModel
    assert resolve_class("transformers", "CLIPTextModel") is transformers.CLIPTextModel
    # SD 1.x names its safety checker this way; it resolves inside diffusers, not by importing "stable_diffusion"
    assert resolve_class("stable_diffusion", "StableDiffusionSafetyChecker").__module__.startswith("diffusers.")
    with pytest.raises(InvalidArgument, match="no class"):
        resolve_class("diffusers", "NoSuchModel")
    with pytest.raises(InvalidArgument, match="not a class name"):
        resolve_class("diffusers", "__class__")
    with pytest.raises(InvalidArgument, match="not a diffusers pipeline"):
        resolve_pipeline_class("UNet2DConditionModel")


def test_unknown_library_in_model_index_is_refused_before_reading(model_copy: Path) -> None:
    from hotslot.loading.pipeline_loader import load_pipeline

    index = json.loads((model_copy / "model_index.json").read_text())
    index["unet"] = ["evil_package", "UNet2DConditionModel"]
    (model_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidArgument, match="library 'evil_package' is not allowed"):
        load_pipeline(model_copy)


def test_skeleton_has_meta_parameters_and_real_buffers(tiny_family: list[Path]) -> None:
    from transformers import CLIPTextModel

    text = build_skeleton(CLIPTextModel, tiny_family[0] / "text_encoder")
    assert all(p.is_meta for p in text.parameters())
    (position_ids,) = [b for n, b in text.named_buffers() if n.endswith("embeddings.position_ids")]
    # non-persistent: not in the file, so the constructor's value is the one that must survive
    assert not position_ids.is_meta
    assert torch.equal(position_ids, torch.arange(77).unsqueeze(0))
    assert not text.training


def test_meta_parameters_only_affects_the_calling_thread() -> None:
    built: dict[str, torch.nn.Module] = {}
    inside = threading.Event()
    done = threading.Event()

    def other_thread() -> None:
        inside.wait(5)
        built["other"] = torch.nn.Linear(3, 3)
        done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with meta_parameters():
        inside.set()
        done.wait(5)
        built["mine"] = torch.nn.Linear(3, 3)
    t.join()
    assert built["mine"].weight.is_meta
    assert not built["other"].weight.is_meta
    assert not torch.nn.Linear(2, 2).weight.is_meta  # and the patch is gone afterwards


def test_initialisers_skip_meta_tensors_while_building_and_still_initialise_real_ones() -> None:
    # A skeleton's parameters are meta: initialising them is skipped (it cost half the build). A real tensor, in
    # this thread or another (a LoRA layer created during a skeleton build), is initialised as before, through
    # torch.nn.init and through transformers' own table of it.
    from transformers import initialization as hf_init

    original = torch.nn.init.normal_
    real = torch.zeros(64, 64)
    torch.manual_seed(0)
    expected = torch.nn.init.kaiming_uniform_(torch.zeros(64, 64), a=5 ** 0.5)
    with meta_parameters():
        meta = torch.empty(4, 4, device="meta")
        assert torch.nn.init.normal_(meta) is meta
        assert hf_init.TORCH_INIT_FUNCTIONS["normal_"](meta) is meta
        torch.manual_seed(0)
        seen = {}
        t = threading.Thread(target=lambda: seen.update(w=torch.nn.init.kaiming_uniform_(real, a=5 ** 0.5)))
        t.start()
        t.join()
        assert torch.equal(seen["w"], expected)
        assert hf_init.TORCH_INIT_FUNCTIONS["ones_"](torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]
        assert torch.nn.init.normal_ is not original
    assert torch.nn.init.normal_ is original  # restored once no build is running
    assert hf_init.TORCH_INIT_FUNCTIONS["normal_"] is torch.nn.init.normal_


def test_cache_hit_returns_an_equivalent_fresh_module_without_rebuilding(
    tiny_family: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import UNet2DConditionModel

    cache = SkeletonCache()
    unet_dir = tiny_family[0] / "unet"
    first = cache.get(UNet2DConditionModel, unet_dir)
    assert (cache.stats.hits, cache.stats.misses) == (0, 1)

    def no_build(*args, **kwargs):
        raise AssertionError("a cache hit must not parse the config or build the model")

    monkeypatch.setattr(skeleton_mod, "build_skeleton", no_build)
    second = cache.get(UNet2DConditionModel, unet_dir)
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)
    assert second is not first  # fresh: assignment into one cannot affect the other
    assert dict(second.config) == dict(first.config)
    shapes = {k: (v.shape, v.dtype) for k, v in first.state_dict().items()}
    assert {k: (v.shape, v.dtype) for k, v in second.state_dict().items()} == shapes
    # family members share the unet config byte for byte: same digest, one skeleton
    cache.get(UNet2DConditionModel, tiny_family[1] / "unet")
    assert (cache.stats.hits, cache.stats.misses) == (2, 1)


def test_cache_hit_with_a_known_digest_does_not_touch_the_config(model_copy: Path) -> None:
    from diffusers import AutoencoderKL

    cache = SkeletonCache()
    digest = config_digest(model_copy / "vae" / "config.json")
    cache.get(AutoencoderKL, model_copy / "vae", digest=digest)
    (model_copy / "vae" / "config.json").unlink()
    assert isinstance(cache.get(AutoencoderKL, model_copy / "vae", digest=digest), AutoencoderKL)
    assert cache.stats.hits == 1


def test_cache_is_bounded() -> None:
    with pytest.raises(ValueError):
        SkeletonCache(max_entries=0)


def test_keep_fp32_modules_follows_each_library() -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, T5EncoderModel

    assert keep_fp32_modules(UNet2DConditionModel, torch.float16) == ()
    assert keep_fp32_modules(CLIPTextModel, torch.float16) == ()
    assert "wo" in keep_fp32_modules(T5EncoderModel, torch.float16)
    assert keep_fp32_modules(T5EncoderModel, None) == ()


class _PicklesItsOwnWay(torch.nn.Linear):
    def __getstate__(self):
        return {**self.__dict__, "copied_by_pickling": True}


def test_a_module_that_pickles_its_own_way_is_deep_copied_rather_than_cloned_by_plan() -> None:
    with meta_parameters():
        original = torch.nn.Sequential(_PicklesItsOwnWay(2, 2), torch.nn.Linear(2, 2))
    skeleton = Skeleton(original)
    assert not skeleton.clonable
    fresh = skeleton.fresh()
    assert fresh[0].copied_by_pickling and fresh[0] is not original[0]
    assert fresh[0].weight.is_meta and fresh[0].weight is not original[0].weight
