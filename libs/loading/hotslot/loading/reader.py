"""Reads safetensors files with large positional reads, several at once, straight into one tensor buffer per file.

Why not `safetensors.torch.load_file`: it mmaps the file (slow and fragile on NFS, and page-cache backed memory
cannot be handed to another process) and allocates per tensor. Here the header is parsed by hand (8-byte
little-endian length + JSON), the data section is read in `chunk_bytes` ranges into ONE preallocated uint8
buffer per file, and the tensors are views into it (`tensor_views`). One buffer per file means one shared-memory
handle (CPU) or one CUDA IPC handle per file when the preloader hands the weights to its parent.

- Parallel: `read_files` keeps `concurrency` reads in flight, across files and across the ranges of one large
  file (positional reads on one descriptor); on CUDA across files. The result is the same bits at any level.
- CPU: the buffer is shared memory in a memfd sized with ftruncate (no zero-fill, no /dev/shm limit; see
  `_allocate_memfd`) that torch shares by descriptor. Unconverted data goes into it by `sendfile` (page cache to
  shared pages in the kernel); converted data through a staging chunk per thread.
- CUDA: chunks are read into a pinned host buffer, copied to the device with `non_blocking=True` and converted
  there; two pinned buffers alternate so the next read overlaps the previous copy.
- dtype conversion happens once, here, in the reading thread (e.g. an fp32 file -> fp16 weights), chunk by
  chunk, so a conversion never holds a second full copy of the file in memory and runs on as many cores as
  there are reads in flight.

Nothing is unpickled: the header is JSON and the data section is raw little-endian numbers.

Verified reads (`verify`, on by default): a file that carries the checksum the storage-cache recorded when it
cached it (`hotslot.checksum`: XXH3 of 1 MiB blocks) is checked while it is read: each thread hashes the blocks of
the range it just read (the staging chunk before conversion, the range read into private memory; after a
`sendfile` it reads the range's blocks again from the page cache into a 1 MiB bounce buffer; the CUDA path hashes
its pinned chunks in order), blocks split between two reads are read again, and the blocks'
digests must give the recorded value. A mismatch raises `CorruptRead` naming the file.
Mapped files are not read by us: `verify_mapped` checksums their pages, which faults them in as `populate` would.
"""
from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import struct
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from torch.multiprocessing import get_sharing_strategy

from hotslot import checksum
from hotslot.errors import (
    CorruptRead,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from hotslot.loading.hostpool import HostPool
from hotslot.manifest import PICKLE_SUFFIXES

__all__ = [
    "DEFAULT_READ_CHUNK_BYTES",
    "DEFAULT_READ_CONCURRENCY",
    "LoadedFile",
    "ReadBuffers",
    "ReadRequest",
    "ReadStats",
    "SafetensorsHeader",
    "TensorEntry",
    "TensorSpec",
    "keeps_dtypes",
    "verify_mapped",
    "verify_paths",
    "load_file",
    "map_safetensors",
    "module_predicate",
    "populate",
    "read_files",
    "read_header",
    "read_safetensors",
    "host_pool",
    "set_host_pool",
    "tensor_views",
]

# One read (and one host->device copy) moves this many bytes. Large enough that syscall and copy-launch overhead
# vanish, small enough that the staging buffers of a conversion stay small.
DEFAULT_READ_CHUNK_BYTES = 16 * 1024 * 1024
MIN_READ_CHUNK_BYTES = 4096
# Reads in flight at once (files, and chunk-sized ranges of large files): enough parallel streams to fill a
# network mount's link and to convert dtypes on several cores (bench/bench_reads.py measures the levels).
DEFAULT_READ_CONCURRENCY = 4
# safetensors' own bound on the JSON header; a larger length field means the file is not safetensors.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Where tensors are laid out by us (conversion, CUDA), each starts at a multiple of this: vectorised CPU kernels
# and CUDA's aligned loads want 16+ bytes, and the CUDA caching allocator hands out 512-byte aligned blocks.
OUTPUT_ALIGNMENT_BYTES = 256
# The shared-memory file system backing torch's CPU shared tensors on Linux.
SHM_DIR = "/dev/shm"
# Unconverted CPU tensors sit at the same address modulo a page as they would in an mmap of the file (which is
# what diffusers' and transformers' from_pretrained hand the model on CPU). CPU kernels pick their vector paths
# by pointer alignment, so the same placement gives bit-identical outputs; another one can differ in the last bit.
PAGE_BYTES = mmap.PAGESIZE

_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
}
# safetensors dtype name -> torch dtype, for the dtypes this torch build has
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    k: getattr(torch, v) for k, v in _DTYPE_NAMES.items() if hasattr(torch, v)
}
# Only these are converted to a target dtype; integer, bool and float8 (quantized, needs scales) tensors keep theirs.
CONVERTIBLE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class TensorEntry(NamedTuple):
    """One tensor as the file stores it: byte range [begin, end) within the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class TensorSpec(NamedTuple):
    """Where one tensor lives inside a file's buffer: enough to rebuild the view in another process."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    data_start: int
    data_bytes: int
    tensors: tuple[TensorEntry, ...]  # sorted by position in the file
    metadata: dict[str, str]


@dataclass
class ReadStats:
    """What reading cost: bytes from the file, bytes of the resulting tensors, and where the time went."""

    files: int = 0
    bytes_read: int = 0
    bytes_out: int = 0
    read_s: float = 0.0  # inside readinto / sendfile (disk or page cache -> memory)
    alloc_s: float = 0.0  # allocating the output buffers (torch zero-fills new shared memory: ~0.25 s/GB)
    convert_s: float = 0.0  # dtype conversion and device copies not overlapped with reading
    throttle_s: float = 0.0  # sleeping to honour read_bytes_per_s

    def add(self, other: ReadStats) -> None:
        self.files += other.files
        self.bytes_read += other.bytes_read
        self.bytes_out += other.bytes_out
        self.read_s += other.read_s
        self.alloc_s += other.alloc_s
        self.convert_s += other.convert_s
        self.throttle_s += other.throttle_s

    @property
    def read_mb_per_s(self) -> float:
        return self.bytes_read / self.read_s / 1e6 if self.read_s > 0 else 0.0


@dataclass
class LoadedFile:
    """One safetensors file in memory: a single 1-D uint8 buffer and where each tensor sits in it."""

    path: str
    buffer: torch.Tensor = field(repr=False)
    specs: tuple[TensorSpec, ...] = field(repr=False)
    metadata: dict[str, str] = field(default_factory=dict)
    stats: ReadStats = field(default_factory=ReadStats)
    data_start: int = 0  # where the buffer's bytes start in the file (mapped files: their data section)
    resident: bool = False  # every page is already in this process's page tables: `populate` would add nothing
    identity: tuple[int, int] | None = None  # mapped files: (st_dev, st_ino) of the file this mapping is of

    def tensors(self) -> dict[str, torch.Tensor]:
        return tensor_views(self.buffer, self.specs)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


