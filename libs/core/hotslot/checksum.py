"""The fast checksum that lets a reader notice a corrupted cached file while it reads it (no second pass).

The storage-cache computes a CRC-32C (Castagnoli) of every blob beside its sha256 when it fills it, and records it
on the blob's inode as the extended attribute `user.hotslot.crc32c` (8 lower-case hex digits). A view's files are
hard links to the blobs (or symlinks where hard links are impossible), so whoever opens a view file finds the
checksum on it, with no index to consult and nothing to pass along. A file without the attribute (a filesystem
without user xattrs, a blob cached before checksums existed) is read unchecked.

Why CRC-32C: hardware instructions (SSE 4.2, ARMv8 CRC) make it several GB/s per core (bench/bench_verify.py
measures it beside xxh3 and zlib's crc32), and CRCs combine: the reader checksums each range it reads, on
whichever thread reads it and in whatever order, and `combine` joins the ranges' values into the file's.
A sha256 would cost ~0.6 s of CPU per GB, as much as the read.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import numpy as np

try:
    import google_crc32c

    _FAST = google_crc32c.implementation == "c"
except ImportError:  # pragma: no cover - a declared dependency
    google_crc32c = None
    _FAST = False

__all__ = ["XATTR", "available", "combine", "crc32c", "read_recorded", "record"]

XATTR = "user.hotslot.crc32c"
# CRC-32C's polynomial 0x1EDC6F41 in the reflected (bit-reversed) form the computation uses
_POLY = 0x82F63B78


def available() -> bool:
    """Whether the hardware-backed implementation is installed (the pure-Python fallback is far too slow)."""
    return _FAST


def crc32c(data, value: int = 0) -> int:
    """The CRC-32C of `data` (bytes, a memoryview, a numpy array or a CPU torch tensor), continuing `value`.
    Releases the GIL for inputs of 1 MB or more, so reading threads checksum in parallel."""
    if hasattr(data, "numpy"):  # a torch tensor: its bytes, without a copy
        data = data.numpy()
    # The C extension takes buffers that need no release (bytes, numpy arrays), not memoryviews or bytearrays.
    arr = data if isinstance(data, (bytes, np.ndarray)) else np.frombuffer(data, dtype=np.uint8)
    if isinstance(arr, np.ndarray) and arr.dtype != np.uint8:
        arr = arr.view(np.uint8)
    return google_crc32c.extend(value, arr)


def _multiply(a: int, b: int) -> int:
    """a * b modulo the polynomial, both in the reflected representation (bit 31 is x^0)."""
    product = 0
    mask = 1 << 31
    while a:
        if a & mask:
            product ^= b
            a ^= mask
        mask >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


@functools.cache
def _power_of_two_shift(k: int) -> int:
    """x^(2^k) modulo the polynomial: x^1 for k=0, then squared."""
    if k == 0:
        return 1 << 30  # x^1
    half = _power_of_two_shift(k - 1)
    return _multiply(half, half)


def _shift(nbytes: int) -> int:
    """x^(8 * nbytes) modulo the polynomial."""
    result = 1 << 31  # x^0
    bits = nbytes * 8
    k = 0
    while bits:
        if bits & 1:
            result = _multiply(_power_of_two_shift(k), result)
        bits >>= 1
        k += 1
    return result


def combine(first: int, second: int, second_bytes: int) -> int:
    """The CRC-32C of A + B from crc32c(A), crc32c(B) and len(B)."""
    return _multiply(_shift(second_bytes), first) ^ second


def join(ranges: Iterable[tuple[int, int, int]]) -> tuple[int, int]:
    """(crc, end) of the ranges (start, end, crc) joined in order; ValueError if they leave a gap or overlap."""
    crc, position = 0, 0
    for start, end, value in sorted(ranges):
        if start != position:
            raise ValueError(f"ranges leave a gap or overlap at byte {position}")
        crc = combine(crc, value, end - start)
        position = end
    return crc, position


def record(fd_or_path: int | str | os.PathLike, value: int) -> bool:
    """Records `value` on the file as its checksum; False where the filesystem keeps no user xattrs."""
    try:
        os.setxattr(fd_or_path, XATTR, f"{value:08x}".encode())
    except OSError:
        return False
    return True


def read_recorded(fd_or_path: int | str | os.PathLike) -> int | None:
    """The checksum recorded on the file, or None when it has none (or an unreadable one)."""
    try:
        raw = os.getxattr(fd_or_path, XATTR)
    except OSError:
        return None
    try:
        return int(raw.decode("ascii"), 16)
    except (UnicodeDecodeError, ValueError):
        return None
