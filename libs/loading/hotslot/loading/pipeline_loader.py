"""`load_pipeline`: one call from a view directory to a ready diffusers pipeline, reading through the preloader
child when one is given (else in this process), building the skeletons while the weights are read, then
assigning them. This is what the executor calls; it returns the phase timings it measured."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hotslot.errors import CorruptRead, HotslotError, InvalidArgument
from hotslot.loading.layout import PipelineLayout, read_layout
from hotslot.loading.materialize import build_pipeline
from hotslot.loading.preloader import LoadedWeights, LoadTimings, Preloader, PreloadFailed
from hotslot.loading.reader import (
    DEFAULT_READ_CHUNK_BYTES,
    DEFAULT_READ_CONCURRENCY,
    LoadedFile,
    ReadRequest,
    ReadStats,
    host_pool,
    keeps_dtypes,
    map_safetensors,
    module_predicate,
    populate,
    read_files,
    read_header,
    tensor_views,
    verify_mapped,
)
from hotslot.loading.skeleton import SkeletonCache, is_model_class, keep_fp32_modules, resolve_class

log = logging.getLogger(__name__)

__all__ = ["LoadReport", "load_pipeline", "plan_weights", "read_weights"]

# Upper bound on waiting for the preloader's weights; a load of many GB from NFS can take minutes.
DEFAULT_LOAD_TIMEOUT_S = 1800.0


@dataclass
class LoadReport:
    """Phase timings and sizes of one `load_pipeline` call."""

    read_s: float  # reading the files (in the preloader or here)
    alloc_s: float  # allocating the weight buffers (shared memory is zero-filled by torch)
    convert_s: float  # dtype conversion / device copies
    materialize_s: float  # skeletons, tokenizers/schedulers, assignment, pipeline assembly
    total_s: float
    bytes: int  # weight bytes in their final dtype
    bytes_read: int
    files: int
    via_preloader: bool
    handoff_s: float = 0.0  # preloader only: child done -> tensors in this process
    wire_bytes: int = 0  # preloader only: size of the hand-off message (handles, not tensor bytes)
    weights: LoadedWeights | None = field(default=None, repr=False)  # preloader only: the weights, e.g. to `owned_copy()` them on CUDA


def plan_weights(layout: PipelineLayout, dtype: torch.dtype | None) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """Which components hold weights (diffusers/transformers model classes) and which of their modules stay
    float32 at `dtype`. Resolving the classes here refuses unknown libraries before anything is read."""
    names: list[str] = []
    keep: dict[str, tuple[str, ...]] = {}
    for cname, comp in layout.components.items():
        if comp is None:
            continue
        cls = resolve_class(comp.library, comp.class_name)
        if not is_model_class(cls):
            continue
        if not comp.has_weights:
            raise InvalidArgument(f"{layout.root}: component {cname!r} ({comp.class_name}) has no safetensors weights")
        names.append(cname)
        patterns = keep_fp32_modules(cls, dtype)
        if patterns:
            keep[cname] = patterns
    return names, keep


def _read_components(
    layout: PipelineLayout,
    names: list[str],
    keep: dict[str, tuple[str, ...]],
    device: str,
    dtype: torch.dtype | None,
    chunk_bytes: int,
    concurrency: int,
    verify: bool = True,
    map_source: bool = False,
    hashed: frozenset[str] = frozenset(),
    read_bytes_per_s: float | None = None,
) -> tuple[list[tuple[str, str, torch.Tensor, tuple]], ReadStats]:
    """Every weight file of `names` read in this process, `concurrency` reads at a time, into private memory
    (nothing crosses a process here, and /dev/shm is often small: 64 MB in Docker). Returns (component, path,
    buffer, specs) per file and the summed stats."""
    requests = [ReadRequest(p, module_predicate(keep.get(c, ())), layout.relative(p) not in hashed) for c in names
                for p in layout.component(c).weight_files]
    owners = [c for c in names for _ in layout.component(c).weight_files]
    loaded = read_files(requests, device=device, dtype=dtype, chunk_bytes=chunk_bytes, concurrency=concurrency,
                        shared=False, verify=verify, map_source=map_source,
                        read_bytes_per_s=read_bytes_per_s) if requests else []
    stats = ReadStats()
    for f in loaded:
        stats.add(f.stats)
    return [(c, str(f.path), f.buffer, f.specs) for c, f in zip(owners, loaded, strict=True)], stats


def _release_if_loaded(preloader: Preloader, key: str, future: Future) -> None:
    if not future.cancelled() and future.exception() is None:
        preloader.release(key)


def mappable_components(layout: PipelineLayout, names: list[str], keep: dict[str, tuple[str, ...]],
                        dtype: torch.dtype | None) -> list[str]:
    """The components whose every file holds its tensors in the dtypes wanted at `dtype`: on CPU their files are
    the weights as they are, so they can be mapped rather than read (`map_safetensors`)."""
    out = []
    for cname in names:
        predicate = module_predicate(keep.get(cname, ()))
        if all(keeps_dtypes(read_header(p), dtype, predicate) for p in layout.component(cname).weight_files):
            out.append(cname)
    return out


def read_weights(
    preloader: Preloader,
    layout: PipelineLayout,
    model_key: str,
    device: str,
    dtype: torch.dtype | None,
    *,
    chunk_bytes: int = DEFAULT_READ_CHUNK_BYTES,
    read_concurrency: int | None = None,
    map_files: bool = False,
    convert_here: bool = False,
    timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
    variant: str | None = None,
    meanwhile: Callable[[], None] | None = None,
    skip: frozenset[str] = frozenset(),
    verify: bool = True,
    hashed: frozenset[str] = frozenset(),
    read_bytes_per_s: float | None = None,
) -> LoadedWeights:
    """Has the preloader read the weight components of `layout` (but those named in `skip`, which the caller
    holds already) (converted to `dtype`, keeping the modules that
    must stay float32) and waits for them; `meanwhile` runs here while the child reads. If anything fails here,
    the child still releases the weights once they arrive, so nothing stays held.

    `map_files` (CPU only; the view must be on a local disk): components that need no conversion are mapped
    here instead (copy-on-write file mappings: no copy, no allocation, the page cache's pages); only the others
    go through the preloader. The mapped files are part of the returned weights like the read ones, their pages
    already faulted in here (by `populate`, or by hashing them when this process checks them).

    `convert_here` (CPU only): the components that need a conversion are read and converted in this process
    instead of the preloader, `read_concurrency` threads at once, into private memory: a private page costs ~30 %
    less to fill than a shared one (measured on an SD 1.5 fp16 -> fp32 load), and nothing has to cross a process.
    With `map_files` too they are converted from a mapping of the file, without a staging copy (`read_files`'
    `map_source`). With both, the preloader is not used at all on CPU.

    `meanwhile` runs in a thread of its own beside everything this does here (mapping, verifying, converting).

    `verify`: files that carry a recorded checksum are checked (the preloader's by its own `verify_reads`;
    converted-here files here; mapped files by the preloader when it has no load to do, in its own process while
    this one populates them, else here); a mismatch raises CorruptRead naming the file. `hashed`: files (paths
    relative to the layout's root) read unchecked all the same, because their bytes were hashed a moment ago: the
    storage-cache copied them for this load and hashed every byte of the copy (sha256 and the read checksum), so
    hashing them again here would only pay the same CPU twice.

    `read_bytes_per_s`: caps the rate of what this process reads (converted here, or mapped), as the
    preloader's own cap paces the child's reads, so a load beside inference leaves the node's I/O to others."""
    names, keep = plan_weights(layout, dtype)
    names = [n for n in names if n not in skip]
    on_cpu = torch.device(device).type == "cpu"
    as_stored = mappable_components(layout, names, keep, dtype) if on_cpu and (map_files or convert_here) else []
    mapped = as_stored if map_files else []
    here = [n for n in names if n not in as_stored] if on_cpu and convert_here else []
    to_read = [n for n in names if n not in mapped and n not in here]
    future = None
    if to_read:
        future = preloader.load(
            f"load-{uuid.uuid4().hex}",
            model_key,
            layout.root,
            device,
            dtype,
            components=to_read,
            keep_fp32={n: keep[n] for n in to_read if n in keep},
            chunk_bytes=chunk_bytes,
            read_concurrency=read_concurrency,
            variant=variant,
            hashed=hashed,
        )
    threads = read_concurrency or DEFAULT_READ_CONCURRENCY  # of this process's own reads
    beside = threading.Thread(target=meanwhile, name="hotslot-prefetch", daemon=True) if meanwhile else None
    try:
        if beside is not None:
            beside.start()
        try:
            mapped_files = [(c, map_safetensors(p)) for c in mapped for p in layout.component(c).weight_files]
            to_check = [f for _, f in mapped_files if layout.relative(f.path) not in hashed] if verify else []
            # An idle preloader checks the mapped files in its own process while this one faults them in and
            # builds skeletons (`meanwhile`): in one process the hashing threads and the skeleton build slow each
            # other down (SD 1.5 fp32, 4.3 GB: 0.33-0.5 s side by side here, 0.15-0.25 s with the child hashing).
            checking = _check_in_child(preloader, to_check, read_concurrency, read_bytes_per_s) \
                if future is None else None
            checked_by = "preloader" if checking is not None else "executor" if to_check else ""
            if checking is None and to_check:  # hashing a mapped file here faults it in too (under the read cap)
                verify_mapped(to_check, threads, read_bytes_per_s)
            populate([f.buffer for _, f in mapped_files if not f.resident], threads, read_bytes_per_s)
            files = [(c, f.path, f.buffer, f.specs) for c, f in mapped_files]
            resident = {f.path for _, f in mapped_files}
            if here:
                converted = _convert_here(layout, model_key, device, dtype, here, keep, chunk_bytes, threads, verify,
                                          map_files, hashed, read_bytes_per_s)
                files += converted.files
                resident |= converted.resident  # written by this process's threads
            if checking is not None and not _checked_in_child(checking, timeout_s):
                checked_by = "executor"
                verify_mapped(to_check, threads, read_bytes_per_s)
        finally:
            if beside is not None:
                beside.join()
        if future is None:
            timings = converted.timings if here else LoadTimings(files=len(files), reader="executor")
            timings.mapped_checked_by = checked_by
            return LoadedWeights(f"here-{uuid.uuid4().hex}", model_key, device, dtype, {}, [], timings).with_files(
                files, resident)
        weights = future.result(timeout_s)
        weights.timings.mapped_checked_by = checked_by
    except BaseException:
        if future is not None:
            future.add_done_callback(lambda f: _release_if_loaded(preloader, model_key, f))
        raise
    return weights.with_files(files, resident) if files else weights


def _check_in_child(preloader: Preloader, files: list[LoadedFile], concurrency: int | None,
                    read_bytes_per_s: float | None) -> Future[int] | None:
    """Sends the check of these mapped files to the preloader when it has nothing else to do; None when they are
    to be checked here (nothing to check, or no idle preloader: a check queued behind a load would wait for it)."""
    if not files or not preloader.idle():
        return None
    return preloader.verify([(f.path, f.identity) for f in files], read_concurrency=concurrency,
                            read_bytes_per_s=read_bytes_per_s)


def _checked_in_child(checking: Future[int], timeout_s: float) -> bool:
    """Waits for the preloader's check: True when it passed; raises CorruptRead when a file does not match; False
    when the child could not check (it died, a path names another file now, it timed out), so the caller checks
    here instead."""
    try:
        checking.result(timeout_s)
    except CorruptRead:
        raise
    except (HotslotError, PreloadFailed, TimeoutError) as err:
        log.warning("the preloader could not check the mapped files (%s); checking them here", err)
        return False
    return True


def _convert_here(
    layout: PipelineLayout,
    model_key: str,
    device: str,
    dtype: torch.dtype | None,
    names: list[str],
    keep: dict[str, tuple[str, ...]],
    chunk_bytes: int,
    concurrency: int,
    verify: bool = True,
    map_source: bool = False,
    hashed: frozenset[str] = frozenset(),
    read_bytes_per_s: float | None = None,
) -> LoadedWeights:
    t0, cpu0 = time.perf_counter(), time.process_time()
    files, stats = _read_components(layout, names, keep, device, dtype, chunk_bytes, concurrency, verify, map_source,
                                    hashed, read_bytes_per_s)
    pool = host_pool()
    if pool is not None:  # an automatically sized pool keeps room for the largest model converted here
        pool.fit(buffer.nbytes for _, _, buffer, _ in files)
    timings = LoadTimings(read_s=time.perf_counter() - t0, bytes_read=stats.bytes_read, bytes=stats.bytes_out,
                          files=stats.files, cpu_s=time.process_time() - cpu0, reader="executor")
    return LoadedWeights(f"here-{uuid.uuid4().hex}", model_key, device, dtype, {}, [], timings).with_files(
        files, [path for _, path, _, _ in files])  # written by this process's threads: resident


def load_pipeline(
    view_path: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    preloader: Preloader | None = None,
    skeletons: SkeletonCache | None = None,
    model_key: str | None = None,
    variant: str | None = None,
    release: bool | None = None,
    chunk_bytes: int = DEFAULT_READ_CHUNK_BYTES,
    read_concurrency: int = DEFAULT_READ_CONCURRENCY,
    timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
) -> tuple[Any, LoadReport]:
    """Loads the diffusers pipeline at `view_path` onto `device` (weights converted to `dtype`; None keeps the
    files' dtypes) and returns (pipeline, LoadReport).

    With `preloader`, the child reads while this thread builds the skeletons and plain components; the weights
    arrive as shared memory / CUDA IPC and are assigned without a copy. `release` tells the child to drop its
    references once the pipeline holds the tensors: the default is True on CPU (the parent's mapping keeps
    shared memory alive) and False on CUDA (IPC memory belongs to the child: release only when the pipeline is
    dropped, or after `report.weights.owned_copy()`). `model_key` names the weights in the child (default: the
    view path). Raises the domain errors of the reader, the layout and the preloader (Unavailable when it died).
    """
    t0 = time.perf_counter()
    layout = read_layout(view_path, variant=variant)
    names, keep = plan_weights(layout, dtype)
    skeletons = SkeletonCache() if skeletons is None else skeletons
    if preloader is None:
        files, stats = _read_components(layout, names, keep, device, dtype, chunk_bytes, read_concurrency)
        state_dicts: dict[str, dict[str, torch.Tensor]] = {}
        for cname, _path, buffer, specs in files:
            state_dicts.setdefault(cname, {}).update(tensor_views(buffer, specs))
        pipeline, materialize_s = build_pipeline(layout, state_dicts, skeletons=skeletons, dtype=dtype)
        report = LoadReport(
            read_s=stats.read_s,
            alloc_s=stats.alloc_s,
            convert_s=stats.convert_s,
            materialize_s=materialize_s,
            total_s=time.perf_counter() - t0,
            bytes=stats.bytes_out,
            bytes_read=stats.bytes_read,
            files=stats.files,
            via_preloader=False,
        )
        return pipeline, report

    key = model_key or str(view_path)

    def prefetch_skeletons() -> None:
        # Overlap: build (and cache) the skeletons while the child reads.
        for cname in names:
            comp = layout.component(cname)
            skeletons.prefetch(resolve_class(comp.library, comp.class_name), comp.directory)

    weights = read_weights(preloader, layout, key, device, dtype, chunk_bytes=chunk_bytes, timeout_s=timeout_s,
                           variant=variant, meanwhile=prefetch_skeletons)
    try:
        pipeline, materialize_s = build_pipeline(layout, weights.components, skeletons=skeletons, dtype=dtype)
    except BaseException:
        preloader.release(key)
        raise
    if release if release is not None else torch.device(device).type == "cpu":
        preloader.release(key)
    t = weights.timings
    report = LoadReport(
        read_s=t.read_s,
        alloc_s=t.alloc_s,
        convert_s=t.convert_s,
        materialize_s=materialize_s,
        total_s=time.perf_counter() - t0,
        bytes=t.bytes,
        bytes_read=t.bytes_read,
        files=t.files,
        via_preloader=True,
        handoff_s=t.handoff_s,
        wire_bytes=t.wire_bytes,
        weights=weights,
    )
    return pipeline, report
