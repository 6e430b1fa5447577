"""Recycled private host memory for weights converted on the CPU.

A converted read writes every byte of fresh memory, and the first write to a fresh page costs a page fault and the
kernel zeroing the page: 0.2-0.9 s per GiB on a 2-core VM, more than the conversion itself (an fp16 -> fp32 SD 1.5
UNet, 3.4 GB out: 0.26 s into memory touched before, 0.9-1.0 s into fresh memory). torch returns a freed buffer of
that size to the kernel at once (glibc unmaps large blocks), so every miss of a CPU executor that converts pays
it again, although an evicted model has just freed as much.

`HostPool` keeps the memory of dropped weights, up to `limit_bytes`, and hands it to the next conversion. Memory
comes in arenas (anonymous private mappings); an allocation takes the smallest free extent that fits, in whole
`REGION_GRANULE_BYTES`, and leaves the rest of it free, so one arena serves weights of any sizes. An extent goes
back to the pool when the last tensor viewing it is gone (a weakref finalizer on the numpy array that torch's
tensor keeps alive), so nothing can be handed out while a pipeline still uses it, and merges with the free
extents beside it.

`reserve()` makes the pool's memory up front, faulted in (`MAP_POPULATE`), so that even the first conversion of a
fresh process writes to memory touched before: the cost moves from the first load to the executor's start, as
Triton's `--pinned-memory-pool-byte-size` does.

Beyond `limit_bytes` of free memory the pool gives pages back to the kernel: an arena with nothing in use is
unmapped, smallest first; otherwise free extents are released with `MADV_DONTNEED` and stay in the arena as cold
extents (handed out only when no warm one fits, and paying the first touch again).

Sized automatically (`grow_up_to`), the pool starts with a limit of 0 and `fit()` raises it to the size of each
load converted into it, up to `grow_up_to`: it keeps about one model's converted weights, the largest seen, which is
what the next miss needs, without the operator knowing the models' sizes.
"""
from __future__ import annotations

import mmap
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["REGION_GRANULE_BYTES", "HostPool"]

# Extents are multiples of this (the huge page size), so the memory of dropped weights fits any later weights.
REGION_GRANULE_BYTES = 2 * 1024 * 1024


@dataclass(eq=False)
class _Arena:
    region: mmap.mmap
    size: int
    live: int = 0  # bytes of extents handed out
    # Free extents (offset, size, warm), sorted by offset, neighbours of equal warmth merged.
    free: list[tuple[int, int, bool]] = field(default_factory=list)

    def warm_bytes(self) -> int:
        return sum(size for _, size, warm in self.free if warm)


