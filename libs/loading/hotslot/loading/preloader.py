"""The preloader: a long-lived spawned child process that reads model weights beside inference and hands them to
the parent without copying them.

The child reads each safetensors file into ONE buffer (shared memory on CPU, device memory on CUDA) with
`reader.read_files` (`read_concurrency` reads in flight across files and ranges), then sends (buffer, tensor
layout) per file through a torch.multiprocessing queue. The halves talk in small frozen dataclasses (`LoadRequest`,
`VerifyRequest`, `ReleaseRequest`, `HeldQuery`, `InfoQuery`, `DebugFill`, `Stop` down; `Ready`, `Started`,
`Loaded`, `Answered`, `Failed` up). `VerifyRequest` has the child check files the parent mapped itself, so their
hashing runs beside the parent's work, in another process.
torch's reductions turn each buffer into a handle (a file descriptor passed over a Unix socket for CPU shared
memory, a CUDA IPC handle on GPU), so the message is a few kB whatever the model size, and the parent builds the
tensors as views of the same memory (`reader.tensor_views`). One handle per file, not per tensor: a tensor-per-
message design would pass ~1,000 descriptors for an SD 1.5 UNet.

Lifetimes. The child keeps every buffer it sent until the parent calls `release(model_key)`: with the
file_descriptor sharing strategy the parent must fetch the descriptor before the child drops its storage, and on
CUDA the memory belongs to the child's allocator, so the child must outlive the parent's use of it (see
`LoadedWeights.owned_copy` for the parent's way out). On CPU the parent's mapping keeps the memory valid after
`release`, and after the child dies.

Failures. Errors while loading (missing file, corrupt header) come back as exceptions with the child's message
(hotslot domain errors are rebuilt as the same class) and the child lives on. A child that dies (kill -9, OOM)
is noticed through its process sentinel: every request it had not answered fails with `Unavailable`, and with
`auto_restart=N` a fresh child is started, up to N times.

The child imports torch and the reader only; diffusers/transformers stay out of it.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from multiprocessing import connection as mp_connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.multiprocessing as torch_mp

from hotslot import errors
from hotslot.errors import HotslotError, InvalidArgument, NotFound, Unavailable
from hotslot.loading.reader import (
    DEFAULT_READ_CHUNK_BYTES,
    DEFAULT_READ_CONCURRENCY,
    MIN_READ_CHUNK_BYTES,
    ReadBuffers,
    ReadRequest,
    ReadStats,
    TensorSpec,
    module_predicate,
    read_files,
    tensor_views,
    verify_paths,
)

__all__ = [
    "DEFAULT_START_TIMEOUT_S",
    "Answered",
    "DebugFill",
    "Failed",
    "HeldQuery",
    "InfoQuery",
    "LoadRequest",
    "Loaded",
    "ReleaseRequest",
    "Ready",
    "Started",
    "Stop",
    "VerifyRequest",
    "LoadTimings",
    "LoadedWeights",
    "PreloadFailed",
    "Preloader",
]

log = logging.getLogger(__name__)

# Spawning imports torch in the child: seconds on an idle machine, much more on a loaded CI box.
DEFAULT_START_TIMEOUT_S = 120.0
# How long a graceful stop may take before the child is terminated, then killed.
DEFAULT_STOP_TIMEOUT_S = 10.0
# Bound on answers to small queries (held, info): the child answers between loads, so a long load delays them.
DEFAULT_QUERY_TIMEOUT_S = 300.0
START_METHODS = ("spawn", "forkserver")  # fork is unsafe with CUDA and with the parent's threads
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_UNSET: Any = object()


class PreloadFailed(RuntimeError):
    """The child failed with an error that is not a hotslot domain error; carries the child's traceback."""

    def __init__(self, message: str, remote_type: str, remote_traceback: str) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


@dataclass
class LoadTimings:
    """Where one preload's time went, measured where it happened (child: read/convert; parent: handoff)."""

    read_s: float = 0.0
    alloc_s: float = 0.0
    convert_s: float = 0.0
    throttle_s: float = 0.0
    child_s: float = 0.0  # the child's whole handling of the request, reading included
    handoff_s: float = 0.0  # child finished -> parent holds the tensors (queue, handle passing, views)
    bytes_read: int = 0
    bytes: int = 0  # bytes of the tensors, in their final dtype
    files: int = 0
    wire_bytes: int = 0  # size of the message that crossed the queue: small unless tensors were pickled
    cpu_s: float = 0.0  # CPU time spent reading and converting (all the reading threads)
    reader: str = "preloader"  # who read the files: "preloader" (the child) or "executor" (mapped / converted here)
    # who checked the files mapped in the executor against their checksums: "preloader" (an idle child, in its own
    # process), "executor", or "" (none to check)
    mapped_checked_by: str = ""


