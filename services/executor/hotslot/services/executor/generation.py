"""One text-to-image run on a materialized pipeline: parameter validation against the executor's bounds, the
denoising loop with per-step progress and cancellation between steps, and deterministic PNG encoding."""
from __future__ import annotations

import io
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from hotslot.errors import Cancelled, FieldViolation, InvalidArgument


@dataclass(frozen=True)
class GenerationLimits:
    """Bounds and defaults an executor enforces; each is a setting."""

    max_width: int = 1024
    max_height: int = 1024
    max_steps: int = 150
    max_images: int = 4
    max_prompt_chars: int = 2000
    default_steps: int = 25
    default_guidance: float = 7.5
    default_width: int = 512
    default_height: int = 512
    max_guidance: float = 50.0


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 0
    guidance_scale: float | None = None
    """None: the executor's default; 0 turns classifier-free guidance off."""
    width: int = 0
    height: int = 0
    seed: int | None = None
    """None: a random seed, drawn in `validate`."""
    num_images: int = 0


@dataclass
class GenerationResult:
    images: list[tuple[bytes, int, int, int]]  # (png, width, height, seed)
    denoise_s: float
    encode_s: float
    steps_done: int = 0
    step_times: list[float] = field(default_factory=list)


def _seed(params: GenerationParams) -> int:
    """The seed of parameters that went through `validate` (which draws one where none was given)."""
    if params.seed is None:
        raise ValueError("generation parameters must be validated first")
    return params.seed


def validate(params: GenerationParams, limits: GenerationLimits) -> GenerationParams:
    """Fills defaults and checks every bound; all violations are reported at once so a user fixes them in one go."""
    guidance = limits.default_guidance if params.guidance_scale is None else params.guidance_scale
    seed = secrets.randbelow(2**63) if params.seed is None else params.seed
    p = replace(
        params,
        steps=params.steps or limits.default_steps,
        guidance_scale=guidance,
        seed=seed,
        width=params.width or limits.default_width,
        height=params.height or limits.default_height,
        num_images=params.num_images or 1,
    )
    bad: list[FieldViolation] = []
    if not p.prompt.strip():
        bad.append(FieldViolation("params.prompt", "is required"))
    for name, text in (("params.prompt", p.prompt), ("params.negative_prompt", p.negative_prompt)):
        if len(text) > limits.max_prompt_chars:
            bad.append(FieldViolation(name, f"is {len(text)} characters; the limit is {limits.max_prompt_chars}"))
    for name, value, top in (("params.width", p.width, limits.max_width), ("params.height", p.height, limits.max_height)):
        if value < 8 or value % 8 or value > top:
            bad.append(FieldViolation(name, f"is {value}; use a multiple of 8 from 8 to {top}"))
    if not 1 <= p.steps <= limits.max_steps:
        bad.append(FieldViolation("params.steps", f"is {p.steps}; use 1 to {limits.max_steps}"))
    if not 1 <= p.num_images <= limits.max_images:
        bad.append(FieldViolation("params.num_images", f"is {p.num_images}; use 1 to {limits.max_images}"))
    if not 0 <= guidance <= limits.max_guidance or guidance != guidance:
        bad.append(FieldViolation("params.guidance_scale", f"is {guidance}; use 0 to {limits.max_guidance:g}"))
    if not 0 <= seed < 2**63:
        bad.append(FieldViolation("params.seed", "must be below 2^63"))
    if bad:
        raise InvalidArgument("; ".join(f"{v.field} {v.description}" for v in bad), bad)
    return p


