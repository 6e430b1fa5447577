"""Benchmark of the storage-cache (not a test): cold fill of the cache from the backing directory against `cp -r` of the
same files and against the disk's read limit (`cat` of the same files to /dev/null), with CPU seconds per GB of
each, warm Ensure latency of a cached 20-file model, and the bytes a 10-model family saves by dedupe. Each
number comes from a real `hotslot serve storage-cache` process called over gRPC, with the baselines measured in
the same run. The models (random weights in safetensors files, diffusers layout) are written to bench/.data once
and reused by later runs with the same sizes.

    .venv/bin/python bench/bench_storage_cache.py                 # ~2 GB model, 10 x 0.2 GB family
    .venv/bin/python bench/bench_storage_cache.py --size-gb 0.5   # smaller, for slow machines
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from hotslot.convert import manifest_to_proto
from hotslot.manifest import Manifest, scan_model_dir
from hotslot.storage.v1 import storage_cache_service_pb2 as pb
from hotslot.storage.v1 import storage_cache_service_pb2_grpc as pb_grpc

DATA = Path(__file__).resolve().parent / ".data"
GB = 1000**3
WRITE_CHUNK = 64 * 1024 * 1024
LISTENING = re.compile(r"hotslot storage-cache listening on (\S+):(\d+)")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Before each cold run the script waits (at most QUIET_WAIT_S) for the CPUs to be this idle over QUIET_WINDOW_S:
# the fill hashes every byte, so a neighbour's CPU load changes its time far more than cp's.
QUIET_IDLE = 0.9
QUIET_WINDOW_S = 0.5
QUIET_WAIT_S = 30.0

# A 20-file diffusers pipeline with sharded weights; each weight file's share of the model's size. The family
# shares everything but unet/ (fine-tunes of one base).
WEIGHTS = {
    **{f"unet/diffusion_pytorch_model-0000{i}-of-00004.safetensors": 0.2 for i in range(1, 5)},
    "text_encoder/model-00001-of-00002.safetensors": 0.06,
    "text_encoder/model-00002-of-00002.safetensors": 0.06,
    "vae/diffusion_pytorch_model.safetensors": 0.08,
}
SMALL = {
    "model_index.json": '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}',
    "scheduler/scheduler_config.json": '{"_class_name": "DDIMScheduler"}',
    "feature_extractor/preprocessor_config.json": '{"size": 224}',
    "tokenizer/merges.txt": "#version: 0.2\n" + "a b\n" * 2000,
    "tokenizer/vocab.json": json.dumps({f"tok{i}": i for i in range(5000)}),
    "tokenizer/special_tokens_map.json": '{"bos_token": "<|startoftext|>"}',
    "tokenizer/tokenizer_config.json": '{"model_max_length": 77}',
    "tokenizer/added_tokens.json": "{}",
    "text_encoder/config.json": '{"hidden_size": 768}',
    "text_encoder/model.safetensors.index.json": '{"weight_map": {}}',
    "unet/config.json": '{"sample_size": 64}',
    "unet/diffusion_pytorch_model.safetensors.index.json": '{"weight_map": {}}',
    "vae/config.json": '{"latent_channels": 4}',
}


# -- data --------------------------------------------------------------------------------------------------------
def write_safetensors(path: Path, size: int, rng: np.random.Generator) -> None:
    """One F16 tensor of random values filling about `size` bytes: a valid safetensors file."""
    n = max(2, (size - 128) // 2 * 2)
    header = json.dumps({"w": {"dtype": "F16", "shape": [n // 2], "data_offsets": [0, n]}}).encode()
    header += b" " * (-len(header) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        left = n
        while left:
            chunk = min(left, WRITE_CHUNK)
            f.write(rng.bytes(chunk))
            left -= chunk


def write_model(dest: Path, size: int, seed: int, shared_from: Path | None = None) -> None:
    rng = np.random.default_rng(seed)
    for rel, text in SMALL.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(text)
    for rel, share in WEIGHTS.items():
        if shared_from is not None and not rel.startswith("unet/"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(shared_from / rel, dest / rel)  # same bytes, without writing them again
        else:
            write_safetensors(dest / rel, int(size * share), rng)


def prepared(dest: Path, size: int, seed: int, shared_from: Path | None = None) -> Manifest:
    """The model at `dest`, written and scanned once; later runs read the manifest saved beside it."""
    stamp = dest.with_name(dest.name + ".manifest.json")
    if stamp.exists():
        return Manifest.from_json(stamp.read_text())
    shutil.rmtree(dest, ignore_errors=True)
    write_model(dest, size, seed, shared_from)
    manifest = scan_model_dir(dest.parent, dest.name)
    stamp.write_text(manifest.to_json())
    return manifest


# -- measuring ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    seconds: float
    cpu_s: float  # CPU time (user + system) of the process doing the copy, over the run
    load: str  # /proc/loadavg's first three fields when the run started


def drop_page_cache(enabled: bool) -> None:
    os.sync()
    if enabled:
        DROP_CACHES.write_text("3\n")


def idle_fraction(window_s: float) -> float:
    def sample() -> tuple[int, int]:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all

    idle0, all0 = sample()
    time.sleep(window_s)
    idle1, all1 = sample()
    return (idle1 - idle0) / max(1, all1 - all0)


def wait_for_quiet() -> bool:
    """Waits until other processes leave the CPUs idle; False if they never did within QUIET_WAIT_S."""
    deadline = time.monotonic() + QUIET_WAIT_S
    while idle_fraction(QUIET_WINDOW_S) < QUIET_IDLE:
        if time.monotonic() > deadline:
            return False
    return True


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu_s(pid: int) -> float:
    # Fields 14 and 15 of /proc/<pid>/stat (utime, stime), counted after the ")" that ends the command name.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass(frozen=True)
class Service:
    stub: pb_grpc.StorageCacheServiceStub
    pid: int


@contextmanager
def storage_cache(backing: Path, cache_dir: Path, *args: str) -> Iterator[Service]:
    shutil.rmtree(cache_dir, ignore_errors=True)
    log_path = cache_dir.with_name(cache_dir.name + ".log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hotslot.cli.main", "serve", "storage-cache", "--port", "0",
             "--metrics-port", "0", "--backing-root", str(backing), "--cache-dir", str(cache_dir), "--registry-address", "", *args],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + 60
        while not (match := LISTENING.search(log_path.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"storage-cache did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        with grpc.insecure_channel(f"{match.group(1)}:{match.group(2)}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            yield Service(pb_grpc.StorageCacheServiceStub(channel), proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(cache_dir, ignore_errors=True)


def cold(drop: bool, quiet: list[bool], measure: Callable[[], tuple[float, float]]) -> Run:
    """One cold run: page cache dropped, CPUs quiet (or waited for long enough), then `measure`."""
    drop_page_cache(drop)
    quiet.append(wait_for_quiet())
    load = load_average()
    seconds, cpu_s = measure()
    return Run(seconds, cpu_s, load)


def timed_child(command: list[str], after: Callable[[], None] = lambda: None) -> tuple[float, float]:
    cpu0 = children_cpu_s()
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    after()
    return time.perf_counter() - started, children_cpu_s() - cpu0


def ensure_request(source: str, manifest: Manifest) -> pb.EnsureModelRequest:
    return pb.EnsureModelRequest(manifest=pb.ManifestTarget(source=source, manifest=manifest_to_proto(manifest)))


def timed_cat(src: Path) -> tuple[float, float]:
    """Every file of src read once to /dev/null: how fast this disk can deliver the bytes, the fill's limit."""
    return timed_child(["cat", *sorted(str(p) for p in src.rglob("*") if p.is_file())])