@dataclass
class LoadedWeights:
    """A model's weights as the parent holds them: state dicts per component, all views of `buffers` (one per
    file) that live in the preloader's shared memory (CPU) or are CUDA IPC mappings of its device memory."""

    request_id: str
    model_key: str
    device: str
    dtype: torch.dtype | None
    components: dict[str, dict[str, torch.Tensor]] = field(repr=False)
    files: list[tuple[str, str, torch.Tensor, tuple[TensorSpec, ...]]] = field(repr=False)  # component, path, ...
    timings: LoadTimings = field(default_factory=LoadTimings)
    resident: frozenset[str] = frozenset()  # paths of files already in this process's page tables (no populate)

    @property
    def buffers(self) -> list[torch.Tensor]:
        return [buf for _, _, buf, _ in self.files]

    @property
    def to_populate(self) -> list[torch.Tensor]:
        """The buffers whose pages this process has not touched yet (handed over, or mapped and not verified)."""
        return [buf for _, path, buf, _ in self.files if path not in self.resident]

    @property
    def nbytes(self) -> int:
        return sum(buf.numel() for buf in self.buffers)

    def owned_copy(self) -> LoadedWeights:
        """The same weights copied into memory this process owns (one copy per file). Needed on CUDA before the
        preloader may release or lose them: IPC memory belongs to the child and dies with it."""
        return self.with_buffers([buf.clone() for buf in self.buffers])

    def with_files(self, files: Sequence[tuple[str, str, torch.Tensor, tuple[TensorSpec, ...]]],
                   resident: Collection[str] = ()) -> LoadedWeights:
        """These weights plus more files (component, path, buffer, specs), e.g. files mapped in this process;
        `resident`: those of their paths whose pages this process has touched already."""
        return _weights(self.request_id, self.model_key, self.device, self.dtype, [*self.files, *files],
                        self.timings, self.resident | frozenset(resident))

    def with_buffers(self, buffers: Sequence[torch.Tensor]) -> LoadedWeights:
        """The same weights over other buffers (one per file, same layout): a copy, or the files moved to another
        device or to pinned memory; the tensor views are rebuilt over them."""
        files = [(c, p, buf, specs) for (c, p, _, specs), buf in zip(self.files, buffers, strict=True)]
        return _weights(self.request_id, self.model_key, self.device, self.dtype, files, self.timings)


