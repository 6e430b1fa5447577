"""Many models on few workers (not a test): 200 SD-shaped fine-tunes (byte-identical VAE, text encoder, tokenizer
and scheduler; only the UNet differs) served by hotslot (registry, storage-cache, executors and router as
`hotslot serve` processes, as `hotslot up` starts them) and by Ray Serve with `@serve.multiplexed`, in one run on
this machine, under the same seeded request sequences:

  zipf   Zipf s=1.1 over the models, --clients clients in closed loop;
  shift  the same, with the Zipf ranking permuted every --shift-period-s seconds;
  hot    one model gets 80 % of the requests, the others Zipf.

Each cell (regime x storage x system x workload) starts cold: fresh executors, storage-cache (empty node cache)
and router for hotslot; fresh replicas for Ray; the page cache dropped (root). Regimes: `gpu-like` = 1 hotslot
executor with torch_threads 1 (the other core is free for its preloader) vs 1 Ray replica with 1 thread;
`saturated` = 2 executors vs 2 replicas, 1 thread each. Storage: `local` = the share is a local directory;
`slow` = the same files behind a FUSE passthrough this script serves, throttled to --slow-mb-s with --slow-delay-ms
per read request, and no page cache kept across opens (so each load reads the share again, as a share far larger
than RAM would). Ray configs: `ray-3` (max_num_models_per_replica=3) and `ray-mem` (as many models per replica as
the bytes of one hotslot executor's active + standby + host budgets hold).

    .venv/bin/pip install -e '.[bench]'                               # ray[serve]; never a runtime dependency
    .venv/bin/pip install --target bench/.data/pydeps fusepy          # the slow share (and apt-get install libfuse2)
    flock /tmp/hotslot-bench.lock .venv/bin/python bench/bench_many_models.py          # ~30 min on 2 cores
    .venv/bin/python bench/bench_many_models.py --quick                                # ~4 min smoke run

Models are written once to bench/.data/many-models/ (hotslot.modelgen.write_family) and reused.
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import slowdisk  # noqa: E402 - the FUSE plumbing of the slow share
from slowdisk import SlowMountUnavailable  # noqa: E402

DATA = BENCH / ".data"
MODELS = DATA / "many-models"  # the share ("NFS"): one directory per model
WORK = DATA / "many-models-work"  # services' state and logs, the slow mount
RAY_TMP = "/tmp/ray-many-models"  # short: Ray's unix sockets live under it
PREFIX = "mm"
GB = 1000**3
MiB = 1024**2
READ_AHEAD_KB = 4096  # the slow share's read-ahead
PROMPT = "a photo of a cat in the city"
WORKLOADS = ("zipf", "shift", "hot")
SYSTEMS = ("hotslot", "ray-3", "ray-mem")
REGIMES = ("gpu-like", "saturated")
STORAGES = ("local", "slow")
NO_LOAD_TIERS = ("ACTIVE", "STANDBY")


# -- models ------------------------------------------------------------------------------------------------------
def model_ids(n: int) -> list[str]:
    return [f"{PREFIX}-{i}" for i in range(n)]


def prepare_models(args: argparse.Namespace) -> list[str]:
    """Writes the family once (reused when the same widths are there); a larger --models adds the missing members
    (member i is the same whatever n: its seed is family_member_seed(seed, i))."""
    from hotslot.modelgen import write_family

    widths = tuple(args.unet_widths)
    marker = MODELS / "family.json"
    spec = {"unet_block_out_channels": list(widths), "image_size": 64, "seed": 0}
    if marker.exists() and json.loads(marker.read_text()).get("spec") != spec:
        print(f"{MODELS} holds another family; rewriting it", file=sys.stderr)
        shutil.rmtree(MODELS)
    ids = model_ids(args.models)
    missing = [m for m in ids if not (MODELS / m / "model_index.json").exists()]
    if missing:
        print(f"writing {len(missing)} models to {MODELS} (UNet widths {widths}, once) ...", file=sys.stderr,
              flush=True)
        t0 = time.perf_counter()
        staging = MODELS / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        if len(missing) == len(ids) and not any(MODELS.glob(f"{PREFIX}-*")):
            staging = MODELS
        write_family(staging, args.models, prefix=PREFIX, seed=0, image_size=64, unet_block_out_channels=widths)
        if staging != MODELS:
            for m in missing:
                (staging / m).rename(MODELS / m)
            shutil.rmtree(staging)
        marker.write_text(json.dumps({"spec": spec}) + "\n")
        print(f"  {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return ids


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


# -- the slow share: a throttled FUSE passthrough ------------------------------------------------------------------
def serve_share(src: Path, mountpoint: Path, delay_ms: float, mb_s: float, stats: Path) -> None:
    """FUSE passthrough of `src`: each read request waits `delay_ms`, and all of them share a link of `mb_s` MB/s
    (a request is done when the link has carried its bytes, plus the delay). No kernel_cache: the kernel drops a
    file's cached pages when it is opened again, so every load reads the share. Bytes served go to `stats`."""
    from fuse import FUSE

    delay, rate = delay_ms / 1000, mb_s * 1e6
    lock = threading.Lock()
    state = {"link_free": 0.0, "bytes": 0, "reads": 0}

    def write_stats() -> None:
        while True:
            time.sleep(0.25)
            with lock:
                text = json.dumps({"bytes": state["bytes"], "reads": state["reads"]})
            tmp = stats.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(stats)

    threading.Thread(target=write_stats, daemon=True).start()

    def throttle(nbytes: int) -> None:
        now = time.monotonic()
        with lock:
            start = max(now, state["link_free"])
            state["link_free"] = start + nbytes / rate
            state["bytes"] += nbytes
            state["reads"] += 1
            done = state["link_free"] + delay
        time.sleep(max(0.0, done - now))

    FUSE(slowdisk.read_only_passthrough(src, throttle), str(mountpoint), foreground=True, nothreads=False, ro=True,
         fsname="hotslot-slowshare", max_read=128 * 1024)


