"""Benchmark of same-model batching (not a test): the throughput of one executor serving a queue of compatible
requests for one model, with `--max-batch-images 1` (each request its own pipeline call) and with batching on, in
one run, beside the limit: the same pipeline called by diffusers in this process, one image per call and a whole
batch per call.

    .venv/bin/python bench/bench_batching.py                         # CPU: SD1.5-layout UNet at 1/5 width, 64 px
    .venv/bin/python bench/bench_batching.py --device cuda --size 512 --steps 25 --widths 320,640,1280,1280

Requests are sent from `--clients` closed-loop clients (each sends its next request when its last one answers), so
the executor's queue holds up to `--clients` requests and a batch can only be as large as that. Every request has
its own prompt and seed. The model (random weights, SD 1.5's layout at `--widths`) is written once to
bench/.data/batching/ and reused.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.support starts the services
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import torch  # noqa: E402

from hotslot.common.v1 import common_pb2  # noqa: E402
from hotslot.executor.v1 import executor_service_pb2 as epb  # noqa: E402
from hotslot.executor.v1 import executor_service_pb2_grpc as egrpc  # noqa: E402
from hotslot.modelgen import write_tiny_pipeline  # noqa: E402
from hotslot.registry.v1 import registry_service_pb2 as rpb  # noqa: E402
from hotslot.registry.v1 import registry_service_pb2_grpc as rgrpc  # noqa: E402
from tests.support.procs import start_service  # noqa: E402

DATA = Path(__file__).resolve().parent / ".data" / "batching"
MODEL = "batch-model"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--widths", default="32,64,128", help="UNet block_out_channels (SD 1.5: 320,640,1280,1280)")
    p.add_argument("--size", type=int, default=64, help="image width and height in px")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--requests", type=int, default=48, help="requests per configuration")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients (the queue depth)")
    p.add_argument("--batch", type=int, default=8, help="max_batch_images of the batching configuration")
    p.add_argument("--torch-threads", type=int, default=0, help="executor's torch threads (0: its default)")
    return p.parse_args()


def prepare_model(args: argparse.Namespace) -> Path:
    widths = tuple(int(w) for w in args.widths.split(","))
    dest = DATA / "models" / f"{MODEL}-{'-'.join(map(str, widths))}-{args.size}"
    if not (dest / "model_index.json").exists():
        print(f"writing {dest} ...", flush=True)
        write_tiny_pipeline(dest, seed=1, image_size=args.size, unet_block_out_channels=widths, overwrite=True)
    return dest


def request(i: int, args: argparse.Namespace) -> epb.GenerateRequest:
    return epb.GenerateRequest(
        model=common_pb2.ModelRef(model_id=MODEL), request_id=f"r{i}",
        params=common_pb2.GenerationParams(prompt=f"a lighthouse at dusk, view {i}", seed=1000 + i, steps=args.steps,
                                           width=args.size, height=args.size, guidance_scale=7.5))


def closed_loop(stub, args: argparse.Namespace) -> tuple[float, list[float], list[int]]:
    """Sends args.requests requests from args.clients clients; returns (wall s, latencies, batch sizes seen)."""
    lock = threading.Lock()
    next_i = [0]
    latencies: list[float] = []
    batches: list[int] = []

    def client() -> None:
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= args.requests:
                return
            t0 = time.perf_counter()
            reply = stub.Generate(request(i, args), timeout=3600)
            with lock:
                latencies.append(time.perf_counter() - t0)
                batches.append(reply.batch_requests)

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, latencies, batches


def hotslot_rows(args: argparse.Namespace, model_dir: Path) -> list[tuple[str, float, list[float], list[int]]]:
    work = DATA / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    share = work / "share"
    share.mkdir()
    shutil.copytree(model_dir, share / MODEL)
    registry = start_service("registry", ["--models-root", str(share), "--database", str(work / "registry.db")],
                             log_path=work / "registry.log")
    storage = start_service("storage-cache", ["--backing-root", str(share), "--cache-dir", str(work / "cache"),
                                              "--registry-address", registry.address], log_path=work / "storage.log")
    rows = []
    try:
        with grpc.insecure_channel(registry.address) as channel:
            rgrpc.RegistryServiceStub(channel).RegisterModel(
                rpb.RegisterModelRequest(model_id=MODEL, source=MODEL), timeout=600)
        top = str(max(1024, args.size))
        for batch in (1, args.batch):
            flags = ["--registry-address", registry.address, "--storage-address", storage.address,
                     "--device", args.device, "--dtype", args.dtype, "--max-batch-images", str(batch),
                     "--max-width", top, "--max-height", top, "--queue-capacity", "64"]
            if args.torch_threads:
                flags += ["--torch-threads", str(args.torch_threads)]
            executor = start_service("executor", flags, log_path=work / f"executor-batch{batch}.log", timeout=300)
            try:
                with grpc.insecure_channel(executor.address) as channel:
                    stub = egrpc.ExecutorServiceStub(channel)
                    stub.Generate(request(-1, args), timeout=3600)  # the load, and the process's first call
                    # One round of the clients untimed: the first call at each batch size pays torch's one-time
                    # kernel set-up for that shape.
                    closed_loop(stub, argparse.Namespace(**{**vars(args), "requests": args.clients}))
                    wall, lat, sizes = closed_loop(stub, args)
                    rows.append((f"hotslot executor, max_batch_images {batch}", wall, lat, sizes))
                    print(f"  {rows[-1][0]}: {args.requests / wall:.2f} images/s", flush=True)
            finally:
                executor.stop()
    finally:
        storage.stop()
        registry.stop()
    return rows


def diffusers_rows(args: argparse.Namespace, model_dir: Path) -> list[tuple[str, float, float]]:
    """The pipeline called in this process: per image, one image per call, and `args.batch` images per call."""
    from diffusers import StableDiffusionPipeline

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    dtype = getattr(torch, args.dtype)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype, safety_checker=None).to(args.device)
    pipe.set_progress_bar_config(disable=True)

    def call(n: int, offset: int) -> None:
        pipe(prompt=[f"a lighthouse at dusk, view {offset + j}" for j in range(n)], num_inference_steps=args.steps,
             guidance_scale=7.5, width=args.size, height=args.size, output_type="np",
             generator=[torch.Generator("cpu").manual_seed(1000 + offset + j) for j in range(n)])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    rows = []
    for per_call in (1, args.batch):
        call(per_call, 0)  # warm-up: the first call at each batch size pays torch's one-time set-up for that shape
        calls = max(1, args.requests // per_call)
        t0 = time.perf_counter()
        for c in range(calls):
            call(per_call, c * per_call)
        wall = time.perf_counter() - t0
        rows.append((f"diffusers in-process, {per_call} image(s) per call", wall, calls * per_call / wall))
        print(f"  {rows[-1][0]}: {rows[-1][2]:.2f} images/s", flush=True)
    return rows


def main() -> None:
    args = parse_args()
    load0 = os.getloadavg()
    model_dir = prepare_model(args)
    weights = sum(p.stat().st_size for p in model_dir.rglob("*.safetensors"))
    print(f"# same-model batching: {args.requests} requests per row, {args.clients} closed-loop clients, "
          f"{args.size}x{args.size} px, {args.steps} steps, guidance 7.5, device {args.device} {args.dtype}, "
          f"UNet widths {args.widths} ({weights / 1e6:.0f} MB of weights), {os.cpu_count()} CPUs, "
          f"torch threads {args.torch_threads or torch.get_num_threads()}")
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in load0)}", flush=True)
    print("measuring diffusers in this process (the limit) ...", flush=True)
    limit = diffusers_rows(args, model_dir)
    print("measuring hotslot ...", flush=True)
    rows = hotslot_rows(args, model_dir)
    load1 = os.getloadavg()
    base = args.requests / rows[0][1]
    print()
    print("| system | images/s | vs max_batch_images 1 | p50 latency | p99 latency | requests per call (mean) |")
    print("|---|---|---|---|---|---|")
    for name, wall, lat, sizes in rows:
        rate = args.requests / wall
        lat = sorted(lat)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        print(f"| {name} | {rate:.2f} | {rate / base:.2f}x | {statistics.median(lat):.2f} s | {p99:.2f} s | "
              f"{statistics.mean(sizes):.1f} |")
    one = limit[0][2]
    for name, _, rate in limit:
        print(f"| {name} (limit) | {rate:.2f} | {rate / one:.2f}x of 1 per call | | | |")
    print(f"\n# load average at end: {' '.join(f'{x:.2f}' for x in load1)}")


if __name__ == "__main__":
    main()
