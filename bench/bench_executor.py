"""Benchmark of the executor (not a test): an SD1.5-shaped pipeline with random fp16 weights (~2.1 GB on disk),
loaded and run by diffusers in this process against real `hotslot serve` processes (model-registry,
storage-cache, executor) called over gRPC, in one run:

  (a) cold start: diffusers `from_pretrained` + first image vs a fresh executor's first Generate (model never
      loaded), with the storage-cache empty (cold) and with the files already in the node cache (warm);
  (b) swap standby -> active: p50/p99 of the `swap` phase over --swaps requests alternating A and B, both held;
  (c) switch penalty: time per request on an alternating B,A,B,A workload minus that on a same-model A,A,A,A
      workload, for hotslot (next request queued while the current computes, so lookahead works; both models
      held, and once with B evicted first) and for diffusers reloading the other model on every switch.

Two models, A and B, share vae/text_encoder/tokenizer/scheduler files and differ in their UNet. They are written
once to bench/.data/sd15 and reused. Weights stay fp16 on disk; both systems convert to --dtype at load.

    .venv/bin/python bench/bench_executor.py          # CPU, float32; (a) 64x64 px, 2 steps
    .venv/bin/python bench/bench_executor.py --device cuda --dtype float16 --size 512 --steps 25 \
        --work-size 512 --work-steps 25 --work-guidance 7.5

diffusers takes its fast loading path only when `accelerate` is importable (see bench/README.md); the header says
whether it was.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.support starts the services
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import torch  # noqa: E402

from hotslot.common.v1 import common_pb2  # noqa: E402
from hotslot.executor.v1 import executor_service_pb2 as epb  # noqa: E402
from hotslot.executor.v1 import executor_service_pb2_grpc as egrpc  # noqa: E402
from hotslot.registry.v1 import registry_service_pb2 as rpb  # noqa: E402
from hotslot.registry.v1 import registry_service_pb2_grpc as rgrpc  # noqa: E402
from tests.support.procs import ServiceProcess, start_service  # noqa: E402

DATA = Path(__file__).resolve().parent / ".data"
MODELS = DATA / "sd15"  # the backing store ("NFS share") the registry and storage-cache point at
WORK = DATA / "executor-work"
MODEL_A, MODEL_B = "sd15-a", "sd15-b"
MODEL_A32 = "sd15-a-fp32"  # model A with float32 files (the fp32-files rows of the dtype table)
FILE_DTYPES = {MODEL_A: "float16", MODEL_A32: "float32"}
GB = 1000**3
PROMPT = "a photo of a cat in the city"
TIER = {v: k.removeprefix("TIER_") for k, v in common_pb2.Tier.items()}

# Stable Diffusion 1.5's component configs (runwayml/stable-diffusion-v1-5), random weights.
UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
TEXT = dict(  # CLIP ViT-L/14 text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)
SCHEDULER = dict(  # SD's noise schedule, sampled with DDIM
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


# -- data --------------------------------------------------------------------------------------------------------
def random_state_dict(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """fp16 weights for every entry of a meta module's state dict, filled in place by a seeded generator (far faster
    than the modules' own init): matrices and kernels ~ N(0, 1/(3 fan_in)) (the scale of PyTorch's default init),
    norm scales 1, biases 0."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, meta in module.state_dict().items():
        if not meta.is_floating_point():
            out[name] = torch.arange(meta.shape[-1]).expand(meta.shape).to(meta.dtype).contiguous()
        elif meta.ndim <= 1:
            fill = 1.0 if name.endswith("weight") else 0.0
            out[name] = torch.full(meta.shape, fill, dtype=torch.float16)
        else:
            fan_in = meta[0].numel()
            out[name] = torch.empty(meta.shape, dtype=torch.float16).normal_(0.0, (3 * fan_in) ** -0.5, generator=gen)
    return out


def save_random(module: torch.nn.Module, seed: int, dest: Path) -> None:
    module.load_state_dict(random_state_dict(module, seed), assign=True)
    module.save_pretrained(dest, safe_serialization=True)


