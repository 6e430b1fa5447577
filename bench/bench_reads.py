"""Benchmark of hotslot's parallel reads (not a test): `read_files` of one SD1.5-shaped model's safetensors files
(bench/.data/sd15/sd15-a, ~2.1 GB fp16 in 3 files: UNet 1.7 GB, text encoder, VAE) at --levels reads in flight,
per medium, against the physical limits measured in the same run on the same files:

  media:  cold    local disk, page cache dropped before every run (root)
          cached  local disk, every file in the page cache (memory-speed case)
          slow    a latency-bound mount built here (bench/slowdisk.py: dm-delay over a loop device, else a FUSE
                  passthrough that sleeps --delay-ms per read request), page cache dropped before every run
  limits: `cat` of the files (one stream), one `cat` per file in parallel, `dd` of --dd-streams equal byte ranges
          in parallel, and a memcpy of the same bytes (torch copy_ between preallocated tensors)
  rows:   hotslot at each level: fp16 as stored into memfd shared memory (the default), the same into torch's
          shared memory (shm="torch": /dev/shm, zero-filled first) at --shm-levels, and converting to each of
          --dtypes (memfd)

Every case runs --repeat times; cases are interleaved (rounds over every medium and case, the order reversed
every other round) and the best time is kept, so load from other processes hits every row alike. The load average
is printed with every round. Tables are Markdown.

    sudo .venv/bin/python bench/bench_reads.py                      # every medium, levels 1..16, best of 3: ~11 min
    sudo .venv/bin/python bench/bench_reads.py --repeat 2            # ~7 min on 2 cores
    .venv/bin/python bench/bench_reads.py --media cached --repeat 5 --levels 1,2,4
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hotslot.loading.reader import DEFAULT_READ_CHUNK_BYTES, DEFAULT_READ_CONCURRENCY, read_files

BENCH = Path(__file__).resolve().parent
DATA = BENCH / ".data"
DEFAULT_MODEL = DATA / "sd15" / "sd15-a"  # written by bench_executor.prepare_models()
SLOW_MOUNT = DATA / "slowmnt"
GB = 1000**3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    DROP_CACHES.write_text("3\n")


def warm_page_cache(files: list[Path]) -> None:
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


# -- what is measured --------------------------------------------------------------------------------------------
@dataclass
class Medium:
    key: str
    title: str
    files: list[Path]
    cold: bool  # drop the page cache before every run (else: warm it)

    def prepare(self) -> None:
        if self.cold:
            drop_page_cache()
        else:
            warm_page_cache(self.files)

    @property
    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


@dataclass(frozen=True)
class Case:
    key: str  # unique within a medium
    label: str
    kind: str  # "tool" (a physical limit) or "read" (hotslot)
    run: Callable[[Medium], Run]
    level: int = 0
    dtype: str = "float16"
    shm: str = "memfd"


@dataclass
class Run:
    seconds: float
    nbytes: int  # bytes moved from the medium
    alloc_s: float = 0.0


@dataclass
class Results:
    runs: dict[tuple[str, str], list[Run]] = field(default_factory=lambda: defaultdict(list))

    def add(self, medium: str, case: str, run: Run) -> None:
        self.runs[(medium, case)].append(run)

    def best(self, medium: str, case: str) -> Run | None:
        runs = self.runs.get((medium, case))
        return min(runs, key=lambda r: r.seconds) if runs else None

    def median_s(self, medium: str, case: str) -> float:
        return statistics.median(r.seconds for r in self.runs[(medium, case)])


def _timed_processes(commands: list[list[str]]) -> float:
    """Wall time of the commands run all at once, output to /dev/null."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL) for c in commands]
    codes = [p.wait() for p in procs]
    elapsed = time.perf_counter() - t0
    if any(codes):
        raise RuntimeError(f"{commands[codes.index(next(c for c in codes if c))]} failed")
    return elapsed


def cat_serial(m: Medium) -> Run:
    return Run(_timed_processes([["cat", *map(str, m.files)]]), m.file_bytes)


def cat_parallel(m: Medium) -> Run:
    return Run(_timed_processes([["cat", str(p)] for p in m.files]), m.file_bytes)