@dataclass
class Share:
    root: Path
    kind: str  # local or slow
    detail: str
    stats: Path | None = None  # the FUSE server's byte counter

    def served_bytes(self) -> int | None:
        if self.stats is None:
            return None
        try:
            return json.loads(self.stats.read_text())["bytes"]
        except (OSError, ValueError):
            return None


@contextlib.contextmanager
def slow_share(args: argparse.Namespace) -> Iterator[Share]:
    """Mounts the throttled passthrough of MODELS (bench/slowdisk.py's FUSE way, with a bandwidth cap added and
    no kernel cache across opens); raises slowdisk.SlowMountUnavailable with the reason when it cannot."""
    if os.geteuid() != 0:
        raise SlowMountUnavailable("needs root (mount)")
    if not Path("/dev/fuse").exists():
        raise SlowMountUnavailable("no /dev/fuse")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(slowdisk.PYDEPS),
                                                                      os.environ.get("PYTHONPATH")])))
    probe = subprocess.run([sys.executable, "-c", "import fuse"], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        raise SlowMountUnavailable(
            f"cannot import fusepy ({(probe.stderr.strip().splitlines() or ['?'])[-1]}); apt-get install libfuse2 "
            "and .venv/bin/pip install --target bench/.data/pydeps fusepy")
    mnt = WORK / "slow-share"
    if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    mnt.mkdir(parents=True, exist_ok=True)
    stats = WORK / "slow-share.stats"
    stats.unlink(missing_ok=True)
    log = WORK / "slow-share.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve-share", str(MODELS), str(mnt), "--slow-delay-ms",
             str(args.slow_delay_ms), "--slow-mb-s", str(args.slow_mb_s), "--share-stats", str(stats)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SlowMountUnavailable(f"the FUSE server did not mount: {log.read_text()[-500:]}")
            time.sleep(0.05)
        if not os.path.ismount(slowdisk.FUSECTL):
            subprocess.run(["mount", "-t", "fusectl", "none", str(slowdisk.FUSECTL)], capture_output=True)
        background = slowdisk._raise_max_background(mnt)
        dev = os.stat(mnt).st_dev  # read-ahead as an NFS client's (15 x rsize): one stream fills the link
        ra = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        with contextlib.suppress(OSError):
            ra.write_text(f"{READ_AHEAD_KB}\n")
        read_ahead = ra.read_text().strip() if ra.exists() else "?"
        yield Share(mnt, "slow", f"FUSE passthrough (fusepy), {args.slow_mb_s:g} MB/s link, {args.slow_delay_ms:g} "
                                 f"ms per read request (<= 128 KiB), max_background {background}, read-ahead {read_ahead} "
                                 "KiB, no kernel cache across opens", stats)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def share_read_bytes_per_s(share: Share, ids: list[str]) -> float:
    """`cat` of the weight files of up to 8 models to /dev/null, 4 at once, the page cache dropped first: what
    the share gives plain readers."""
    files = [str(p) for m in ids[-8:] for p in sorted((share.root / m).rglob("*.safetensors"))]
    nbytes = sum(os.stat(f).st_size for f in files)
    drop_page_cache()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["cat", *files[i::4]], stdout=subprocess.DEVNULL) for i in range(4)]
    for p in procs:
        p.wait()
    return nbytes / (time.perf_counter() - t0)


