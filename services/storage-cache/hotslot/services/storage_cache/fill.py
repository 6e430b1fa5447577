"""Copies one backing file into a temp file of the blob store and hashes it, for the cold fill of Ensure.

Where the kernel can copy between the two files (copy_file_range on one filesystem; sendfile across filesystems,
as from an NFS mount to a local disk) the bytes never enter user space on the way: each chunk is copied in the
kernel and then hashed from the local copy's page cache on a second thread (through a mapping of the local temp
file, never of the backing file), so hashing chunk k overlaps the copy of chunk k+1. Hashing the local copy, not
the source, means the digest is that of the bytes the blob will hold, so a copy that went wrong in any way is
caught like a corrupt source. Where no kernel copy works, chunks are read into user-space buffers, written, and
hashed from the same buffers (also the bytes written), one chunk behind.

Either way each byte is hashed once, and the local copy stays in the page cache: the executor reads it next. With
fsync on, each hashed chunk's writeback is started at once (sync_file_range), so the disk writes while the copy
goes on and the final fsync has little left to wait for."""
from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import hashlib
import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import BinaryIO

from hotslot import checksum

from .backing import write_all

# Page tables of a chunk's mapping filled at once instead of a fault per 64 KiB (Linux only).
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
# Chunks the hashing thread may lag behind the copy: one buffer being filled while the others are hashed.
COPY_BUFFERS = 3
# Errors of a kernel copy that mean "not between these two files" (another filesystem, a filesystem or kernel
# without it, a sandbox that forbids the call) rather than a failed read or write: the next method is tried.
_NO_KERNEL_COPY = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EPERM, errno.ENOTTY}
)


class CopyMethod(enum.Enum):
    """How the bytes went from the backing file to the local copy, best first."""

    COPY_FILE_RANGE = "copy_file_range"
    SENDFILE = "sendfile"
    READ_WRITE = "read_write"


def _copy_file_range(src: int, dst: int, count: int) -> int:
    return os.copy_file_range(src, dst, count)


def _sendfile(src: int, dst: int, count: int) -> int:
    return os.sendfile(dst, src, None, count)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux; the os module lacks it), or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait for it


# Both continue from (and advance) the current offsets of the two files, so any method can take over mid-file.
_KERNEL_COPIES: tuple[tuple[CopyMethod, Callable[[int, int, int], int]], ...] = (
    (CopyMethod.COPY_FILE_RANGE, _copy_file_range),
    (CopyMethod.SENDFILE, _sendfile),
)


