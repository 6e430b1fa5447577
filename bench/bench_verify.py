"""What verified reads cost: candidate checksum speeds, then the read of one weight file with and without the
check (`read_files(verify=...)`), for each read path, from the page cache (the worst case: the read is a memory
copy) and from disk (the file's pages dropped with posix_fadvise first), plus mapped files (populate vs
verify_mapped). The goal of issue 13: the check costs at most 10 % of the read.

    .venv/bin/python bench/bench_verify.py [--mb 512] [--dir /tmp] [--repeat 3]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from hotslot import checksum
from hotslot.loading.reader import map_safetensors, populate, read_files, verify_mapped


def _speed(name: str, fn, data: np.ndarray, repeat: int) -> None:
    best = min(_timed(lambda: fn(data)) for _ in range(repeat))
    print(f"  {name:<28} {data.nbytes / best / 1e9:6.2f} GB/s")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512, help="size of the weight file")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write it (a local disk)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    data = np.random.default_rng(0).integers(0, 255, 256 << 20, dtype=np.uint8)
    print("checksum speed, one thread, 256 MiB in memory:")
    _speed("zlib.crc32", zlib.crc32, data, args.repeat)
    try:
        import google_crc32c

        _speed("crc32c (google-crc32c)", lambda d: google_crc32c.extend(0, d), data, args.repeat)
    except ImportError:
        print("  crc32c (google-crc32c)       (pip install google-crc32c to compare)")
    _speed("sha256 (hashlib)", lambda d: hashlib.sha256(d).digest(), data, args.repeat)
    _speed("xxh3_64 (xxhash): chosen", checksum.block_digest, data, args.repeat)
    hasher = checksum.BlockHasher
    _speed("xxh3 of 1 MiB blocks + root", lambda d: (h := hasher(), h.update(d), h.value()), data, args.repeat)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "weights.safetensors"
        per = args.mb * (1 << 20) // 4 // 16
        g = torch.Generator().manual_seed(0)
        save_file({f"layer{i}.weight": torch.randn(per, generator=g) for i in range(16)}, str(path))
        with open(path, "rb") as f:
            value = checksum.of_file(f.fileno())
        if not checksum.record(path, value):
            raise SystemExit(f"{args.dir} keeps no user xattrs: nothing would be verified")
        size = path.stat().st_size
        modes = {
            "shared memory (sendfile)": {"shared": True},
            "private memory (pread)": {"shared": False},
            "converted fp32->fp16": {"shared": True, "dtype": torch.float16},
        }
        print(f"\nread of one {size / 1e6:.0f} MB file, concurrency {args.concurrency}, best of {args.repeat}:")
        print(f"  {'path':<28} {'source':<11} {'plain s':>8} {'checked s':>9} {'check share':>11}"
              f"   {'CPU s plain/checked':>19}")
        for cache in ("page cache", "disk"):
            for name, kwargs in modes.items():
                plain, checked, cpu = [], [], {False: [], True: []}
                for _ in range(args.repeat):
                    for verify, out in ((False, plain), (True, checked)):
                        if cache == "disk":
                            _drop(path)
                        c0 = time.process_time()
                        out.append(_timed(lambda v=verify, kw=kwargs: read_files(
                            [path], concurrency=args.concurrency, verify=v, **kw)))
                        cpu[verify].append(time.process_time() - c0)
                p, c = min(plain), min(checked)
                print(f"  {name:<28} {cache:<11} {p:8.3f} {c:9.3f} {(c - p) / p:10.1%}"
                      f"   {statistics.median(cpu[False]):8.3f} / {statistics.median(cpu[True]):.3f}"
                      f"   (median wall {statistics.median(plain):.3f} / {statistics.median(checked):.3f})")
            plain, checked = [], []
            for _ in range(args.repeat):
                if cache == "disk":
                    _drop(path)
                plain.append(_timed(lambda: populate([map_safetensors(path).buffer], args.concurrency)))
                if cache == "disk":
                    _drop(path)
                checked.append(_timed(lambda: verify_mapped([map_safetensors(path)], args.concurrency)))
            p, c = min(plain), min(checked)
            print(f"  {'mapped: populate/verify':<28} {cache:<11} {p:8.3f} {c:9.3f} {(c - p) / p:10.1%}")


if __name__ == "__main__":
    main()
