"""What a tier change does to memory: reading a view's weights through the preloader subprocess (host tier),
materializing a pipeline around them (standby), and on CUDA moving weights between device and pinned host memory.
Blocking calls; the core runs them in worker threads."""
from __future__ import annotations

import gc
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hotslot.loading.layout import PipelineLayout, read_layout
from hotslot.loading.materialize import build_component, build_pipeline
from hotslot.loading.pipeline_loader import plan_weights, read_weights
from hotslot.loading.preloader import LoadedWeights, LoadTimings, Preloader
from hotslot.loading.reader import (
    DEFAULT_READ_CONCURRENCY,
    keeps_dtypes,
    map_safetensors,
    module_predicate,
    populate,
    read_header,
    tensor_views,
    verify_mapped,
)
from hotslot.loading.skeleton import SkeletonCache, is_model_class, resolve_class

from .components import ComponentPool, SharedComponent, component_id
from .lora import ADAPTER_COMPONENT, AdapterWeights, adapter_file, apply_adapters, unload_missing

log = logging.getLogger(__name__)

# Imported at start by `warmup`: the classes of the Stable Diffusion 1.x/2.x and SDXL pipelines.
WARM_CLASSES = (
    ("diffusers", "StableDiffusionPipeline"),
    ("diffusers", "StableDiffusionXLPipeline"),
    ("diffusers", "UNet2DConditionModel"),
    ("diffusers", "AutoencoderKL"),
    ("transformers", "CLIPTextModel"),
    ("transformers", "CLIPTextModelWithProjection"),
    ("transformers", "CLIPTokenizer"),
)
# The components LoRA adapters change (PEFT wraps their layers): a pipeline that loads adapters owns these.
ADAPTER_TARGETS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if not name:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}") from None


@dataclass(eq=False)
class HostWeights:
    """A model's weights as the slot holds them, per weight component, plus the layout needed to materialize it
    again. The components live in the executor's `ComponentPool`: one that another held model has byte for byte
    is that model's, not a copy."""

    key: str
    layout: PipelineLayout
    parts: dict[str, SharedComponent]  # weight component name -> the held component
    pool: ComponentPool = field(repr=False)
    materialized: bool = False  # a pipeline was built around these weights and not yet dropped
    released: bool = False

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())

    @property
    def components(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: part.tensors for name, part in self.parts.items()}

    def part_sizes(self) -> dict[str, int]:
        """component id -> bytes, for the slot manager's accounting (shared bytes counted once)."""
        return {part.component_id: part.nbytes for part in self.parts.values()}

    def release(self) -> None:
        """The model left the executor: its components lose a user (the last user frees one). Idempotent."""
        if self.released:
            return
        self.released = True
        self.unmaterialized()
        for part in self.parts.values():
            self.pool.release(part, self.key)

    def unmaterialized(self) -> None:
        if self.materialized:
            self.materialized = False
            for part in self.parts.values():
                part.pipelines = max(0, part.pipelines - 1)


@dataclass
class ReadResult:
    weights: HostWeights | AdapterWeights
    read_s: float  # reading files in the child (+ dtype conversion)
    handoff_s: float  # child done -> tensors usable here
    wall_s: float