# -- workloads ---------------------------------------------------------------------------------------------------
class Sequence:
    """The seeded request sequence of one workload: client c's i-th request has a fixed Zipf rank (or is the hot
    model's), whatever system serves it; which model a rank names is fixed, except in `shift`, where the ranking
    is permuted every `period` seconds of the cell's clock (epoch e's permutation is seeded by e)."""

    def __init__(self, workload: str, ids: list[str], seed: int, period: float, hot_share: float = 0.8) -> None:
        self.workload, self.ids, self.seed, self.period, self.hot_share = workload, ids, seed, period, hot_share
        weights = [k ** -1.1 for k in range(1, len(ids) + 1)]
        self.cum = [sum(weights[: k + 1]) for k in range(len(weights))]
        rest = weights[1:]
        self.cum_rest = [sum(rest[: k + 1]) for k in range(len(rest))]
        self.perms: dict[int, list[str]] = {}

    def perm(self, epoch: int) -> list[str]:
        if epoch not in self.perms:
            ids = list(self.ids)
            random.Random(f"{self.seed}-perm-{epoch}").shuffle(ids)
            self.perms[epoch] = ids
        return self.perms[epoch]

    def ranks(self, client: int) -> Iterator[int]:
        rng = random.Random(f"{self.seed}-{self.workload}-{client}")
        while True:
            if self.workload == "hot":
                if rng.random() < self.hot_share:
                    yield 0
                else:
                    yield 1 + bisect.bisect_left(self.cum_rest, rng.random() * self.cum_rest[-1])
            else:
                yield bisect.bisect_left(self.cum, rng.random() * self.cum[-1])

    def model(self, rank: int, elapsed: float) -> str:
        epoch = int(elapsed // self.period) if self.workload == "shift" else 0
        return self.perm(epoch)[rank]


@dataclass
class Reply:
    model: str
    sent: float  # seconds since the cell started
    latency: float
    no_load: bool
    load_s: float  # load phases this request waited for (hotslot: ensure + read + materialize; Ray: get_model)
    worker: str
    run_s: float = 0.0  # the image itself (hotslot: denoise + encode; Ray: the pipeline call + PNG)
    queue_s: float = 0.0  # hotslot: time in the executor's queue
    tier: str = ""  # hotslot only
    placement: str = ""  # hotslot only


@dataclass
class Cell:
    regime: str
    storage: str
    system: str
    workload: str
    replies: list[Reply] = field(default_factory=list)
    makespan_s: float = 0.0
    share_bytes: int = 0
    load_at_start: float = 0.0
    errors: int = 0
    notes: list[str] = field(default_factory=list)

    def later(self) -> list[Reply]:
        """Every reply but each model's first request (by send time)."""
        seen: set[str] = set()
        out = []
        for r in sorted(self.replies, key=lambda r: r.sent):
            if r.model in seen:
                out.append(r)
            seen.add(r.model)
        return out

    @property
    def no_load(self) -> float:
        later = self.later()
        return sum(r.no_load for r in later) / len(later) if later else float("nan")

    def latency(self, q: int) -> float:
        values = sorted(r.latency for r in self.replies)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]

    @property
    def throughput(self) -> float:
        return len(self.replies) / self.makespan_s if self.makespan_s else 0.0


def drive(cell: Cell, call: Callable[[str], Reply], seq: Sequence, clients: int, duration: float,
          on_progress: Callable[[str], None]) -> None:
    """Closed loop: `clients` threads, each sends its next request when its previous one answered, until
    `duration` seconds have passed; requests in flight then finish. Prints progress every 5 s."""
    t0 = time.perf_counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client(c: int) -> None:
        for rank in seq.ranks(c):
            sent = time.perf_counter() - t0
            if sent >= duration:
                return
            model = seq.model(rank, sent)
            try:
                reply = call(model)
            except Exception as err:  # noqa: BLE001 - counted and shown; the loop goes on
                with lock:
                    cell.errors += 1
                    if cell.errors <= 3:
                        cell.notes.append(f"error: {type(err).__name__}: {str(err)[:300]}")
                time.sleep(0.5)
                continue
            reply.sent = sent
            with lock:
                cell.replies.append(reply)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()

    def report() -> None:
        while not stop.wait(5):
            with lock:
                done = list(cell.replies)
            elapsed = time.perf_counter() - t0
            hits = sum(r.no_load for r in done)
            on_progress(f"  {elapsed:5.0f}/{duration:.0f} s: {len(done)} done, {len(done) / elapsed:.1f} img/s, "
                        f"{hits / max(1, len(done)):.0%} no load (all requests), {cell.errors} errors")

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    for t in threads:
        t.join()
    cell.makespan_s = time.perf_counter() - t0
    stop.set()