def tensor_views(buffer: torch.Tensor, specs: Sequence[TensorSpec]) -> dict[str, torch.Tensor]:
    """The tensors of one file as views into its buffer (no copy): what the parent builds from a handle."""
    out = {}
    for spec in specs:
        flat = buffer[spec.offset : spec.offset + spec.nbytes]
        if spec.dtype != torch.uint8:
            flat = flat.view(spec.dtype)
        out[spec.name] = flat.view(spec.shape)
    return out


# --------------------------------------------------------------------------------------------------------------
# header


def _corrupt(path: Path, reason: str) -> DataLoss:
    return DataLoss(f"{path} is not a valid safetensors file: {reason}")


def _open(path: Path):
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidArgument(f"{path.name} is a pickle-format weight file; hotslot loads safetensors only",
                              reason=Reason.UNSAFE_FILE_FORMAT)
    try:
        return open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise NotFound(f"weight file {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidArgument(f"weight file {path} is a directory") from None
    except OSError as err:
        raise Unavailable(f"cannot open weight file {path}: {err.strerror}") from None


def _parse_header(path: Path, f) -> SafetensorsHeader:
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
        raise _corrupt(path, f"only {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES:
        raise _corrupt(path, f"header length {n} exceeds {MAX_HEADER_BYTES} bytes")
    if 8 + n > size:
        raise _corrupt(path, f"header length {n} runs past the end of the {size}-byte file")
    raw = f.read(n)
    if len(raw) != n:
        raise _corrupt(path, "file shrank while its header was read")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"header is not UTF-8 JSON ({err})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    data_start = 8 + n
    data_bytes = size - data_start
    entries = [_entry(path, name, info) for name, info in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    # The format requires the tensors to tile the data section exactly: no gaps, no overlaps, nothing after.
    position = 0
    for e in entries:
        if e.begin != position:
            raise _corrupt(path, f"tensor {e.name!r} starts at {e.begin}, expected {position} (gap or overlap)")
        position = e.end
    if position != data_bytes:
        raise _corrupt(path, f"tensors cover {position} bytes but the data section holds {data_bytes}")
    return SafetensorsHeader(path, data_start, data_bytes, tuple(entries), dict(metadata))


def _entry(path: Path, name: str, info: object) -> TensorEntry:
    if not isinstance(info, dict):
        raise _corrupt(path, f"entry {name!r} is not an object")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype_name not in SAFETENSORS_DTYPES:
        raise _corrupt(path, f"tensor {name!r} has unsupported dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    numel = 1
    for d in shape:
        numel *= d
    begin, end = offsets
    if end - begin != numel * dtype.itemsize:
        raise _corrupt(path, f"tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype_name}")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parses and validates a safetensors header without reading the data section."""
    path = Path(path)
    with _open(path) as f:
        return _parse_header(path, f)


# --------------------------------------------------------------------------------------------------------------
# buffers


class ReadBuffers:
    """Staging buffers reused across files and loads (the preloader keeps one for its lifetime): a CPU chunk for
    conversions, and on CUDA two pinned host chunks plus two device chunks that alternate. Each reading thread
    uses its own set (`worker(i)`), so concurrent reads never share a staging buffer."""

    def __init__(self) -> None:
        self._cpu: torch.Tensor | None = None
        self._pinned: dict[int, torch.Tensor] = {}
        self._device: dict[tuple[str, int], torch.Tensor] = {}
        self._streams: dict[str, torch.cuda.Stream] = {}
        self._workers: dict[int, ReadBuffers] = {}
        self._lock = threading.Lock()

    def worker(self, index: int) -> ReadBuffers:
        """The buffers of reading thread `index` (0 is this object itself)."""
        if index == 0:
            return self
        with self._lock:
            if index not in self._workers:
                self._workers[index] = ReadBuffers()
            return self._workers[index]

    def cpu(self, nbytes: int) -> torch.Tensor:
        if self._cpu is None or self._cpu.numel() < nbytes:
            self._cpu = torch.empty(nbytes, dtype=torch.uint8)
        return self._cpu

    def pinned(self, slot: int, nbytes: int) -> torch.Tensor:
        buf = self._pinned.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = self._pinned[slot] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return buf

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        """A side stream for host->device copies, so loading does not queue behind inference kernels."""
        if str(device) not in self._streams:
            self._streams[str(device)] = torch.cuda.Stream(device)
        return self._streams[str(device)]

    def device(self, device: torch.device, slot: int, nbytes: int) -> torch.Tensor:
        key = (str(device), slot)
        buf = self._device.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._device[key] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return buf


def _shm_free_bytes() -> int | None:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _mem_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo: what a memfd can still take before the kernel has to reclaim or kill."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _allocate(nbytes: int, device: torch.device, shared: bool, stats: ReadStats, shm: str) -> torch.Tensor:
    """The output buffer of one file: shared memory on CPU (when `shared`), device memory on CUDA."""
    t0 = time.perf_counter()
    try:
        return _allocate_untimed(nbytes, device, shared, shm)
    finally:
        stats.alloc_s += time.perf_counter() - t0


SHM_MODES = ("memfd", "torch")
_SHM_ADVICE = f"give the executor a larger {SHM_DIR} (Kubernetes: an emptyDir volume with medium: Memory there)"


def _allocate_untimed(nbytes: int, device: torch.device, shared: bool, shm: str) -> torch.Tensor:
    if device.type == "cuda":
        try:
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        except torch.OutOfMemoryError:
            raise ResourceExhausted(f"{device} has no room for {nbytes} more bytes of weights") from None
    if not shared or nbytes == 0:  # an empty storage cannot be mapped; it has nothing to share either
        pool = _host_pool
        if pool is not None and nbytes:
            return pool.allocate(nbytes)  # memory of dropped weights, already touched
        return torch.empty(nbytes, dtype=torch.uint8)
    if shm == "memfd" and hasattr(os, "memfd_create") and get_sharing_strategy() == "file_descriptor":
        return _allocate_memfd(nbytes)
    free = _shm_free_bytes()
    # torch reserves the pages up front, zero-filling them (so a full tmpfs cannot SIGBUS us later), and fails
    # with an opaque RuntimeError; checking first gives an error the operator can act on.
    if free is not None and nbytes > free:
        raise ResourceExhausted(
            f"shared memory is full: {nbytes} bytes needed, {free} free in {SHM_DIR}; {_SHM_ADVICE}"
        )
    try:
        storage = torch.UntypedStorage._new_shared(nbytes)
    except RuntimeError as err:
        raise ResourceExhausted(f"cannot allocate {nbytes} bytes of shared memory ({err}); {_SHM_ADVICE}") from None
    return torch.empty(0, dtype=torch.uint8).set_(storage)


_host_pool: HostPool | None = None


def host_pool() -> HostPool | None:
    """The pool `set_host_pool` installed, if any."""
    return _host_pool


def set_host_pool(pool: HostPool | None) -> HostPool | None:
    """Private (unshared) CPU buffers of later reads come from `pool` (recycled memory of dropped weights; see
    hostpool), or from torch again with None. Process-wide, as the executor has one host budget. Returns the
    previous pool."""
    global _host_pool
    previous, _host_pool = _host_pool, pool
    return previous


def _allocate_memfd(nbytes: int) -> torch.Tensor:
    """Shared memory as an anonymous memory file (memfd) sized with ftruncate: no pages exist until the read
    writes them, so nothing is zero-filled first (torch's `_new_shared` reserves and clears every page, ~0.25 s
    per GB, before the read writes it again), and no /dev/shm mount limits it. torch wraps the descriptor as a
    file-descriptor shared storage, so the hand-off to another process is the same zero-copy descriptor passing."""
    available = _mem_available_bytes()
    if available is not None and nbytes > available:
        raise ResourceExhausted(
            f"not enough memory for {nbytes} bytes of weights: {available} bytes available; raise the executor's "
            "memory limit or lower its host and standby budgets"
        )
    try:
        fd = os.memfd_create("hotslot-weights", os.MFD_CLOEXEC)
    except OSError as err:
        raise ResourceExhausted(f"cannot create shared memory for {nbytes} bytes ({err.strerror})") from None
    try:
        os.ftruncate(fd, nbytes)
        # dups the descriptor and maps it (private to torch, so not in its type hints)
        storage = torch.UntypedStorage._new_shared_fd_cpu(fd, nbytes)  # type: ignore[attr-defined]
    except (OSError, RuntimeError) as err:
        raise ResourceExhausted(f"cannot map {nbytes} bytes of shared memory ({err})") from None
    finally:
        os.close(fd)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


# --------------------------------------------------------------------------------------------------------------
# reading


class _Source:
    """One open weight file read with positional reads (so several threads share it), with timing and the rate
    cap shared by every file of one `read_files` call."""

    def __init__(self, path: Path, f, stats: ReadStats, cap: _RateCap) -> None:
        self.path, self.f, self.fd, self.stats, self.cap = path, f, f.fileno(), stats, cap
        self._lock = threading.Lock()

    def pread_into(self, view: memoryview, offset: int) -> None:
        """Fills `view` with the file's bytes from `offset`."""
        t0 = time.perf_counter()
        pos = 0
        while pos < len(view):
            try:
                k = os.preadv(self.fd, [view[pos:]], offset + pos)
            except OSError as err:
                raise Unavailable(f"reading {self.path} failed: {err.strerror}") from None
            if not k:
                raise self._truncated()
            pos += k
        self._account(pos, t0)

    def sendfile(self, out_fd: int, in_offset: int, nbytes: int) -> None:
        """Copies `nbytes` from the file at `in_offset` to `out_fd`'s current position, inside the kernel."""
        t0 = time.perf_counter()
        pos = 0
        while pos < nbytes:
            k = os.sendfile(out_fd, self.fd, in_offset + pos, nbytes - pos)
            if not k:
                raise self._truncated()
            pos += k
        self._account(pos, t0)

    def mapped_range(self, mapping: torch.Tensor, offset: int, nbytes: int) -> torch.Tensor | None:
        """The file's bytes [offset, offset + nbytes) as a view of `mapping` (the whole file, mapped), faulted in
        first in one call (read from disk if they are not in the page cache): the bytes are then read where they
        are, with no copy into a staging buffer. None when they could not be faulted in (a kernel without
        MADV_POPULATE_READ, an I/O error, a file cut short since it was opened): the caller reads them with pread,
        which reports such errors, where touching the mapping would kill the process with SIGBUS."""
        t0 = time.perf_counter()
        view = mapping[offset : offset + nbytes]
        if not _madvise_populate(view):
            return None
        self._account(nbytes, t0)
        return view

    def _truncated(self) -> DataLoss:
        return _corrupt(self.path, "file ended before its data section did (truncated or changed)")

    def _account(self, nbytes: int, t0: float) -> None:
        elapsed = time.perf_counter() - t0
        slept = self.cap.account(nbytes)
        with self._lock:
            self.stats.read_s += elapsed
            self.stats.bytes_read += nbytes
            self.stats.throttle_s += slept


class _RateCap:
    """Sleeps off whatever the reads of one call are ahead of `bytes_per_s`, so a background preload leaves I/O
    to others; shared by all reading threads."""

    def __init__(self, bytes_per_s: float | None) -> None:
        self.rate = bytes_per_s
        self.started = time.perf_counter()
        self.done = 0
        self._lock = threading.Lock()

    def account(self, nbytes: int) -> float:
        if not self.rate:
            return 0.0
        with self._lock:
            self.done += nbytes
            ahead = self.done / self.rate - (time.perf_counter() - self.started)
        if ahead > 0:
            time.sleep(ahead)
            return ahead
        return 0.0


def _target_dtype(entry: TensorEntry, dtype: torch.dtype | None, keep_fp32: Callable[[str], bool] | None):
    if dtype is None or entry.dtype not in CONVERTIBLE_DTYPES:
        return entry.dtype
    if keep_fp32 is not None and keep_fp32(entry.name):
        return torch.float32
    return dtype


def _align(n: int) -> int:
    return -(-n // OUTPUT_ALIGNMENT_BYTES) * OUTPUT_ALIGNMENT_BYTES


class _Piece(NamedTuple):
    entry: TensorEntry
    spec: TensorSpec
    lo: int  # byte range [lo, hi) of the tensor in the file, relative to the data section
    hi: int


def _batches(pieces: list[_Piece], chunk: int, cut: Callable[[int], bool] | None = None
             ) -> Iterator[tuple[int, int, list[_Piece]]]:
    """Groups consecutive pieces into file ranges of at most `chunk` bytes (the file is contiguous). With `cut`,
    a full batch ends after its last piece whose end `cut` accepts (a checksum block boundary), where it has one,
    and the pieces after it start the next batch."""
    batch: list[_Piece] = []
    start = 0
    for p in pieces:
        while batch and p.hi - start > chunk:
            ends = [i for i, q in enumerate(batch) if cut(q.hi)] if cut is not None else []
            keep = ends[-1] + 1 if ends else len(batch)
            yield start, batch[keep - 1].hi, batch[:keep]
            batch = batch[keep:]
            start = batch[0].lo if batch else p.lo
        if not batch:
            start = p.lo
        batch.append(p)
    if batch:
        yield start, batch[-1].hi, batch


def _pieces(entries: Sequence[TensorEntry], specs: Sequence[TensorSpec], chunk: int, block: int = 0,
            data_start: int = 0) -> list[_Piece]:
    """Splits tensors larger than a chunk at element boundaries, so every piece fits one staging chunk; with
    `block`, also where a checksum block starts (file offset a multiple of it) on an element boundary."""
    out = []
    for e, s in zip(entries, specs, strict=True):
        item = e.dtype.itemsize
        step = max(chunk // item, 1) * item
        lo = e.begin
        while True:
            hi = min(lo + step, e.end)
            if block:
                boundary = ((data_start + lo) // block + 1) * block - data_start  # next block start after lo
                if boundary < hi and (boundary - e.begin) % item == 0:
                    hi = boundary
            out.append(_Piece(e, s, lo, hi))
            lo = hi
            if lo >= e.end:
                break
    return out


class ReadRequest(NamedTuple):
    """One file for `read_files`, with the predicate of tensors kept float32 (`keep_fp32`, see read_safetensors);
    `verify=False` reads it unchecked even when `read_files` verifies (its bytes were hashed a moment ago, e.g. by
    the storage-cache's fill of this very load)."""

    path: str | Path
    keep_fp32: Callable[[str], bool] | None = None
    verify: bool = True


@dataclass
class _Job:
    """One file being read: its open source, header, output buffer and layout."""

    path: Path
    source: _Source
    header: SafetensorsHeader
    buffer: torch.Tensor
    specs: tuple[TensorSpec, ...]
    stats: ReadStats
    staged: bool  # converted (or CUDA): read through staging chunks; else the data section is read in place
    shift: int = 0  # direct reads: where the data section starts in the buffer
    pieces: list[_Piece] = field(default_factory=list)
    out_fd: int | None = None  # direct reads into shared memory: the memory file's descriptor (sendfile target)
    expected: int | None = None  # the checksum recorded on the file (hotslot.checksum): checked while read
    head: bytes = b""  # the file's bytes before the data section (verified files)
    digests: dict[int, int] = field(default_factory=dict)  # block index -> XXH3-64, from the reading threads
    stream: checksum.BlockHasher | None = None  # CUDA: one thread reads the file in order and hashes it so
    mapping: torch.Tensor | None = None  # map_source: the whole file mapped; conversions read from it in place

    def expect(self, value: int | None, head: bytes) -> None:
        """Verify this file against `value`; hashes the blocks that lie wholly in `head` (the header) now."""
        self.expected, self.head = value, head
        size, block = self.header.data_start + self.header.data_bytes, checksum.BLOCK_BYTES
        for k in range(checksum.blocks(size)):
            start, end = k * block, min((k + 1) * block, size)
            if end <= len(head):
                self.digests[k] = checksum.block_digest(head[start:end])

    def checksum(self, lo: int, hi: int, data=None, bounce: torch.Tensor | None = None) -> None:
        """Hashes the blocks that lie wholly in data-section bytes [lo, hi), just read into `data` (and the block
        that straddles header and data section, from the read that starts the data section). Blocks split
        between two reads are read again by `check`. Without `data` (the kernel copied the range by sendfile)
        each block is read again from the file's page cache into `bounce`, one block at a time: cheaper than
        mapping the shared pages into this process (measured +4-16 % against +18-22 %)."""
        if self.expected is None:
            return
        block, start = checksum.BLOCK_BYTES, self.header.data_start
        a, b, size = start + lo, start + hi, start + self.header.data_bytes

        def part(x: int, y: int):
            if data is not None:
                return data[x - a : y - a]
            view = memoryview(bounce.numpy())[: y - x]  # type: ignore[arg-type,union-attr]  # bounce: without data
            got = 0
            while got < len(view):
                n = os.preadv(self.source.fd, [view[got:]], x + got)
                if not n:
                    raise self.source._truncated()
                got += n
            return view

        k = a // block
        if a % block:
            end = min((k + 1) * block, size)
            if a == start and end <= b:
                self.digests[k] = checksum.block_digest(self.head[k * block :], part(a, end))
            k += 1
        while k * block < b:
            end = min((k + 1) * block, size)
            if end > b:
                break
            self.digests[k] = checksum.block_digest(part(k * block, end))  # dict item set: atomic
            k += 1

    def hash_mapped(self, lo: int, hi: int) -> None:
        """Hashes, from the whole-file mapping, every block that starts in data-section bytes [lo, hi) (and from
        the first range, the block that straddles header and data section), reading past `hi` to the block's end:
        ranges and blocks need not line up. The caller has faulted [lo, hi) in; the tail past `hi` is faulted in
        here, and where that fails its block is left to `check`, which reads it with pread and reports the error
        (touching an unreadable page of a mapping would be a SIGBUS)."""
        if self.expected is None or self.mapping is None:  # unverified, or not mapped after all
            return
        block, start = checksum.BLOCK_BYTES, self.header.data_start
        a, b, size = start + lo, start + hi, start + self.header.data_bytes
        first = a // block if lo == 0 else -(-a // block)
        last = -(-b // block)
        tail = min(last * block, size)
        if tail > b and not _madvise_populate(self.mapping[b:tail]):
            last -= 1
        for k in range(first, last):
            if k not in self.digests:
                self.digests[k] = checksum.block_digest(self.mapping[k * block : min((k + 1) * block, size)])

    def feed(self, data) -> None:
        """The next bytes of the data section, in order (the CUDA path reads a file on one thread)."""
        if self.expected is None:
            return
        if self.stream is None:
            self.stream = checksum.BlockHasher()
            self.stream.update(self.head)
        self.stream.update(data)

    def check(self) -> None:
        """Raises CorruptRead when the bytes read do not hash to the recorded checksum; blocks no single read
        held whole are read again from the file (page cache) first."""
        if self.expected is None:
            return
        block, size = checksum.BLOCK_BYTES, self.header.data_start + self.header.data_bytes
        if self.stream is not None:
            value = self.stream.value() if self.stream.size == size else None
        else:
            for k in range(checksum.blocks(size)):
                if k not in self.digests:
                    start = k * block
                    self.digests[k] = checksum.block_digest(os.pread(self.source.fd, min(block, size - start), start))
            value = checksum.root(self.digests, size)
        if value != self.expected:
            raise CorruptRead.of(self.path)


class _Task(NamedTuple):
    job: _Job
    lo: int  # byte range [lo, hi) of the data section (direct) or of the batch (staged)
    hi: int
    batch: list[_Piece] | None  # staged CPU reads: the pieces in [lo, hi); None for direct and whole-file CUDA


def read_files(
    files: Sequence[str | Path | ReadRequest],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    keep_fp32: Callable[[str], bool] | None = None,
    chunk_bytes: int = DEFAULT_READ_CHUNK_BYTES,
    concurrency: int = DEFAULT_READ_CONCURRENCY,
    shared: bool = True,
    read_bytes_per_s: float | None = None,
    buffers: ReadBuffers | None = None,
    shm: str = "memfd",
    verify: bool = True,
    map_source: bool = False,
) -> list[LoadedFile]:
    """Reads several safetensors files, `concurrency` reads at a time, each into a single buffer on `device`;
    returns them in order. On CPU a file is cut into `chunk_bytes` ranges that different threads read (and
    convert) at once, so several files and the ranges of one large file are in flight together: on NFS and other
    latency-bound mounts parallel streams are how the link's bandwidth is reached, and on a fast disk the dtype
    conversion runs on several cores. On CUDA each thread reads whole files through its own pinned buffers and
    copy stream. The result is bit-identical whatever the concurrency. `shm`: "memfd" (default; see
    `_allocate_memfd`) or "torch" (`UntypedStorage._new_shared`: /dev/shm, pages reserved and zero-filled).
    `verify`: check the files that carry a recorded checksum while reading them (module docstring); a mismatch
    raises CorruptRead (a DataLoss) naming the file.
    `map_source` (CPU; files on a local disk only, as for `map_safetensors`): files that need a conversion are
    mapped and converted from the page cache's pages where they are, instead of being read into a staging buffer
    first: one copy of the file's bytes fewer (without a rate cap; with one, the reads are staged and paced).

    The other arguments and the errors are those of `read_safetensors`; `keep_fp32` applies to files given as
    plain paths."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; big-endian hosts are not supported")
    if chunk_bytes < MIN_READ_CHUNK_BYTES:
        raise InvalidArgument.field("chunk_bytes", f"must be at least {MIN_READ_CHUNK_BYTES}, got {chunk_bytes}")
    if concurrency < 1:
        raise InvalidArgument.field("concurrency", f"must be at least 1, got {concurrency}")
    if shm not in SHM_MODES:
        raise InvalidArgument.field("shm", f"must be one of {', '.join(SHM_MODES)}, got {shm!r}")
    device = _device(device)
    buffers = buffers or ReadBuffers()
    cap = _RateCap(read_bytes_per_s)
    requests = [f if isinstance(f, ReadRequest) else ReadRequest(f, keep_fp32) for f in files]
    jobs: list[_Job] = []
    started = time.perf_counter()
    try:
        for request in requests:
            jobs.append(_open_job(Path(request.path), request.keep_fp32, device, dtype, chunk_bytes, shared, cap,
                                  shm, verify and request.verify,
                                  map_source=map_source and device.type == "cpu" and not cap.rate))
        tasks = _interleave([_tasks(job, device, chunk_bytes) for job in jobs])
        _run(tasks, min(concurrency, max(len(tasks), 1)), buffers, device, chunk_bytes)
        for job in jobs:
            job.check()
    finally:
        for job in jobs:
            job.source.f.close()
            job.mapping = None  # unmapped once no view is left
    out = []
    for job in jobs:
        job.stats.bytes_out = sum(spec.nbytes for spec in job.specs)
        # written through this process's mapping (converted, or read in place without sendfile): resident
        resident = device.type == "cpu" and (job.staged or job.out_fd is None)
        out.append(LoadedFile(str(job.path), job.buffer, job.specs, job.header.metadata, job.stats,
                              resident=resident))
    if len(jobs) == 1:
        s = jobs[0].stats  # one file read alone: what is not reading, allocating or sleeping is conversion
        s.convert_s = max(time.perf_counter() - started - s.read_s - s.throttle_s - s.alloc_s, 0.0)
    return out


def _open_job(
    path: Path,
    keep_fp32: Callable[[str], bool] | None,
    device: torch.device,
    dtype: torch.dtype | None,
    chunk: int,
    shared: bool,
    cap: _RateCap,
    shm: str,
    verify: bool = False,
    map_source: bool = False,
) -> _Job:
    stats = ReadStats(files=1)
    f = _open(path)
    try:
        header = _parse_header(path, f)
        expected = checksum.read_recorded(f.fileno()) if verify and checksum.available() else None
        # A file converted from a mapping hashes its blocks from the mapping, across range ends (`hash_mapped`),
        # so its pieces need not end on block boundaries: fewer, larger conversions.
        job = _open_source(path, f, header, keep_fp32, device, dtype, chunk, shared, cap, shm, stats,
                           checksum.BLOCK_BYTES if expected is not None and not map_source else 0)
        if map_source and job.staged and header.data_bytes:
            job.mapping = _map_whole(path, f)
        if expected is not None:
            job.expect(expected, os.pread(f.fileno(), header.data_start, 0))
        return job
    except BaseException:
        f.close()
        raise


def _open_source(path: Path, f, header: SafetensorsHeader, keep_fp32: Callable[[str], bool] | None,
                 device: torch.device, dtype: torch.dtype | None, chunk: int, shared: bool, cap: _RateCap,
                 shm: str, stats: ReadStats, block: int = 0) -> _Job:
    if hasattr(os, "posix_fadvise"):  # tell the kernel to read ahead aggressively: each stream reads forward
        os.posix_fadvise(f.fileno(), header.data_start, header.data_bytes, os.POSIX_FADV_SEQUENTIAL)
    source = _Source(path, f, stats, cap)
    targets = [_target_dtype(e, dtype, keep_fp32) for e in header.tensors]
    direct = device.type == "cpu" and all(
        t == e.dtype and (header.data_start + e.begin) % e.dtype.itemsize == 0
        for t, e in zip(targets, header.tensors, strict=True)
    )
    if direct:
        # The data section is already the buffer we want: read it in place, at the file's page offset (see
        # PAGE_BYTES); the views use the file's offsets.
        size = header.data_bytes + PAGE_BYTES - 1 if header.data_bytes else 0
        buffer = _allocate(size, device, shared, stats, shm)
        shift = (header.data_start - buffer.data_ptr()) % PAGE_BYTES if size else 0
        specs = tuple(TensorSpec(e.name, e.dtype, e.shape, shift + e.begin, e.nbytes) for e in header.tensors)
        return _Job(path, source, header, buffer, specs, stats, False, shift=shift, out_fd=_shm_fd(buffer))
    specs, total = _layout(header.tensors, targets)
    buffer = _allocate(total, device, shared, stats, shm)
    # staging chunks need not exceed the file: a 100 kB text encoder should not allocate 16 MiB to read it
    stage = max(min(chunk, header.data_bytes), 1)
    return _Job(path, source, header, buffer, specs, stats, True,
                pieces=_pieces(header.tensors, specs, stage, block, header.data_start))


def _map_whole(path: Path, f) -> torch.Tensor | None:
    """The whole file as a read-only mapping (a uint8 tensor over it); None where it cannot be mapped (then it is
    read through staging buffers). The header check has seen the file hold its whole data section."""
    try:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        return None
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_SEQUENTIAL)
    with warnings.catch_warnings():  # read-only on purpose: nothing writes to the source
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mapped, dtype=torch.uint8)


def _tasks(job: _Job, device: torch.device, chunk: int) -> list[_Task]:
    if not job.staged:
        # Ranges end at file offsets that are multiples of the chunk (rounded to checksum blocks), so the blocks a
        # verified read hashes are never split between two reads.
        n, start = job.header.data_bytes, job.header.data_start
        step = max(chunk // checksum.BLOCK_BYTES, 1) * checksum.BLOCK_BYTES if job.expected is not None else chunk
        cuts = [0, *range(step - start % step, n, step), n]
        return [_Task(job, lo, hi, None) for lo, hi in zip(cuts, cuts[1:], strict=False) if hi > lo]
    if device.type == "cuda":
        return [_Task(job, 0, job.header.data_bytes, None)]
    stage = max(min(chunk, job.header.data_bytes), 1)
    # a verified file's batches end on checksum block boundaries where they can, so no block is read twice
    start = job.header.data_start
    cut = (lambda hi: (start + hi) % checksum.BLOCK_BYTES == 0) if job.expected is not None else None
    return [_Task(job, lo, hi, batch) for lo, hi, batch in _batches(job.pieces, stage, cut)]


def _interleave(per_file: list[list[_Task]]) -> list[_Task]:
    """The files' tasks round-robin (file 1 range 1, file 2 range 1, ..., file 1 range 2, ...): the kernel
    serialises writes into one memory file (the shmem inode lock), so threads that fill different files at once
    go faster than threads that all wait on the largest (measured 1.13-1.24x for an SD 1.5 model)."""
    out: list[_Task] = []
    for i in range(max((len(t) for t in per_file), default=0)):
        out += [tasks[i] for tasks in per_file if i < len(tasks)]
    return out


T = TypeVar("T")


def _on_threads(items: Sequence[T], threads: int, name: str, handle: Callable[[int, T], None],
                done: Callable[[int], None] | None = None) -> None:
    """Calls `handle(thread index, item)` for every item, in order, on up to `threads` threads (this one is index
    0); the first error stops the others and is raised here. `done(index)` runs as each thread ends."""
    queue = iter(items)
    lock = threading.Lock()
    failed: list[BaseException] = []

    def work(index: int) -> None:
        try:
            while True:
                with lock:
                    if failed:
                        return
                    item = next(queue, None)
                if item is None:
                    return
                handle(index, item)
        except BaseException as err:  # noqa: BLE001 - handed to the calling thread
            with lock:
                failed.append(err)
        finally:
            if done is not None:
                done(index)

    others = [threading.Thread(target=work, args=(i,), name=f"{name}-{i}", daemon=True)
              for i in range(1, min(threads, len(items)))]
    for t in others:
        t.start()
    work(0)
    for t in others:
        t.join()
    if failed:
        raise failed[0]


def _run(tasks: list[_Task], threads: int, buffers: ReadBuffers, device: torch.device, chunk: int) -> None:
    """Runs the tasks in order on `threads` threads (this one included); the first error stops the others and
    is raised here."""
    out_fds: dict[int, dict[int, int]] = {i: {} for i in range(threads)}  # per thread: job id -> own descriptor

    def close_fds(index: int) -> None:
        for fd in out_fds[index].values():
            os.close(fd)

    _on_threads(tasks, threads, "hotslot-read",
                lambda i, task: _run_task(task, buffers.worker(i), device, chunk, out_fds[i]), close_fds)


def _private_fd(job: _Job, out_fds: dict[int, int]) -> int | None:
    """A descriptor of the job's memory file with a file position of this thread's own (sendfile writes at the
    target's position; a dup would share it). None when the memory file cannot be reopened."""
    key = id(job)
    if key not in out_fds:
        try:
            out_fds[key] = os.open(f"/proc/self/fd/{job.out_fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            job.out_fd = None
            return None
    return out_fds[key]


def _run_task(task: _Task, buffers: ReadBuffers, device: torch.device, chunk: int, out_fds: dict[int, int]) -> None:
    job = task.job
    data_start = job.header.data_start
    if not job.staged:
        # Into shared memory by `sendfile` to the memory file: the kernel copies page cache to shared-memory pages
        # without faulting each 4 kB page into this process (measured ~1.6x faster than reading into the mapping).
        if job.out_fd is not None:
            fd = _private_fd(job, out_fds)
            if fd is not None:
                try:
                    os.lseek(fd, job.shift + task.lo, os.SEEK_SET)
                    job.source.sendfile(fd, data_start + task.lo, task.hi - task.lo)
                except OSError:
                    job.out_fd = None  # a file system without sendfile support: read into the mapping below
                else:
                    if job.expected is not None:
                        job.checksum(task.lo, task.hi, bounce=buffers.cpu(checksum.BLOCK_BYTES))
                    return
        part = job.buffer[job.shift + task.lo : job.shift + task.hi]
        # numpy's stubs call ndarray a buffer only on Python 3.12+
        job.source.pread_into(memoryview(part.numpy()), data_start + task.lo)  # type: ignore[arg-type]
        job.checksum(task.lo, task.hi, part)
        return
    if device.type == "cuda":
        stage_bytes = max(min(chunk, job.header.data_bytes), 1)
        _read_staged_cuda(job, data_start, job.buffer, job.pieces, stage_bytes, buffers, device)
        return
    mapped = None if job.mapping is None else job.source.mapped_range(job.mapping, data_start + task.lo,
                                                                       task.hi - task.lo)
    if mapped is not None:
        stage = mapped
    else:
        stage = buffers.cpu(max(min(chunk, job.header.data_bytes), 1))
        job.source.pread_into(memoryview(stage.numpy())[: task.hi - task.lo], data_start + task.lo)  # type: ignore[arg-type]
    if mapped is not None:
        # From a mapping: hash the whole range first, then convert it (measured: fewer, larger conversions beat
        # hashing block by block between them, fp32 -> fp16 0.12 CPU s less per 3.4 GB)
        job.hash_mapped(task.lo, task.hi)
    if job.expected is None or mapped is not None:
        for p in task.batch or ():  # staged CPU reads always have their batch
            _convert_piece(job.buffer, stage, task.lo, p)
        return
    # Hash a checksum block, then convert the pieces in it while its bytes are still in the CPU's cache (a verified
    # staged file's pieces end on block boundaries; in a range of a mapped file read with pread because its pages
    # could not be faulted in, blocks cut by the range's ends are left to `check`).
    block, hashed = checksum.BLOCK_BYTES, task.lo
    for p in task.batch or ():
        if p.hi > hashed:
            end = min(task.hi, -(-(data_start + p.hi) // block) * block - data_start)
            job.checksum(hashed, end, stage[hashed - task.lo : end - task.lo])
            hashed = end
        _convert_piece(job.buffer, stage, task.lo, p)
    if hashed < task.hi:
        job.checksum(hashed, task.hi, stage[hashed - task.lo : task.hi - task.lo])


def read_safetensors(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    keep_fp32: Callable[[str], bool] | None = None,
    chunk_bytes: int = DEFAULT_READ_CHUNK_BYTES,
    concurrency: int = 1,
    shared: bool = True,
    read_bytes_per_s: float | None = None,
    buffers: ReadBuffers | None = None,
    shm: str = "memfd",
) -> LoadedFile:
    """Reads one safetensors file into a single buffer on `device` and returns it with its tensor layout.

    `dtype`: convert floating tensors (f16/bf16/f32/f64) to it while reading; None keeps the file's dtypes.
    `keep_fp32(name)`: tensors it accepts become float32 instead (diffusers/transformers `_keep_in_fp32_modules`).
    `concurrency`: ranges of the file read at once (see `read_files`).
    `shared`: on CPU, put the buffer in shared memory so it can be handed to another process without a copy.
    `read_bytes_per_s`: cap the read rate (a background preload should not starve the serving path's I/O).

    Raises NotFound (no such file), InvalidArgument (pickle suffix, bad device), DataLoss (not a valid or a
    truncated safetensors file), ResourceExhausted (shared memory too small), Unavailable (I/O error).
    """
    return read_files(
        [ReadRequest(path, keep_fp32)],
        device=device,
        dtype=dtype,
        chunk_bytes=chunk_bytes,
        concurrency=concurrency,
        shared=shared,
        read_bytes_per_s=read_bytes_per_s,
        buffers=buffers,
        shm=shm,
    )[0]


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgument.field("device", f"{device!r} is not a device name such as 'cpu' or 'cuda:0'") from None
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgument.field("device", f"{device!r}: only cpu and cuda devices are supported")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _layout(entries: Sequence[TensorEntry], targets: Sequence[torch.dtype]) -> tuple[tuple[TensorSpec, ...], int]:
    specs = []
    offset = 0
    for e, t in zip(entries, targets, strict=True):
        nbytes = e.nbytes // e.dtype.itemsize * t.itemsize
        specs.append(TensorSpec(e.name, t, e.shape, offset, nbytes))
        offset = _align(offset + nbytes)
    return tuple(specs), offset


def _shm_fd(buffer: torch.Tensor) -> int | None:
    """The descriptor of a shared buffer's memory file (file_descriptor sharing strategy), or None."""
    if not hasattr(os, "sendfile") or get_sharing_strategy() != "file_descriptor" or not buffer.is_shared():
        return None
    try:
        fd, _size = buffer.untyped_storage()._share_fd_cpu_()
    except (AttributeError, RuntimeError):
        return None
    return fd


def _convert_piece(out: torch.Tensor, stage: torch.Tensor, start: int, p: _Piece) -> None:
    """Copies (converting) one piece from the staging chunk (which holds the file from byte `start`) to `out`."""
    src_item, dst_item = p.entry.dtype.itemsize, p.spec.dtype.itemsize
    src = stage[p.lo - start : p.hi - start]
    if src.data_ptr() % src_item or src.storage_offset() % src_item:
        src = src.clone()  # a tensor misaligned in the file: realign before reinterpreting the bytes
    first = (p.lo - p.entry.begin) // src_item
    count = (p.hi - p.lo) // src_item
    dst = out[p.spec.offset + first * dst_item : p.spec.offset + (first + count) * dst_item]
    dst.view(p.spec.dtype).copy_(src.view(p.entry.dtype), non_blocking=True)


def _read_staged_cuda(
    job: _Job,
    data_start: int,
    out: torch.Tensor,
    pieces: list[_Piece],
    chunk: int,
    buffers: ReadBuffers,
    device: torch.device,
) -> None:
    stream = buffers.stream(device)
    events = [torch.cuda.Event(), torch.cuda.Event()]
    used = [False, False]
    # `out` and the staging buffers were allocated on the current stream: the side stream writes them only after
    # what is queued there (a previous user of those blocks) is done.
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(stream):
            for i, (start, end, batch) in enumerate(_batches(pieces, chunk)):
                slot = i % 2
                if used[slot]:
                    events[slot].synchronize()  # the copy out of this pinned buffer two batches ago must be done
                pinned = buffers.pinned(slot, chunk)
                staging = buffers.device(device, slot, chunk)
                job.source.pread_into(memoryview(pinned.numpy())[: end - start],  # type: ignore[arg-type]
                                      data_start + start)
                job.feed(pinned[: end - start])
                staging[: end - start].copy_(pinned[: end - start], non_blocking=True)
                for p in batch:
                    _convert_piece(out, staging, start, p)
                events[slot].record(stream)
                used[slot] = True
    finally:
        # Everything was queued on the side stream; wait here so the buffer is complete before anyone (the parent
        # via IPC included) reads it on another stream, and, when a read failed part way, so no queued copy lands
        # in `out` after it is freed and handed to another allocation.
        stream.synchronize()


# --------------------------------------------------------------------------------------------------------------
# mapping


def module_predicate(patterns: Sequence[str]) -> Callable[[str], bool] | None:
    """`keep_fp32` for read_files from module names (skeleton.keep_fp32_modules): a tensor whose dotted name has
    one of them as a part."""
    if not patterns:
        return None
    wanted = frozenset(patterns)
    return lambda name: any(part in wanted for part in name.split("."))


def keeps_dtypes(
    header: SafetensorsHeader, dtype: torch.dtype | None, keep_fp32: Callable[[str], bool] | None = None
) -> bool:
    """Whether every tensor of the file is wanted in the dtype it is stored in, at an address its dtype allows:
    then the file's own bytes are the weights, and it can be mapped (`map_safetensors`) instead of read."""
    return all(
        _target_dtype(e, dtype, keep_fp32) == e.dtype and (header.data_start + e.begin) % e.dtype.itemsize == 0
        for e in header.tensors
    )


def map_safetensors(path: str | Path) -> LoadedFile:
    """The file's data section as a copy-on-write mapping of the file (MAP_PRIVATE): nothing is copied or
    allocated, the pages are the page cache's, shared with every process that maps the same file, and a write to
    a tensor (a LoRA fuse, say) makes a private copy of that page instead of changing the file. What
    `from_pretrained` does on CPU; for a file system with a reliable page cache only (a node-local disk, never
    NFS). `populate` reads the pages in ahead of use. Raises what `read_safetensors` raises."""
    path = Path(path)
    stats = ReadStats(files=1)
    with _open(path) as f:
        header = _parse_header(path, f)
        st = os.fstat(f.fileno())
        if header.data_bytes == 0:
            buffer = torch.empty(0, dtype=torch.uint8)
        else:
            try:
                mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as err:
                raise Unavailable(f"cannot map weight file {path}: {err.strerror}") from None
            # the tensor keeps `mapped` alive; the views start at the data section
            buffer = torch.frombuffer(mapped, dtype=torch.uint8)[header.data_start :]
    specs = tuple(TensorSpec(e.name, e.dtype, e.shape, e.begin, e.nbytes) for e in header.tensors)
    stats.bytes_out = header.data_bytes
    return LoadedFile(str(path), buffer, specs, header.metadata, stats, data_start=header.data_start,
                      identity=(st.st_dev, st.st_ino))


_MADV_POPULATE_READ = 22  # Linux 5.14+: fault a range in (reading it from disk if needed) in one call
_POPULATE_RANGE_BYTES = 64 * 1024 * 1024


def populate(buffers: Sequence[torch.Tensor], concurrency: int = DEFAULT_READ_CONCURRENCY,
             read_bytes_per_s: float | None = None) -> int:
    """Maps every page of the CPU buffers into this process now, `concurrency` ranges at a time: for a file
    mapping this reads the file in (parallel streams), for shared memory it maps pages the preloader wrote. So the
    first denoising step does not take ~1 page fault per 4 kB (measured +0.35 s on an SD 1.5 UNet's first
    forward). Uses madvise(MADV_POPULATE_READ), else touches one byte per page. `read_bytes_per_s` paces it as
    `read_files` paces reads. Returns the bytes populated."""
    ranges = []
    for buf in buffers:
        if buf.device.type != "cpu" or not buf.numel():
            continue
        flat = buf.view(torch.uint8) if buf.dtype != torch.uint8 else buf
        n = flat.numel() * flat.element_size()
        ranges += [flat[lo : lo + _POPULATE_RANGE_BYTES] for lo in range(0, n, _POPULATE_RANGE_BYTES)]

    cap = _RateCap(read_bytes_per_s)

    def fault_in(_: int, part: torch.Tensor) -> None:
        if not _madvise_populate(part):
            part[::PAGE_BYTES].sum()  # an older kernel: touch one byte per page
        cap.account(part.numel())

    _on_threads(ranges, concurrency, "hotslot-populate", fault_in)
    return sum(r.numel() for r in ranges)


def verify_mapped(files: Sequence[LoadedFile], concurrency: int = DEFAULT_READ_CONCURRENCY,
                  read_bytes_per_s: float | None = None) -> int:
    """Checks mapped files (`map_safetensors`) that carry a recorded checksum against it, `concurrency` ranges at
    a time: hashing the mapped pages reads them in, so it also does what `populate` does for them (and is paced
    by `read_bytes_per_s` as `populate` is). Raises CorruptRead naming the first file that does not match. Returns
    the bytes checked."""
    checked = [(f, expected) for f in files
               if checksum.available() and (expected := checksum.read_recorded(f.path)) is not None]
    digests: list[dict[int, int]] = []
    work_items = []  # (file index, first block, last block + 1)
    per_item = max(_POPULATE_RANGE_BYTES // checksum.BLOCK_BYTES, 1)
    for i, (f, _) in enumerate(checked):
        with open(f.path, "rb", buffering=0) as raw:
            head = raw.read(f.data_start)
        digests.append({})
        n = checksum.blocks(f.data_start + f.buffer.numel())
        work_items += [(i, head, k, min(k + per_item, n)) for k in range(0, n, per_item)]
    block = checksum.BLOCK_BYTES
    cap = _RateCap(read_bytes_per_s)

    def hash_blocks(_: int, item: tuple[int, bytes, int, int]) -> None:
        i, head, first, last = item
        f = checked[i][0]
        start, size = f.data_start, f.data_start + f.buffer.numel()
        lo, hi = max(first * block - start, 0), max(min(last * block, size) - start, 0)
        if hi > lo:
            _madvise_populate(f.buffer[lo:hi])
        for k in range(first, last):
            a, b = k * block, min((k + 1) * block, size)
            parts: list[bytes | torch.Tensor] = [head[a:b]] if a < start else []
            parts.append(f.buffer[max(a - start, 0) : max(b - start, 0)])
            digests[i][k] = checksum.block_digest(*parts)
        cap.account(hi - lo)

    _on_threads(work_items, concurrency, "hotslot-verify", hash_blocks)
    for (f, expected), found in zip(checked, digests, strict=True):
        if checksum.root(found, f.data_start + f.buffer.numel()) != expected:
            raise CorruptRead.of(f.path)
        f.resident = True  # hashing faulted every page in
    return sum(f.data_start + f.buffer.numel() for f, _ in checked)


def verify_paths(files: Sequence[tuple[str, tuple[int, int] | None]], concurrency: int = DEFAULT_READ_CONCURRENCY,
                 read_bytes_per_s: float | None = None) -> int:
    """`verify_mapped` for files another process has mapped (the preloader checks the executor's mapped files, so
    the hashing runs on another core, outside the executor's interpreter): maps each (path, identity) here and
    checks it. `identity` is the (st_dev, st_ino) the other process mapped: a path that names another file now
    (a corrupt blob replaced by its refetch in between) raises FailedPrecondition, since checking that file would
    say nothing of the bytes the other process holds. Raises CorruptRead as verify_mapped does. Returns the bytes
    checked."""
    mapped = []
    for path, identity in files:
        f = map_safetensors(path)
        if identity is not None and f.identity != tuple(identity):
            raise FailedPrecondition(f"{path} is not the file that was mapped (replaced since); check it there")
        mapped.append(f)
    return verify_mapped(mapped, concurrency, read_bytes_per_s)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _madvise_populate(part: torch.Tensor) -> bool:
    libc = _libc()
    if libc is None:
        return False
    addr = part.data_ptr()
    start = addr - addr % PAGE_BYTES
    # ctypes releases the GIL for the call, so several ranges fault in at once
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(part.numel() + addr - start),
                        _MADV_POPULATE_READ) == 0


def load_file(path: str | Path, **kwargs) -> dict[str, torch.Tensor]:
    """`read_safetensors(path, **kwargs).tensors()`: a drop-in for `safetensors.torch.load_file`."""
    return read_safetensors(path, **kwargs).tensors()
