"""LoRA adapters and shared components, measured in one run (not a test). Sections (`--sections`):

switch (the issue's (a)): switching adapters on a resident SD 1.5-shaped base (random fp16 weights, loaded as fp32
    on CPU; adapters of rank 16 and 64 on the UNet and the text encoder). hotslot's switch is what the executor
    runs (`ModelLoader.apply_adapters` on a pipeline it materialized: adapters kept loaded, switched with
    set_adapters), timed A -> B -> A ... after each was loaded once. Against it, in the same process: diffusers'
    `unload_lora_weights` + `load_lora_weights` per switch, and `from_pretrained` of the merged pipeline (the
    adapter fused into the base and saved, as a user without adapter serving would deploy it) per switch. Then
    whether every base weight is torch.equal to before once hotslot's adapters are off.

bytes (the issue's (b)): bytes held per extra fine-tune in a family of SD 1.5-shaped fine-tunes that share VAE,
    text encoder, tokenizer and scheduler byte for byte (different UNets), read by the executor's loader with the
    manifest's digests (shared components held once) and without (every model its own copy), accounted by the
    executor's slot manager, and how many fine-tunes a 16 GiB host budget holds each way.

methods: the candidates diffusers and PEFT offer for a switch, to choose the executor's method. For each base
    (the tiny test pipeline, and an SD 1.5-layout UNet at `--widths`), two adapters A and B, and per method
    `--switches` switches A -> B -> A ... timed one by one (p50, p99), then whether every base weight is
    torch.equal to before after the adapters are removed, and whether the base's image is then bit for bit the
    same: keep loaded + set_adapters; hotswap (enable_lora_hotswap, load_lora_weights(X, hotswap=True)); load +
    delete; unfuse + fuse.

Run under `flock /tmp/hotslot-bench.lock`. Data: bench/.data/lora/ and bench/.data/sd15/ (shared with
bench_executor.py)."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / ".data" / "lora"


def _quiet() -> None:
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    warnings.filterwarnings("ignore")


def prepare(name: str, widths: tuple[int, ...] | None, rank: int) -> tuple[Path, list[Path]]:
    from hotslot.modelgen import write_tiny_pipeline
    from hotslot.modelgen.lora import write_lora

    base = DATA / name
    if not (base / "model_index.json").exists():
        write_tiny_pipeline(base, seed=0, unet_block_out_channels=widths, overwrite=True)
    loras = []
    for seed in (1, 2):
        path = DATA / f"{name}-lora-r{rank}-{seed}"
        if not path.exists():
            write_lora(path, base, seed=seed, rank=rank)
        loras.append(path)
    return base, loras


def measure(base: Path, loras: list[Path], rank: int, switches: int) -> list[tuple[str, list[float], bool, bool]]:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from hotslot.modelgen.lora import LORA_FILE

    sds = [load_file(str(p / LORA_FILE)) for p in loras]

    def fresh():
        pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def base_weights(pipe) -> dict[str, torch.Tensor]:
        return {f"{c}.{k.replace('.base_layer', '')}": v for c in ("unet", "text_encoder")
                for k, v in getattr(pipe, c).state_dict().items() if "lora_" not in k}

    def image(pipe) -> np.ndarray:
        with torch.inference_mode():
            return pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np",
                        height=64, width=64).images

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    rows = []

    def finish(label, pipe, times, ref, ref_image) -> None:
        now = base_weights(pipe)
        same = now.keys() == ref.keys() and all(torch.equal(now[k], ref[k]) for k in ref)
        rows.append((label, times, same, bool(np.array_equal(image(pipe), ref_image))))

    pipe = fresh()
    ref = {k: v.clone() for k, v in base_weights(pipe).items()}
    ref_image = image(pipe)
    first = [timed(lambda i=i: pipe.load_lora_weights(sds[i], adapter_name=f"a{i}")) for i in range(2)]
    times = [timed(lambda i=i: pipe.set_adapters([f"a{(i + 1) % 2}"], [1.0])) for i in range(switches)]
    pipe.disable_lora()
    finish(f"keep loaded + set_adapters (first load {statistics.mean(first) * 1000:.0f} ms)", pipe, times, ref,
           ref_image)

    pipe = fresh()
    pipe.enable_lora_hotswap(target_rank=rank)
    pipe.load_lora_weights(sds[0], adapter_name="slot")
    times = [timed(lambda i=i: pipe.load_lora_weights(sds[(i + 1) % 2], adapter_name="slot", hotswap=True))
             for i in range(switches)]
    pipe.disable_lora()
    finish("hotswap (load_lora_weights hotswap=True)", pipe, times, ref, ref_image)

    pipe = fresh()
    pipe.load_lora_weights(sds[0], adapter_name="x0")
    times = []
    for i in range(switches):
        nxt = sds[(i + 1) % 2]
        times.append(timed(lambda i=i, nxt=nxt: (pipe.delete_adapters(pipe.get_list_adapters()["unet"]),
                                                 pipe.load_lora_weights(nxt, adapter_name=f"x{i + 1}"))))
    pipe.unload_lora_weights()
    finish("load_lora_weights + delete_adapters", pipe, times, ref, ref_image)

    pipe = fresh()
    for i in range(2):
        pipe.load_lora_weights(sds[i], adapter_name=f"a{i}")
    pipe.fuse_lora(adapter_names=["a0"])
    times = [timed(lambda i=i: (pipe.unfuse_lora(), pipe.fuse_lora(adapter_names=[f"a{(i + 1) % 2}"])))
             for i in range(switches)]
    pipe.unfuse_lora()
    pipe.disable_lora()
    finish("unfuse_lora + fuse_lora", pipe, times, ref, ref_image)
    return rows


def percentiles(times: list[float]) -> tuple[float, float]:
    ms = sorted(t * 1000 for t in times)
    return statistics.median(ms), ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]


def methods_section(args: argparse.Namespace) -> None:
    widths = tuple(int(w) for w in args.widths.split(","))
    print("\n## methods: the switch candidates on a resident base\n")
    print("| base | method | switch p50 ms | p99 ms | base weights torch.equal after | base image identical |")
    print("|---|---|---|---|---|---|")
    for name, base_widths, rank in (("tiny", None, 4), (f"unet-{'-'.join(map(str, widths))}", widths, args.rank)):
        base, loras = prepare(name, base_widths, rank)
        for label, times, same, same_image in measure(base, loras, rank, args.switches):
            p50, p99 = percentiles(times)
            print(f"| {name} (rank {rank}) | {label} | {p50:.2f} | {p99:.2f} | {same} | {same_image} |", flush=True)


# -- (a) switching on an SD 1.5-shaped base -----------------------------------------------------------------------


def sd15_family(n: int) -> list[Path]:
    """bench_executor's SD 1.5-shaped models (sd15-a, sd15-b sharing all but the UNet), and more members like
    sd15-b (sd15-c, ...): written once, reused."""
    import bench_executor as be

    a, b = be.prepare_models()
    out = [a, b]
    for i in range(2, n):
        dest = be.MODELS / f"sd15-{chr(ord('a') + i)}"
        if not (dest / "model_index.json").exists():
            print(f"writing {dest} (random fp16 UNet, once) ...", file=sys.stderr, flush=True)
            be.write_sd15(dest, 100 * (i + 1), a)
        out.append(dest)
    return out[:n]


def sd15_loras(base: Path, rank: int) -> list[Path]:
    from hotslot.modelgen.lora import write_lora

    out = []
    for seed in (1, 2):
        path = DATA / f"sd15-lora-r{rank}-{seed}"
        if not path.exists():
            write_lora(path, base, seed=seed, rank=rank, text_encoder=True)
        out.append(path)
    return out


def merged(base: Path, lora: Path, dtype: torch.dtype) -> Path:
    """The base with the adapter fused in, saved as a pipeline of its own (fp16 files, like the base)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from hotslot.modelgen.lora import LORA_FILE

    dest = DATA / f"merged-{lora.name}"
    if not (dest / "model_index.json").exists():
        print(f"writing {dest} (the base with {lora.name} fused in, once) ...", file=sys.stderr, flush=True)
        pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True, safety_checker=None,
                                                       torch_dtype=dtype)
        pipe.load_lora_weights(load_file(str(lora / LORA_FILE)), adapter_name="m")
        pipe.fuse_lora(adapter_names=["m"])
        pipe.unload_lora_weights()
        pipe.to(torch.float16).save_pretrained(dest.with_name(dest.name + ".tmp"), safe_serialization=True)
        dest.with_name(dest.name + ".tmp").rename(dest)
    return dest