# -- hotslot -----------------------------------------------------------------------------------------------------
class Hotslot:
    """registry (kept for the run) + per cell: storage-cache with an empty node cache, N executors, router."""

    def __init__(self, args: argparse.Namespace, ids: list[str], model_bytes: int, on_progress) -> None:
        import grpc

        from hotslot.cluster.process import start_service
        from hotslot.registry.v1 import registry_service_pb2 as rpb
        from hotslot.registry.v1 import registry_service_pb2_grpc as rgrpc

        self.args, self.model_bytes = args, model_bytes
        self.services: list = []
        WORK.mkdir(parents=True, exist_ok=True)
        self.registry = start_service(
            "registry", ["--models-root", str(MODELS), "--database", str(WORK / "registry.db")],
            log_path=WORK / "logs" / "registry.log")
        t0 = time.perf_counter()
        with grpc.insecure_channel(self.registry.address) as channel:
            stub = rgrpc.RegistryServiceStub(channel)
            for i, m in enumerate(ids):
                stub.RegisterModel(rpb.RegisterModelRequest(model_id=m, source=m), timeout=600)
                if i % 50 == 49:
                    on_progress(f"  registered {i + 1}/{len(ids)}")
        self.register_s = time.perf_counter() - t0
        self.channel = self.stub = self.storage_stub = None

    def budgets(self) -> dict[str, int]:
        a = self.args
        return {"active": 2 * self.model_bytes, "standby": a.standby_models * self.model_bytes,
                "host": a.host_models * self.model_bytes}

    def start(self, executors: int, share: Share, tag: str) -> None:
        import grpc

        from hotslot.cluster.process import spawn_service, start_service, wait_ready
        from hotslot.router.v1 import router_service_pb2_grpc as router_grpc
        from hotslot.storage.v1 import storage_cache_service_pb2_grpc as sgrpc

        cache = WORK / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        logs = WORK / "logs" / tag
        storage = start_service(
            "storage-cache", ["--backing-root", str(share.root), "--cache-dir", str(cache),
                              "--capacity-bytes", str(40 * GB), "--registry-address", self.registry.address],
            log_path=logs / "storage-cache.log")
        self.services = [storage]
        b = self.budgets()
        top = str(max(64, self.args.size))
        spawned = []
        for i in range(executors):
            spawned.append(spawn_service("executor", [
                "--registry-address", self.registry.address, "--storage-address", storage.address,
                "--device", "cpu", "--executor-id", f"executor-{i}", "--torch-threads", "1",
                "--active-budget-bytes", str(b["active"]), "--standby-budget-bytes", str(b["standby"]),
                "--host-budget-bytes", str(b["host"]), "--max-width", top, "--max-height", top,
                "--queue-capacity", "64", *self.args.executor_flag], log_path=logs / f"executor-{i}.log"))
        self.services += spawned
        for svc in spawned:
            wait_ready(svc, 300)
        router = start_service("router", ["--registry-address", self.registry.address,
                                          "--executors", ",".join(s.address for s in spawned)],
                               log_path=logs / "router.log")
        self.services.append(router)
        self.channel = grpc.insecure_channel(router.address)
        self.stub = router_grpc.RouterServiceStub(self.channel)
        self.storage_channel = grpc.insecure_channel(storage.address)
        self.storage_stub = sgrpc.StorageCacheServiceStub(self.storage_channel)
        self.wait_executors(executors)

    def wait_executors(self, n: int) -> None:
        from hotslot.router.v1 import router_service_pb2 as router_pb

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = self.stub.GetClusterStatus(router_pb.GetClusterStatusRequest(), timeout=10)
            if len(status.executors) >= n:
                return
            time.sleep(0.2)
        raise RuntimeError(f"router sees fewer than {n} executors after 60 s")

    def bytes_fetched(self) -> int:
        from hotslot.storage.v1 import storage_cache_service_pb2 as spb

        return self.storage_stub.GetUsage(spb.GetUsageRequest(), timeout=30).bytes_fetched

    def call(self, model: str, seed: int = 7) -> Reply:
        from hotslot.common.v1 import common_pb2
        from hotslot.router.v1 import router_service_pb2 as router_pb

        a = self.args
        t0 = time.perf_counter()
        resp = self.stub.Generate(router_pb.GenerateRequest(
            model=common_pb2.ModelRef(model_id=model),
            params=common_pb2.GenerationParams(prompt=PROMPT, steps=a.steps, guidance_scale=a.guidance, width=a.size,
                                               height=a.size, seed=seed, num_images=1)), timeout=600)
        latency = time.perf_counter() - t0
        r = resp
        tier = common_pb2.Tier.Name(r.tier).removeprefix("TIER_")
        load = sum(getattr(r.timings, p).ToNanoseconds() for p in ("ensure", "read", "materialize")) / 1e9
        placement = router_pb.PlacementReason.Name(resp.placement_reason).removeprefix("PLACEMENT_REASON_")
        run = (r.timings.denoise.ToNanoseconds() + r.timings.encode.ToNanoseconds()) / 1e9
        return Reply(model, 0.0, latency, tier in NO_LOAD_TIERS, load, r.executor_id, run,
                     r.timings.queue.ToNanoseconds() / 1e9, tier, placement)

    def held(self) -> str:
        """What each executor holds per tier, from the router's view."""
        from hotslot.common.v1 import common_pb2
        from hotslot.router.v1 import router_service_pb2 as router_pb

        status = self.stub.GetClusterStatus(router_pb.GetClusterStatusRequest(), timeout=10)
        parts = []
        for ex in status.executors:
            st = ex
            tiers = Counter(common_pb2.Tier.Name(m.tier).removeprefix("TIER_").lower() for m in st.models)
            parts.append(f"{st.executor_id}: " + ", ".join(f"{n} {t}" for t, n in sorted(tiers.items())))
        return "; ".join(parts)

    def stop(self) -> None:
        for ch in (self.channel, getattr(self, "storage_channel", None)):
            if ch is not None:
                ch.close()
        self.channel = self.stub = self.storage_stub = None
        for svc in reversed(self.services):
            svc.send(signal.SIGTERM)
        for svc in reversed(self.services):
            svc.stop(None, timeout=20)
        self.services = []
        shutil.rmtree(WORK / "cache", ignore_errors=True)

    def close(self) -> None:
        self.stop()
        self.registry.stop()