def _granules(nbytes: int) -> int:
    return -(-max(nbytes, 1) // REGION_GRANULE_BYTES) * REGION_GRANULE_BYTES


class HostPool:
    """Private anonymous memory, recycled once its tensors are gone; thread-safe."""

    def __init__(self, limit_bytes: int, grow_up_to: int = 0) -> None:
        self.limit_bytes = limit_bytes
        self.grow_up_to = grow_up_to  # > 0: fit() raises limit_bytes to the largest load, up to this
        self._arenas: list[_Arena] = []  # oldest first; arenas with free extents or live ones
        self._lock = threading.Lock()
        self.reused = 0  # allocations served from memory the pool held
        self.created = 0  # allocations that made a new arena
        self.reserved_bytes = 0  # made up front by reserve()

    @property
    def free_bytes(self) -> int:
        """Free memory the pool holds faulted in (cold extents, already given back to the kernel, not counted)."""
        with self._lock:
            return sum(a.warm_bytes() for a in self._arenas)

    def reserve(self, nbytes: int | None = None) -> float:
        """Makes `nbytes` (default `limit_bytes`) of free, faulted-in memory now, in one arena; the seconds it took.
        Raises MemoryError when the kernel refuses the mapping."""
        size = _granules(self.limit_bytes if nbytes is None else nbytes)
        t0 = time.perf_counter()
        try:
            region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
        except OSError as err:
            raise MemoryError(f"cannot reserve {size} bytes of host memory for the host pool ({err})") from None
        with self._lock:
            self._arenas.append(_Arena(region, size, free=[(0, size, True)]))
            self.reserved_bytes += size
        return time.perf_counter() - t0

    def fit(self, sizes: Iterable[int]) -> int:
        """Automatic sizing: the buffers of one load (their sizes in bytes) were allocated from the pool, so keep
        as much free memory as that load took, when it is more than now and within `grow_up_to`. Returns the limit."""
        want = min(sum(_granules(n) for n in sizes if n), self.grow_up_to)
        with self._lock:
            self.limit_bytes = max(self.limit_bytes, want)
            return self.limit_bytes

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of `nbytes` over the smallest free extent that fits (faulted-in ones first), else over a
        new arena. Its contents are whatever the memory held: the caller overwrites every byte."""
        size = _granules(nbytes)
        with self._lock:
            found = self._take_locked(size)
            if found is None:
                self.created += 1
            else:
                self.reused += 1
        if found is None:
            arena = _Arena(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), size, live=size)
            with self._lock:
                self._arenas.append(arena)
            offset = 0
        else:
            arena, offset = found
        array = np.frombuffer(arena.region, dtype=np.uint8, count=nbytes, offset=offset)
        weakref.finalize(array, self._release, arena, offset, size)
        return torch.from_numpy(array)

    def _take_locked(self, size: int) -> tuple[_Arena, int] | None:
        best: tuple[bool, int, _Arena, int] | None = None  # (cold, extent size, arena, index)
        for arena in self._arenas:
            for i, (_, extent, warm) in enumerate(arena.free):
                if extent >= size and (best is None or (not warm, extent) < best[:2]):
                    best = (not warm, extent, arena, i)
        if best is None:
            return None
        _, extent, arena, i = best
        offset, _, warm = arena.free[i]
        if extent == size:
            del arena.free[i]
        else:
            arena.free[i] = (offset + size, extent - size, warm)
        arena.live += size
        return arena, offset

    def _release(self, arena: _Arena, offset: int, size: int) -> None:
        """The last tensor over `[offset, offset + size)` of `arena` is gone: keep it for the next allocation,
        within `limit_bytes`."""
        with self._lock:
            arena.live -= size
            _insert(arena.free, (offset, size, True))
            self._trim_locked(self.limit_bytes)

    def trim(self, keep_bytes: int = 0) -> int:
        """Gives free memory back to the kernel (see `_trim_locked` for the order) until at most `keep_bytes` stay faulted in;
        the bytes given back."""
        with self._lock:
            return self._trim_locked(keep_bytes)

    def _trim_locked(self, keep_bytes: int) -> int:
        """A wholly free arena is dropped: unmapped when its last reference goes, not closed here, because this runs
        from the finalizer of an array that may still export the arena's buffer (closing it there raises
        BufferError). An arena in use has its free extents released with MADV_DONTNEED, from their ends."""
        given = 0
        total = sum(a.warm_bytes() for a in self._arenas)
        # Wholly free arenas first, smallest first (the large ones fit more later weights), oldest first among
        # equals; then the free extents of arenas in use.
        for arena in sorted(self._arenas, key=lambda a: (a.live > 0, a.size if a.live == 0 else 0)):
            if total <= keep_bytes:
                break
            if arena.live == 0:
                warm = arena.warm_bytes()
                self._arenas.remove(arena)
                total -= warm
                given += warm
                continue
            for i in range(len(arena.free) - 1, -1, -1):
                offset, extent, warm = arena.free[i]
                if not warm or total <= keep_bytes:
                    continue
                cut = min(extent, _granules(total - keep_bytes))
                arena.region.madvise(mmap.MADV_DONTNEED, offset + extent - cut, cut)
                del arena.free[i]
                if cut < extent:
                    _insert(arena.free, (offset, extent - cut, True))
                _insert(arena.free, (offset + extent - cut, cut, False))
                total -= cut
                given += cut
        return given


def _insert(free: list[tuple[int, int, bool]], extent: tuple[int, int, bool]) -> None:
    """Puts `extent` into the offset-sorted `free`, merged with neighbours of the same warmth that touch it."""
    offset, size, warm = extent
    i = 0
    while i < len(free) and free[i][0] < offset:
        i += 1
    if i > 0:
        left_offset, left_size, left_warm = free[i - 1]
        if left_warm == warm and left_offset + left_size == offset:
            offset, size = left_offset, left_size + size
            i -= 1
            del free[i]
    if i < len(free):
        right_offset, right_size, right_warm = free[i]
        if right_warm == warm and offset + size == right_offset:
            size += right_size
            del free[i]
    free.insert(i, (offset, size, warm))