def dd_ranges(files: list[Path], streams: int) -> list[list[str]]:
    """`streams` shell commands, each `dd`-ing one contiguous 1/streams of the files' bytes (across file ends)."""
    sizes = [p.stat().st_size for p in files]
    total = sum(sizes)
    per = -(-total // streams)
    commands = []
    for s in range(streams):
        lo, hi = s * per, min((s + 1) * per, total)
        parts, start = [], 0
        for path, size in zip(files, sizes, strict=True):
            a, b = max(lo, start), min(hi, start + size)
            if a < b:
                parts.append(f"dd if={shlex.quote(str(path))} of=/dev/null bs=1M iflag=skip_bytes,count_bytes "
                             f"skip={a - start} count={b - a} status=none")
            start += size
        if parts:
            commands.append(["sh", "-c", " && ".join(parts)])
    return commands


def dd_parallel(streams: int) -> Callable[[Medium], Run]:
    def run(m: Medium) -> Run:
        return Run(_timed_processes(dd_ranges(m.files, streams)), m.file_bytes)

    return run


def hotslot_read(level: int, dtype: str, chunk_bytes: int, shm: str = "memfd") -> Callable[[Medium], Run]:
    target = None if dtype == "float16" else DTYPES[dtype]

    def run(m: Medium) -> Run:
        t0 = time.perf_counter()
        out = read_files(m.files, dtype=target, chunk_bytes=chunk_bytes, concurrency=level, shm=shm)
        elapsed = time.perf_counter() - t0
        nbytes = sum(f.stats.bytes_read for f in out)
        alloc = sum(f.stats.alloc_s for f in out)
        del out
        gc.collect()  # unmap the buffers before the next run
        return Run(elapsed, nbytes, alloc)

    return run


def memcpy_limit(files: list[Path]) -> Run:
    """torch copy_ of the files' bytes between tensors allocated and touched beforehand (per file, as read)."""
    sizes = [p.stat().st_size for p in files]
    src = [torch.ones(n, dtype=torch.uint8) for n in sizes]
    dst = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
    t0 = time.perf_counter()
    for d, s in zip(dst, src, strict=True):
        d.copy_(s)
    elapsed = time.perf_counter() - t0
    del src, dst
    gc.collect()
    return Run(elapsed, sum(sizes))


def memcpy_fresh(files: list[Path]) -> Run:
    """The same copy into tensors never touched before: what first-touch page faults (allocating and zeroing every
    page) add, which a read into new shared memory pays too."""
    sizes = [p.stat().st_size for p in files]
    src = [torch.ones(n, dtype=torch.uint8) for n in sizes]
    t0 = time.perf_counter()
    dst = [torch.empty(n, dtype=torch.uint8).copy_(s) for n, s in zip(sizes, src, strict=True)]
    elapsed = time.perf_counter() - t0
    del src, dst
    gc.collect()
    return Run(elapsed, sum(sizes))


# -- the run -----------------------------------------------------------------------------------------------------
def cases_for(medium: str, args: argparse.Namespace) -> list[Case]:
    out = [
        Case("cat", f"`cat` of the {len(args.files)} files, 1 stream", "tool", cat_serial),
        Case("cat-par", f"`cat` x {len(args.files)} files in parallel", "tool", cat_parallel),
        Case("dd-par", f"`dd` x {args.dd_streams} byte ranges in parallel", "tool", dd_parallel(args.dd_streams)),
    ]
    dtypes = ["float16"] + (args.dtypes if medium in args.dtype_media else [])
    for dtype in dtypes:
        # torch's shared memory beside memfd (the default) only where nothing is converted: that is where it differs
        shms = ("memfd", "torch") if dtype == "float16" else ("memfd",)
        for level in args.levels:
            for shm in shms if level in args.shm_levels else ("memfd",):
                name = "fp16 as stored" if dtype == "float16" else f"fp16 -> {dtype}"
                label = f"hotslot c={level}, {name}" + (f", shm={shm}" if len(shms) > 1 else "")
                out.append(Case(f"read-{dtype}-{shm}-{level}", label, "read",
                                hotslot_read(level, dtype, args.chunk_bytes, shm), level, dtype, shm))
    return out


def run_rounds(media: list[Medium], cases: dict[str, list[Case]], repeat: int, results: Results,
               memcpy: Callable[[], Run] | None, loads: list[str], started: float) -> None:
    for r in range(repeat):
        loads.append(loadavg())
        print(f"  round {r + 1}/{repeat}: load average {loads[-1]}  (+{time.perf_counter() - started:.0f} s)",
              file=sys.stderr, flush=True)
        if memcpy is not None:
            results.add("*", "memcpy", memcpy())
            results.add("*", "memcpy-fresh", memcpy_fresh(media[0].files))
        for m in media if r % 2 == 0 else media[::-1]:
            for case in cases[m.key] if r % 2 == 0 else cases[m.key][::-1]:
                m.prepare()
                results.add(m.key, case.key, case.run(m))


def gbps(run: Run) -> float:
    return run.nbytes / run.seconds / GB


def print_table(m: Medium, cases: list[Case], results: Results, memcpy: Run) -> None:
    tools = [c for c in cases if c.kind == "tool"]
    reads = [c for c in cases if c.kind == "read"]
    best_tool = max(gbps(results.best(m.key, c.key)) for c in tools)
    limit = min(best_tool, gbps(memcpy))
    print(f"\n### {m.title}\n")
    print("| row | best s | median s | GB/s | vs c=1 | of limit | alloc s |")
    print("|---|---|---|---|---|---|---|")

    def row(label: str, run: Run, median: float, base: Run | None = None) -> None:
        gain = f"{base.seconds / run.seconds:.2f}x" if base else ""
        alloc = f"{run.alloc_s:.2f}" if run.alloc_s else ""
        print(f"| {label} | {run.seconds:.2f} | {median:.2f} | {gbps(run):.2f} | {gain} | {gbps(run) / limit:.0%} "
              f"| {alloc} |")

    for c in tools:
        row(c.label, results.best(m.key, c.key), results.median_s(m.key, c.key))
    row("memcpy, torch copy_ of preallocated tensors", memcpy, results.median_s("*", "memcpy"))
    fresh = results.best("*", "memcpy-fresh")
    row("memcpy into fresh tensors (first touch; not in the limit)", fresh, results.median_s("*", "memcpy-fresh"))
    print(f"| **limit** = min(best tool, memcpy) | | | **{limit:.2f}** | | | |")
    first = min(c.level for c in reads)
    for c in reads:
        base = results.best(m.key, f"read-{c.dtype}-{c.shm}-{first}")
        row(c.label, results.best(m.key, c.key), results.median_s(m.key, c.key), base)
    memfd = [c for c in reads if c.dtype == "float16" and c.shm == "memfd"]
    best = min(memfd, key=lambda c: results.best(m.key, c.key).seconds)
    a = results.best(m.key, best.key)
    print(f"\nBest fp16 level: c={best.level}, {gbps(a):.2f} GB/s ({gbps(a) / limit:.0%} of the limit).", end="")
    paired = [c for c in memfd if (m.key, f"read-float16-torch-{c.level}") in results.runs]
    if paired:  # memfd vs torch at the best level that has both
        c = min(paired, key=lambda c: results.best(m.key, c.key).seconds)
        a, b = results.best(m.key, c.key), results.best(m.key, f"read-float16-torch-{c.level}")
        print(f" shm at c={c.level}: torch {b.seconds:.2f} s ({b.alloc_s:.2f} s of it allocating), memfd "
              f"{a.seconds:.2f} s ({a.seconds / b.seconds - 1:+.0%} time with memfd).", end="")
    print()


def parse_levels(text: str) -> list[int]:
    levels = sorted({int(x) for x in text.split(",") if x.strip()})
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError("levels are integers >= 1, e.g. 1,2,4,8,16")
    return levels


def parse_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        return items

    return parse


def header(args: argparse.Namespace, slow_detail: str) -> None:
    model = (Path("/proc/cpuinfo").read_text().split("model name")[1:2] or [": ?"])[0].split(":", 1)[1]
    model = model.splitlines()[0].strip()
    mem = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if
               line.startswith("MemTotal"))
    df = subprocess.run(["df", "--output=source,fstype", str(args.model)], capture_output=True, text=True)
    source = df.stdout.splitlines()[-1].split() if df.returncode == 0 else ["?", "?"]
    ra = Path(f"/sys/class/block/{Path(source[0]).name}/queue/read_ahead_kb")
    print("# hotslot parallel reads\n")
    print(f"- machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {model}, "
          f"{int(mem) / 1024**2:.1f} GiB RAM, kernel {platform.release()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} intra-op threads)")
    print(f"- local disk: {source[0]} ({source[1]}), read-ahead "
          f"{ra.read_text().strip() + ' KiB' if ra.exists() else '?'}")
    print(f"- slow mount: {slow_detail}")
    print(f"- model: {args.model} — {len(args.files)} files, "
          f"{sum(p.stat().st_size for p in args.files) / GB:.2f} GB: "
          + ", ".join(f"{p.relative_to(args.model)} {p.stat().st_size / GB:.2f}" for p in args.files))
    print(f"- read_files chunk_bytes {args.chunk_bytes // 2**20} MiB, levels {args.levels}, best of {args.repeat}; "
          f"executor default read_concurrency {DEFAULT_READ_CONCURRENCY}")
    print(f"- load average at start: {loadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="a directory of safetensors files (default: bench_executor's sd15-a, written if missing)")
    parser.add_argument("--media", type=parse_list(("cold", "cached", "slow")), default=["cold", "cached", "slow"])
    parser.add_argument("--levels", type=parse_levels, default=[1, 2, 4, 8, 16], help="reads in flight")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best is kept")
    parser.add_argument("--dtypes", type=parse_list(("float32", "bfloat16")), default=["float32", "bfloat16"])
    parser.add_argument("--dtype-media", type=parse_list(("cold", "cached", "slow")), default=["cold", "cached"],
                        help="media with the conversion rows")
    parser.add_argument("--shm-levels", type=parse_levels, default=[4, 16],
                        help="levels with a shm=torch row beside memfd (fp16 as stored)")
    parser.add_argument("--dd-streams", type=int, default=16, help="parallel dd streams of the limit row")
    parser.add_argument("--chunk-mib", type=int, default=DEFAULT_READ_CHUNK_BYTES // 2**20)
    parser.add_argument("--delay-ms", type=float, default=2.0, help="slow mount: delay per I/O request")
    parser.add_argument("--slow-backend", choices=("auto", "dm", "fuse"), default="auto")
    args = parser.parse_args()
    args.chunk_bytes = args.chunk_mib * 2**20

    if args.model == DEFAULT_MODEL and not (DEFAULT_MODEL / "model_index.json").exists():
        sys.path.insert(0, str(BENCH))
        from bench_executor import prepare_models

        prepare_models()
    args.files = sorted(args.model.rglob("*.safetensors"), key=lambda p: -p.stat().st_size)
    if not args.files:
        sys.exit(f"no safetensors files under {args.model}")
    can_drop = os.access(DROP_CACHES, os.W_OK)
    if "cold" in args.media and not can_drop:
        print("skipping medium cold: dropping the page cache needs root", file=sys.stderr)
        args.media.remove("cold")

    from slowdisk import SlowMountUnavailable, slow_mount

    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        slow, slow_detail = None, "not measured"
        if "slow" in args.media:
            try:
                slow = stack.enter_context(slow_mount(args.model, SLOW_MOUNT, args.delay_ms, args.slow_backend))
                slow_detail = slow.detail
            except SlowMountUnavailable as err:
                slow_detail = f"skipped: {err}"
                print(f"skipping medium slow: {err}", file=sys.stderr)
                args.media.remove("slow")
        header(args, slow_detail)
        media = []
        for key in args.media:
            if key == "cold":
                media.append(Medium("cold", "local disk, page cache dropped before each run", args.files, True))
            elif key == "cached":
                media.append(Medium("cached", "local disk, files in the page cache", args.files, False))
            else:
                files = [slow.root / p.relative_to(args.model) for p in args.files]
                media.append(Medium("slow", f"latency-bound mount ({slow.kind}, {args.delay_ms:g} ms per request), "
                                            "page cache dropped before each run", files, True))
        cases = {m.key: cases_for(m.key, args) for m in media}
        results = Results()
        loads: list[str] = []
        print(f"measuring {sum(len(c) for c in cases.values())} cases x {args.repeat} ...", file=sys.stderr)
        run_rounds(media, cases, args.repeat, results, lambda: memcpy_limit(args.files), loads, started)
        memcpy = results.best("*", "memcpy")
        for m in media:
            print_table(m, cases[m.key], results, memcpy)
    print(f"\nload average at the start of each round: {' | '.join(loads)}; at end {loadavg()}; "
          f"{time.perf_counter() - started:.0f} s in all")
    print("GB/s: bytes read from the medium per second of wall time (hotslot: the data sections; the tools: whole "
          "files). vs c=1: time at c=1 of the same dtype / this time. of limit: GB/s / the limit row. alloc s: time "
          "allocating the output buffers (summed over files). median s: of the --repeat runs.")


if __name__ == "__main__":
    main()