def timed_cp(src: Path, dst: Path, fsync: bool) -> tuple[float, float]:
    shutil.rmtree(dst, ignore_errors=True)

    def fsync_all() -> None:
        if fsync:
            for path in dst.rglob("*"):
                if path.is_file():
                    fd = os.open(path, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)

    try:
        return timed_child(["cp", "-r", str(src), str(dst)], after=fsync_all)  # the fsyncs' CPU is not counted
    finally:
        shutil.rmtree(dst)


def cold_fill(
    backing: Path, work: Path, source: str, manifest: Manifest, drop: bool, quiet: list[bool], *args: str
) -> Run:
    with storage_cache(backing, work / "cache", *args) as service:
        def fill() -> tuple[float, float]:
            cpu0 = process_cpu_s(service.pid)
            started = time.perf_counter()
            reply = service.stub.EnsureModel(ensure_request(source, manifest), timeout=3600)
            elapsed = time.perf_counter() - started
            # Each distinct file exactly once (the two empty weight maps of the index files are one blob).
            assert reply.bytes_fetched == sum({f.sha256: f.size_bytes for f in manifest.files}.values())
            return elapsed, process_cpu_s(service.pid) - cpu0

        return cold(drop, quiet, fill)


def warm_ensure(backing: Path, work: Path, source: str, manifest: Manifest, calls: int) -> tuple[list[float], ...]:
    with storage_cache(backing, work / "cache", "--no-fsync") as service:
        stub = service.stub
        request = ensure_request(source, manifest)
        stub.EnsureModel(request, timeout=3600)
        for _ in range(20):  # connection and code paths warmed before timing
            stub.EnsureModel(request)
        client, server = [], []
        for _ in range(calls):
            started = time.perf_counter()
            reply = stub.EnsureModel(request)
            client.append(time.perf_counter() - started)
            server.append(reply.elapsed.ToNanoseconds() / 1e9)
            assert {f.source for f in reply.files} == {pb.FILE_SOURCE_LOCAL_HIT}
    return client, server


