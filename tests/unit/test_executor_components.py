"""Components that models share byte for byte are held once: the pool's reference counts, the slot manager's
accounting (shared bytes counted once, in the fastest tier holding them), and the loader on real tiny fine-tunes of
one family (VAE and text encoder read once, one module in every pipeline, images as diffusers makes them, a
text-encoder LoRA on one pipeline leaving the others' images alone)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hotslot.manifest import scan_model_dir
from hotslot.modelgen import write_family
from hotslot.modelgen.lora import write_lora
from hotslot.services.executor.components import ComponentPool, SharedComponent, component_id
from hotslot.services.executor.loader import ModelLoader
from hotslot.services.executor.lora import AdapterWeights, adapter_file
from hotslot.services.executor.slots import ModelKey, SlotManager, Tier

# -- the pool ---------------------------------------------------------------------------------------------------


def part(cid: str, nbytes: int = 10) -> SharedComponent:
    return SharedComponent(cid, "vae", [], {}, nbytes)


def test_a_component_is_freed_only_when_its_last_user_releases_it() -> None:
    pool = ComponentPool()
    vae = pool.add(part("v"), "a@1")
    assert pool.take("v", "b@1") is vae and vae.users == {"a@1", "b@1"}
    assert pool.shared() == [vae]
    vae.module = object()
    assert not pool.release(vae, "a@1")
    assert pool.take("v", "c@1") is vae and vae.module is not None
    assert not pool.release(vae, "b@1")
    assert pool.release(vae, "c@1")
    assert len(pool) == 0 and vae.module is None
    assert pool.take("v", "d@1") is None


def test_an_equal_component_read_twice_at_once_is_held_once() -> None:
    pool = ComponentPool()
    first = pool.add(part("v"), "a@1")
    second = pool.add(part("v"), "b@1")
    assert second is first and first.users == {"a@1", "b@1"} and len(pool) == 1


def test_component_identity_follows_every_file_digest_class_and_dtype() -> None:
    digests = {"vae/config.json": "c1", "vae/diffusion_pytorch_model.safetensors": "w1", "unet/config.json": "u"}
    same = component_id("diffusers", "AutoencoderKL", "torch.float32", "cpu", "vae", dict(digests))
    assert same == component_id("diffusers", "AutoencoderKL", "torch.float32", "cpu", "vae", dict(digests))
    other_weights = {**digests, "vae/diffusion_pytorch_model.safetensors": "w2"}
    other_config = {**digests, "vae/config.json": "c2"}
    for changed in (
        component_id("diffusers", "AutoencoderKL", "torch.float32", "cpu", "vae", other_weights),
        component_id("diffusers", "AutoencoderKL", "torch.float32", "cpu", "vae", other_config),
        component_id("diffusers", "AutoencoderKL", "torch.float16", "cpu", "vae", digests),
        component_id("diffusers", "AutoencoderTiny", "torch.float32", "cpu", "vae", digests),
    ):
        assert changed != same
    assert component_id("diffusers", "AutoencoderKL", "torch.float32", "cpu", "vae_2", digests) is None


# -- the slot manager's accounting ------------------------------------------------------------------------------

SHARED = {"vae": 10, "te": 20}


def slots(host: int = 10_000) -> SlotManager:
    return SlotManager(active_budget_bytes=10_000, standby_budget_bytes=10_000, host_budget_bytes=host)


def add(s: SlotManager, name: str, parts: dict[str, int], size: int = 100):
    entry = s.add_host(ModelKey(name, 1), object(), size, parts={**parts, f"unet-{name}": size - sum(parts.values())})
    s.release(entry)
    return entry


def test_shared_parts_are_counted_once_in_the_fastest_tier_that_holds_them() -> None:
    s = slots()
    a, _b = add(s, "a", SHARED), add(s, "b", SHARED)
    assert s.used(Tier.HOST) == 70 + 70 + 30
    held = {m.key.model_id: m for m in s.held()}
    assert (held["a"].unique_bytes, held["a"].shared_bytes, held["a"].size_bytes) == (70, 30, 100)
    s.activate(a, pipeline=object())
    assert s.used(Tier.ACTIVE) == 100 and s.used(Tier.HOST) == 70
    s.evict(ModelKey("a", 1))
    held = {m.key.model_id: m for m in s.held()}
    assert (held["b"].unique_bytes, held["b"].shared_bytes) == (100, 0)
    assert s.used(Tier.HOST) == 100 and s.used(Tier.ACTIVE) == 0


def test_a_budget_holds_more_fine_tunes_when_they_share_components() -> None:
    shared = slots(host=250)
    for name in "abc":
        add(shared, name, SHARED)
    assert len(shared.held()) == 3 and shared.used(Tier.HOST) == 240
    alone = slots(host=250)
    for name in "abc":
        add(alone, name, {})
    assert len(alone.held()) == 2  # 300 bytes without sharing: the least recently used went


# -- the loader on real tiny pipelines --------------------------------------------------------------------------


class _NoChild:
    """The loader maps files stored in the wanted dtype (CPU, map_files) and reads nothing through a child; with no
    child to hand it to, it checks the mapped files itself."""

    def release(self, key: str) -> None:
        pass

    def idle(self) -> bool:
        return False


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_family(tmp_path_factory.mktemp("shared-family"), 3, prefix="fam", seed=11)


def digests(path: Path) -> dict[str, str]:
    return {f.path: f.sha256 for f in scan_model_dir(path.parent, path.name).files}


def image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        return pipe("a red cube", num_inference_steps=2, generator=torch.Generator().manual_seed(5),
                    output_type="np", height=32, width=32).images


def lora_keys(module: torch.nn.Module) -> list[str]:
    return [k for k in module.state_dict() if "lora_" in k]


def test_fine_tunes_of_one_family_share_one_vae_and_text_encoder_and_draw_what_diffusers_draws(family) -> None:
    from diffusers import StableDiffusionPipeline

    loader = ModelLoader(_NoChild(), device="cpu", dtype=torch.float32, chunk_bytes=1 << 20, map_files=True)
    a = loader.read("fam-0@1", str(family[0]), 60, digests(family[0])).weights
    b = loader.read("fam-1@1", str(family[1]), 60, digests(family[1])).weights
    assert a.parts["vae"] is b.parts["vae"] and a.parts["text_encoder"] is b.parts["text_encoder"]
    assert a.parts["unet"] is not b.parts["unet"]
    assert len(loader.components) == 4  # one VAE, one text encoder, two UNets
    assert set(a.part_sizes()) & set(b.part_sizes()) == {a.parts["vae"].component_id,
                                                          a.parts["text_encoder"].component_id}
    pa, _ = loader.materialize(a)
    pb, _ = loader.materialize(b)
    assert pa.vae is pb.vae and pa.text_encoder is pb.text_encoder and pa.unet is not pb.unet
    for pipe, path in ((pa, family[0]), (pb, family[1])):
        reference = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, safety_checker=None)
        assert np.array_equal(image(pipe), image(reference))
    before_b = image(pb)
    a.release()
    assert b.parts["vae"].users == {"fam-1@1"} and len(loader.components) == 3
    assert np.array_equal(image(pb), before_b)
    b.release()
    assert len(loader.components) == 0


def test_without_digests_nothing_is_shared(family) -> None:
    loader = ModelLoader(_NoChild(), device="cpu", dtype=torch.float32, chunk_bytes=1 << 20, map_files=True)
    a = loader.read("fam-0@1", str(family[0]), 60).weights
    b = loader.read("fam-1@1", str(family[1]), 60).weights
    assert not set(a.part_sizes()) & set(b.part_sizes()) and len(loader.components) == 6


def test_a_text_encoder_lora_changes_only_the_images_of_the_pipeline_it_is_on(family, tmp_path: Path) -> None:
    loader = ModelLoader(_NoChild(), device="cpu", dtype=torch.float32, chunk_bytes=1 << 20, map_files=True)
    a = loader.read("fam-0@1", str(family[0]), 60, digests(family[0])).weights
    b = loader.read("fam-1@1", str(family[1]), 60, digests(family[1])).weights
    pa, _ = loader.materialize(a)
    pb, _ = loader.materialize(b)
    plain_a, plain_b = image(pa), image(pb)
    lora = write_lora(tmp_path / "te", family[0], seed=3, text_encoder=True, unet=False)
    tensors = load_file(str(lora / adapter_file(lora)))
    weights = AdapterWeights(tensors, None, sum(t.numel() * t.element_size() for t in tensors.values()))
    loader.apply_adapters(pa, [("te", weights, 1.0)], {"te": weights})
    assert pa.text_encoder is not pb.text_encoder  # a tree of its own, over the same weight tensors
    assert lora_keys(pa.text_encoder) and not lora_keys(pb.text_encoder)
    ptrs = {p.data_ptr() for p in pa.text_encoder.parameters()}
    assert {p.data_ptr() for p in pb.text_encoder.parameters()} <= ptrs  # not one weight copied
    assert not np.array_equal(image(pa), plain_a)
    assert np.array_equal(image(pb), plain_b)
    # a model read later gets the held text encoder, which no adapter ever touched
    c = loader.read("fam-2@1", str(family[2]), 60, digests(family[2])).weights
    pc, _ = loader.materialize(c)
    assert pc.text_encoder is pb.text_encoder and not lora_keys(pc.text_encoder)
    loader.apply_adapters(pa, [], {"te": weights})
    assert np.array_equal(image(pa), plain_a)
