"""Benchmark of a converting read (not a test): one weight file read into private memory converted to another dtype,
as the executor does for a cold load on CPU, against what diffusers does with the same file (safetensors `safe_open`
mapping, then `.to(dtype)` per tensor), with the physical limits measured in the same run.

  rows:   diffusers   safe_open + get_tensor(k).to(dtype) for every tensor (torch's intra-op threads)
          staged      read_files(dtype=..., shared=False, map_source=False): pread into 16 MiB staging chunks, then
                      convert (the path with a rate cap, or with --no-map-view-files)
          mapped      read_files(..., map_source=True): convert straight from a mapping of the file, hashing each
                      range's 1 MiB checksum blocks before converting it (the executor's default on a local disk)
          mapped-unverified   the same with verify=False (`--no-verify-reads`): what verifying every byte costs
          mapped-recycled     `mapped` into memory a dropped model used (the executor's --host-pool-bytes): the
                      file is converted once untimed with a HostPool set, dropped, then converted again, timed
  limits: memcpy of the output's bytes into fresh memory (first touch included: what any conversion must pay),
          and with --cold, `cat` of the file with the page cache dropped

Every run is a fresh process (a process that freed memory reuses it, which would flatter whichever runs second), the
cases are interleaved round by round (the order reversed every other round) and the median and best are printed,
with the load average of every round: on a small shared VM compare rows only within one run. The file gets a
recorded checksum first (as the storage-cache records one), so hotslot's rows verify every byte; diffusers' does not.

    .venv/bin/python bench/bench_convert.py                                  # UNet of sd15-a, fp16 -> fp32, 5 rounds
    .venv/bin/python bench/bench_convert.py --source float32 --dtype float16  # fp32 files served as fp16
    sudo .venv/bin/python bench/bench_convert.py --cold                       # page cache dropped before every run
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DATA = BENCH / ".data"
UNET = DATA / "sd15" / "sd15-a" / "unet" / "diffusion_pytorch_model.safetensors"  # bench_executor.prepare_models()
WORK = DATA / "convert"
GB = 1000**3
CASES = ("diffusers", "staged", "mapped", "mapped-unverified", "mapped-recycled", "memcpy")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def prepare(source: str) -> Path:
    """The UNet stored as `source`, with a recorded checksum (once)."""
    import torch
    from safetensors.torch import load_file, save_file

    from hotslot import checksum

    dest = WORK / f"unet-{source}.safetensors"
    if not dest.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        print(f"writing {dest} ...", file=sys.stderr, flush=True)
        tmp = dest.with_suffix(".tmp")
        if source == "float16":
            shutil.copyfile(UNET, tmp)
        else:
            tensors = {k: v.to(getattr(torch, source)) if v.is_floating_point() else v
                       for k, v in load_file(UNET).items()}
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.rename(dest)
    if checksum.available() and checksum.read_recorded(dest) is None:
        fd = os.open(dest, os.O_RDONLY)
        try:
            if not checksum.record(dest, checksum.of_file(fd)):
                print("the file system keeps no xattrs: hotslot's rows run unverified", file=sys.stderr)
        finally:
            os.close(fd)
    return dest


def child(case: str, path: Path, dtype_name: str, concurrency: int) -> dict:
    """One run of `case` in this (fresh) process."""
    import torch

    from hotslot.loading.reader import ReadRequest, read_files

    dtype = getattr(torch, dtype_name)
    gc.collect()
    gc.freeze()  # as the executor does after its imports (ModelLoader.warmup); the same for every case
    t0 = time.perf_counter()
    c0 = time.process_time()
    if case == "diffusers":
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[key] = f.get_tensor(key).to(dtype)
        nbytes = sum(t.numel() * t.element_size() for t in out.values())
    elif case == "memcpy":
        from hotslot.loading.reader import read_header

        nbytes = sum(e.nbytes // e.dtype.itemsize * dtype.itemsize for e in read_header(path).tensors)
        src = torch.ones(nbytes // 2, dtype=torch.uint8)  # touched before the clock: only the target is fresh
        t0, c0 = time.perf_counter(), time.process_time()
        dst = torch.empty(nbytes, dtype=torch.uint8)
        dst[: src.numel()].copy_(src)
        dst[src.numel() :].copy_(src[: nbytes - src.numel()])
    else:
        if case == "mapped-recycled":  # a model converted and dropped before: its memory waits in the pool
            from hotslot.loading.hostpool import HostPool
            from hotslot.loading.reader import set_host_pool

            set_host_pool(HostPool(1 << 40))
            dropped = read_files([ReadRequest(path, None)], dtype=dtype, shared=False, concurrency=concurrency,
                                 map_source=True)[0]
            del dropped
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
        loaded = read_files([ReadRequest(path, None)], dtype=dtype, shared=False, concurrency=concurrency,
                            map_source=case.startswith("mapped"), verify=case != "mapped-unverified")[0]
        nbytes = loaded.buffer.numel()
    return {"s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "out_bytes": nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("float16", "float32", "bfloat16"), default="float16",
                        help="dtype the file stores")
    parser.add_argument("--dtype", choices=("float16", "float32", "bfloat16"), default="float32",
                        help="dtype the weights are converted to")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4, help="hotslot's read_concurrency")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every run (root)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.dtype, args.concurrency)))
        return
    if args.source == args.dtype:
        parser.error("--source and --dtype are equal: nothing to convert (such files are mapped, not read)")
    path = prepare(args.source)
    size = path.stat().st_size
    runs: dict[str, list[dict]] = {c: [] for c in CASES}
    cat_s: list[float] = []
    print(f"converting read: {path.name} ({size / GB:.2f} GB {args.source}) -> {args.dtype}, private memory, "
          f"{os.cpu_count()} CPUs, {'page cache dropped' if args.cold else 'page cache warm'}; "
          f"every run a fresh process; {args.rounds} rounds interleaved")
    for r in range(args.rounds):
        order = CASES if r % 2 == 0 else tuple(reversed(CASES))
        for case in order:
            if args.cold:
                drop_page_cache()
            else:
                subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
            out = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--concurrency",
                                  str(args.concurrency), "--child", case, str(path)],
                                 check=True, stdout=subprocess.PIPE, text=True).stdout
            runs[case].append(json.loads(out.strip().splitlines()[-1]))
        if args.cold:
            drop_page_cache()
            t0 = time.perf_counter()
            subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
            cat_s.append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{args.rounds} done, load average {loadavg()}", file=sys.stderr, flush=True)

    base = statistics.median(x["s"] for x in runs["diffusers"])
    print()
    print("| case | median s | best s | median CPU s | output GB/s (median) | diffusers / case (median) |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        xs = runs[case]
        med = statistics.median(x["s"] for x in xs)
        label = "memcpy into fresh memory (limit)" if case == "memcpy" else case
        print(f"| {label} | {med:.3f} | {min(x['s'] for x in xs):.3f} | "
              f"{statistics.median(x['cpu_s'] for x in xs):.3f} | {xs[0]['out_bytes'] / med / GB:.2f} | "
              f"{base / med:.2f} |")
    if cat_s:
        print(f"| `cat` of the file, page cache dropped (limit) | {statistics.median(cat_s):.3f} | {min(cat_s):.3f} "
              f"| | {size / statistics.median(cat_s) / GB:.2f} (file bytes) | |")
    print(f"\nload average at the end: {loadavg()}")


if __name__ == "__main__":
    main()