def family_dedupe(backing: Path, work: Path, sources: list[str], manifests: list[Manifest]) -> pb.GetUsageResponse:
    with storage_cache(backing, work / "cache", "--no-fsync") as service:
        for source, manifest in zip(sources, manifests, strict=True):
            service.stub.EnsureModel(ensure_request(source, manifest), timeout=3600)
        return service.stub.GetUsage(pb.GetUsageRequest())


# -- report ------------------------------------------------------------------------------------------------------
def rate(size: int, seconds: float) -> str:
    return f"{seconds:.2f} s ({size / seconds / 1e6:,.0f} MB/s)"


def cpu_per_gb(size: int, run: Run) -> str:
    return f"{run.cpu_s / (size / GB):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0, help="size of the big model (GB, 10^9 bytes)")
    parser.add_argument("--family-size-gb", type=float, default=0.2, help="size of each of the 10 family models")
    parser.add_argument("--family", type=int, default=10, help="models in the dedupe family")
    parser.add_argument("--warm-calls", type=int, default=300, help="timed warm Ensure calls")
    parser.add_argument("--repeat", type=int, default=3, help="cold runs of each kind; the best is reported")
    parser.add_argument("--read-chunk-bytes", default="8MiB", help="the service's read_chunk_bytes for the fills")
    parser.add_argument("--parallel-fetches", type=int, default=4, help="the service's parallel_fetches")
    parser.add_argument("--no-drop-caches", action="store_true",
                        help="keep the page cache between cold runs (it is dropped when /proc allows it)")
    args = parser.parse_args()
    drop = not args.no_drop_caches and os.access(DROP_CACHES, os.W_OK)

    backing = DATA / "share"
    work = DATA / "work"
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gb * GB)
    big_name = f"model-{args.size_gb:g}gb"
    print(f"writing / reusing the models under {DATA} ...", file=sys.stderr)
    big = prepared(backing / big_name, size, seed=1)
    fam_size = int(args.family_size_gb * GB)
    base = backing / f"family-{args.family_size_gb:g}gb-0"
    family = [prepared(base, fam_size, seed=100)]
    family += [prepared(backing / f"family-{args.family_size_gb:g}gb-{i}", fam_size, seed=100 + i, shared_from=base)
               for i in range(1, args.family)]
    family_sources = [f"family-{args.family_size_gb:g}gb-{i}" for i in range(args.family)]

    print("measuring cold copies ...", file=sys.stderr)
    load_start = load_average()
    tuning = ("--read-chunk-bytes", args.read_chunk_bytes, "--parallel-fetches", str(args.parallel_fetches))
    quiet: list[bool] = []
    # Interleaved and best-of-N: on a shared machine, writeback and neighbours make single runs noisy.
    kinds: dict[str, Callable[[], Run]] = {
        "cat": lambda: cold(drop, quiet, lambda: timed_cat(backing / big_name)),
        "cp": lambda: cold(drop, quiet, lambda: timed_cp(backing / big_name, work / "cp", fsync=False)),
        "fill": lambda: cold_fill(backing, work, big_name, big, drop, quiet, "--no-fsync", *tuning),
        "cp_sync": lambda: cold(drop, quiet, lambda: timed_cp(backing / big_name, work / "cp", fsync=True)),
        "fill_sync": lambda: cold_fill(backing, work, big_name, big, drop, quiet, "--fsync", *tuning),
    }
    runs: dict[str, list[Run]] = {kind: [] for kind in kinds}
    for _ in range(args.repeat):
        for kind, measure in kinds.items():
            runs[kind].append(measure())
    cat, cp_plain, fill_plain, cp_sync, fill_sync = (min(runs[kind], key=lambda r: r.seconds) for kind in kinds)
    print("measuring warm Ensure ...", file=sys.stderr)
    client, server = warm_ensure(backing, work, big_name, big, args.warm_calls)
    print("measuring family dedupe ...", file=sys.stderr)
    usage = family_dedupe(backing, work, family_sources, family)

    logical = sum(m.total_bytes for m in family)
    saved = logical - usage.used_bytes
    q = statistics.quantiles
    n = big.total_bytes
    rows = [
        ("cat to /dev/null (disk read limit)", rate(n, cat.seconds), cpu_per_gb(n, cat), ""),
        ("cp -r (no fsync)", rate(n, cp_plain.seconds), cpu_per_gb(n, cp_plain), ""),
        ("cold fill, --no-fsync", rate(n, fill_plain.seconds), cpu_per_gb(n, fill_plain), ""),
        ("  ratio: cp time / fill time", f"{cp_plain.seconds / fill_plain.seconds:.2f}", "", ">= 0.9"),
        ("  share of the read limit: cat time / fill time", f"{cat.seconds / fill_plain.seconds:.2f}", "", ""),
        ("cp -r + fsync of every file", rate(n, cp_sync.seconds), cpu_per_gb(n, cp_sync), ""),
        ("cold fill, --fsync (default)", rate(n, fill_sync.seconds), cpu_per_gb(n, fill_sync), ""),
        ("  ratio: cp time / fill time", f"{cp_sync.seconds / fill_sync.seconds:.2f}", "", ">= 0.9"),
        ("  share of the read limit: cat time / fill time", f"{cat.seconds / fill_sync.seconds:.2f}", "", ""),
        (f"warm Ensure p50 / p99, gRPC round trip ({len(big.files)} files)",
         f"{statistics.median(client) * 1e3:.2f} / {q(client, n=100)[98] * 1e3:.2f} ms", "", "p50 <= 5 ms"),
        ("warm Ensure p50, inside the service", f"{statistics.median(server) * 1e3:.3f} ms", "", ""),
        (f"family: {args.family} models x {fam_size / GB:.2f} GB, logical bytes", f"{logical / GB:.3f} GB", "", ""),
        ("family: bytes stored (blob store used)", f"{usage.used_bytes / GB:.3f} GB", "", ""),
        ("family: saved by dedupe", f"{saved / GB:.3f} GB ({saved / logical:.0%})", "", ""),
    ]
    cpus = os.cpu_count()
    same_fs = (backing.stat().st_dev == work.stat().st_dev)
    print(f"\nstorage-cache benchmark: model {n / GB:.2f} GB in {len(big.files)} files; "
          f"page cache dropped before each cold run: {'yes' if drop else 'no'}; best of {args.repeat}; {cpus} CPUs; "
          f"{args.parallel_fetches} parallel fetches, {args.read_chunk_bytes} reads; backing and cache on "
          f"{'one filesystem' if same_fs else 'two filesystems'}; load average {load_start} at start, "
          f"{load_average()} at end; {quiet.count(False)} of {len(quiet)} cold runs started on a busy machine\n")
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width)} | {'value'.ljust(26)} | CPU s/GB | goal        |")
    print(f"|{'-' * (width + 2)}|{'-' * 28}|----------|-------------|")
    for name, value, cpu, goal in rows:
        print(f"| {name.ljust(width)} | {value.ljust(26)} | {cpu.ljust(8)} | {goal.ljust(11)} |")
    print("\nevery cold run, seconds (load average at its start):")
    for kind, kind_runs in runs.items():
        print(f"  {kind:9} " + "  ".join(f"{r.seconds:.2f} ({r.load.split()[0]})" for r in kind_runs))


if __name__ == "__main__":
    main()
