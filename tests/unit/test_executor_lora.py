"""LoRA adapters on a real tiny pipeline: switching adapters never writes the base (every weight torch.equal before
and after), the same adapters give the same pixels in any order, kohya/A1111 naming gives what PEFT naming gives,
a text-encoder adapter changes the images, and an adapter that does not fit is refused naming its first key before
the pipeline is touched."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hotslot.errors import FailedPrecondition, InvalidArgument
from hotslot.modelgen import write_tiny_pipeline
from hotslot.modelgen.lora import LORA_FILE, lora_targets, write_lora
from hotslot.services.executor.lora import (
    AdapterWeights,
    adapter_file,
    apply_adapters,
    loaded_adapters,
    unload_missing,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_pipeline(tmp_path_factory.mktemp("lora-base") / "base", seed=0)


@pytest.fixture(scope="module")
def adapters(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterWeights]:
    root = tmp_path_factory.mktemp("loras")
    made = {
        "a@1": write_lora(root / "a", base, seed=1),
        "b@1": write_lora(root / "b", base, seed=2, rank=8),
        "a-kohya@1": write_lora(root / "a-kohya", base, seed=1, fmt="kohya"),
        "te@1": write_lora(root / "te", base, seed=3, text_encoder=True, unet=False),
    }
    out = {}
    for name, path in made.items():
        tensors = load_file(str(path / adapter_file(path)))
        out[name] = AdapterWeights(tensors, None, sum(t.numel() * t.element_size() for t in tensors.values()))
    return out


@pytest.fixture
def pipe(base: Path):
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(base, local_files_only=True, safety_checker=None)
    p.set_progress_bar_config(disable=True)
    return p


def image(pipe) -> np.ndarray:
    with torch.inference_mode():
        return pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np",
                    height=32, width=32).images


def base_weights(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for component in ("unet", "text_encoder"):
        for key, value in getattr(pipe, component).state_dict().items():
            if "lora_" not in key:
                out[f"{component}.{key.replace('.base_layer', '')}"] = value
    return out


def use(pipe, adapters, *names_scales, max_loaded: int = 8) -> None:
    apply_adapters(pipe, [(n, adapters[n], s) for n, s in names_scales], max_loaded=max_loaded)


def test_switching_adapters_never_writes_the_base_and_is_repeatable(pipe, adapters) -> None:
    before = {k: v.clone() for k, v in base_weights(pipe).items()}
    plain = image(pipe)
    use(pipe, adapters, ("a@1", 1.0))
    with_a = image(pipe)
    use(pipe, adapters, ("b@1", 1.0))
    with_b = image(pipe)
    use(pipe, adapters, ("a@1", 1.0))
    assert np.array_equal(image(pipe), with_a)  # A, B, A: A's pixels again
    use(pipe, adapters, ("a@1", 0.5), ("b@1", 0.5))
    stacked = image(pipe)
    use(pipe, adapters)
    assert np.array_equal(image(pipe), plain)  # the base alone again, bit for bit
    after = base_weights(pipe)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not np.array_equal(with_a, plain) and not np.array_equal(with_b, with_a)
    assert not np.array_equal(stacked, with_a) and not np.array_equal(stacked, with_b)
    assert loaded_adapters(pipe) == ["a@1", "b@1"]  # kept loaded, least recently used first: a switch is set_adapters


def test_scale_zero_is_the_base_and_scales_change_the_image(pipe, adapters) -> None:
    plain = image(pipe)
    use(pipe, adapters, ("a@1", 0.0))
    assert np.array_equal(image(pipe), plain)
    use(pipe, adapters, ("a@1", 1.0))
    full = image(pipe)
    use(pipe, adapters, ("a@1", 0.5))
    assert not np.array_equal(image(pipe), full) and not np.array_equal(image(pipe), plain)


def test_kohya_naming_gives_the_peft_named_adapters_image(pipe, adapters) -> None:
    use(pipe, adapters, ("a@1", 1.0))
    peft = image(pipe)
    use(pipe, adapters, ("a-kohya@1", 1.0))
    assert np.array_equal(image(pipe), peft)


def test_a_text_encoder_adapter_changes_the_image(pipe, adapters) -> None:
    plain = image(pipe)
    use(pipe, adapters, ("te@1", 1.0))
    assert not np.array_equal(image(pipe), plain)
    use(pipe, adapters, ("a@1", 1.0))  # a UNet-only adapter runs without the text encoder's one
    with_a = image(pipe)
    use(pipe, adapters)
    assert np.array_equal(image(pipe), plain)
    use(pipe, adapters, ("a@1", 1.0))
    assert np.array_equal(image(pipe), with_a)


def test_least_recently_used_adapters_are_unloaded_beyond_the_bound(pipe, adapters) -> None:
    for name in ("a@1", "b@1", "te@1"):
        use(pipe, adapters, (name, 1.0), max_loaded=2)
    assert loaded_adapters(pipe) == ["b@1", "te@1"]
    unload_missing(pipe, held={"te@1": adapters["te@1"]})
    assert loaded_adapters(pipe) == ["te@1"]


def test_an_adapter_that_does_not_fit_is_refused_naming_its_first_key(pipe, adapters, base: Path,
                                                                      tmp_path: Path) -> None:
    use(pipe, adapters, ("a@1", 1.0))
    with_a = image(pipe)
    first = lora_targets(base)[0]
    bad = dict(adapters["b@1"].tensors)
    key = f"unet.{first.name}.lora_A.weight"
    bad[key] = torch.zeros(8, first.in_features + 16)
    with pytest.raises(FailedPrecondition) as err:
        apply_adapters(pipe, [("bad@1", AdapterWeights(bad, None, 0), 1.0)], max_loaded=8, label="bad@1")
    assert key in err.value.message and "bad@1" in err.value.message
    missing = {"unet.down_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "unet.down_blocks.7.attn.to_q.lora_B.weight": torch.zeros(8, 4)}
    with pytest.raises(FailedPrecondition, match="down_blocks.7.attn.to_q.lora_A.weight names a module"):
        apply_adapters(pipe, [("gone@1", AdapterWeights(missing, None, 0), 1.0)], max_loaded=8)
    with pytest.raises(InvalidArgument):
        apply_adapters(pipe, [("empty@1", AdapterWeights({"x.weight": torch.zeros(2)}, None, 0), 1.0)], max_loaded=8)
    assert loaded_adapters(pipe) == ["a@1"]
    use(pipe, adapters, ("a@1", 1.0))
    assert np.array_equal(image(pipe), with_a)


def test_adapter_file_prefers_diffusers_name_and_refuses_pickles(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, str(tmp_path / LORA_FILE))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    assert adapter_file(tmp_path) == LORA_FILE
    (tmp_path / LORA_FILE).unlink()
    assert adapter_file(tmp_path) == "other.safetensors"
    (tmp_path / "old.ckpt").write_bytes(b"x")
    with pytest.raises(InvalidArgument, match="pickle"):
        adapter_file(tmp_path)
