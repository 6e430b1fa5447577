"""Generation parameters: defaults, bounds, and messages that name the field and the allowed range."""
from __future__ import annotations

import pytest

from hotslot.errors import InvalidArgument
from hotslot.services.executor.generation import GenerationLimits, GenerationParams, encode_png, validate

LIMITS = GenerationLimits(max_width=256, max_height=256, max_steps=50, max_images=2, max_prompt_chars=100,
                          default_steps=10, default_guidance=5.0, default_width=64, default_height=64)


def test_defaults_fill_unset_fields() -> None:
    p = validate(GenerationParams(prompt="a cat"), LIMITS)
    assert (p.steps, p.guidance_scale, p.width, p.height, p.num_images) == (10, 5.0, 64, 64, 1)


def test_guidance_zero_is_kept_and_an_absent_seed_is_drawn_per_request() -> None:
    assert validate(GenerationParams(prompt="a cat", guidance_scale=0.0), LIMITS).guidance_scale == 0.0
    assert validate(GenerationParams(prompt="a cat", seed=0), LIMITS).seed == 0
    seeds = {validate(GenerationParams(prompt="a cat"), LIMITS).seed for _ in range(5)}
    assert len(seeds) == 5 and all(0 <= seed < 2**63 for seed in seeds)


@pytest.mark.parametrize(
    ("params", "field", "needle"),
    [
        (dict(prompt=""), "params.prompt", "required"),
        (dict(prompt="x" * 101), "params.prompt", "limit is 100"),
        (dict(prompt="a", negative_prompt="y" * 101), "params.negative_prompt", "limit is 100"),
        (dict(prompt="a", width=65), "params.width", "multiple of 8 from 8 to 256"),
        (dict(prompt="a", height=512), "params.height", "multiple of 8 from 8 to 256"),
        (dict(prompt="a", steps=51), "params.steps", "1 to 50"),
        (dict(prompt="a", steps=-1), "params.steps", "1 to 50"),
        (dict(prompt="a", num_images=3), "params.num_images", "1 to 2"),
        (dict(prompt="a", guidance_scale=-2), "params.guidance_scale", "0 to 50"),
    ],
)
def test_each_bound_is_named(params, field, needle) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate(GenerationParams(**params), LIMITS)
    assert [v.field for v in err.value.violations] == [field]
    assert needle in err.value.message


def test_all_violations_are_reported_together() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate(GenerationParams(prompt="", width=7, steps=99), LIMITS)
    assert {v.field for v in err.value.violations} == {"params.prompt", "params.width", "params.steps"}


def test_png_encoding_is_deterministic() -> None:
    import numpy as np

    pixels = np.arange(8 * 8 * 3, dtype="uint8").reshape(8, 8, 3)
    assert encode_png(pixels) == encode_png(pixels.copy())
    assert encode_png(pixels)[:8] == b"\x89PNG\r\n\x1a\n"