def encode_png(pixels) -> bytes:
    """uint8 HxWx3 array -> PNG bytes with no metadata, so equal pixels give equal bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def batch_key(params: GenerationParams) -> tuple:
    """Requests with equal keys (and the same model, hence scheduler, and adapters) can share one pipeline call;
    prompts, negative prompts and seeds are per image."""
    return (params.steps, params.guidance_scale, params.width, params.height)


def run_pipeline(
    pipe,
    params: GenerationParams,
    *,
    device: str,
    on_step: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Runs the pipeline for one request; blocking (call it from a worker thread). `should_stop` is polled between
    steps: when it returns True denoising stops and Cancelled is raised, freeing the device for the next request."""
    result = run_batch(pipe, [params], device=device, on_step=on_step,
                       should_stop=[should_stop] if should_stop is not None else None)[0]
    assert result is not None  # a lone request that stops raises Cancelled
    return result


def run_batch(
    pipe,
    requests: Sequence[GenerationParams],
    *,
    device: str,
    on_step: Callable[[int, int, float], None] | None = None,
    should_stop: Sequence[Callable[[], bool]] | None = None,
) -> list[GenerationResult | None]:
    """Runs requests with equal steps, guidance scale and size as one pipeline call, each with its own prompts and
    one generator per image (seed + i within a request, as alone). Returns one result per request, None for a
    request whose `should_stop` turned True during the call (its images are dropped); the call itself stops, and
    Cancelled is raised, only when every request has stopped. Blocking (call it from a worker thread).

    Batched images can differ from the same request run alone in the last bits (batched kernels sum in another
    order): on the tiny test pipeline on CPU by up to ~1.4e-6 before quantization, one level of one 8-bit channel."""
    import numpy as np
    import torch

    first = requests[0]
    assert all(batch_key(p) == batch_key(first) for p in requests), "a batch needs equal steps, guidance scale and size"
    stops = list(should_stop) if should_stop is not None else [lambda: False] * len(requests)

    def all_stopped() -> bool:
        return all(stop() for stop in stops)

    started = time.perf_counter()
    step_times: list[float] = []

    def callback(pipeline, step: int, timestep, callback_kwargs):
        now = time.perf_counter()
        step_times.append(now)
        if on_step is not None:
            on_step(step + 1, first.steps, now - started)
        if all_stopped():
            raise _Stop()
        return callback_kwargs

    generator_device = device if device.startswith("cuda") else "cpu"
    generators = [torch.Generator(device=generator_device).manual_seed(_seed(p) + i)
                  for p in requests for i in range(p.num_images)]
    prompts = [p.prompt for p in requests for _ in range(p.num_images)]
    # An empty negative prompt is what the pipeline uses for None, so requests with and without one can share a call.
    negatives = [p.negative_prompt for p in requests for _ in range(p.num_images)]
    if all_stopped():
        raise Cancelled("request cancelled before denoising started")
    try:
        pipe.set_progress_bar_config(disable=True)  # progress goes to on_step; no tqdm bar per request in the log
        with torch.inference_mode():
            out = pipe(
                prompt=prompts,
                negative_prompt=negatives if any(negatives) else None,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                width=first.width,
                height=first.height,
                generator=generators,
                output_type="np",
                callback_on_step_end=callback,
            )
    except _Stop:
        raise Cancelled(f"request cancelled after {len(step_times)} of {first.steps} steps") from None
    denoise_end = step_times[-1] if step_times else time.perf_counter()
    arrays = (np.clip(out.images, 0.0, 1.0) * 255).round().astype("uint8")
    results: list[GenerationResult | None] = []
    offset = 0
    for params, stop in zip(requests, stops, strict=True):
        mine = arrays[offset:offset + params.num_images]
        offset += params.num_images
        if stop():
            results.append(None)
            continue
        results.append(GenerationResult(
            images=[(encode_png(arr), int(arr.shape[1]), int(arr.shape[0]), _seed(params) + i)
                    for i, arr in enumerate(mine)],
            denoise_s=denoise_end - started, encode_s=0.0, steps_done=len(step_times), step_times=step_times,
        ))
    encode_s = time.perf_counter() - denoise_end
    for result in results:
        if result is not None:
            result.encode_s = encode_s
    return results


class _Stop(Exception):
    """Raised inside the pipeline's step callback to leave the denoising loop."""