def hotslot_switch(base: Path, digests: dict[str, str], sds: list[dict], switches: int,
                   dtype: torch.dtype) -> tuple[list[float], list[float], bool]:
    """The executor's loader and switch: (switch times, first-load times, base torch.equal after)."""
    from hotslot.loading.preloader import Preloader
    from hotslot.services.executor.loader import ModelLoader
    from hotslot.services.executor.lora import AdapterWeights

    with Preloader() as preloader:
        loader = ModelLoader(preloader, device="cpu", dtype=dtype, chunk_bytes=16 << 20, map_files=True,
                             convert_here=True)
        host = loader.read("base@1", str(base), 1800, digests).weights
        pipe, _ = loader.materialize(host)
        ref = {k: v.clone() for k, v in base_state(pipe).items()}
        weights = {f"a{i}": AdapterWeights(sd, None, 0) for i, sd in enumerate(sds)}

        def use(name: str) -> float:
            return timed(lambda: loader.apply_adapters(pipe, [(name, weights[name], 1.0)], weights))

        first = [use("a0"), use("a1")]
        times = [use(f"a{i % 2}") for i in range(switches)]
        loader.apply_adapters(pipe, [], weights)
        now = base_state(pipe)
        exact = now.keys() == ref.keys() and all(torch.equal(now[k], ref[k]) for k in ref)
        host.release()
    return times, first, exact


