"""CUDA check of hotslot's loading path, run by hand on a GPU machine (pytest does not collect this file).

    .venv/bin/python tests/gpu/check_cuda_loading.py                 # everything, on cuda
    .venv/bin/python tests/gpu/check_cuda_loading.py --size-mb 2048  # a bigger synthetic file for throughput
    .venv/bin/python tests/gpu/check_cuda_loading.py --device cpu    # the same flow on CPU (a dry run)

It writes a tiny SD pipeline, then checks, each against diffusers/safetensors on the same device:
1. the reader on the device is bit-identical to safetensors.torch.load_file (as stored, and converted to fp16);
2. the preloader child loads to the device and hands over CUDA IPC handles: small message, the parent sees the
   child's writes (same memory), `owned_copy` survives `release`;
3. `load_pipeline` through the preloader (fp32 and fp16) gives the same image bytes as
   `StableDiffusionPipeline.from_pretrained(...).to(device)` for the same seed;
and prints timings: reader throughput vs safetensors on a synthetic file and, on CUDA, vs the limit of the path
(one torch copy of the same bytes from pinned host memory to the device, measured in the same run), and the
preloader's phases. Exit status 0 when every check passed; the summary is printed as JSON on the last line.
`make gpu-check` (tests/gpu/gpu_check.py) runs this and the executor benchmark and prints both as one table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
for source_root in ROOT.glob("[ls]*/*/hotslot/"):  # one per distribution (libs/<name>, services/<name>)
    sys.path.insert(0, str(source_root.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WAIT_S = 300.0


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().contiguous().cpu(), b.detach().contiguous().cpu()
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def image(pipe, device: str) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device).manual_seed(0)
    return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np", generator=generator).images


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_reader(view: Path, device: str, out: dict) -> None:
    from safetensors.torch import load_file

    from hotslot.loading.reader import read_safetensors

    for path in sorted(view.glob("*/*.safetensors")):
        ref = load_file(str(path), device=device)
        for dtype in (None, torch.float16):
            got = read_safetensors(path, device=device, dtype=dtype, chunk_bytes=64 * 1024).tensors()
            for name, r in ref.items():
                expected = r.to(dtype) if dtype is not None and r.is_floating_point() else r
                assert got[name].device.type == torch.device(device).type, name
                assert same_bits(got[name], expected), f"{path.parent.name}/{name} dtype={dtype}"
    out["reader_bit_identical"] = True


def throughput(tmp: Path, device: str, size_mb: int, out: dict) -> None:
    """Reader vs safetensors.torch.load_file on one synthetic file (page cache warm for both: read it once)."""
    from safetensors.torch import load_file, save_file

    from hotslot.loading.reader import DEFAULT_READ_CONCURRENCY, read_safetensors

    n_tensors = 64
    per = size_mb * 1024 * 1024 // 4 // n_tensors
    tensors = {f"t{i:03d}": torch.randn(per) for i in range(n_tensors)}
    path = tmp / "big.safetensors"
    save_file(tensors, str(path))
    del tensors
    nbytes = path.stat().st_size
    path.read_bytes()  # warm the page cache so both readers see the same source

    def best(fn, repeats=3):
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            result = fn()
            sync(device)
            times.append(time.perf_counter() - t0)
            del result
        return min(times)

    limit = None
    if device.startswith("cuda"):  # the bound for any reader: the file's bytes from pinned memory to the device
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        limit = best(lambda: dst.copy_(src, non_blocking=True))
        del src, dst
        torch.cuda.empty_cache()
    # as the executor reads: DEFAULT_READ_CONCURRENCY ranges in flight
    ours = best(lambda: read_safetensors(path, device=device, concurrency=DEFAULT_READ_CONCURRENCY))
    ours16 = best(lambda: read_safetensors(path, device=device, dtype=torch.float16,
                                           concurrency=DEFAULT_READ_CONCURRENCY))
    ref = best(lambda: load_file(str(path), device=device))
    ref16 = best(lambda: {k: v.to(torch.float16) for k, v in load_file(str(path), device=device).items()})
    out["throughput"] = {
        "file_mb": round(nbytes / 1e6),
        "hotslot_reader_mb_s": round(nbytes / ours / 1e6),
        "safetensors_load_file_mb_s": round(nbytes / ref / 1e6),
        "hotslot_reader_to_fp16_mb_s": round(nbytes / ours16 / 1e6),
        "safetensors_then_to_fp16_mb_s": round(nbytes / ref16 / 1e6),
    }
    if limit is not None:
        out["throughput"]["pinned_h2d_copy_mb_s"] = round(nbytes / limit / 1e6)
    path.unlink()


def check_preloader(view: Path, device: str, out: dict) -> None:
    from diffusers import StableDiffusionPipeline

    from hotslot.loading.pipeline_loader import load_pipeline
    from hotslot.loading.preloader import Preloader

    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    on_cuda = torch.device(device).type == "cuda"
    with Preloader() as preloader:
        allocated = torch.cuda.memory_allocated() if on_cuda else 0
        weights = preloader.load("gpu-1", "raw", view, device=device).result(WAIT_S)
        # The parent's allocator pays nothing for memory it opened through IPC handles: a second proof of no copy.
        opened = (torch.cuda.memory_allocated() - allocated) if on_cuda else None
        assert all(b.device.type == torch.device(device).type for b in weights.buffers)
        assert weights.timings.wire_bytes < 64 * 1024, weights.timings
        w = weights.components["unet"]["conv_in.weight"]
        preloader.debug_fill("raw", "unet", "conv_in.weight", 3.0).result(WAIT_S)
        sync(device)
        assert bool((w == 3.0).all()), "the parent does not see the child's write: not the same memory"
        owned = weights.owned_copy()
        assert preloader.release("raw").result(WAIT_S) > 0 and preloader.held() == {}
        assert bool((owned.components["unet"]["conv_in.weight"] == 3.0).all())
        out["preloader_ipc_same_memory"] = True
        out["preloader_handoff"] = {
            "wire_bytes": weights.timings.wire_bytes,
            "handoff_ms": round(weights.timings.handoff_s * 1e3, 2),
            "child_ms": round(weights.timings.child_s * 1e3, 2),
            "files": weights.timings.files,
            "weight_bytes": sum(b.numel() * b.element_size() for b in weights.buffers),
            "parent_allocated_bytes": opened,
        }
        del weights, owned, w

        for dtype in (None, torch.float16):
            label = "fp16" if dtype else "as_stored"
            t0 = time.perf_counter()
            pipe, report = load_pipeline(view, device=device, dtype=dtype, preloader=preloader, model_key=label)
            sync(device)
            wall = time.perf_counter() - t0
            kwargs = {"torch_dtype": dtype} if dtype else {}
            ref = StableDiffusionPipeline.from_pretrained(view, local_files_only=True, **kwargs).to(device)
            ours_img, ref_img = image(pipe, device), image(ref, device)
            out[f"image_bit_identical_{label}"] = bool(np.array_equal(ours_img, ref_img, equal_nan=True))
            if not out[f"image_bit_identical_{label}"]:
                out[f"image_max_abs_diff_{label}"] = float(np.abs(ours_img - ref_img).max())
            out[f"timings_{label}"] = {
                "wall_s": round(wall, 4),
                "read_s": round(report.read_s, 4),
                "convert_s": round(report.convert_s, 4),
                "handoff_s": round(report.handoff_s, 4),
                "materialize_s": round(report.materialize_s, 4),
                "bytes": report.bytes,
            }
            held = preloader.held()
            if on_cuda:
                assert label in held, "on CUDA the child must keep the weights until release"
            del pipe, ref, report  # the consumer lets go first, then the producer releases
            preloader.release(label).result(WAIT_S)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size-mb", type=int, default=1024, help="synthetic file for the throughput numbers")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "CUDA is not available"}))
        return 2
    from hotslot.modelgen import write_tiny_pipeline

    out: dict = {"device": args.device, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()
    failures = []
    with tempfile.TemporaryDirectory(prefix="hotslot-gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        view = write_tiny_pipeline(tmp / "tiny", seed=0)
        for check in (check_reader, check_preloader):
            try:
                check(view, args.device, out)
            except Exception:  # noqa: BLE001 - report every failing check, not just the first
                failures.append(check.__name__)
                traceback.print_exc()
        try:
            throughput(tmp, args.device, args.size_mb, out)
        except Exception:  # noqa: BLE001
            failures.append("throughput")
            traceback.print_exc()
    out["failures"] = failures
    out["ok"] = not failures and all(v for k, v in out.items() if k.startswith("image_bit_identical"))
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