def _weights(rid, key, device, dtype, files, timings, resident: frozenset[str] = frozenset()) -> LoadedWeights:
    components: dict[str, dict[str, torch.Tensor]] = {}
    for component, _path, buf, specs in files:
        components.setdefault(component, {}).update(tensor_views(buf, specs))
    return LoadedWeights(rid, key, device, dtype, components, list(files), timings, resident)


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise InvalidArgument.field("dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
    return name


# --------------------------------------------------------------------------------------------------------------
# messages between the halves: small frozen dataclasses, pickled by the queues (a Loaded's payload is pickled by the
# child itself so its size is known; its buffers cross as handles, not bytes)


@dataclass(frozen=True)
class LoadRequest:
    """Parent -> child: read a model's weights (a pipeline's components, or the named `files`) onto `device`."""

    kind: ClassVar[str] = "load"
    rid: str
    model_key: str
    view_path: str
    device: str
    dtype: str | None  # a DTYPES name; None keeps the files' dtype
    components: tuple[str, ...] | None  # None: every component with safetensors weights
    keep_fp32: Mapping[str, tuple[str, ...]]  # per component, module names kept float32
    read_bytes_per_s: float | None = None
    chunk_bytes: int | None = None  # None: the preloader's
    read_concurrency: int | None = None  # None: the preloader's
    variant: str | None = None
    files: tuple[tuple[str, str], ...] | None = None  # (component, path relative to view_path), e.g. a LoRA's
    hashed: frozenset[str] = frozenset()  # paths relative to view_path read unchecked: hashed by this load's fill


@dataclass(frozen=True)
class VerifyRequest:
    """Parent -> child: check files the parent has mapped against their recorded checksums (`reader.verify_paths`),
    so the hashing runs in this process, on another core and outside the parent's interpreter; answered with the
    bytes checked, or Failed (CorruptRead naming the file; FailedPrecondition when a path names another file than
    the parent's mapping now)."""

    kind: ClassVar[str] = "verify"
    rid: str
    files: tuple[tuple[str, tuple[int, int] | None], ...]  # (path, (st_dev, st_ino) of the parent's mapping)
    read_concurrency: int | None = None  # None: the preloader's
    read_bytes_per_s: float | None = None


@dataclass(frozen=True)
class ReleaseRequest:
    """Parent -> child: drop the references to `model_key`'s buffers; answered with the bytes it held."""

    kind: ClassVar[str] = "release"
    rid: str
    model_key: str


@dataclass(frozen=True)
class HeldQuery:
    """Parent -> child: model_key -> bytes held."""

    kind: ClassVar[str] = "held"
    rid: str


@dataclass(frozen=True)
class InfoQuery:
    """Parent -> child: pid, held bytes, imported libraries, sharing strategy, threads."""

    kind: ClassVar[str] = "info"
    rid: str


@dataclass(frozen=True)
class DebugFill:
    """Parent -> child (diagnostics): fill one held tensor with `value`."""

    kind: ClassVar[str] = "debug_fill"
    rid: str
    model_key: str
    component: str
    tensor: str
    value: float


@dataclass(frozen=True)
class Stop:
    """Parent -> child: exit."""


Request = LoadRequest | VerifyRequest | ReleaseRequest | HeldQuery | InfoQuery | DebugFill


@dataclass(frozen=True)
class Ready:
    """Child -> parent: started, taking requests."""

    pid: int


@dataclass(frozen=True)
class Started:
    """Child -> parent: began working on request `rid` (a load)."""

    rid: str


@dataclass(frozen=True)
class Loaded:
    """Child -> parent: a load's files and timings, pickled with ForkingPickler (buffers as handles)."""

    rid: str
    payload: bytes
    sent_at: float  # time.time() when sent, for the hand-off time


@dataclass(frozen=True)
class Answered:
    """Child -> parent: the result of a query or release."""

    rid: str
    result: Any


@dataclass(frozen=True)
class Failed:
    """Child -> parent: request `rid` raised; the parent rebuilds the error (_rebuild_error)."""

    rid: str
    type_name: str
    message: str
    traceback: str


Response = Ready | Started | Loaded | Answered | Failed


# --------------------------------------------------------------------------------------------------------------
# the child


class _Child:
    """State of the child process: what it holds per model, and its reusable staging buffers."""

    def __init__(self, responses, settings: Mapping[str, Any]) -> None:
        self.responses = responses
        self.settings = settings
        self.buffers = ReadBuffers()
        # model_key -> [(component, path, buffer, specs)]: kept until `release` (see module docstring)
        self.held: dict[str, list[tuple[str, str, torch.Tensor, tuple[TensorSpec, ...]]]] = {}

    def send(self, msg: Response) -> None:
        self.responses.put(msg)

    def handle(self, msg: Request) -> None:
        try:
            result: Any
            match msg:
                case LoadRequest():
                    self.send(Started(msg.rid))
                    self.load(msg)
                    return
                case VerifyRequest():
                    result = verify_paths(msg.files, msg.read_concurrency or self.settings["read_concurrency"],
                                          msg.read_bytes_per_s)
                case ReleaseRequest():
                    result = self.release(msg.model_key)
                case HeldQuery():
                    result = {k: sum(buf.numel() for _, _, buf, _ in v) for k, v in self.held.items()}
                case InfoQuery():
                    result = self.info()
                case DebugFill():
                    self.debug_fill(msg.model_key, msg.component, msg.tensor, msg.value)
                    result = None
                case _:
                    raise InvalidArgument(f"unknown preloader request {type(msg).__name__}")
            self.send(Answered(msg.rid, result))
        except Exception as err:  # noqa: BLE001 - every failure goes back to the parent; the child lives on
            message = err.message if isinstance(err, HotslotError) else str(err)
            self.send(Failed(msg.rid, type(err).__name__, message, traceback.format_exc()))

    def load(self, msg: LoadRequest) -> None:
        from hotslot.loading.layout import read_layout

        t0 = time.perf_counter()
        view_path = msg.view_path
        dtype = DTYPES[msg.dtype] if msg.dtype else None
        requests, owners = [], []
        if msg.files:  # named files (a LoRA adapter's), not a pipeline layout
            for cname, path in msg.files:
                requests.append(ReadRequest(Path(view_path) / path, module_predicate(()), path not in msg.hashed))
                owners.append(cname)
        else:
            layout = read_layout(view_path, variant=msg.variant)
            wanted = list(msg.components) if msg.components is not None else sorted(layout.weight_components())
            for cname in wanted:
                comp = layout.components.get(cname)
                if comp is None or not comp.has_weights:
                    raise NotFound(f"{view_path}: component {cname!r} has no safetensors weights")
                keep = module_predicate(msg.keep_fp32.get(cname, ()))
                for weight_path in comp.weight_files:
                    requests.append(ReadRequest(weight_path, keep, layout.relative(weight_path) not in msg.hashed))
                    owners.append(cname)
        cpu0 = time.process_time()
        t_read = time.perf_counter()
        # Every file of every component in one call: `read_concurrency` reads in flight across files and ranges.
        loaded_files = read_files(
            requests,
            device=msg.device,
            dtype=dtype,
            chunk_bytes=msg.chunk_bytes or self.settings["chunk_bytes"],
            concurrency=msg.read_concurrency or self.settings["read_concurrency"],
            shared=True,
            read_bytes_per_s=msg.read_bytes_per_s,
            buffers=self.buffers,
            verify=self.settings.get("verify_reads", True),
        )
        read_wall = time.perf_counter() - t_read
        stats = ReadStats()
        files = []
        for cname, loaded in zip(owners, loaded_files, strict=True):
            files.append((cname, str(loaded.path), loaded.buffer, loaded.specs))
            stats.add(loaded.stats)
        # Threads overlap: the phase is the wall time of the read; allocation and throttling are parts of it.
        stats.read_s = max(read_wall - stats.alloc_s - stats.throttle_s, 0.0)
        stats.convert_s = 0.0
        timings = LoadTimings(
            read_s=stats.read_s,
            alloc_s=stats.alloc_s,
            convert_s=stats.convert_s,
            throttle_s=stats.throttle_s,
            child_s=time.perf_counter() - t0,
            bytes_read=stats.bytes_read,
            bytes=stats.bytes_out,
            files=stats.files,
            cpu_s=time.process_time() - cpu0,
        )
        # Serialised here rather than by the queue so its exact size is known: with torch's reductions the
        # buffers become handles, and `wire_bytes` proves it.
        payload = bytes(ForkingPickler.dumps((files, asdict(timings))))
        # Held before sending: the parent fetches the handles after this message, from this very memory.
        self.held.setdefault(msg.model_key, []).extend(files)
        self.send(Loaded(msg.rid, payload, time.time()))

    def release(self, model_key: str) -> int:
        dropped = self.held.pop(model_key, [])
        nbytes = sum(buf.numel() for _, _, buf, _ in dropped)
        on_cuda = any(buf.is_cuda for _, _, buf, _ in dropped)
        del dropped
        if on_cuda:
            # Hand freed device memory back to the driver so the parent can allocate it, and drop IPC blocks
            # whose consumers are gone.
            torch.cuda.ipc_collect()
            torch.cuda.empty_cache()
        return nbytes

    def info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "held": {k: sum(buf.numel() for _, _, buf, _ in v) for k, v in self.held.items()},
            "diffusers_imported": "diffusers" in sys.modules,
            "transformers_imported": "transformers" in sys.modules,
            "sharing_strategy": torch_mp.get_sharing_strategy(),
            "torch_threads": torch.get_num_threads(),
        }

    def debug_fill(self, model_key: str, component: str, tensor: str, value: float) -> None:
        for cname, _path, buf, specs in self.held.get(model_key, []):
            if cname == component:
                views = tensor_views(buf, specs)
                if tensor in views:
                    views[tensor].fill_(value)
                    if buf.is_cuda:
                        torch.cuda.synchronize(buf.device)
                    return None
        raise NotFound(f"the preloader holds no tensor {component}/{tensor} of {model_key!r}")