# -- Ray Serve ---------------------------------------------------------------------------------------------------
def ray_app(share_root: str, replicas: int, max_models: int, size: int, steps: int, guidance: float):
    """A deployment whose replicas load `StableDiffusionPipeline.from_pretrained(share/model)` on a miss
    (`@serve.multiplexed`, LRU of `max_models` per replica), 1 torch thread each, and run the request."""
    from ray import serve

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8)
    class ManyModels:
        def __init__(self) -> None:
            import diffusers
            import torch
            import transformers

            torch.set_num_threads(1)
            for library in (diffusers, transformers):
                library.utils.logging.disable_progress_bar()
                library.utils.logging.set_verbosity_error()
            warnings.filterwarnings("ignore")
            self.torch = torch
            self.cls = diffusers.StableDiffusionPipeline
            self.loads: dict[str, float] = {}
            self.name = f"replica-{os.getpid()}"

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str):
            t0 = time.perf_counter()
            pipe = self.cls.from_pretrained(os.path.join(share_root, model_id), local_files_only=True,
                                            torch_dtype=self.torch.float32)
            pipe.set_progress_bar_config(disable=True)
            self.loads[model_id] = time.perf_counter() - t0
            return pipe

        async def __call__(self, seed: int) -> dict:
            import numpy as np

            from hotslot.services.executor.generation import encode_png

            model_id = serve.get_multiplexed_model_id()
            pipe = await self.get_model(model_id)
            load_s = self.loads.pop(model_id, None)
            t0 = time.perf_counter()
            gen = self.torch.Generator().manual_seed(seed)
            with self.torch.inference_mode():
                out = pipe(prompt=[PROMPT], num_inference_steps=steps, guidance_scale=guidance, width=size,
                           height=size, generator=[gen], output_type="np")
            png = encode_png((np.clip(out.images, 0.0, 1.0) * 255).round().astype("uint8")[0])
            return {"loaded": load_s is not None, "load_s": load_s or 0.0, "replica": self.name, "png": len(png),
                    "run_s": time.perf_counter() - t0}

    return ManyModels.bind()


class RayServe:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.handle = None
        self.inited = False

    def init(self, cpus: int) -> None:
        import logging

        import ray
        from ray import serve

        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, object_store_memory=256 * MiB,
                 _temp_dir=RAY_TMP, logging_level=logging.WARNING, configure_logging=False)
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        self.inited = True

    def start(self, share: Share, replicas: int, max_models: int) -> None:
        from ray import serve

        a = self.args
        self.handle = serve.run(ray_app(str(share.root), replicas, max_models, a.size, a.steps, a.guidance),
                                name="many-models", route_prefix=None)

    def call(self, model: str, seed: int = 7) -> Reply:
        t0 = time.perf_counter()
        out = self.handle.options(multiplexed_model_id=model).remote(seed).result(timeout_s=600)
        return Reply(model, 0.0, time.perf_counter() - t0, not out["loaded"], out["load_s"], out["replica"],
                     out["run_s"])

    def stop(self) -> None:
        from ray import serve

        if self.handle is not None:
            serve.delete("many-models")
            self.handle = None

    def shutdown(self) -> None:
        import ray
        from ray import serve

        self.stop()
        serve.shutdown()
        ray.shutdown()
        self.inited = False


