"""hotslot.modelgen and `hotslot dev make-model`: tiny random Stable-Diffusion pipelines, offline."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hotslot.cli.dev import dev_app
from hotslot.modelgen import (
    PICKLE_SUFFIXES,
    family_member_seed,
    tree_stats,
    write_family,
    write_tiny_pipeline,
)

SHARED_PARTS = ("model_index.json", "vae", "text_encoder", "tokenizer", "scheduler")


@pytest.fixture(scope="module", autouse=True)
def _offline():
    """No test here may reach a hub: these models are local and complete."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("modelgen")


@pytest.fixture(scope="module")
def model(root: Path) -> Path:
    return write_tiny_pipeline(root / "tiny", seed=0)


@pytest.fixture(scope="module")
def family(root: Path) -> list[Path]:
    return write_family(root / "family", 3, prefix="m", seed=7)


def hashes(path: Path, *parts: str) -> dict[str, str]:
    """sha256 of every file under `path` (or under `path/part` for each part), keyed by relative path."""
    tops = [path / p for p in parts] if parts else [path]
    files = [f for top in tops for f in ([top] if top.is_file() else top.rglob("*")) if f.is_file()]
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(files)}


def generate(pipe, prompt: str = "a cat", seed: int = 0) -> np.ndarray:
    out = pipe(
        prompt,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images


def test_layout(model: Path):
    files = set(hashes(model))
    assert files == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    }
    n_files, n_bytes = tree_stats(model)
    assert n_files == 12
    assert n_bytes < 8_000_000
    assert not [p.name for p in model.parent.iterdir() if p.name.startswith(".")], "temporary dir left behind"


def test_loads_offline_and_generates(model: Path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)

    first = generate(pipe)
    assert first.shape == (1, 64, 64, 3)
    assert not np.isnan(first).any()
    assert first.std() > 0, "a constant image means some component is dead"
    np.testing.assert_array_equal(first, generate(pipe))
    assert not np.array_equal(first, generate(pipe, seed=1))
    assert not np.array_equal(first, generate(pipe, prompt="a dog")), "the prompt must reach the UNet"

    generic = DiffusionPipeline.from_pretrained(str(model), local_files_only=True)
    assert isinstance(generic, StableDiffusionPipeline)


def test_tokenizer_is_byte_level_bpe(model: Path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(model / "tokenizer"), local_files_only=True)
    assert tok.tokenize("A photo of a CAT") == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    ids = tok("zebra, 42 ü")["input_ids"]  # unknown words fall back to bytes, never to <unk>
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "zebra,42ü"


def test_same_arguments_give_identical_bytes(model: Path, root: Path):
    again = write_tiny_pipeline(root / "tiny-again", seed=0)
    assert hashes(again) == hashes(model)


def test_seed_changes_only_the_unet(model: Path, root: Path):
    other = write_tiny_pipeline(root / "tiny-seed1", seed=1, shared_seed=0)
    a, b = hashes(model), hashes(other)
    differ = {name for name in a if a[name] != b[name]}
    assert differ == {"unet/diffusion_pytorch_model.safetensors"}


def test_shared_seed_defaults_to_seed(model: Path, root: Path):
    other = write_tiny_pipeline(root / "tiny-shared1", seed=0, shared_seed=1)
    a, b = hashes(model), hashes(other)
    differ = {name for name in a if a[name] != b[name]}
    assert differ == {"vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}


def test_family_shares_everything_but_the_unet(family: list[Path], root: Path):
    assert [p.name for p in family] == ["m-0", "m-1", "m-2"]
    assert all(p.parent == root / "family" for p in family)
    shared = [hashes(p, *SHARED_PARTS) for p in family]
    assert shared[0] and shared[0] == shared[1] == shared[2]
    unets = {hashes(p, "unet")["unet/diffusion_pytorch_model.safetensors"] for p in family}
    assert len(unets) == 3
    configs = {hashes(p, "unet")["unet/config.json"] for p in family}
    assert len(configs) == 1


def test_family_member_equals_single_model_with_its_seeds(family: list[Path], root: Path):
    single = write_tiny_pipeline(root / "member1", seed=family_member_seed(7, 1), shared_seed=7)
    assert hashes(single) == hashes(family[1])


def test_family_members_load_and_differ(family: list[Path]):
    from diffusers import StableDiffusionPipeline

    images = []
    for path in family[:2]:
        pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        images.append(generate(pipe))
    assert not np.array_equal(images[0], images[1])


def test_no_pickle_files(model: Path, family: list[Path]):
    for path in [model, *family]:
        found = [p for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
        assert found == []
        weights = [p.name for p in path.rglob("*") if p.is_file() and p.suffix not in {".json", ".txt"}]
        assert weights and all(name.endswith(".safetensors") for name in weights)


def test_refuses_non_empty_dest_unless_overwrite(root: Path):
    dest = root / "occupied"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        write_tiny_pipeline(dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]

    write_tiny_pipeline(dest, overwrite=True)
    assert not (dest / "keep.txt").exists()
    assert (dest / "model_index.json").is_file()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "temporary dir left behind"


def test_family_checks_every_member_before_writing(root: Path):
    fam = root / "occupied-family"
    (fam / "x-1").mkdir(parents=True)
    (fam / "x-1" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="x-1 exists and is not empty"):
        write_family(fam, 2, prefix="x")
    assert sorted(p.name for p in fam.iterdir()) == ["x-1"], "x-0 must not be written when x-1 is refused"


def test_accepts_empty_dest_and_rejects_files(root: Path):
    empty = root / "empty"
    empty.mkdir()
    write_tiny_pipeline(empty)
    assert (empty / "unet" / "config.json").is_file()

    a_file = root / "a-file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        write_tiny_pipeline(a_file, overwrite=True)


def test_bad_arguments(root: Path):
    with pytest.raises(ValueError, match="image_size"):
        write_tiny_pipeline(root / "bad-size", image_size=60)
    with pytest.raises(ValueError, match="at least one"):
        write_family(root / "bad-family", 0)
    with pytest.raises(ValueError, match="prefix"):
        write_family(root / "bad-family", 1, prefix="../escape")
    assert not (root / "bad-size").exists() and not (root / "bad-family").exists()


def test_cli_make_model(root: Path, model: Path):
    runner = CliRunner()
    dest = root / "cli-one"
    result = runner.invoke(dev_app, ["make-model", str(dest)])
    assert result.exit_code == 0, result.output
    files, size = tree_stats(dest)
    assert f"wrote {dest}" in result.output
    assert f"{files} files, {size} bytes" in result.output
    assert hashes(dest) == hashes(model)

    result = runner.invoke(dev_app, ["make-model", str(dest), "--seed", "1"])
    assert result.exit_code == 2
    assert "not empty" in result.output

    result = runner.invoke(
        dev_app, ["make-model", str(dest), "--seed", "1", "--shared-seed", "0", "--overwrite"]
    )
    assert result.exit_code == 0, result.output
    assert hashes(dest, "vae") == hashes(model, "vae")
    assert hashes(dest, "unet") != hashes(model, "unet")


def test_cli_make_family(root: Path, family: list[Path]):
    dest = root / "cli-family"
    result = CliRunner().invoke(
        dev_app, ["make-model", str(dest), "--family", "2", "--prefix", "m", "--seed", "7"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in dest.iterdir()) == ["m-0", "m-1"]
    assert hashes(dest / "m-1") == hashes(family[1])
    assert "total: 2 models, 24 files" in result.output
