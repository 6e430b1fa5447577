"""Fixtures shared by every test: offline Hugging Face settings and tiny real models written once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may reach a model hub at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three tiny Stable-Diffusion pipelines sharing VAE, text encoder, tokenizer and scheduler byte for byte."""
    from hotslot.modelgen import write_family

    root = tmp_path_factory.mktemp("family")
    return write_family(root, 3, prefix="tiny-sd", seed=0)
