"""Reads safetensors files with large sequential reads straight into one tensor buffer per file.

Why not `safetensors.torch.load_file`: it mmaps the file (slow and fragile on NFS, and page-cache backed memory
cannot be handed to another process) and allocates per tensor. Here the header is parsed by hand (8-byte
little-endian length + JSON), the data section is read with `readinto` in big chunks into ONE preallocated uint8
buffer per file, and the tensors are views into it (`tensor_views`). One buffer per file means one shared-memory
handle (CPU) or one CUDA IPC handle per file when the preloader hands the weights to its parent.

- CPU: the buffer is a torch uint8 tensor in shared memory (`UntypedStorage._new_shared`, no copy); the file's
  bytes land in it directly unless a dtype conversion (or a misaligned tensor) needs a staging chunk.
- CUDA: chunks are read into a pinned host buffer, copied to the device with `non_blocking=True` and converted
  there; two pinned buffers alternate so the next read overlaps the previous copy.
- dtype conversion happens once, here (e.g. an fp32 file -> fp16 weights), chunk by chunk, so a conversion never
  holds a second full copy of the file in memory.

Nothing is unpickled: the header is JSON and the data section is raw little-endian numbers.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch.multiprocessing import get_sharing_strategy

from hotslot.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from hotslot.manifest import PICKLE_SUFFIXES

__all__ = [
    "DEFAULT_READ_CHUNK_BYTES",
    "LoadedFile",
    "ReadBuffers",
    "ReadStats",
    "SafetensorsHeader",
    "TensorEntry",
    "TensorSpec",
    "load_file",
    "read_header",
    "read_safetensors",
    "tensor_views",
]

# One read (and one host->device copy) moves this many bytes. Large enough that syscall and copy-launch overhead
# vanish, small enough that the staging buffers of a conversion stay small.
DEFAULT_READ_CHUNK_BYTES = 16 * 1024 * 1024
MIN_READ_CHUNK_BYTES = 4096
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
        raise InvalidArgument(f"{path.name} is a pickle-format weight file; hotslot loads safetensors only")
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
    conversions, and on CUDA two pinned host chunks plus two device chunks that alternate."""

    def __init__(self) -> None:
        self._cpu: torch.Tensor | None = None
        self._pinned: dict[int, torch.Tensor] = {}
        self._device: dict[tuple[str, int], torch.Tensor] = {}
        self._streams: dict[str, torch.cuda.Stream] = {}

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


def _allocate(nbytes: int, device: torch.device, shared: bool, stats: ReadStats) -> torch.Tensor:
    """The output buffer of one file: shared memory on CPU (when `shared`), device memory on CUDA."""
    t0 = time.perf_counter()
    try:
        return _allocate_untimed(nbytes, device, shared)
    finally:
        stats.alloc_s += time.perf_counter() - t0


def _allocate_untimed(nbytes: int, device: torch.device, shared: bool) -> torch.Tensor:
    if device.type == "cuda":
        try:
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        except torch.OutOfMemoryError:
            raise ResourceExhausted(f"{device} has no room for {nbytes} more bytes of weights") from None
    if not shared or nbytes == 0:  # an empty storage cannot be mapped; it has nothing to share either
        return torch.empty(nbytes, dtype=torch.uint8)
    free = _shm_free_bytes()
    advice = f"give the executor a larger {SHM_DIR} (Kubernetes: an emptyDir volume with medium: Memory there)"
    # torch reserves the pages up front (so a full tmpfs cannot SIGBUS us later) but fails with an opaque
    # RuntimeError; checking first gives an error the operator can act on.
    if free is not None and nbytes > free:
        raise ResourceExhausted(f"shared memory is full: {nbytes} bytes needed, {free} free in {SHM_DIR}; {advice}")
    try:
        storage = torch.UntypedStorage._new_shared(nbytes)
    except RuntimeError as err:
        raise ResourceExhausted(f"cannot allocate {nbytes} bytes of shared memory ({err}); {advice}") from None
    return torch.empty(0, dtype=torch.uint8).set_(storage)


# --------------------------------------------------------------------------------------------------------------
# reading