def diffusers_switch(base: Path, sds: list[dict], switches: int, dtype: torch.dtype) -> list[float]:
    """diffusers as a user switches adapters without hotslot: unload_lora_weights + load_lora_weights."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True, safety_checker=None,
                                                   torch_dtype=dtype)
    pipe.load_lora_weights(dict(sds[0]), adapter_name="x")

    def switch(sd: dict) -> None:
        pipe.unload_lora_weights()
        pipe.load_lora_weights(dict(sd), adapter_name="x")

    return [timed(lambda i=i: switch(sds[(i + 1) % 2])) for i in range(switches)]


def merged_reloads(paths: list[Path], reloads: int, dtype: torch.dtype) -> list[float]:
    """from_pretrained of the merged pipelines, alternating."""
    import gc

    from diffusers import StableDiffusionPipeline

    times = []
    for i in range(reloads):
        t0 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(paths[i % 2], local_files_only=True, safety_checker=None,
                                                       torch_dtype=dtype)
        times.append(time.perf_counter() - t0)
        del pipe
        gc.collect()
    return times


def switch_section(args: argparse.Namespace) -> None:
    import gc

    from safetensors.torch import load_file

    from hotslot.manifest import scan_model_dir
    from hotslot.modelgen.lora import LORA_FILE

    dtype = torch.float32
    base = sd15_family(1)[0]
    digests = {f.path: f.sha256 for f in scan_model_dir(base.parent, base.name).files}
    print("\n## switch: adapters on a resident SD 1.5-shaped base (UNet + text encoder adapters, fp32, CPU)\n")
    print("| rank | adapter MB | hotslot switch p50 / p99 ms (first load ms) | diffusers unload + load p50 / p99 ms "
          "| from_pretrained merged p50 / p99 ms | unload+load / hotslot | from_pretrained / hotslot "
          "| base torch.equal after |")
    print("|---|---|---|---|---|---|---|---|")
    reload_times: list[float] = []
    for rank in args.ranks:
        loras = sd15_loras(base, rank)
        sds = [load_file(str(p / LORA_FILE)) for p in loras]
        mb = sum(t.numel() * t.element_size() for t in sds[0].values()) / 1e6
        times, first, exact = hotslot_switch(base, digests, sds, args.switches, dtype)
        gc.collect()
        unload_load = diffusers_switch(base, sds, args.switches, dtype)
        gc.collect()
        if not reload_times:  # a merged pipeline's load does not depend on the rank
            reload_times = merged_reloads([merged(base, lora, dtype) for lora in loras], args.reloads, dtype)
        h50, h99 = percentiles(times)
        u50, u99 = percentiles(unload_load)
        r50, r99 = percentiles(reload_times)
        print(f"| {rank} | {mb:.1f} | {h50:.1f} / {h99:.1f} ({statistics.mean(first) * 1000:.0f}) | "
              f"{u50:.1f} / {u99:.1f} | {r50:.0f} / {r99:.0f} | {u50 / h50:.1f}x | {r50 / h50:.0f}x | {exact} |",
              flush=True)


def base_state(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k.replace('.base_layer', '')}": v for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items() if "lora_" not in k}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- (b) bytes per extra fine-tune -----------------------------------------------------------------------------------


class _NoChild:
    """Files stored in the wanted dtype are mapped (CPU, map_files): nothing goes through a preloader child."""

    def release(self, key: str) -> None:
        pass


def bytes_section(args: argparse.Namespace) -> None:
    from hotslot.manifest import scan_model_dir
    from hotslot.services.executor.loader import ModelLoader
    from hotslot.services.executor.slots import ModelKey, SlotManager, Tier

    budget = 16 * 1024**3
    family = sd15_family(args.family)
    print(f"\n## bytes: {len(family)} SD 1.5-shaped fine-tunes sharing VAE and text encoder (fp16, mapped)\n")
    print("| holding | 1 model MB | each extra fine-tune MB | UNet MB | host-tier use for all MB | fine-tunes in 16 GiB |")
    print("|---|---|---|---|---|---|")
    unet_mb = (family[0] / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size / 1e6
    for label, share in (("shared components once (hotslot)", True), ("each model its own copy", False)):
        loader = ModelLoader(_NoChild(), device="cpu", dtype=torch.float16, chunk_bytes=16 << 20, map_files=True)
        slots = SlotManager(active_budget_bytes=budget, standby_budget_bytes=budget, host_budget_bytes=budget * 8)
        used = []
        for i, path in enumerate(family):
            digests = {f.path: f.sha256 for f in scan_model_dir(path.parent, path.name).files} if share else None
            host = loader.read(f"m{i}@1", str(path), 600, digests).weights
            slots.release(slots.add_host(ModelKey(f"m{i}", 1), host, host.nbytes, parts=host.part_sizes()))
            used.append(slots.used(Tier.HOST))
        assert used[-1] == loader.components.nbytes()  # the slot manager counts what the pool holds
        first, extra = used[0], (used[-1] - used[0]) / (len(used) - 1)
        fit = 1 + int((budget - first) // extra) if budget >= first else 0
        print(f"| {label} | {first / 1e6:.0f} | {extra / 1e6:.0f} | {unet_mb:.0f} | {used[-1] / 1e6:.0f} | {fit} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="switch,bytes", help="comma-separated: switch, bytes, methods")
    parser.add_argument("--ranks", default="16,64", help="switch: adapter ranks")
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--reloads", type=int, default=4, help="switch: from_pretrained loads of merged pipelines")
    parser.add_argument("--family", type=int, default=3, help="bytes: fine-tunes in the family")
    parser.add_argument("--widths", default="160,320,640,640", help="methods: UNet block widths of the larger base")
    parser.add_argument("--rank", type=int, default=16, help="methods: LoRA rank on the larger base (tiny: 4)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = parser.parse_args()
    args.ranks = [int(r) for r in args.ranks.split(",")]
    _quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    print(f"# bench_lora: torch {torch.__version__}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"load average at start {' '.join(f'{x:.2f}' for x in load0)}", flush=True)
    sections = {"switch": switch_section, "bytes": bytes_section, "methods": methods_section}
    for name in args.sections.split(","):
        sections[name](args)
    print(f"\n# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