def write_sd15(dest: Path, unet_seed: int, shared_from: Path | None) -> None:
    """One SD1.5-shaped StableDiffusionPipeline directory, written beside `dest` and renamed into place. With
    `shared_from`, everything but unet/ is hard-linked from that model (the same bytes, a shared VAE and text
    encoder as fine-tunes of one base have)."""
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from hotslot.modelgen import BOS_TOKEN, EOS_TOKEN, _bpe_vocab_and_merges, _tokenizer_files

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET)
    save_random(unet, unet_seed, tmp / "unet")
    del unet
    if shared_from is not None:
        for path in shared_from.rglob("*"):
            rel = path.relative_to(shared_from)
            if path.is_file() and rel.parts[0] != "unet":
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(path, tmp / rel)
    else:
        vocab, _ = _bpe_vocab_and_merges()  # the tiny byte-level BPE: every id is far below CLIP's 49408
        with torch.device("meta"):
            vae = AutoencoderKL(**VAE)
            text = CLIPTextModel(CLIPTextConfig(
                **TEXT, bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN], pad_token_id=vocab[EOS_TOKEN]))
        save_random(vae, 1, tmp / "vae")
        save_random(text, 2, tmp / "text_encoder")
        DDIMScheduler(**SCHEDULER).save_pretrained(tmp / "scheduler")
        (tmp / "tokenizer").mkdir()
        for name, data in _tokenizer_files().items():
            (tmp / "tokenizer" / name).write_bytes(data)
        index = {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
            "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for path in tmp.rglob("*"):  # safetensors writes 0600 files; give every file the same ordinary mode
        path.chmod(0o755 if path.is_dir() else 0o644)
    tmp.rename(dest)


def prepare_models() -> tuple[Path, Path]:
    a, b = MODELS / MODEL_A, MODELS / MODEL_B
    for dest, seed, shared in ((a, 100, None), (b, 200, a)):
        if not (dest / "model_index.json").exists():
            print(f"writing {dest} (random fp16 weights, once) ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            write_sd15(dest, seed, shared)
            print(f"  {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return a, b


def prepare_fp32(a: Path) -> Path:
    """Model A with every weight file stored as float32 (the same values, 2x the bytes): the fp32-files rows."""
    from safetensors.torch import load_file, save_file

    dest = MODELS / MODEL_A32
    if (dest / "model_index.json").exists():
        return dest
    print(f"writing {dest} (A's weights as float32 files, once) ...", file=sys.stderr, flush=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for path in a.rglob("*"):
        rel = path.relative_to(a)
        if path.is_dir():
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            tensors = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
            save_file(tensors, tmp / rel, metadata={"format": "pt"})
            del tensors
            (tmp / rel).chmod(0o644)
        else:
            shutil.copy2(path, tmp / rel)
    tmp.rename(dest)
    return dest


def weight_files(model: Path) -> list[Path]:
    return sorted(model.rglob("*.safetensors"))


def weight_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.rglob("*.safetensors"))



# -- requests ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    size: int
    steps: int
    guidance: float
    seed: int = 7

    def __str__(self) -> str:
        return f"{self.size}x{self.size} px, {self.steps} step(s), guidance {self.guidance:g}, DDIM"


def generate_request(model_id: str, p: Params) -> epb.GenerateRequest:
    return epb.GenerateRequest(
        model=common_pb2.ModelRef(model_id=model_id),
        params=common_pb2.GenerationParams(prompt=PROMPT, steps=p.steps, guidance_scale=p.guidance, width=p.size,
                                           height=p.size, seed=p.seed, num_images=1),
    )


def seconds(duration) -> float:
    return duration.ToNanoseconds() / 1e9


@dataclass
class Workload:
    """One run of requests: wall time of the whole run, per-request client latency and the executor's answers."""

    models: list[str]
    makespan_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    replies: list = field(default_factory=list)  # GenerateResponse (hotslot) or None (diffusers)

    @property
    def per_request_s(self) -> float:
        return self.makespan_s / len(self.models)

    def tiers(self) -> str:
        counts: dict[str, int] = {}
        for reply in self.replies:
            counts[TIER[reply.tier]] = counts.get(TIER[reply.tier], 0) + 1
        return ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))


# -- hotslot -----------------------------------------------------------------------------------------------------
class Hotslot:
    """model-registry + storage-cache + executor(s) as `hotslot serve` processes, as in production."""

    def __init__(self, args: argparse.Namespace, model_bytes: int, models: tuple[str, ...]) -> None:
        self.args = args
        # Both models must fit the standby tier (one is active, the other standby) and the host tier.
        self.budget = str(3 * model_bytes)
        shutil.rmtree(WORK, ignore_errors=True)
        WORK.mkdir(parents=True)
        self.registry = start_service(
            "registry", ["--models-root", str(MODELS), "--database", str(WORK / "registry.db")],
            log_path=WORK / "registry.log")
        self.storage: ServiceProcess | None = None
        self.executor: ServiceProcess | None = None
        self.channel: grpc.Channel | None = None
        self.stub: egrpc.ExecutorServiceStub | None = None
        with grpc.insecure_channel(self.registry.address) as channel:
            stub = rgrpc.RegistryServiceStub(channel)
            for model in models:  # hashes every file: seconds for 2 x 2 GB
                stub.RegisterModel(rpb.RegisterModelRequest(model_id=model, source=model), timeout=1800)

    def start_storage(self) -> None:
        """A storage-cache with an empty node cache."""
        if self.storage:
            self.storage.stop()
        shutil.rmtree(WORK / "cache", ignore_errors=True)
        self.storage = start_service(
            "storage-cache", ["--backing-root", str(MODELS), "--cache-dir", str(WORK / "cache"),
                              "--registry-address", self.registry.address],
            log_path=WORK / "storage-cache.log")

    def start_executor(self, name: str, dtype: str = "") -> float:
        """A fresh executor (nothing loaded); returns how long it took to start (process, preloader, SERVING)."""
        self.stop_executor()
        a = self.args
        dtype = dtype or a.dtype
        top = str(max(1024, a.size, a.work_size))
        t0 = time.perf_counter()
        self.executor = start_service(
            "executor",
            ["--registry-address", self.registry.address, "--storage-address", self.storage.address,
             "--device", a.device, "--dtype", dtype, "--read-concurrency", str(a.read_concurrency),
             "--standby-budget-bytes", self.budget,
             "--host-budget-bytes", self.budget, "--active-budget-bytes", self.budget,
             "--max-width", top, "--max-height", top, "--queue-capacity", "64", *a.executor_flag],
            log_path=WORK / f"executor-{name}.log", timeout=300)
        started = time.perf_counter() - t0
        self.channel = grpc.insecure_channel(self.executor.address)
        self.stub = egrpc.ExecutorServiceStub(self.channel)
        return started

    def stop_executor(self) -> None:
        if self.channel:
            self.channel.close()
            self.channel = self.stub = None
        if self.executor:
            self.executor.stop()
            self.executor = None

    def generate(self, model: str, p: Params) -> tuple[epb.GenerateResponse, float]:
        t0 = time.perf_counter()
        reply = self.stub.Generate(generate_request(model, p), timeout=3600)
        return reply, time.perf_counter() - t0

    def evict(self, model: str) -> None:
        self.stub.Evict(epb.EvictRequest(model=common_pb2.ModelRef(model_id=model)), timeout=60)

    def run(self, models: list[str], p: Params, depth: int = 2) -> Workload:
        """Sends the requests in order keeping `depth` in flight: request i+depth is sent when request i answers,
        so the next one always waits in the executor's queue while the current one computes (lookahead sees it)."""
        run = Workload(models, latencies=[0.0] * len(models), replies=[None] * len(models))
        done = threading.Semaphore(0)
        sent = [0.0] * len(models)
        futures = []

        def send(i: int) -> None:
            sent[i] = time.perf_counter()
            future = self.stub.Generate.future(generate_request(models[i], p), timeout=3600)

            def finished(f, i=i) -> None:
                run.latencies[i] = time.perf_counter() - sent[i]
                done.release()

            future.add_done_callback(finished)
            futures.append(future)

        t0 = time.perf_counter()
        for i in range(min(depth, len(models))):
            send(i)
        for i in range(len(models)):
            futures[i].result()  # raises the request's error
            if i + depth < len(models):
                send(i + depth)
        for _ in models:
            done.acquire()
        run.makespan_s = time.perf_counter() - t0
        run.replies = [f.result() for f in futures]
        return run

    def close(self) -> None:
        self.stop_executor()
        for svc in (self.storage, self.registry):
            if svc:
                svc.stop()
        shutil.rmtree(WORK / "cache", ignore_errors=True)  # GBs of blobs; the services' logs stay in WORK


# -- diffusers ---------------------------------------------------------------------------------------------------
class Diffusers:
    """The baseline: plain diffusers in this process, `from_pretrained` from the model directory."""

    def __init__(self, args: argparse.Namespace) -> None:
        import diffusers
        import transformers
        from diffusers import StableDiffusionPipeline
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401 - imported before anything is timed

        for library in (diffusers, transformers):
            library.utils.logging.disable_progress_bar()
            library.utils.logging.set_verbosity_error()
        warnings.filterwarnings("ignore", category=FutureWarning)  # newer diffusers prefer dtype= to torch_dtype=
        self.cls = StableDiffusionPipeline
        self.device = args.device
        self.dtype = getattr(torch, args.dtype)
        self.pipe = None
        self.loaded = ""

    def load(self, model: str) -> float:
        self.unload()
        t0 = time.perf_counter()
        pipe = self.cls.from_pretrained(MODELS / model, local_files_only=True, torch_dtype=self.dtype)
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        sync(self.device)
        self.pipe, self.loaded = pipe, model
        return time.perf_counter() - t0

    def unload(self) -> None:
        self.pipe, self.loaded = None, ""
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def generate(self, p: Params) -> tuple[bytes, float]:
        """One image, encoded as PNG the way the executor does (so the bytes can be compared)."""
        import numpy as np

        from hotslot.services.executor.generation import encode_png

        t0 = time.perf_counter()
        gen = torch.Generator(device=self.device if self.device.startswith("cuda") else "cpu").manual_seed(p.seed)
        with torch.inference_mode():
            out = self.pipe(prompt=[PROMPT], num_inference_steps=p.steps, guidance_scale=p.guidance, width=p.size,
                            height=p.size, generator=[gen], output_type="np")
        pixels = (np.clip(out.images, 0.0, 1.0) * 255).round().astype("uint8")
        png = encode_png(pixels[0])
        return png, time.perf_counter() - t0

    def run(self, models: list[str], p: Params) -> Workload:
        """One request after another; a request for another model than the loaded one reloads first."""
        run = Workload(models)
        t0 = time.perf_counter()
        for model in models:
            r0 = time.perf_counter()
            if model != self.loaded:
                self.load(model)
            self.generate(p)
            run.latencies.append(time.perf_counter() - r0)
        run.makespan_s = time.perf_counter() - t0
        return run


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def drop_page_cache(enabled: bool) -> None:
    if enabled:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm_page_cache(paths: list[Path]) -> None:
    """Reads the files so a timed run finds them in the page cache. Run right before each timed load: a machine
    that reclaims idle memory (DAMON, a VM balloon: this one pages out what was not touched for ~60 s) would
    otherwise give one system cached files and the other a disk read.

    Each file's cached pages are dropped first and read again, so both systems' files sit in the page cache the
    same way: read by readahead, in large folios. A blob the storage-cache filled by copy_file_range is cached in
    4 KiB pages while it stays cached; mapping it costs ~40x more (populating a 3.4 GB file: 0.16 s against
    0.004 s on this VM), while diffusers' files, written by write() or read by readahead, are in large folios."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            while f.read(64 << 20):
                pass


def prepare_cache(args: argparse.Namespace, paths: list[Path]) -> None:
    """Before a timed cold load: the page cache dropped (--drop-caches) or holding `paths` (the files that system
    will read), so both systems start from the same state."""
    if args.drop_caches:
        drop_page_cache(True)
    else:
        warm_page_cache(paths)


def node_cache_files() -> list[Path]:
    """The storage-cache's blobs: the files an executor's view links to."""
    return sorted(p for p in (WORK / "cache").rglob("*") if p.is_file() and "blobs" in p.parts)


def diffusers_first_image(args: argparse.Namespace, image: Params, model: str = MODEL_A, dtype: str = "") -> dict:
    """from_pretrained + first image in a fresh process (imports done before the clock starts), as the executor's
    first request runs in a fresh process."""
    cmd = [sys.executable, __file__, "--diffusers-first-image", "--device", args.device, "--dtype",
           dtype or args.dtype, "--child-model", model,
           "--size", str(image.size), "--steps", str(image.steps), "--guidance", str(image.guidance)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- physical limits and CPU time -------------------------------------------------------------------------------
def disk_read_s(files: list[Path]) -> float:
    """`cat` of the files to /dev/null with the page cache dropped first: what the disk gives a plain reader."""
    drop_page_cache(True)
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def memcpy_bytes_per_s(nbytes: int, sample: int = 1 << 30) -> float:
    """A memcpy (torch copy_ between touched buffers) of min(nbytes, 1 GiB), best of 3: the memory limit."""
    n = min(nbytes, sample)
    src, dst = torch.ones(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return n / best


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def merged(runs: list[Workload]) -> Workload:
    return Workload([m for r in runs for m in r.models], sum(r.makespan_s for r in runs),
                    [x for r in runs for x in r.latencies], [x for r in runs for x in r.replies])


# -- report ------------------------------------------------------------------------------------------------------
def ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 0.1 else f"{s:.2f} s"


def phases(reply: epb.GenerateResponse, names: tuple[str, ...]) -> str:
    return " / ".join(f"{seconds(getattr(reply.timings, n)):.2f}" for n in names) + " s"


def quantile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def progress(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)


PAIRINGS = ("float16:float32", "float16:bfloat16", "float16:float16", "float32:float32", "float32:bfloat16",
            "float32:float16")


@dataclass
class ColdRow:
    """One dtype pairing of the cold table: diffusers' and hotslot's best run, and the limits beside them."""

    files: str
    dtype: str
    d_load: float
    d_gen: float
    h_wall: float
    reply: epb.GenerateResponse
    cpu: dict[str, float]  # process -> CPU seconds spent on the first Generate
    same_png: bool
    file_bytes: int
    out_bytes: int
    paired: list[float]  # per run, diffusers / hotslot of the two processes run back to back
    starts: list[float]  # per run, the executor's start (process, preloader, host pool, SERVING), not counted

    @property
    def d_first(self) -> float:
        return self.d_load + self.d_gen

    @property
    def h_load(self) -> float:
        return load_s(self.reply)


def cold_by_dtype(args: argparse.Namespace, hot: Hotslot, image: Params, started: float) -> list[ColdRow]:
    """(d) for each "files:weights" pairing, diffusers from_pretrained + first image against a fresh executor's
    first Generate with the files in the node cache (tier LOCAL_DISK), best of --repeat, CPU time per process."""
    rows = []
    warmed: set[str] = set()
    for pairing in args.pairings:
        file_dtype, dtype = pairing.split(":")
        model = next(m for m, d in FILE_DTYPES.items() if d == file_dtype)
        if model not in warmed:  # the node cache gets the files once; every timed run then reads them from it
            hot.start_executor(f"warm-{model}")
            hot.stub.Preload(epb.PreloadRequest(model=common_pb2.ModelRef(model_id=model),
                                                target_tier=common_pb2.TIER_HOST), timeout=1800)
            warmed.add(model)
        best_d, best_h = None, None
        pngs = set()
        paired, starts = [], []
        for r in range(args.repeat):
            # Odd runs put hotslot first: a process that starts right after another freed gigabytes gets pages the
            # guest has just touched, which flatters whichever system runs second.
            first = "hotslot" if r % 2 else "diffusers"
            progress(f"(d) {file_dtype} files -> {dtype}, run {r + 1}/{args.repeat}: {first} first ...", started)
            hot.stop_executor()
            if first == "diffusers":
                prepare_cache(args, weight_files(MODELS / model))
                d = diffusers_first_image(args, image, model=model, dtype=dtype)
            starts.append(hot.start_executor(f"{model}-{dtype}-{r}", dtype=dtype))
            pids = {"storage-cache": hot.storage.pid, "executor": hot.executor.pid}
            for child in child_pids(hot.executor.pid):  # the preloader; not multiprocessing's resource tracker
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                    pids["preloader"] = child
            prepare_cache(args, node_cache_files())
            before = {name: cpu_s(pid) for name, pid in pids.items()}
            reply, wall = hot.generate(model, image)
            used = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
            pngs.add(hashlib.sha256(reply.images[0].data).hexdigest())
            if first == "hotslot":
                hot.stop_executor()
                prepare_cache(args, weight_files(MODELS / model))
                d = diffusers_first_image(args, image, model=model, dtype=dtype)
            pngs.add(d["png_sha256"])
            paired.append((d["load_s"] + d["gen_s"]) / wall)
            if best_d is None or d["load_s"] + d["gen_s"] < best_d["load_s"] + best_d["gen_s"]:
                best_d = d
            if best_h is None or wall < best_h[1]:
                best_h = (reply, wall, used)
        file_bytes = weight_bytes(MODELS / model)
        out_bytes = file_bytes // getattr(torch, file_dtype).itemsize * getattr(torch, dtype).itemsize
        rows.append(ColdRow(file_dtype, dtype, best_d["load_s"], best_d["gen_s"], best_h[1], best_h[0], best_h[2],
                            len(pngs) == 1, file_bytes, out_bytes, paired, starts))
    hot.stop_executor()
    return rows


def print_cold_table(rows: list[ColdRow], args: argparse.Namespace, limits: dict[str, float]) -> None:
    """The (d) table: one row per pairing, the limits and hotslot's share of them beside it."""
    head = ("files -> weights", "diffusers load+1st", "hotslot 1st Generate", "ratio", "paired ratios (median)",
            "hotslot load (read / mat.)",
            "read GB/s", "limit GB/s", "share", "CPU s/GB ensure / read / executor", "executor start", "same PNG")
    table = []
    for r in rows:
        t = r.reply.timings
        read_s, mat_s = seconds(t.read), seconds(t.materialize)
        if args.drop_caches:
            limit = r.file_bytes / limits[r.files]  # the disk: cat of the same files, page cache dropped
        else:
            limit = limits["memcpy"]  # files in the page cache: reading them is a memory copy
        rate = r.file_bytes / read_s if read_s else 0.0
        gb = r.out_bytes / GB
        cpu = " / ".join(f"{r.cpu.get(k, 0.0) / gb:.2f}" for k in ("storage-cache", "preloader", "executor"))
        table.append((f"{r.files} -> {r.dtype}", f"{ms(r.d_first)} ({ms(r.d_load)} load)", ms(r.h_wall), f"{r.d_first / r.h_wall:.2f}",
                      f"{' '.join(f'{x:.2f}' for x in r.paired)} ({statistics.median(r.paired):.2f})",
                      f"{ms(r.h_load)} ({ms(read_s)} / {ms(mat_s)})", f"{rate / GB:.2f}", f"{limit / GB:.2f}",
                      f"{rate / limit:.0%}", cpu, f"{min(r.starts):.1f}-{max(r.starts):.1f} s",
                      "yes" if r.same_png else "NO"))
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in table:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


LOAD_PHASES = ("ensure", "read", "materialize", "swap")


def load_s(reply: epb.GenerateResponse) -> float:
    """The request's load phases summed: what getting the model active cost it."""
    return sum(seconds(getattr(reply.timings, p)) for p in LOAD_PHASES)


def first_generate_rows(what: str, reply: epb.GenerateResponse, wall: float, d_first: float,
                        d_load: float) -> list[tuple[str, str, str, str]]:
    """(a) rows of one fresh executor's first Generate, against diffusers' load + first image."""
    return [
        (f"(a) hotslot cold, {what}: first Generate (tier {TIER[reply.tier]})", ms(wall), f"{d_first / wall:.2f}",
         ""),
        ("      ensure / read / materialize / swap", phases(reply, LOAD_PHASES), "", ""),
        ("      denoise / encode (VAE decode + PNG)", phases(reply, ("denoise", "encode")), "", ""),
        ("      load phases summed; ratio = from_pretrained / this", ms(load_s(reply)), f"{d_load / load_s(reply):.2f}",
         ""),
    ]


def section_a(args: argparse.Namespace, hot: Hotslot, first: Params, starts: list[float],
              started: float) -> list[tuple[str, str, str, str]]:
    """(a) cold start, best of --repeat; every run in a fresh process (diffusers in a child of this script)."""
    d_runs, cold_runs, warm_runs = [], [], []
    for r in range(args.repeat):
        progress(f"(a) run {r + 1}/{args.repeat}: diffusers from_pretrained + first image ({first}) ...", started)
        hot.stop_executor()
        prepare_cache(args, weight_files(MODELS / MODEL_A))
        d_runs.append(diffusers_first_image(args, first))
        progress(f"(a) run {r + 1}/{args.repeat}: hotslot, fresh executor, empty node cache ...", started)
        hot.start_storage()
        starts.append(hot.start_executor(f"cold-{r}"))
        prepare_cache(args, weight_files(MODELS / MODEL_A))  # the backing store is what a fill reads
        cold_runs.append(hot.generate(MODEL_A, first))
        progress(f"(a) run {r + 1}/{args.repeat}: hotslot, fresh executor, files in the node cache ...", started)
        starts.append(hot.start_executor(f"warm-{r}"))
        prepare_cache(args, node_cache_files())
        warm_runs.append(hot.generate(MODEL_A, first))
    d_best = min(d_runs, key=lambda d: d["load_s"] + d["gen_s"])
    d_load, d_gen = d_best["load_s"], d_best["gen_s"]
    cold, cold_wall = min(cold_runs, key=lambda run: run[1])
    warm, warm_wall = min(warm_runs, key=lambda run: run[1])
    pngs = {hashlib.sha256(reply.images[0].data).hexdigest() for reply, _ in cold_runs + warm_runs}
    pngs |= {d["png_sha256"] for d in d_runs}

    d_first = d_load + d_gen
    return [
        (f"(a) diffusers from_pretrained (fp16 files -> {args.dtype})", ms(d_load), "", ""),
        ("(a) diffusers first image", ms(d_gen), "", ""),
        ("(a) diffusers load + first image", ms(d_first), "1.00", ""),
        *first_generate_rows("node cache empty", cold, cold_wall, d_first, d_load),
        *first_generate_rows("files in node cache", warm, warm_wall, d_first, d_load),
        ("(a) hotslot PNG == diffusers PNG (same seed and params)",
         "yes" if len(pngs) == 1 else f"NO: {len(pngs)} different images", "", ""),
    ]


def section_bc(args: argparse.Namespace, hot: Hotslot, work: Params,
               started: float) -> tuple[epb.GenerateResponse, list[tuple[str, str, str, str]]]:
    """(b) swap and (c) switch penalty on a warm executor holding A and B, then diffusers' reloads."""
    rounds = max(1, args.rounds)
    h_block = -(-args.swaps // rounds)  # ceil: at least --swaps swaps
    h_block += h_block % 2
    d_block = max(2, args.requests // rounds // 2 * 2)
    n_evicted = max(2, args.requests // 2 * 2)
    if hot.executor is None:
        hot.start_executor("switch")
    # (b) + (c) on the last warm executor, both models held: A and B
    progress(f"(b)/(c) loading B; {rounds} x ({h_block} requests for A, {h_block} alternating B,A) ...", started)
    b_load, _ = hot.generate(MODEL_B, work)
    hot.generate(MODEL_A, work)  # warm-up at the workload's shape
    h_same, h_alt = [], []
    for _ in range(rounds):
        h_same.append(hot.run([MODEL_A] * h_block, work))
        h_alt.append(hot.run([MODEL_B, MODEL_A] * (h_block // 2), work))
    h_same, h_alt = merged(h_same), merged(h_alt)
    progress(f"(c) hotslot: B evicted, then A,B x {n_evicted // 2} (lookahead loads B while A computes) ...",
             started)
    hot.evict(MODEL_B)
    h_cold_alt = hot.run([MODEL_A, MODEL_B] * (n_evicted // 2), work)
    hot.stop_executor()  # frees its memory for the baseline

    progress(f"(c) diffusers: {rounds} x ({d_block} same-model requests, {d_block} alternating with a reload "
             "per switch) ...", started)
    base = Diffusers(args)
    base.load(MODEL_A)
    base.generate(work)  # warm-up at the workload's shape
    d_same, d_alt = [], []
    for _ in range(rounds):
        d_same.append(base.run([MODEL_A] * d_block, work))
        d_alt.append(base.run([MODEL_B, MODEL_A] * (d_block // 2), work))
    d_same, d_alt = merged(d_same), merged(d_alt)
    base.unload()
    swap_s = [seconds(r.timings.swap) for r in h_alt.replies]
    h_pen, hc_pen, d_pen = (h_alt.per_request_s - h_same.per_request_s,
                            h_cold_alt.per_request_s - h_same.per_request_s,
                            d_alt.per_request_s - d_same.per_request_s)
    return b_load, [
        (f"(b) swap standby -> active, p50 ({len(swap_s)} swaps; tiers: {h_alt.tiers()})",
         ms(statistics.median(swap_s)), "", "<= 1 ms"),
        ("(b) swap standby -> active, p99 / max", f"{ms(quantile(swap_s, 99))} / {ms(max(swap_s))}", "", ""),
        (f"(c) hotslot same model A x {len(h_same.models)}: time per request", ms(h_same.per_request_s), "", ""),
        (f"(c) hotslot alternating B,A x {len(h_alt.models)}, both held: time per request", ms(h_alt.per_request_s), "", ""),
        ("(c) hotslot switch penalty (alternating - same)", f"{h_pen:+.3f} s", "", "~ 0"),
        (f"(c) hotslot A,B x {len(h_cold_alt.models)}, B evicted first ({h_cold_alt.tiers()}): time/request",
         ms(h_cold_alt.per_request_s), "", ""),
        ("(c)   its penalty: B's one load over the run, lookahead-overlapped", f"{hc_pen:+.3f} s", "", ""),
        ("(c)   B's first request: queue / ensure / read / materialize",
         phases(h_cold_alt.replies[1], ("queue", "ensure", "read", "materialize")), "", ""),
        (f"(c) diffusers same model A x {len(d_same.models)}: time per request", ms(d_same.per_request_s), "", ""),
        (f"(c) diffusers alternating B,A x {len(d_alt.models)}, reload per switch: time/request", ms(d_alt.per_request_s), "", ""),
        ("(c) diffusers switch penalty (alternating - same)", f"{d_pen:+.3f} s", "", ""),
        ("(c) alternating, time per request: diffusers / hotslot (both held)", "",
         f"{d_alt.per_request_s / h_alt.per_request_s:.2f}", ""),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device of the executor and of diffusers: cpu, cuda")
    parser.add_argument("--dtype", default="", help="weights after loading; default float32 on CPU, float16 on CUDA")
    parser.add_argument("--size", type=int, default=64, help="(a) image width = height in pixels")
    parser.add_argument("--steps", type=int, default=2, help="(a) denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="(a) guidance scale (> 1: two UNet passes/step)")
    parser.add_argument("--work-size", type=int, default=8,
                        help="(b), (c) image size of each request; only the switch is measured, so the default is "
                             "the cheapest the pipeline runs (8 px = a 1x1 latent)")
    parser.add_argument("--work-steps", type=int, default=1, help="(b), (c) denoising steps of each request")
    parser.add_argument("--work-guidance", type=float, default=1.0, help="(b), (c) guidance (1 = one UNet pass)")
    parser.add_argument("--swaps", type=int, default=50,
                        help="(b) length of hotslot's alternating run (one standby -> active swap per request) and "
                             "(c) of its same-model run")
    parser.add_argument("--requests", type=int, default=8,
                        help="(c) N: requests per diffusers run and in hotslot's run with B evicted first")
    parser.add_argument("--repeat", type=int, default=2, help="(a) runs of each cold start; the best is reported")
    parser.add_argument("--rounds", type=int, default=2,
                        help="(c) each system's same-model and alternating runs are cut into this many blocks, "
                             "interleaved, so load from other processes hits both alike")
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the page cache before each cold load (needs root; slows the whole machine)")
    parser.add_argument("--pairings", default=",".join(PAIRINGS),
                        help="(d) comma-separated FILES:WEIGHTS dtype pairings of the cold table (files float16 or "
                             "float32; weights float16, bfloat16 or float32); empty to skip (d)")
    parser.add_argument("--d-size", type=int, default=8,
                        help="(d) image size of the first image; the default is the cheapest the pipeline runs, so "
                             "the table measures loading (fp16 convolutions on a CPU take minutes at 64 px)")
    parser.add_argument("--d-steps", type=int, default=1, help="(d) denoising steps of the first image")
    parser.add_argument("--d-guidance", type=float, default=1.0, help="(d) guidance of the first image")
    parser.add_argument("--sections", default="abcd", help="which parts to run: any of a, b, c (b needs c), d")
    parser.add_argument("--read-concurrency", type=int, default=4, help="the executor's read_concurrency")
    parser.add_argument("--executor-flag", action="append", default=[],
                        help="extra flag for every executor, e.g. --executor-flag=--no-convert-in-executor")
    parser.add_argument("--diffusers-first-image", action="store_true", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--child-model", default=MODEL_A, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.dtype:
        args.dtype = "float16" if args.device.startswith("cuda") else "float32"
    first, work = Params(args.size, args.steps, args.guidance), Params(args.work_size, args.work_steps,
                                                                       args.work_guidance)
    args.pairings = [p for p in args.pairings.split(",") if p] if "d" in args.sections else []
    for pairing in args.pairings:
        files, _, weights = pairing.partition(":")
        if files not in FILE_DTYPES.values() or weights not in ("float16", "bfloat16", "float32"):
            parser.error(f"--pairings: {pairing!r} is not FILES:WEIGHTS with FILES float16|float32 and WEIGHTS "
                         "float16|bfloat16|float32")
    if args.diffusers_first_image:
        base = Diffusers(args)
        load_s = base.load(args.child_model)
        png, gen_s = base.generate(first)
        print(json.dumps({"load_s": load_s, "gen_s": gen_s, "png_sha256": hashlib.sha256(png).hexdigest()}))
        return
    started = time.perf_counter()
    load0 = os.getloadavg()

    a_dir, _ = prepare_models()
    models = (MODEL_A, MODEL_B)
    if any(p.startswith("float32:") for p in args.pairings):
        prepare_fp32(a_dir)
        models += (MODEL_A32,)
    disk_bytes = weight_bytes(a_dir)
    model_bytes = disk_bytes * getattr(torch, args.dtype).itemsize // 2
    progress(f"registering {', '.join(models)} (the registry hashes every file) ...", started)
    hot = Hotslot(args, 2 * model_bytes if MODEL_A32 in models else model_bytes, models)
    rows: list[tuple[str, str, str, str]] = []
    starts: list[float] = []
    b_load = None
    cold_rows: list[ColdRow] = []
    limits: dict[str, float] = {}
    try:
        hot.start_storage()
        if "a" in args.sections:
            rows += section_a(args, hot, first, starts, started)
        if "c" in args.sections:
            b_load, switch_rows = section_bc(args, hot, work, started)
            rows += switch_rows
        if args.pairings:
            if rows:  # (d) takes minutes: what (a)-(c) measured is out before it, in case the run is cut short
                print("(a)-(c), printed before (d) runs:\n")
                print_rows(rows)
                print(flush=True)
                rows = []
            limits["memcpy"] = memcpy_bytes_per_s(2 * model_bytes)
            if args.drop_caches:
                for model, file_dtype in FILE_DTYPES.items():
                    if model in models:
                        limits[file_dtype] = disk_read_s(weight_files(MODELS / model))
            cold_rows = cold_by_dtype(args, hot, Params(args.d_size, args.d_steps, args.d_guidance), started)
    finally:
        hot.close()
    elapsed = time.perf_counter() - started
    load1 = os.getloadavg()

    import diffusers

    accel = importlib.util.find_spec("accelerate") is not None
    print(f"\nexecutor benchmark: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, diffusers "
          f"{diffusers.__version__} (accelerate {'present: low_cpu_mem_usage' if accel else 'absent: full init'}), "
          f"device {args.device}, {args.dtype}; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end")
    print(f"models: SD1.5-shaped StableDiffusionPipeline A and B (UNets differ), {disk_bytes / GB:.2f} GB fp16 "
          f"safetensors each, {model_bytes / GB:.2f} GB as {args.dtype}; page cache "
          f"{'dropped before each cold load' if args.drop_caches else 'warm (files read before)'}")
    print(f"(a) image: {first}; (b)/(c) each request: {work}; (c) hotslot keeps 2 requests in flight so the next "
          f"waits in its queue; time per request = wall time of the run / requests")
    print(f"(a), (d) best of {args.repeat} runs each, every run in a fresh process; (c) same-model and alternating "
          f"runs interleaved in {max(1, args.rounds)} blocks each; executor read_concurrency {args.read_concurrency}")
    if args.executor_flag:
        print(f"executor flags: {' '.join(args.executor_flag)}")
    if starts:
        print(f"executor start (not counted): {min(starts):.1f}-{max(starts):.1f} s")
    if b_load is not None:
        print(f"B's first load for (b): {seconds(b_load.timings.read):.2f} s read, "
              f"{seconds(b_load.timings.materialize):.2f} s materialize")
    print(f"whole run {elapsed:.0f} s\n")
    if cold_rows:
        limit = ("disk: cat of the same files with the page cache dropped" if args.drop_caches
                 else f"memcpy of the same bytes ({limits['memcpy'] / GB:.1f} GB/s; the files are in the page cache)")
        print(f"(d) cold start by dtype: from_pretrained + first image vs a fresh executor's first Generate, files in "
              f"the node cache (tier LOCAL_DISK); ratio = best diffusers / best hotslot; paired ratios = each run's "
              "diffusers / hotslot, the two processes run back to back, order alternating (the median is the "
              f"estimate least moved by this VM's drift); read GB/s = file bytes / read phase; limit = {limit}; CPU "
              "s per GB of weights during the first Generate, per process (executor includes denoising); executor start = "
              "its process start to SERVING (preloader, host pool reservation), not counted\n")
        print_cold_table(cold_rows, args, limits)
        print()
    if rows:
        print_rows(rows)


def print_rows(rows: list[tuple[str, str, str, str]]) -> None:
    """The main table of (a)-(c): measure, value, ratio, goal."""
    width = max(len(r[0]) for r in rows)
    vw = max(len(r[1]) for r in rows)
    print(f"| {'measure'.ljust(width)} | {'value'.ljust(vw)} | ratio | goal    |")
    print(f"|{'-' * (width + 2)}|{'-' * (vw + 2)}|-------|---------|")
    for name, value, ratio, goal in rows:
        print(f"| {name.ljust(width)} | {value.ljust(vw)} | {ratio.ljust(5)} | {goal.ljust(7)} |")


if __name__ == "__main__":
    main()
