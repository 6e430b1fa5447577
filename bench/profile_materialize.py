"""Profile of the executor's materialize phase (not a test): host tier -> a ready diffusers pipeline, for a ~200 MB
SD-shaped pipeline whose weights are already in shared memory, against two baselines measured in the same run:

  memcpy          `dst.copy_(src)` of the same bytes into preallocated tensors (the speed limit of any phase that
                  touches every weight byte once; materialize touches none, so it should beat it)
  from_pretrained diffusers `DiffusionPipeline.from_pretrained` of the same directory from the page cache (its fast
                  path needs `accelerate` importable; the header says whether it was)

The model (written once to bench/.data/materialize/sd-small): SD 1.5's architecture (the same blocks, layers and
module count) at smaller widths: UNet 96-192-384-384 channels, VAE 32-64-128-128, a 12-layer CLIP text tower of width
256, the tiny BPE tokenizer of `hotslot.modelgen`, SD's DDIM scheduler; random fp16 weights, ~212 MB.

The weights are read once with `hotslot.loading.reader` into shared memory (as the preloader hands them over); then
`build_pipeline` runs --repeat times with one warm SkeletonCache (as the executor's ModelLoader holds it), and once
more under cProfile for the breakdown by part.

    PYTHONPATH=bench/.data/pydeps flock /tmp/hotslot-bench.lock .venv/bin/python bench/profile_materialize.py
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.util
import io
import os
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from hotslot.loading.layout import read_layout  # noqa: E402
from hotslot.loading.materialize import build_pipeline  # noqa: E402
from hotslot.loading.reader import read_safetensors  # noqa: E402
from hotslot.loading.skeleton import SkeletonCache  # noqa: E402

DATA = Path(__file__).resolve().parent / ".data" / "materialize"
MB = 1e6
WIDTH = 256  # text tower width = the UNet's cross-attention width
UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(96, 192, 384, 384),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=WIDTH, attention_head_dim=8,
    norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128, 128),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=256, scaling_factor=0.18215,
)
TEXT = dict(
    vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=WIDTH,
)


def write_model(dest: Path) -> None:
    """The pipeline directory, written beside `dest` and renamed into place."""
    import json
    import shutil

    import diffusers
    from bench_executor import SCHEDULER, save_random
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from hotslot.modelgen import BOS_TOKEN, EOS_TOKEN, _bpe_vocab_and_merges, _tokenizer_files

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vocab, _ = _bpe_vocab_and_merges()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**VAE)
        text = CLIPTextModel(CLIPTextConfig(
            **TEXT, bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN], pad_token_id=vocab[EOS_TOKEN]))
    index: dict[str, object] = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "requires_safety_checker": False, "tokenizer": ["transformers", "CLIPTokenizer"],
        **{name: [None, None] for name in ("safety_checker", "feature_extractor", "image_encoder")},
    }
    for name, module, seed in (("unet", unet, 100), ("vae", vae, 1), ("text_encoder", text, 2)):
        save_random(module, seed, tmp / name)
        index[name] = [type(module).__module__.split(".")[0], type(module).__name__]
    DDIMScheduler(**SCHEDULER).save_pretrained(tmp / "scheduler")
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    (tmp / "tokenizer").mkdir()
    for name, data in _tokenizer_files().items():
        (tmp / "tokenizer" / name).write_bytes(data)
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    tmp.rename(dest)


def interleaved(fns: list, repeat: int) -> list[tuple[float, float]]:
    """(min, median) seconds of `repeat` calls of each function, the calls interleaved (a, b, a, b, ...) so load
    from other processes hits each alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, out in zip(fns, times, strict=True):
            gc.collect()
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [(min(t), statistics.median(t)) for t in times]


# Functions whose cumulative time the breakdown shows, by (file name ending, function name).
PARTS = (
    ("materialize.py", "build_pipeline", "build_pipeline (all)"),
    ("skeleton.py", "get", "SkeletonCache.get (deep copy of the skeleton)"),
    ("skeleton.py", "instantiate", "Skeleton.instantiate (clone by plan)"),
    ("copy.py", "deepcopy", "copy.deepcopy (all callers)"),
    ("materialize.py", "materialize_module", "materialize_module"),
    ("materialize.py", "materialize_skeleton", "materialize_skeleton"),
    ("materialize.py", "_align_keys", "_align_keys"),
    ("module.py", "state_dict", "Module.state_dict"),
    ("module.py", "load_state_dict", "Module.load_state_dict"),
    ("materialize.py", "_assign", "_assign (tensors into slots)"),
    ("modeling_utils.py", "tie_weights", "tie_weights"),
    ("materialize.py", "_own_buffers", "_own_buffers (buffers copied/moved)"),
    ("materialize.py", "meta_tensors", "meta_tensors"),
    ("materialize.py", "_non_persistent_buffers", "_non_persistent_buffers"),
    ("skeleton.py", "load_plain_component", "load_plain_component (from files)"),
    ("skeleton.py", "plain_component", "SkeletonCache.plain_component"),
    ("tokenization_utils_base.py", "from_pretrained", "tokenizer from_pretrained"),
    ("scheduling_utils.py", "from_pretrained", "scheduler from_pretrained"),
    ("configuration_utils.py", "from_config", "ConfigMixin.from_config"),
    ("materialize.py", "assemble_pipeline", "assemble_pipeline"),
    ("inspect.py", "signature", "inspect.signature"),
    ("configuration_utils.py", "register_to_config", "register_to_config"),
)


