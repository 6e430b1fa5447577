"""The fast checksum that lets a reader notice a corrupted cached file while it reads it (no second pass).

The storage-cache computes it for every blob beside the sha256 when it fills it, and records it on the blob's
inode as the extended attribute `user.hotslot.xxh3` (`<block bytes>:<16 hex digits>`). A view's files are hard
links to the blobs (or symlinks where hard links are impossible), so whoever opens a view file finds the checksum
on it, with no index to consult and nothing to pass along. A file without the attribute (a filesystem without
user xattrs, a blob cached before checksums existed) is read unchecked.

The checksum: the file is cut into BLOCK_BYTES blocks at offsets 0, B, 2B, ...; each block gets its XXH3-64, and
the checksum is the XXH3-64 of those digests (8 bytes little-endian each, in order). Blocks let the reader's
threads hash whichever ranges they read, in any order, and a block split between two reads is simply read
again. Why XXH3: bench/bench_verify.py measured it at ~6x hardware CRC-32C (google-crc32c) and ~30x zlib's
crc32 per core; a sha256 would cost ~0.6 s of CPU per GB, as much as the read. xxhash releases the GIL.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

try:
    import xxhash
except ImportError:  # pragma: no cover - a declared dependency
    xxhash = None  # type: ignore[assignment]

__all__ = ["BLOCK_BYTES", "XATTR", "BlockHasher", "available", "block_digest", "blocks", "read_recorded", "record",
           "root"]

XATTR = "user.hotslot.xxh3"
BLOCK_BYTES = 1024 * 1024


def available() -> bool:
    return xxhash is not None


def _bytes(data: Any) -> Any:
    """A buffer xxhash takes without a copy (torch tensors through numpy)."""
    return data.numpy() if hasattr(data, "numpy") else data


def block_digest(*parts: Any) -> int:
    """XXH3-64 of the parts' bytes, one after the other (one block, possibly split across buffers)."""
    h = xxhash.xxh3_64()
    for part in parts:
        h.update(_bytes(part))
    return h.intdigest()


def blocks(size: int) -> int:
    """How many blocks a file of `size` bytes has (an empty file has one, empty block)."""
    return max(-(-size // BLOCK_BYTES), 1)


def root(digests: Mapping[int, int] | list[int], size: int) -> int | None:
    """The file's checksum from its block digests; None when a block of the `size`-byte file is missing."""
    n = blocks(size)
    if isinstance(digests, Mapping):
        if len(digests) != n or any(k not in digests for k in range(n)):
            return None
        digests = [digests[k] for k in range(n)]
    elif len(digests) != n:
        return None
    return xxhash.xxh3_64_intdigest(np.asarray(digests, dtype="<u8").tobytes())


class BlockHasher:
    """The checksum of bytes fed in order (a fill, an upload, one reading thread): `update`, then `value()`."""

    def __init__(self) -> None:
        self.digests: list[int] = []
        self.size = 0
        self._block = xxhash.xxh3_64()
        self._filled = 0

    def update(self, data: Any) -> None:
        view = memoryview(_bytes(data)).cast("B")
        pos = 0
        while pos < len(view):
            take = min(BLOCK_BYTES - self._filled, len(view) - pos)
            self._block.update(view[pos : pos + take])
            self._filled += take
            pos += take
            if self._filled == BLOCK_BYTES:
                self.digests.append(self._block.intdigest())
                self._block.reset()
                self._filled = 0
        self.size += len(view)

    def value(self) -> int:
        digests = list(self.digests)
        if self._filled or not digests:
            digests.append(self._block.intdigest())
        value = root(digests, self.size)
        if value is None:  # every block is there by construction
            raise AssertionError("a block digest is missing")
        return value


def record(fd_or_path: int | str | os.PathLike[str], value: int) -> bool:
    """Records `value` on the file as its checksum; False where the filesystem keeps no user xattrs."""
    try:
        os.setxattr(fd_or_path, XATTR, f"{BLOCK_BYTES}:{value:016x}".encode())
    except OSError:
        return False
    return True


def read_recorded(fd_or_path: int | str | os.PathLike[str]) -> int | None:
    """The checksum recorded on the file, or None when it has none (or one of another block size)."""
    try:
        raw = os.getxattr(fd_or_path, XATTR)
    except OSError:
        return None
    try:
        block, value = raw.decode("ascii").split(":")
        return int(value, 16) if int(block) == BLOCK_BYTES else None
    except (UnicodeDecodeError, ValueError):
        return None


def of_file(fd: int, size: int | None = None, chunk_bytes: int = 16 * BLOCK_BYTES) -> int:
    """The checksum of an open file, read from the start (storage-cache re-records, tests, benchmarks)."""
    hasher = BlockHasher()
    size = os.fstat(fd).st_size if size is None else size
    pos = 0
    while pos < size:
        data = os.pread(fd, min(chunk_bytes, size - pos), pos)
        if not data:
            break
        hasher.update(data)
        pos += len(data)
    return hasher.value()
