"""`hotslot dev make-lora` / hotslot.modelgen.lora: tiny real LoRA adapters for a tiny base, byte-identical for the
same arguments, in PEFT or kohya naming, that diffusers loads onto the base."""
from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from hotslot.cli.main import app
from hotslot.modelgen import write_tiny_pipeline
from hotslot.modelgen.lora import LORA_FILE, lora_targets, write_lora


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_pipeline(tmp_path_factory.mktemp("modelgen-lora") / "base", seed=0)


def test_same_arguments_give_identical_bytes_and_the_seed_changes_them(base: Path, tmp_path: Path) -> None:
    one = (write_lora(tmp_path / "one", base, seed=3) / LORA_FILE).read_bytes()
    two = (write_lora(tmp_path / "two", base, seed=3) / LORA_FILE).read_bytes()
    other = (write_lora(tmp_path / "other", base, seed=4) / LORA_FILE).read_bytes()
    assert one == two and one != other


def test_keys_and_shapes_follow_the_base_in_peft_and_kohya_naming(base: Path, tmp_path: Path) -> None:
    targets = lora_targets(base, text_encoder=True)
    assert {t.component for t in targets} == {"unet", "text_encoder"}
    peft = load_file(str(write_lora(tmp_path / "p", base, rank=5, text_encoder=True) / LORA_FILE))
    assert len(peft) == 2 * len(targets)
    for t in targets:
        assert peft[f"{t.component}.{t.name}.lora_A.weight"].shape == (5, t.in_features)
        assert peft[f"{t.component}.{t.name}.lora_B.weight"].shape == (t.out_features, 5)
    kohya = load_file(str(write_lora(tmp_path / "k", base, rank=5, fmt="kohya") / LORA_FILE))
    unet = [t for t in targets if t.component == "unet"]
    assert len(kohya) == 3 * len(unet)
    stem = f"lora_unet_{unet[0].name.replace('.', '_')}"
    assert kohya[f"{stem}.lora_down.weight"].shape == (5, unet[0].in_features)
    assert float(kohya[f"{stem}.alpha"]) == 5.0


def test_diffusers_loads_it_onto_the_base(base: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True, safety_checker=None)
    pipe.load_lora_weights(str(write_lora(tmp_path / "a", base, text_encoder=True)), adapter_name="a")
    adapters = pipe.get_list_adapters()
    assert adapters["unet"] == ["a"] and adapters["text_encoder"] == ["a"]


def test_make_lora_command_writes_an_adapter_and_refuses_a_non_pipeline(base: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(app, ["dev", "make-lora", str(tmp_path / "cli"), "--base", str(base), "--rank", "2",
                               "--seed", "1", "--text-encoder"])
    assert done.exit_code == 0, done.output
    assert "wrote" in done.output and (tmp_path / "cli" / LORA_FILE).is_file()
    refused = runner.invoke(app, ["dev", "make-lora", str(tmp_path / "x"), "--base", str(tmp_path)])
    assert refused.exit_code == 2 and "not a pipeline directory" in refused.output