def breakdown(run, calls: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        run()
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        for suffix, name, label in PARTS:
            if func == name and file.endswith(suffix):
                rows.append((label, ct / calls))
    merged: dict[str, float] = {}
    for label, t in rows:
        merged[label] = merged.get(label, 0.0) + t
    order = [label for _, _, label in PARTS]
    lines = [f"  {label:<44} {merged[label] * 1e3:8.2f} ms" for label in order if label in merged]
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    top = [ln for ln in out.getvalue().splitlines() if ln.strip()][-13:]
    return "\n".join(lines + ["  top by own time (cProfile, all calls):"] + ["    " + ln for ln in top])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float16", choices=("float16", "float32", "bfloat16"))
    p.add_argument("--repeat", type=int, default=50,
                   help="materialize and memcpy calls timed, interleaved (after one warm-up call each)")
    p.add_argument("--pretrained-repeat", type=int, default=3, help="from_pretrained calls timed")
    p.add_argument("--profile-calls", type=int, default=5, help="materialize calls under cProfile")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    warnings.filterwarnings("ignore")
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    load_start = os.getloadavg()
    model = DATA / "sd-small"
    if not model.is_dir():
        print(f"writing {model} ...", flush=True)
        write_model(model)
    accelerate = importlib.util.find_spec("accelerate") is not None
    print(f"model {model.relative_to(DATA.parents[1])}, dtype {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"accelerate {'importable: diffusers fast path' if accelerate else 'missing: diffusers random init'}")

    layout = read_layout(model)
    files = [(c, read_safetensors(f, dtype=dtype)) for c, comp in layout.weight_components().items()
             for f in comp.weight_files]
    state_dicts: dict[str, dict[str, torch.Tensor]] = {}
    for cname, loaded in files:
        state_dicts.setdefault(cname, {}).update(loaded.tensors())
    nbytes = sum(loaded.nbytes for _, loaded in files)
    ntensors = sum(len(sd) for sd in state_dicts.values())

    # as the executor's ModelLoader.warmup does: imported objects leave the collector's generations, so a full
    # collection (0.2-0.5 s here) cannot land inside a timed call
    gc.collect()
    gc.freeze()
    srcs = [loaded.buffer for _, loaded in files]
    dsts = [torch.empty_like(b) for b in srcs]

    def memcpy() -> None:
        for d, s in zip(dsts, srcs, strict=True):
            d.copy_(s)

    memcpy()  # first touch of the destination pages is not the copy's cost
    skeletons = SkeletonCache()

    def materialize() -> None:
        build_pipeline(layout, state_dicts, skeletons=skeletons, dtype=dtype)

    t0 = time.perf_counter()
    materialize()
    first_s = time.perf_counter() - t0
    (copy_min, copy_med), (mat_min, mat_med) = interleaved([memcpy, materialize], args.repeat)

    from diffusers import DiffusionPipeline

    def pretrained() -> None:
        DiffusionPipeline.from_pretrained(model, local_files_only=True, torch_dtype=dtype)

    pretrained()  # page cache and diffusers' own lazy imports
    ((pre_min, pre_med),) = interleaved([pretrained], args.pretrained_repeat)
    parts = breakdown(materialize, args.profile_calls)
    load_end = os.getloadavg()

    def gbs(s: float) -> str:
        return f"{nbytes / s / 1e9:6.2f} GB/s"

    print(f"{nbytes / MB:.0f} MB in {len(files)} files, {ntensors} tensors; load average "
          f"{load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    print(f"{'':<34}{'min':>10}{'median':>10}")
    print(f"{'memcpy (dst.copy_(src))':<34}{copy_min * 1e3:8.1f}ms{copy_med * 1e3:8.1f}ms   {gbs(copy_min)}")
    print(f"{'materialize (warm skeleton cache)':<34}{mat_min * 1e3:8.1f}ms{mat_med * 1e3:8.1f}ms   {gbs(mat_min)}"
          f"   (first call, cold cache: {first_s * 1e3:.0f} ms)")
    print(f"{'diffusers from_pretrained':<34}{pre_min * 1e3:8.1f}ms{pre_med * 1e3:8.1f}ms")
    print(f"materialize speed / memcpy speed: {copy_min / mat_min:.2f} (goal >= 0.8)")
    print(f"materialize / from_pretrained:    {mat_min / pre_min:.3f} (goal <= 0.2)")
    print(f"breakdown (cProfile, mean of {args.profile_calls} calls; cProfile inflates Python-heavy parts):")
    print(parts)


if __name__ == "__main__":
    main()