# -- calibration ---------------------------------------------------------------------------------------------------
def calibrate(args: argparse.Namespace, ids: list[str]) -> dict[str, float]:
    """One load (diffusers from_pretrained, files in the page cache) and one image at the run's parameters, 1
    torch thread, in a child process: best of 3 each."""
    code = f"""
import json, sys, time, warnings, torch
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
import diffusers, transformers
for lib in (diffusers, transformers):
    lib.utils.logging.disable_progress_bar(); lib.utils.logging.set_verbosity_error()
loads, gens = [], []
for m in {ids[:3]!r}:
    t0 = time.perf_counter()
    p = diffusers.StableDiffusionPipeline.from_pretrained({str(MODELS)!r} + "/" + m, local_files_only=True,
                                                          torch_dtype=torch.float32)
    loads.append(time.perf_counter() - t0)
p.set_progress_bar_config(disable=True)
for i in range(4):
    t0 = time.perf_counter()
    p(prompt=[{PROMPT!r}], num_inference_steps={args.steps}, guidance_scale={args.guidance}, width={args.size},
      height={args.size}, generator=[torch.Generator().manual_seed(i)], output_type="np")
    gens.append(time.perf_counter() - t0)
print(json.dumps({{"load_s": min(loads), "image_s": min(gens[1:])}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- the run -------------------------------------------------------------------------------------------------------
def progress(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)


def run_cell(cell: Cell, call, seq: Sequence, args: argparse.Namespace, share: Share, fetched: Callable[[], int],
             say) -> Cell:
    drop_page_cache()
    cell.load_at_start = os.getloadavg()[0]
    served0, fetched0 = share.served_bytes(), fetched()
    say(f"{cell.regime} / {cell.storage} / {cell.system} / {cell.workload}: {args.duration_s:g} s, "
        f"{args.clients} clients (load average {cell.load_at_start:.2f}) ...")
    drive(cell, call, seq, args.clients, args.duration_s, say)
    time.sleep(0.3)  # the FUSE server writes its counter every 0.25 s
    served1, fetched1 = share.served_bytes(), fetched()
    cell.share_bytes = served1 - served0 if served1 is not None and served0 is not None else fetched1 - fetched0
    if served1 is not None:
        cell.notes.append(f"share bytes: {cell.share_bytes / GB:.3f} GB served by the FUSE server, "
                          f"{(fetched1 - fetched0) / GB:.3f} GB counted by the client side")
    say(f"  done: {len(cell.replies)} requests, {cell.throughput:.2f} img/s, {cell.no_load:.1%} no load "
        f"(without first requests), p50 {cell.latency(50):.2f} s, p99 {cell.latency(99):.2f} s, "
        f"{cell.share_bytes / GB:.2f} GB from the share")
    return cell


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def hotslot_notes(cell: Cell) -> None:
    """Placement reason vs the tier the model was in when the request ran, requests per executor, where the time
    went, and reloads: what shows misses that should have been hits, or uneven placement."""
    cross = Counter((r.placement, r.tier) for r in cell.replies)
    cell.notes.append("placement -> tier: " + ", ".join(f"{p}->{t} {n}" for (p, t), n in sorted(cross.items())))
    per = Counter(r.worker for r in cell.replies)
    cell.notes.append("per executor: " + ", ".join(f"{w} {n}" for w, n in sorted(per.items())))
    seen: set[tuple[str, str]] = set()
    reloads = 0  # loaded although that executor had served the model before in this cell (evicted meanwhile)
    for r in sorted(cell.replies, key=lambda r: r.sent):
        if not r.no_load and (r.worker, r.model) in seen:
            reloads += 1
        seen.add((r.worker, r.model))
    loads = [r.load_s for r in cell.replies if not r.no_load]
    misses = [r for r in cell.later() if not r.no_load]
    cell.notes.append(f"image (denoise + encode) p50 {p50([r.run_s for r in cell.replies]):.3f} s, queue p50 "
                      f"{p50([r.queue_s for r in cell.replies]):.3f} s; {len(loads)} requests waited for a load "
                      f"(load phases p50 {p50(loads):.3f} s), {len(misses)} of them not a model's first request, "
                      f"{reloads} reloads of a model the same executor had served before")


def ray_notes(cell: Cell) -> None:
    per = Counter(r.worker for r in cell.replies)
    loads = [r.load_s for r in cell.replies if not r.no_load]
    cell.notes.append("per replica: " + ", ".join(f"{n}" for _, n in sorted(per.items())) +
                      f"; image p50 {p50([r.run_s for r in cell.replies]):.3f} s; {len(loads)} loads, get_model "
                      f"(from_pretrained) p50 {p50(loads):.3f} s")


def fmt_table(cells: list[Cell]) -> list[str]:
    head = ("regime", "storage", "workload", "system", "requests", "no-load", "p50 s", "p99 s", "p99/p50",
            "img/s", "share GB", "hotslot/this img/s", "load avg")
    rows = []
    by_key = {(c.regime, c.storage, c.workload, c.system): c for c in cells}
    for c in cells:
        h = by_key.get((c.regime, c.storage, c.workload, "hotslot"))
        ratio = f"{h.throughput / c.throughput:.2f}x" if h and c.system != "hotslot" and c.throughput else ""
        rows.append((c.regime, c.storage, c.workload, c.system, f"{len(c.replies)}" + (f" ({c.errors} err)" if c.errors
                     else ""), f"{c.no_load:.1%}", f"{c.latency(50):.3f}", f"{c.latency(99):.3f}",
                     f"{c.latency(99) / c.latency(50):.1f}", f"{c.throughput:.2f}", f"{c.share_bytes / GB:.2f}",
                     ratio, f"{c.load_at_start:.2f}"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return out


def goals(cells: list[Cell]) -> list[str]:
    out = []
    by_key = {(c.regime, c.storage, c.workload, c.system): c for c in cells}
    for c in cells:
        if c.system == "hotslot" and c.workload == "zipf" and c.regime == "gpu-like":
            out.append(f"no-load on zipf, gpu-like, {c.storage}: {c.no_load:.1%} (goal >= 95 %) "
                       f"{'MET' if c.no_load >= 0.95 else 'missed'}")
    for c in cells:
        if c.system != "hotslot" and c.throughput:
            h = by_key.get((c.regime, c.storage, c.workload, "hotslot"))
            if h:
                r = h.throughput / c.throughput
                out.append(f"throughput hotslot / {c.system}, {c.regime}, {c.storage}, {c.workload}: {r:.2f}x "
                           f"(goal >= 1.5x) {'MET' if r >= 1.5 else 'missed'}")
    for c in cells:
        if c.system == "hotslot" and c.workload == "hot" and c.replies:
            r = c.latency(99) / c.latency(50)
            out.append(f"p99 / p50 on hot, {c.regime}, {c.storage}: {r:.2f} (goal <= 2) "
                       f"{'MET' if r <= 2 else 'missed'}")
    return out


def share_for(storage: str, args: argparse.Namespace):
    if storage == "local":
        return contextlib.nullcontext(Share(MODELS, "local", "local directory (ext4 on the VM's disk)"))
    return slow_share(args)


def one_cell(args, ids, regime, storage, system, workload, share, hot, ray_sys, ray_max, model_file_bytes,
             say) -> Cell:
    """One cell from a cold start: the system started, the workload driven, the system stopped."""
    workers = 1 if regime == "gpu-like" else 2
    seq = Sequence(workload, ids, args.seed, args.shift_period_s)
    cell = Cell(regime, storage, system, workload)
    if system == "hotslot":
        say(f"starting hotslot: storage-cache, {workers} executor(s), router ...")
        hot.start(workers, share, f"{storage}-{regime}-{workload}")
        try:
            run_cell(cell, hot.call, seq, args, share, hot.bytes_fetched, say)
            hotslot_notes(cell)
            cell.notes.append("held at end: " + hot.held())
        finally:
            hot.stop()
    else:
        say(f"starting Ray Serve: {workers} replica(s), max_num_models_per_replica {ray_max[system]} ...")
        ray_sys.start(share, workers, ray_max[system])

        def ray_fetched() -> int:  # from_pretrained reads every file of the model from the share
            return sum(model_file_bytes for r in cell.replies if not r.no_load)

        try:
            run_cell(cell, ray_sys.call, seq, args, share, ray_fetched, say)
            ray_notes(cell)
        finally:
            ray_sys.stop()
    for note in cell.notes:
        say(f"  {note}")
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, help="models in the family (default 200; --quick 30)")
    parser.add_argument("--duration-s", type=float,
                        help="seconds of closed-loop traffic per cell (default 30; --quick 12)")
    parser.add_argument("--shift-period-s", type=float,
                        help="shift: the Zipf ranking is permuted every this many seconds (default 10; --quick 4)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients in closed loop")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"any of {','.join(WORKLOADS)}")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"any of {','.join(SYSTEMS)}")
    parser.add_argument("--regimes", help=f"any of {','.join(REGIMES)} (default all; --quick gpu-like)")
    parser.add_argument("--storage", help=f"any of {','.join(STORAGES)} (default all; --quick local)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (~4 min): 30 models, 12 s per cell (shift period 4 s), gpu-like, local share; "
                             "flags given explicitly win")
    parser.add_argument("--unet-widths", type=lambda s: tuple(int(x) for x in s.split(",")), default=(32, 64, 128, 128),
                        help="UNet block_out_channels (SD 1.5 layout); default 32,64,128,128: 34 MB fp32")
    parser.add_argument("--size", type=int, default=48, help="image width = height (px)")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps per image")
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance scale (1 = one UNet pass per step)")
    parser.add_argument("--standby-models", type=int, default=8,
                        help="hotslot standby budget per executor, in models (the GPU's room beside the active one)")
    parser.add_argument("--host-models", type=int, default=24, help="hotslot host budget per executor, in models")
    parser.add_argument("--slow-mb-s", type=float, default=250.0, help="slow share: link bandwidth, MB/s")
    parser.add_argument("--slow-delay-ms", type=float, default=3.0, help="slow share: delay per read request, ms")
    parser.add_argument("--seed", type=int, default=1, help="seed of the request sequences")
    parser.add_argument("--executor-flag", action="append", default=[], help="extra flag for every executor")
    parser.add_argument("--serve-share", nargs=2, type=Path, help=argparse.SUPPRESS)  # child: the FUSE server
    parser.add_argument("--share-stats", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_share:
        serve_share(args.serve_share[0].resolve(), args.serve_share[1], args.slow_delay_ms, args.slow_mb_s,
                    args.share_stats)
        return
    defaults = {"models": (200, 30), "duration_s": (30.0, 12.0), "shift_period_s": (10.0, 4.0),
                "regimes": (",".join(REGIMES), "gpu-like"), "storage": (",".join(STORAGES), "local")}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    workloads = [w for w in args.workloads.split(",") if w]
    systems = [s for s in args.systems.split(",") if s]
    regimes = [r for r in args.regimes.split(",") if r]
    storages = [s for s in args.storage.split(",") if s]
    for name, chosen, allowed in (("workloads", workloads, WORKLOADS), ("systems", systems, SYSTEMS),
                                  ("regimes", regimes, REGIMES), ("storage", storages, STORAGES)):
        if not chosen or set(chosen) - set(allowed):
            parser.error(f"--{name}: {','.join(chosen)} is not a subset of {','.join(allowed)}")

    started = time.perf_counter()
    load0 = os.getloadavg()

    def say(msg: str) -> None:
        progress(msg, started)

    import bench_executor  # the memcpy limit, measured as bench_executor does
    import torch

    ids = prepare_models(args)
    model_file_bytes = dir_bytes(MODELS / ids[0])
    model_bytes = weight_bytes(MODELS / ids[0])  # fp32 files, served as fp32: the bytes a held model takes
    unet_bytes = weight_bytes(MODELS / ids[0] / "unet")
    say("calibrating: one from_pretrained and one image, 1 thread ...")
    cal = calibrate(args, ids)
    say(f"  one load {cal['load_s']:.3f} s, one image {cal['image_s']:.3f} s")
    memcpy = bench_executor.memcpy_bytes_per_s(1 << 30)
    dropped = drop_page_cache()
    shutil.rmtree(WORK / "logs", ignore_errors=True)

    hot = None
    ray_sys = RayServe(args) if any(s.startswith("ray") for s in systems) else None
    cells: list[Cell] = []
    limits: dict[str, float] = {}
    share_details: dict[str, str] = {}
    ray_max = {"ray-3": 3, "ray-mem": 1 + args.standby_models + args.host_models}
    # hotslot's cells first, then Ray's: Ray's cluster is started once (a second ray.init in one process fails
    # here) and its background processes must not run beside hotslot's cells
    groups = [g for g in (["hotslot"], [s for s in systems if s.startswith("ray")]) if set(g) & set(systems)]
    try:
        for group in groups:
            if group == ["hotslot"]:
                say(f"starting the registry, registering {len(ids)} models (it hashes every file) ...")
                hot = Hotslot(args, ids, model_bytes, say)
                say(f"  registered in {hot.register_s:.1f} s")
            else:
                say("starting Ray (2 CPUs, no dashboard, no HTTP proxy) ...")
                ray_sys.init(2)
            for storage in storages:
                if storage in share_details and share_details[storage].startswith("NOT RUN"):
                    continue
                try:
                    with share_for(storage, args) as share:
                        share_details[storage] = share.detail
                        if storage not in limits:
                            limits[storage] = share_read_bytes_per_s(share, ids)
                            say(f"share {storage}: {share.detail}; cat x 4: {limits[storage] / GB:.2f} GB/s")
                        for regime in regimes:
                            for system in group:
                                for workload in workloads:
                                    cells.append(one_cell(args, ids, regime, storage, system, workload, share, hot,
                                                          ray_sys, ray_max, model_file_bytes, say))
                except SlowMountUnavailable as err:
                    share_details[storage] = f"NOT RUN: {err}"
                    say(f"share {storage} not available: {err}; running local only")
            if group == ["hotslot"]:
                hot.close()
                hot = None
            else:
                ray_sys.shutdown()
                ray_sys = None
    finally:
        if ray_sys is not None and ray_sys.inited:
            ray_sys.shutdown()
        if hot is not None:
            hot.close()
    elapsed = time.perf_counter() - started
    load1 = os.getloadavg()

    import diffusers
    import ray

    print(f"\nmany-models benchmark: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}, ray {ray.__version__}; load average {' '.join(f'{x:.2f}' for x in load0)} at "
          f"start, {' '.join(f'{x:.2f}' for x in load1)} at end; whole run {elapsed / 60:.1f} min")
    print(f"models: {len(ids)} SD-1.5-layout pipelines (hotslot.modelgen, UNet widths {args.unet_widths}), "
          f"{model_file_bytes / 1e6:.1f} MB each on disk ({unet_bytes / 1e6:.1f} MB UNet, the rest byte-identical "
          f"in every model), fp32 files served as fp32; {len(ids) * model_file_bytes / GB:.2f} GB in all")
    print(f"one load (diffusers from_pretrained, page cache warm, 1 thread) {cal['load_s']:.3f} s; one image "
          f"({args.size}x{args.size} px, {args.steps} step(s), guidance {args.guidance:g}, 1 thread) "
          f"{cal['image_s']:.3f} s; ratio load/image {cal['load_s'] / cal['image_s']:.2f}")
    b = {"active": 2, "standby": args.standby_models, "host": args.host_models}
    print(f"hotslot per executor: torch_threads 1, budgets active {b['active']} / standby {b['standby']} / host "
          f"{b['host']} models ({', '.join(f'{k} {v * model_bytes / GB:.2f} GB' for k, v in b.items())}); "
          f"ray-3: max_num_models_per_replica 3; ray-mem: {ray_max['ray-mem']} (= 1 active + standby + host of one "
          f"executor); Ray replicas 1 torch thread, num_cpus 1")
    print(f"{args.clients} clients in closed loop, {args.duration_s:g} s per cell, shift period "
          f"{args.shift_period_s:g} s, seed {args.seed}; every cell starts cold "
          f"(page cache {'dropped' if dropped else 'NOT dropped (not root)'})")
    print(f"limits: memcpy {memcpy / GB:.1f} GB/s; share read (cat x 4, page cache dropped): " + "; ".join(
        f"{k} {v / GB:.2f} GB/s" for k, v in limits.items()))
    for k, v in share_details.items():
        print(f"share {k}: {v}")
    print("no-load = share of requests, each model's first request left out, whose model was held (hotslot: tier "
          "ACTIVE or STANDBY when it reached the front of the queue; Ray: no get_model load); share GB = bytes read "
          "from the share (slow: counted by the FUSE server; local: hotslot's storage-cache bytes_fetched, Ray's "
          "model bytes per load)\n")
    for line in fmt_table(cells):
        print(line)
    print("\ngoals:")
    for line in goals(cells):
        print(f"  {line}")
    print("\nnotes per cell:")
    for c in cells:
        for note in c.notes:
            print(f"  {c.regime}/{c.storage}/{c.system}/{c.workload}: {note}")


if __name__ == "__main__":
    main()