class HashingCopy:
    """One copy with its sha256, computed on a thread of its own over a ring of COPY_BUFFERS reused buffers of
    `chunk_bytes`. Use it as a context manager: leaving it waits for the hashing thread."""

    def __init__(self, chunk_bytes: int, *, start_writeback: bool = False) -> None:
        self.chunk_bytes = chunk_bytes
        # With fsync on, each chunk copied in the kernel is sent to the disk once hashed, so the final fsync
        # waits for the last chunks only instead of the whole file.
        self.start_writeback = start_writeback and _SYNC_FILE_RANGE is not None
        self.method = CopyMethod.READ_WRITE
        self._digest = hashlib.sha256()
        self._blocks = checksum.BlockHasher()  # beside the sha256: what readers check while they read
        self._buffers = [bytearray(chunk_bytes) for _ in range(COPY_BUFFERS)]
        self._pending: list[Future[None] | None] = [None] * COPY_BUFFERS
        self._slot = 0
        # hashlib releases the GIL on large buffers, as file I/O does: the copy and the hashing run in parallel.
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="sha256")

    def __enter__(self) -> HashingCopy:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._hasher.shutdown(wait=True, cancel_futures=True)

    def copy(self, reader: BinaryIO, out: BinaryIO, limit: int, report: Callable[[int], None]) -> int:
        """Copies up to `limit` bytes from `reader` to `out` (a new file open for reading and writing) and returns
        how many; the last chunks may still be hashing (hexdigest waits for them). A reader with a file descriptor
        (a real file) is copied in the kernel where possible."""
        kernel = list(_KERNEL_COPIES) if _has_fileno(reader) else []
        total = 0
        while total < limit:
            want = min(self.chunk_bytes, limit - total)
            if kernel:
                method, kernel_copy = kernel[0]
                try:
                    n = kernel_copy(reader.fileno(), out.fileno(), want)
                except OSError as error:
                    if error.errno not in _NO_KERNEL_COPY:
                        raise
                    del kernel[0]
                    continue
                if not n:
                    # End of file, or a filesystem whose kernel copy reports 0 for files it cannot copy (procfs
                    # and some FUSE mounts do): a read says which.
                    kernel.clear()
                    continue
                self.method = method
                self._hash_written(out.fileno(), total, n)
            else:
                buffer = self._free_buffer()
                # The backing stores open files in binary mode: io.BufferedReader has readinto, which
                # typing.BinaryIO does not declare.
                n = reader.readinto(buffer[:want])  # type: ignore[attr-defined]
                if not n:
                    break
                write_all(out, buffer[:n])
                self._submit(self._hash_buffer, out.fileno(), total, buffer[:n])
            total += n
            report(total)
        return total

    def hexdigest(self) -> str:
        """The sha256 of every byte copied, once the hashing thread has caught up."""
        for future in self._pending:
            if future is not None:
                future.result()
        return self._digest.hexdigest()

    def read_checksum(self) -> int:
        """The read checksum (hotslot.checksum) of every byte copied, once the hashing thread has caught up."""
        self.hexdigest()
        return self._blocks.value()

    def _update(self, data: memoryview) -> None:
        self._digest.update(data)
        self._blocks.update(data)

    def _free_buffer(self) -> memoryview:
        """The next buffer of the ring, once the hashing thread is done with what it held."""
        future = self._pending[self._slot]
        if future is not None:
            future.result()
        return memoryview(self._buffers[self._slot])

    def _submit(self, fn: Callable[..., None], *args: object) -> None:
        # One hashing thread: chunks are hashed in the order they were copied.
        self._pending[self._slot] = self._hasher.submit(fn, *args)
        self._slot = (self._slot + 1) % COPY_BUFFERS

    def _hash_written(self, fd: int, offset: int, n: int) -> None:
        self._submit(self._read_and_hash, fd, offset, self._free_buffer()[:n])

    def _read_and_hash(self, fd: int, offset: int, view: memoryview) -> None:
        """Hashes bytes just written to the local copy, straight from its page cache through a mapping (no copy
        into user space; the file is local and ours alone until it is renamed into place, so nothing truncates
        it under the mapping), or read into `view` where the filesystem cannot map it."""
        n = len(view)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapping = mmap.mmap(fd, offset + n - start, flags=mmap.MAP_SHARED | _MAP_POPULATE,
                                prot=mmap.PROT_READ, offset=start)
        except OSError:
            self._pread_and_hash(fd, offset, view)
        else:
            try:
                with memoryview(mapping) as mapped:
                    self._update(mapped[offset - start:])
            finally:
                mapping.close()
        self._start_writeback(fd, offset, n)

    def _pread_and_hash(self, fd: int, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if not n:
                raise OSError(errno.EIO, f"the local copy ended at {offset + done} bytes, before the bytes copied")
            done += n
        self._update(view)

    def _hash_buffer(self, fd: int, offset: int, chunk: memoryview) -> None:
        """Hashes a chunk read into user space, from the buffer it was written from."""
        self._update(chunk)
        self._start_writeback(fd, offset, len(chunk))

    def _start_writeback(self, fd: int, offset: int, n: int) -> None:
        if self.start_writeback and _SYNC_FILE_RANGE is not None:
            _SYNC_FILE_RANGE(fd, offset, n, _SYNC_FILE_RANGE_WRITE)  # a hint: a failure shows in the fsync


def _has_fileno(reader: BinaryIO) -> bool:
    try:
        reader.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both OSError and ValueError
        return False
    return True