def _child_main(requests, responses, settings: dict[str, Any]) -> None:
    """Entry point of the preloader process."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when its preloader stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch_mp.set_sharing_strategy(settings["sharing_strategy"])
    if settings.get("num_threads"):
        torch.set_num_threads(settings["num_threads"])
    elif settings.get("read_concurrency", 1) > 1:
        # The reading threads convert in parallel already; torch's own intra-op threads on top of them put
        # read_concurrency x cores threads on the cores, and OpenMP's spin-waiting then burns the CPU that
        # inference beside it needs (measured: 13.7 CPU s instead of ~3.5 for an SD 1.5 fp16 -> fp32 load).
        torch.set_num_threads(1)
    # Close the ends this process does not use, so each side sees EOF when the other one dies.
    requests._writer.close()
    responses._reader.close()
    child = _Child(responses, settings)
    child.send(Ready(os.getpid()))
    while True:
        try:
            msg = requests.get()
        except (EOFError, OSError):
            return  # the parent is gone
        if isinstance(msg, Stop):
            return
        child.handle(msg)


# --------------------------------------------------------------------------------------------------------------
# the parent


@dataclass
class _Pending:
    future: Future
    kind: str
    model_key: str
    generation: int
    started: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Incarnation:
    generation: int
    process: Any
    requests: Any
    responses: Any
    ready: threading.Event = field(default_factory=threading.Event)
    stopping: bool = False
    thread: threading.Thread | None = None


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}, signal {-code}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Preloader:
    """The parent's handle on the preloader child. Thread-safe; every request returns a `concurrent.futures`
    Future (await it with `asyncio.wrap_future`, or use `load_async`).

    The child is spawned, so like any spawn-based multiprocessing the program's main module must guard its
    entry point with `if __name__ == "__main__":` (the child imports it)."""

    def __init__(
        self,
        *,
        start_method: str = "spawn",
        auto_restart: int = 0,
        chunk_bytes: int = DEFAULT_READ_CHUNK_BYTES,
        read_concurrency: int = DEFAULT_READ_CONCURRENCY,
        read_bytes_per_s: float | None = None,
        num_threads: int | None = None,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
        verify_reads: bool = True,
    ) -> None:
        """`auto_restart`: how many times a dead child is replaced automatically (0: call `restart()`).
        `chunk_bytes`: read size. `read_concurrency`: reads in flight at once per load (files and ranges of
        large files). `read_bytes_per_s`: default read-rate cap per load (None: unbounded).
        `num_threads`: torch threads in the child for dtype conversion (None: 1 when read_concurrency > 1, since
        the reading threads convert in parallel, else torch's default). `verify_reads`: check files that carry a
        recorded checksum while reading them (reader module docstring); a mismatch fails the load with
        CorruptRead."""
        if start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
        if auto_restart < 0:
            raise ValueError(f"auto_restart must be >= 0, got {auto_restart}")
        if chunk_bytes < MIN_READ_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be at least {MIN_READ_CHUNK_BYTES}, got {chunk_bytes}")
        self.start_method = start_method
        self.auto_restart = auto_restart
        if read_concurrency < 1:
            raise ValueError(f"read_concurrency must be at least 1, got {read_concurrency}")
        self.chunk_bytes = chunk_bytes
        self.read_concurrency = read_concurrency
        self.read_bytes_per_s = read_bytes_per_s
        self.num_threads = num_threads
        self.verify_reads = verify_reads
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._ctx = torch_mp.get_context(start_method)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._pending: dict[str, _Pending] = {}
        self._inc: _Incarnation | None = None
        self._generations = itertools.count(1)
        self._ids = itertools.count(1)
        self._restarting = False
        self._closed = False
        self.restarts = 0  # children started after the first one (automatic and manual)
        self.auto_restarts_used = 0
        self.last_exit: str | None = None  # how the last child ended, for status pages

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the child and waits until it is ready. No-op when it runs already."""
        with self._lock:
            if self._closed:
                raise Unavailable("the preloader is closed")
            if self._inc is not None and self._inc.process.is_alive():
                inc = self._inc
            else:
                inc = self._spawn()
        self._wait_ready(inc)

    def _spawn(self) -> _Incarnation:
        settings = {
            "sharing_strategy": torch_mp.get_sharing_strategy(),
            "chunk_bytes": self.chunk_bytes,
            "read_concurrency": self.read_concurrency,
            "num_threads": self.num_threads,
            "verify_reads": self.verify_reads,
        }
        requests, responses = self._ctx.SimpleQueue(), self._ctx.SimpleQueue()
        process = self._ctx.Process(  # type: ignore[attr-defined]  # every concrete context has Process
            target=_child_main, args=(requests, responses, settings), name="hotslot-preloader", daemon=True
        )
        process.start()
        # The child has its copies now; dropping ours makes a dead child visible as EOF / EPIPE.
        requests._reader.close()  # type: ignore[attr-defined]  # SimpleQueue's private ends
        responses._writer.close()  # type: ignore[attr-defined]
        inc = _Incarnation(next(self._generations), process, requests, responses)
        inc.thread = threading.Thread(
            target=self._read_loop, args=(inc,), name=f"preloader-reader-{process.pid}", daemon=True
        )
        self._inc = inc
        inc.thread.start()
        self._changed.notify_all()
        return inc

    def _wait_ready(self, inc: _Incarnation) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not inc.ready.wait(0.05):
            if not inc.process.is_alive():
                raise Unavailable(f"the preloader failed to start ({_describe_exit(inc.process.exitcode)})")
            if time.monotonic() > deadline:
                self._stop(inc, graceful=False)
                raise Unavailable(f"the preloader did not start within {self.start_timeout_s:.0f} s")

    def restart(self) -> None:
        """Stops the current child (pending requests fail with Unavailable) and starts a fresh one."""
        with self._lock:
            if self._closed:
                raise Unavailable("the preloader is closed")
            old = self._inc
            self._restarting = True
        try:
            if old is not None:
                self._stop(old, graceful=False)
            with self._lock:
                inc = self._spawn()
                self.restarts += 1
            self._wait_ready(inc)
        finally:
            with self._lock:
                self._restarting = False
                self._changed.notify_all()

    def close(self) -> None:
        """Stops the child; pending requests fail with Unavailable. Weights already handed over stay valid on CPU."""
        with self._lock:
            self._closed = True
            # a restart in flight sees `_closed` before it spawns, or finishes its spawn; either way wait for it
            while self._restarting:
                self._changed.wait(self.start_timeout_s)
            inc = self._inc
        if inc is not None:
            self._stop(inc, graceful=True)

    def __enter__(self) -> Preloader:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stop(self, inc: _Incarnation, *, graceful: bool) -> None:
        with self._lock:
            inc.stopping = True
        if graceful and inc.process.is_alive():
            try:
                inc.requests.put(Stop())
            except OSError:
                pass
            inc.process.join(self.stop_timeout_s)
        if inc.process.is_alive():
            inc.process.terminate()
            inc.process.join(self.stop_timeout_s)
        if inc.process.is_alive():
            inc.process.kill()
            inc.process.join()
        if inc.thread is not None and inc.thread is not threading.current_thread():
            inc.thread.join(self.stop_timeout_s)

    def is_alive(self) -> bool:
        inc = self._inc
        return inc is not None and inc.ready.is_set() and not inc.stopping and inc.process.is_alive()

    @property
    def restarting(self) -> bool:
        """A restart (automatic, or `restart()`) is under way: wait for it instead of starting another."""
        return self._restarting

    @property
    def pid(self) -> int | None:
        inc = self._inc
        return inc.process.pid if inc is not None else None

    # -- requests -------------------------------------------------------------------------------------------

    def _running(self) -> _Incarnation | None:
        """The live child; waits out an automatic restart in progress (bounded by the start timeout)."""
        deadline = time.monotonic() + self.start_timeout_s
        with self._lock:
            while True:
                inc = self._inc
                if self._closed:
                    return None
                if inc is not None and not inc.stopping and inc.process.is_alive():
                    if inc.ready.is_set():
                        return inc
                elif not self._restarting:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(min(left, 0.05))

    def _submit(self, request: Request, model_key: str, meta: dict | None = None) -> Future:
        future: Future = Future()
        kind, rid = request.kind, request.rid
        inc = self._running()
        if inc is None:
            state = "closed" if self._closed else f"not running ({self.last_exit or 'not started'})"
            future.set_exception(Unavailable(f"the preloader is {state}; start() or restart() it and retry"))
            return future
        with self._lock:
            if rid in self._pending:
                raise InvalidArgument.field("request_id", f"{rid!r} is already pending")
            self._pending[rid] = _Pending(future, kind, model_key, inc.generation, meta=meta or {})
        try:
            inc.requests.put(request)
        except OSError:
            with self._lock:
                self._pending.pop(rid, None)
            future.set_exception(Unavailable(f"the preloader died before it got the {kind} of {model_key!r}"))
        return future

    def _next_id(self, kind: str) -> str:
        return f"{kind}-{os.getpid()}-{next(self._ids)}"

    def load(
        self,
        request_id: str,
        model_key: str,
        view_path: str | Path,
        device: str = "cpu",
        dtype: torch.dtype | str | None = None,
        *,
        components: Sequence[str] | None = None,
        keep_fp32: Mapping[str, Sequence[str]] | None = None,
        read_bytes_per_s: float | None = _UNSET,
        chunk_bytes: int | None = None,
        read_concurrency: int | None = None,
        variant: str | None = None,
        files: Sequence[tuple[str, str]] | None = None,
        hashed: Collection[str] = (),
    ) -> Future[LoadedWeights]:
        """Asks the child to read the weights of the pipeline at `view_path` onto `device` (converted to `dtype`)
        and returns a Future of the LoadedWeights. `components`: which components to read (default: all with
        safetensors); `files`: instead of a pipeline's components, these (component, path relative to
        `view_path`) safetensors files, e.g. a LoRA adapter's; `keep_fp32`: per component, module names kept
        float32 (skeleton.keep_fp32_modules); `read_bytes_per_s`, `chunk_bytes`, `read_concurrency`: for this load
        (default: the preloader's); `hashed`: files (paths relative to `view_path`) the child reads without
        checking them, whose bytes were hashed a moment ago (by the storage-cache's fill of this load: never hash
        the same bytes twice). The child holds the weights under `model_key` until `release(model_key)`."""
        if not request_id:
            raise InvalidArgument.field("request_id", "is required")
        if not model_key:
            raise InvalidArgument.field("model_key", "is required")
        dtype_name = _dtype_name(dtype)
        try:
            device_type = torch.device(device).type
        except (RuntimeError, TypeError):
            raise InvalidArgument.field("device", f"{device!r} is not a device name") from None
        if device_type not in ("cpu", "cuda"):
            raise InvalidArgument.field("device", f"{device!r}: only cpu and cuda are supported")
        request = LoadRequest(
            rid=request_id,
            model_key=model_key,
            view_path=str(view_path),
            device=str(device),
            dtype=dtype_name,
            components=tuple(components) if components is not None else None,
            keep_fp32={k: tuple(v) for k, v in (keep_fp32 or {}).items()},
            read_bytes_per_s=self.read_bytes_per_s if read_bytes_per_s is _UNSET else read_bytes_per_s,
            chunk_bytes=chunk_bytes,
            read_concurrency=read_concurrency,
            variant=variant,
            files=tuple((str(c), str(p)) for c, p in files) if files else None,
            hashed=frozenset(hashed),
        )
        return self._submit(request, model_key,
                            meta={"device": str(device), "dtype": DTYPES[dtype_name] if dtype_name else None})

    async def load_async(self, request_id: str, model_key: str, view_path: str | Path, **kwargs: Any) -> LoadedWeights:
        return await asyncio.wrap_future(self.load(request_id, model_key, view_path, **kwargs))

    def verify(self, files: Sequence[tuple[str | Path, tuple[int, int] | None]], *,
               read_concurrency: int | None = None, read_bytes_per_s: float | None = None) -> Future[int]:
        """Asks the child to check files this process has mapped (path, (st_dev, st_ino) of the mapping, e.g.
        `LoadedFile.identity`) against the checksums recorded on them; the Future gives the bytes checked, or raises
        CorruptRead naming the first file that does not match, or FailedPrecondition when a path names another file
        now. The child takes requests one at a time: see `idle`."""
        request = VerifyRequest(self._next_id("verify"), tuple((str(p), i) for p, i in files), read_concurrency,
                                read_bytes_per_s)
        return self._submit(request, "")

    def idle(self) -> bool:
        """The child is running and has no load to do (sent or started): a request now is taken at once."""
        with self._lock:
            busy = any(p.kind == "load" for p in self._pending.values())
        return not busy and self.is_alive()

    def release(self, model_key: str) -> Future[int]:
        """The child drops its references to `model_key`'s weights; the Future gives the bytes it held."""
        return self._submit(ReleaseRequest(self._next_id("release"), model_key), model_key)

    def held(self, timeout: float | None = DEFAULT_QUERY_TIMEOUT_S) -> dict[str, int]:
        """model_key -> bytes the child holds for it."""
        return self._submit(HeldQuery(self._next_id("held")), "").result(timeout)

    def info(self, timeout: float | None = DEFAULT_QUERY_TIMEOUT_S) -> dict[str, Any]:
        """The child's pid, held bytes per model, which heavy libraries it imported, sharing strategy, threads."""
        return self._submit(InfoQuery(self._next_id("info")), "").result(timeout)

    def debug_fill(self, model_key: str, component: str, tensor: str, value: float) -> Future[None]:
        """Diagnostics: the child fills one tensor it holds with `value`. A parent tensor that then reads `value`
        shares the child's memory: the proof that the hand-off was zero-copy (a pickled copy would not change)."""
        return self._submit(DebugFill(self._next_id("fill"), model_key, component, tensor, value), model_key)

    def in_flight(self) -> list[str]:
        """Request ids the child has started working on and not answered yet."""
        with self._lock:
            return [rid for rid, p in self._pending.items() if p.started]

    # -- responses ------------------------------------------------------------------------------------------

    def _read_loop(self, inc: _Incarnation) -> None:
        reader = inc.responses._reader
        try:
            while True:
                ready = mp_connection.wait([reader, inc.process.sentinel])
                if reader not in ready:
                    break  # the child exited and nothing more is readable
                try:
                    msg = inc.responses.get()
                except (EOFError, OSError):
                    break
                self._dispatch(inc, msg)
            # The child is gone; take what it managed to send in full before it died.
            while True:
                try:
                    if not reader.poll(0):
                        break
                    msg = inc.responses.get()
                except (EOFError, OSError):
                    break
                self._dispatch(inc, msg)
        finally:
            self._on_exit(inc)

    def _dispatch(self, inc: _Incarnation, msg: Response) -> None:
        if isinstance(msg, Ready):
            inc.ready.set()
            with self._lock:
                self._changed.notify_all()
            return
        with self._lock:
            pending = self._pending.get(msg.rid)
            if pending is None:
                return
            if isinstance(msg, Started):
                pending.started = True
                return
            del self._pending[msg.rid]
        match msg:
            case Loaded():
                self._deliver(pending, msg.rid, msg.payload, msg.sent_at)
            case Answered():
                pending.future.set_result(msg.result)
            case Failed():
                pending.future.set_exception(_rebuild_error(pending, msg.type_name, msg.message, msg.traceback))

    def _deliver(self, pending: _Pending, rid: str, payload: bytes, sent_at: float) -> None:
        try:
            # Rebuilding the buffers fetches their handles from the child (CPU: descriptors over its resource
            # sharer; CUDA: IPC opens): this is the moment the child must still hold them.
            files, timings = ForkingPickler.loads(payload)
            weights = _weights(
                rid,
                pending.model_key,
                pending.meta["device"],
                pending.meta["dtype"],
                [(c, p, buf, tuple(TensorSpec(*s) for s in specs)) for c, p, buf, specs in files],
                LoadTimings(**timings),
            )
        except Exception as err:  # noqa: BLE001 - a handle that cannot be opened means the child is gone
            pending.future.set_exception(
                Unavailable(f"preloader died while handing over {pending.model_key!r} ({type(err).__name__}: {err})")
            )
            return
        weights.timings.wire_bytes = len(payload)
        weights.timings.handoff_s = max(time.time() - sent_at, 0.0)
        pending.future.set_result(weights)

    def _on_exit(self, inc: _Incarnation) -> None:
        inc.process.join(self.stop_timeout_s)
        how = _describe_exit(inc.process.exitcode)
        with self._lock:
            lost = {rid: p for rid, p in self._pending.items() if p.generation == inc.generation}
            for rid in lost:
                del self._pending[rid]
            expected = inc.stopping
            if self._inc is inc:
                self._inc = None
            self.last_exit = how
            restart = not expected and not self._closed and self.auto_restarts_used < self.auto_restart
            if restart:
                self.auto_restarts_used += 1
                self._restarting = True
            self._changed.notify_all()
        for p in lost.values():
            if expected:
                what = "closed" if self._closed else "restarted"
                err = Unavailable(f"the preloader was {what} while {_doing(p)}; retry")
            else:
                then = "it is being restarted, retry" if restart else "restart() it and retry"
                err = Unavailable(f"preloader died while {_doing(p)} ({how}); {then}")
            p.future.set_exception(err)
        for q in (inc.requests, inc.responses):
            try:
                q.close()
            except (OSError, AttributeError):
                pass
        if not expected:
            log.warning("preloader process %s died (%s)%s", inc.process.pid, how, "; restarting it" if restart else "")
        if restart:
            try:
                with self._lock:
                    if self._closed:
                        return  # closed meanwhile: the finally below still clears `_restarting`
                    new = self._spawn()
                    self.restarts += 1
                self._wait_ready(new)
            except Exception:  # noqa: BLE001 - a failed restart leaves the preloader down; requests fail Unavailable
                log.exception("restarting the preloader failed")
            finally:
                with self._lock:
                    self._restarting = False
                    self._changed.notify_all()


def _doing(p: _Pending) -> str:
    return f"loading {p.model_key}" if p.kind == "load" else f"answering {p.kind}"


def _rebuild_error(pending: _Pending, type_name: str, message: str, remote_tb: str) -> BaseException:
    """The child's exception as the parent raises it: domain errors as their own class, the rest as PreloadFailed."""
    cls = getattr(errors, type_name, None)
    if isinstance(cls, type) and issubclass(cls, HotslotError):
        try:
            err = cls(message)
        except TypeError:
            err = HotslotError(message)
        err.__notes__ = [f"raised in the preloader process:\n{remote_tb}"]
        return err
    return PreloadFailed(
        f"preloader failed while {_doing(pending)}: {type_name}: {message}", type_name, remote_tb
    )