class ModelLoader:
    def __init__(
        self,
        preloader: Preloader,
        *,
        device: str,
        dtype: torch.dtype,
        chunk_bytes: int,
        read_concurrency: int = DEFAULT_READ_CONCURRENCY,
        map_files: bool = False,
        convert_here: bool = False,
        skeletons: SkeletonCache | None = None,
        max_pipeline_adapters: int = 8,
        components: ComponentPool | None = None,
        verify_reads: bool = True,
        read_bytes_per_s: float | None = None,
    ) -> None:
        self.preloader = preloader
        self.device = device
        self.dtype = dtype
        self.chunk_bytes = chunk_bytes
        self.read_concurrency = read_concurrency
        self.map_files = map_files and torch.device(device).type == "cpu"
        self.convert_here = convert_here and torch.device(device).type == "cpu"
        self.skeletons = skeletons or SkeletonCache()
        self.is_cuda = torch.device(device).type == "cuda"
        self.max_pipeline_adapters = max_pipeline_adapters
        self.components = ComponentPool() if components is None else components
        self.verify_reads = verify_reads
        # the preloader paces its child's reads itself; this paces what this process reads (converted here,
        # mapped and verified or populated), so the cap holds whichever reads a load
        self.read_bytes_per_s = read_bytes_per_s

    def warmup(self) -> float:
        """Imports diffusers/transformers and the classes of a Stable Diffusion pipeline once, at start, so the
        first request does not pay seconds of imports. Returns the seconds spent.

        Then freezes the garbage collector's view of what the imports made (~400k objects): materialize creates
        ~15k containers per SD pipeline, enough to trigger a full collection now and then, and a full collection
        that walks every imported object took 0.2-0.5 s on a 2-core box, inside the materialize phase."""
        t0 = time.perf_counter()
        for library, name in WARM_CLASSES:
            try:
                resolve_class(library, name)
            except Exception:  # noqa: BLE001 - an older library without the class: it loads on demand instead
                log.debug("warmup: %s.%s not available", library, name)
        gc.collect()
        gc.freeze()
        return time.perf_counter() - t0

    def read(self, key: str, view_path: str, timeout_s: float, digests: Mapping[str, str] | None = None,
             hashed: frozenset[str] = frozenset()) -> ReadResult:
        """Reads every weight file of the view in the preloader child; the tensors arrive as shared memory (CPU,
        zero copy) or CUDA IPC handles. With `map_files` (CPU), components stored in the dtype they are wanted
        in are mapped from the view's files instead (no copy at all) and only the others are read and converted
        by the child. Then the pages are populated in parallel, so the first denoising step takes no page faults.
        Components another held model has byte for byte (`digests`: the manifest's path -> sha256) are not read
        at all: the model shares them (`ComponentPool`). Files in `hashed` (paths relative to the view) are read
        without checking them: the storage-cache copied and hashed them for this load a moment ago.
        Skeletons are built in `materialize` (cached per config digest), so this phase measures reading alone."""
        t0 = time.perf_counter()
        layout = read_layout(view_path)
        names, _ = plan_weights(layout, self.dtype)
        ids = {name: self._component_id(layout, name, digests or {}) for name in names}
        parts: dict[str, SharedComponent] = {}
        for name in names:
            held = self.components.take(ids[name], key)
            if held is not None:
                parts[name] = held
        weights = None
        try:
            weights = read_weights(self.preloader, layout, key, self.device, self.dtype, chunk_bytes=self.chunk_bytes,
                                   read_concurrency=self.read_concurrency, map_files=self.map_files,
                                   convert_here=self.convert_here, timeout_s=timeout_s,
                                   meanwhile=lambda: self.prefetch(layout), skip=frozenset(parts),
                                   verify=self.verify_reads, hashed=hashed,
                                   read_bytes_per_s=self.read_bytes_per_s)
            if self.is_cuda and weights.files:
                # IPC memory belongs to the child and dies with it: own a copy so a preloader crash cannot take the
                # weights of held models with it. This runs beside inference, never on the request path.
                weights = weights.owned_copy()
        except BaseException:
            for part in parts.values():
                self.components.release(part, key)
            if weights is not None:  # the copy failed (device memory full): the child must not keep them either
                self.preloader.release(key)
            raise
        t_populate = time.perf_counter()
        if not self.is_cuda:
            populate(weights.to_populate, self.read_concurrency)  # mapped or converted here: touched already
        populate_s = time.perf_counter() - t_populate
        # On CPU the parent's mapping keeps the shared memory alive, so the child can drop its reference now.
        self.preloader.release(key)
        shared_bytes = sum(p.nbytes for p in parts.values())
        for name, tensors in weights.components.items():
            files = [f for f in weights.files if f[0] == name]
            part = SharedComponent(ids[name] or f"{key}/{name}/{uuid.uuid4().hex}", name, files, tensors,
                                   sum(buf.numel() for _, _, buf, _ in files))
            parts[name] = self.components.add(part, key)  # an equal one read meanwhile wins; ours is dropped
        t = weights.timings
        log.info(
            "read weights",
            extra={"model": key, "bytes": weights.nbytes, "files": len(weights.files),
                   "files_read": t.files, "bytes_read": t.bytes_read,
                   "read_by": t.reader, "checked_by": t.mapped_checked_by or "-",
                   "shared_components": len(names) - len(weights.components),
                   "shared_bytes": shared_bytes,
                   "read_s": round(t.child_s or t.read_s, 3), "read_cpu_s": round(t.cpu_s, 3),
                   "handoff_s": round(t.handoff_s, 3), "populate_s": round(populate_s, 3),
                   "wall_s": round(time.perf_counter() - t0, 3)},
        )
        host = HostWeights(key, layout, parts, self.components)
        return ReadResult(host, t.read_s + t.convert_s, t.handoff_s, time.perf_counter() - t0)

    def _component_id(self, layout: PipelineLayout, name: str, digests: Mapping[str, str]) -> str | None:
        comp = layout.components[name]
        assert comp is not None
        directory = layout.relative(comp.directory)
        return component_id(comp.library, comp.class_name, str(self.dtype), self.device, directory, digests)

    def read_adapter(self, key: str, view_path: str, timeout_s: float) -> ReadResult:
        """Reads a LoRA adapter's safetensors file as `read` reads a pipeline's: mapped from the view on CPU when
        it is stored in the wanted dtype (with `map_files`), else read and converted by the preloader child; the
        tensors keep their own naming (PEFT or kohya; diffusers converts them when they are first applied)."""
        t0 = time.perf_counter()
        name = adapter_file(view_path)
        path = Path(view_path) / name
        if self.map_files and keeps_dtypes(read_header(path), self.dtype, module_predicate(())):
            mapped = map_safetensors(path)
            if self.verify_reads:
                verify_mapped([mapped], 1, self.read_bytes_per_s)
            weights = LoadedWeights(f"here-{uuid.uuid4().hex}", key, self.device, self.dtype, {}, [],
                                    LoadTimings(files=1, reader="executor")).with_files(
                [(ADAPTER_COMPONENT, str(path), mapped.buffer, mapped.specs)], [str(path)] if mapped.resident else [])
            populate(weights.to_populate, 1, self.read_bytes_per_s)
        else:
            future = self.preloader.load(f"adapter-{uuid.uuid4().hex}", key, view_path, self.device, self.dtype,
                                         files=[(ADAPTER_COMPONENT, name)], chunk_bytes=self.chunk_bytes)
            weights = future.result(timeout_s)
            if self.is_cuda:
                weights = weights.owned_copy()  # as for pipelines: the child's memory must not be what we hold
            else:
                populate(weights.buffers, 1)
            self.preloader.release(key)
        tensors = weights.components.get(ADAPTER_COMPONENT, {})
        t = weights.timings
        log.info("read adapter", extra={"model": key, "bytes": weights.nbytes, "tensors": len(tensors),
                                        "read_by": t.reader, "wall_s": round(time.perf_counter() - t0, 3)})
        return ReadResult(AdapterWeights(tensors, weights, weights.nbytes), t.read_s + t.convert_s, t.handoff_s,
                          time.perf_counter() - t0)

    def apply_adapters(self, pipeline: Any, wanted: list[tuple[str, AdapterWeights, float]],
                       held: dict[str, AdapterWeights]) -> None:
        """Makes `pipeline` run with exactly `wanted` (lora.apply_adapters), first unloading the adapters it keeps
        whose weights the host tier no longer holds (`held`: adapter name -> the weights it holds). Before the
        first adapter goes in, the pipeline gets module trees of its own for the components adapters change, over
        the same weight tensors: PEFT wraps layers of the module it is given, and the held module is shared with
        every other pipeline that has that component."""
        if wanted:
            self._own_adapter_targets(pipeline)
        unload_missing(pipeline, held)
        apply_adapters(pipeline, wanted, max_loaded=self.max_pipeline_adapters)

    def _own_adapter_targets(self, pipeline: Any) -> None:
        host: HostWeights | None = getattr(pipeline, "_hotslot_host", None)
        if host is None or pipeline.__dict__.get("_hotslot_own_targets"):
            return
        for name in ADAPTER_TARGETS:
            part = host.parts.get(name)
            if part is not None and getattr(pipeline, name, None) is part.module:
                setattr(pipeline, name, build_component(host.layout, name, part.tensors, skeletons=self.skeletons,
                                                        dtype=self.dtype))
        pipeline.__dict__["_hotslot_own_targets"] = True

    def prefetch(self, layout: PipelineLayout) -> None:
        """Builds (and caches) the skeletons and tokenizers of the layout's components; `read` runs it while the
        preloader reads, so a model's first materialize does not pay them (0.9-1.9 s for a new SD config)."""
        for comp in layout.components.values():
            if comp is None:
                continue
            try:
                cls = resolve_class(comp.library, comp.class_name)
                if is_model_class(cls):
                    self.skeletons.prefetch(cls, comp.directory)
                else:
                    self.skeletons.plain_component(cls, comp.directory)
            except Exception:  # noqa: BLE001 - materialize raises the same error with its context
                log.debug("prefetch of %s failed; materialize will report it", comp.directory, exc_info=True)

    def materialize(self, host: HostWeights) -> tuple[Any, float]:
        """The pipeline around the held components' modules: a component's module is built once (from the cached
        meta skeleton, the weights assigned in place, no copy on CPU) and then stands in every pipeline that has
        that component."""
        t0 = time.perf_counter()
        self.to_device(host)
        modules = {}
        for name, part in host.parts.items():
            if part.module is None:
                part.module = build_component(host.layout, name, part.tensors, skeletons=self.skeletons,
                                              dtype=self.dtype)
            modules[name] = part.module
        pipeline, _ = build_pipeline(host.layout, {}, skeletons=self.skeletons, dtype=self.dtype, modules=modules)
        pipeline.__dict__["_hotslot_host"] = host
        if not host.materialized:
            host.materialized = True
            for part in host.parts.values():
                part.pipelines += 1
        return pipeline, time.perf_counter() - t0

    def demote(self, host: HostWeights) -> None:
        """STANDBY -> HOST. On CPU the weights already are host (shared) memory; on CUDA copy the components no
        other materialized pipeline uses to pinned host memory so device memory is freed."""
        host.unmaterialized()
        if not self.is_cuda:
            return
        for part in host.parts.values():
            if part.on_device and part.pipelines == 0:
                # one copy, device -> pinned (`.to("cpu").pin_memory()` would copy twice through pageable memory)
                self._move(part, [torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True).copy_(buf)
                                  for _, _, buf, _ in part.files])
                part.module = None
                part.on_device = False

    def to_device(self, host: HostWeights) -> None:
        if not self.is_cuda:
            return
        moved = False
        for part in host.parts.values():
            if not part.on_device:
                self._move(part, [buf.to(self.device, non_blocking=True) for _, _, buf, _ in part.files])
                part.on_device = moved = True
        if moved:
            torch.cuda.synchronize(self.device)

    @staticmethod
    def _move(part: SharedComponent, buffers: list[torch.Tensor]) -> None:
        part.files = [(c, p, buf, specs) for (c, p, _, specs), buf in zip(part.files, buffers, strict=True)]
        tensors: dict[str, torch.Tensor] = {}
        for _, _, buf, specs in part.files:
            tensors.update(tensor_views(buf, specs))
        part.tensors = tensors


def device_memory(device: str) -> tuple[int, int]:
    """(total, used) bytes of the device; host memory on CPU."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return total, total - free
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                name, value = line.split(":", 1)
                info[name] = int(value.split()[0]) * 1024
        return info["MemTotal"], info["MemTotal"] - info.get("MemAvailable", info.get("MemFree", 0))
    except (OSError, KeyError, ValueError):
        return 0, 0