class _Reader:
    """Sequential chunked reads from one open file, with timing and an optional rate cap."""

    def __init__(self, path: Path, f, stats: ReadStats, read_bytes_per_s: float | None) -> None:
        self.path, self.f, self.stats = path, f, stats
        self.rate = read_bytes_per_s
        self.started = time.perf_counter()
        self.done = 0

    def readinto(self, view: memoryview) -> None:
        t0 = time.perf_counter()
        pos = 0
        while pos < len(view):
            try:
                k = self.f.readinto(view[pos:])
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
            k = os.sendfile(out_fd, self.f.fileno(), in_offset + pos, nbytes - pos)
            if not k:
                raise self._truncated()
            pos += k
        self._account(pos, t0)

    def _truncated(self) -> DataLoss:
        return _corrupt(self.path, "file ended before its data section did (truncated or changed)")

    def _account(self, nbytes: int, t0: float) -> None:
        self.stats.read_s += time.perf_counter() - t0
        self.stats.bytes_read += nbytes
        self.done += nbytes
        if self.rate:
            # sleep off whatever we are ahead of the allowed rate, so a background preload leaves I/O to others
            ahead = self.done / self.rate - (time.perf_counter() - self.started)
            if ahead > 0:
                time.sleep(ahead)
                self.stats.throttle_s += ahead


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


def _batches(pieces: list[_Piece], chunk: int) -> Iterator[tuple[int, int, list[_Piece]]]:
    """Groups consecutive pieces into file ranges of at most `chunk` bytes (the file is contiguous)."""
    batch: list[_Piece] = []
    start = 0
    for p in pieces:
        if batch and p.hi - start > chunk:
            yield start, batch[-1].hi, batch
            batch = []
        if not batch:
            start = p.lo
        batch.append(p)
    if batch:
        yield start, batch[-1].hi, batch


