"""LoRA adapter switch on a resident base: the candidates diffusers and PEFT offer, measured in one run, to choose
how the executor switches adapters (services/hotslot/services/executor/lora.py). For each base (the tiny test
pipeline, and an SD 1.5-layout UNet at `--widths`), two adapters A and B, and per method `--switches` switches
A -> B -> A ... timed one by one (p50, p99), then whether every base weight is torch.equal to before after the
adapters are removed, and whether the base's image is then bit for bit the same:

- keep loaded + set_adapters: both adapters loaded once (load_lora_weights), a switch is set_adapters([X]);
- hotswap: enable_lora_hotswap(target_rank) before the first load, a switch is load_lora_weights(X, hotswap=True);
- load + delete: a switch is delete_adapters(current) + load_lora_weights(X);
- unfuse + fuse: both loaded, a switch is unfuse_lora() + fuse_lora(adapter_names=[X]).

This is the choice of method only, not the issue's whole benchmark (no SD 1.5-sized base, no text encoder, no
from_pretrained baseline). Run under `flock /tmp/hotslot-bench.lock`. Data: bench/.data/lora/."""
from __future__ import annotations

import argparse
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="160,320,640,640", help="UNet block widths of the larger base")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank on the larger base (tiny: 4)")
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = parser.parse_args()
    _quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = tuple(int(w) for w in args.widths.split(","))
    print("| base | method | switch p50 ms | p99 ms | base weights torch.equal after | base image identical |")
    print("|---|---|---|---|---|---|")
    for name, base_widths, rank in (("tiny", None, 4), (f"unet-{'-'.join(map(str, widths))}", widths, args.rank)):
        base, loras = prepare(name, base_widths, rank)
        for label, times, same, same_image in measure(base, loras, rank, args.switches):
            ms = sorted(t * 1000 for t in times)
            p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
            print(f"| {name} (rank {rank}) | {label} | {statistics.median(ms):.2f} | {p99:.2f} | {same} | "
                  f"{same_image} |", flush=True)


if __name__ == "__main__":
    main()