def _pieces(entries: Sequence[TensorEntry], specs: Sequence[TensorSpec], chunk: int) -> list[_Piece]:
    """Splits tensors larger than a chunk at element boundaries, so every piece fits one staging chunk."""
    out = []
    for e, s in zip(entries, specs, strict=True):
        step = max(chunk // e.dtype.itemsize, 1) * e.dtype.itemsize
        lo = e.begin
        while True:
            hi = min(lo + step, e.end)
            out.append(_Piece(e, s, lo, hi))
            lo = hi
            if lo >= e.end:
                break
    return out


def read_safetensors(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    keep_fp32: Callable[[str], bool] | None = None,
    chunk_bytes: int = DEFAULT_READ_CHUNK_BYTES,
    shared: bool = True,
    read_bytes_per_s: float | None = None,
    buffers: ReadBuffers | None = None,
) -> LoadedFile:
    """Reads one safetensors file into a single buffer on `device` and returns it with its tensor layout.

    `dtype`: convert floating tensors (f16/bf16/f32/f64) to it while reading; None keeps the file's dtypes.
    `keep_fp32(name)`: tensors it accepts become float32 instead (diffusers/transformers `_keep_in_fp32_modules`).
    `shared`: on CPU, put the buffer in shared memory so it can be handed to another process without a copy.
    `read_bytes_per_s`: cap the read rate (a background preload should not starve the serving path's I/O).

    Raises NotFound (no such file), InvalidArgument (pickle suffix, bad device), DataLoss (not a valid or a
    truncated safetensors file), ResourceExhausted (shared memory too small), Unavailable (I/O error).
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; big-endian hosts are not supported")
    if chunk_bytes < MIN_READ_CHUNK_BYTES:
        raise InvalidArgument.field("chunk_bytes", f"must be at least {MIN_READ_CHUNK_BYTES}, got {chunk_bytes}")
    device = _device(device)
    path = Path(path)
    stats = ReadStats(files=1)
    t_start = time.perf_counter()
    with _open(path) as f:
        header = _parse_header(path, f)
        if hasattr(os, "posix_fadvise"):  # tell the kernel to read ahead aggressively: we read front to back
            os.posix_fadvise(f.fileno(), header.data_start, header.data_bytes, os.POSIX_FADV_SEQUENTIAL)
        reader = _Reader(path, f, stats, read_bytes_per_s)
        targets = [_target_dtype(e, dtype, keep_fp32) for e in header.tensors]
        direct = device.type == "cpu" and all(
            t == e.dtype and (header.data_start + e.begin) % e.dtype.itemsize == 0
            for t, e in zip(targets, header.tensors, strict=True)
        )
        if direct:
            # The data section is already the buffer we want: read it in place, at the file's page offset (see
            # PAGE_BYTES); the views use the file's offsets.
            size = header.data_bytes + PAGE_BYTES - 1 if header.data_bytes else 0
            buffer = _allocate(size, device, shared, stats)
            shift = (header.data_start - buffer.data_ptr()) % PAGE_BYTES if size else 0
            specs = tuple(TensorSpec(e.name, e.dtype, e.shape, shift + e.begin, e.nbytes) for e in header.tensors)
            _read_direct(reader, buffer, shift, header.data_start, header.data_bytes, chunk_bytes)
        else:
            specs, total = _layout(header.tensors, targets)
            buffer = _allocate(total, device, shared, stats)
            # staging chunks need not exceed the file: a 100 kB text encoder should not allocate 16 MiB to read it
            stage = max(min(chunk_bytes, header.data_bytes), 1)
            pieces = _pieces(header.tensors, specs, stage)
            buffers = buffers or ReadBuffers()
            if device.type == "cuda":
                _read_staged_cuda(reader, buffer, pieces, stage, buffers, device)
            else:
                _read_staged_cpu(reader, buffer, pieces, stage, buffers)
    stats.bytes_out = sum(spec.nbytes for spec in specs)
    stats.convert_s = max(time.perf_counter() - t_start - stats.read_s - stats.throttle_s - stats.alloc_s, 0.0)
    return LoadedFile(str(path), buffer, specs, header.metadata, stats)


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


def _read_direct(
    reader: _Reader, buffer: torch.Tensor, shift: int, data_start: int, nbytes: int, chunk: int
) -> None:
    """The data section into buffer[shift:shift + nbytes]. Into shared memory it goes by `sendfile` to the
    memory file's descriptor: the kernel copies page cache to shared-memory pages without faulting each 4 kB page
    into this process (measured ~1.6x faster than `readinto` here); otherwise by `readinto` in chunks."""
    if nbytes == 0:
        return
    pos = 0
    fd = _shm_fd(buffer)
    if fd is not None:
        try:
            os.lseek(fd, shift, os.SEEK_SET)
            while pos < nbytes:
                step = min(chunk, nbytes - pos)
                reader.sendfile(fd, data_start + pos, step)
                pos += step
            return
        except OSError:
            reader.f.seek(data_start + pos)  # a file system without sendfile support: read the rest below
    view = memoryview(buffer[shift : shift + nbytes].numpy())
    while pos < nbytes:
        step = min(chunk, nbytes - pos)
        reader.readinto(view[pos : pos + step])
        pos += step


def _convert_piece(out: torch.Tensor, stage: torch.Tensor, start: int, p: _Piece) -> None:
    """Copies (converting) one piece from the staging chunk (which holds the file from byte `start`) to `out`."""
    src_item, dst_item = p.entry.dtype.itemsize, p.spec.dtype.itemsize
    src = stage[p.lo - start : p.hi - start]
    if (p.lo - start) % src_item:
        src = src.clone()  # a tensor misaligned in the file: realign before reinterpreting the bytes
    first = (p.lo - p.entry.begin) // src_item
    count = (p.hi - p.lo) // src_item
    dst = out[p.spec.offset + first * dst_item : p.spec.offset + (first + count) * dst_item]
    dst.view(p.spec.dtype).copy_(src.view(p.entry.dtype), non_blocking=True)


def _read_staged_cpu(
    reader: _Reader, out: torch.Tensor, pieces: list[_Piece], chunk: int, buffers: ReadBuffers
) -> None:
    stage = buffers.cpu(chunk)
    view = memoryview(stage.numpy())
    for start, end, batch in _batches(pieces, chunk):
        reader.readinto(view[: end - start])
        for p in batch:
            _convert_piece(out, stage, start, p)


def _read_staged_cuda(
    reader: _Reader, out: torch.Tensor, pieces: list[_Piece], chunk: int, buffers: ReadBuffers, device: torch.device
) -> None:
    stream = buffers.stream(device)
    events = [torch.cuda.Event(), torch.cuda.Event()]
    used = [False, False]
    with torch.cuda.stream(stream):
        for i, (start, end, batch) in enumerate(_batches(pieces, chunk)):
            slot = i % 2
            if used[slot]:
                events[slot].synchronize()  # the copy out of this pinned buffer two batches ago must be done
            pinned = buffers.pinned(slot, chunk)
            staging = buffers.device(device, slot, chunk)
            reader.readinto(memoryview(pinned.numpy())[: end - start])
            staging[: end - start].copy_(pinned[: end - start], non_blocking=True)
            for p in batch:
                _convert_piece(out, staging, start, p)
            events[slot].record(stream)
            used[slot] = True
    # Everything was queued on the side stream; wait here so the buffer is complete before anyone (the parent via
    # IPC included) reads it on another stream.
    stream.synchronize()


def load_file(path: str | Path, **kwargs) -> dict[str, torch.Tensor]:
    """`read_safetensors(path, **kwargs).tensors()`: a drop-in for `safetensors.torch.load_file`."""
    return read_safetensors(path, **kwargs).tensors()
