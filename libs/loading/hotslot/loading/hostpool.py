"""Recycled private host memory for weights converted on the CPU.

A converted read writes every byte of fresh memory, and the first write to a fresh page costs a page fault and the
kernel zeroing the page: 0.2-0.9 s per GiB on a 2-core VM, more than the conversion itself (an fp16 -> fp32 SD 1.5
UNet, 3.4 GB out: 0.26 s into memory touched before, 0.9-1.0 s into fresh memory). torch returns a freed buffer of
that size to the kernel at once (glibc unmaps large blocks), so every miss of a CPU executor that converts pays
it again, although an evicted model has just freed as much.

`HostPool` keeps the regions of dropped weights, up to `limit_bytes`, and hands them to the next conversion.
A region goes back to the pool when the last tensor viewing it is gone (a weakref finalizer on the numpy array
that torch's tensor keeps alive), so nothing can be handed out while a pipeline still uses it.
"""
from __future__ import annotations

import mmap
import threading
import weakref

import numpy as np
import torch

__all__ = ["REGION_GRANULE_BYTES", "HostPool"]

# Regions are made in multiples of this, so weights of similar sizes fit each other's regions.
REGION_GRANULE_BYTES = 2 * 1024 * 1024
# A region is reused for a request at most this much larger than the request (the rest of it idles meanwhile).
_MAX_SLACK = 1.25


class HostPool:
    """Private anonymous memory regions, recycled once their tensors are gone; thread-safe."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._free: list[mmap.mmap] = []  # oldest first
        self._lock = threading.Lock()
        self.reused = 0  # allocations served from the pool
        self.created = 0  # allocations that made a new region

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(len(r) for r in self._free)

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of `nbytes` over a pooled region (the smallest free one that fits without too much slack),
        else over a new one. Its contents are whatever the region held: the caller overwrites every byte."""
        with self._lock:
            most = max(nbytes * _MAX_SLACK, nbytes + REGION_GRANULE_BYTES)
            fits = [r for r in self._free if nbytes <= len(r) <= most]
            region = min(fits, key=len) if fits else None
            if region is not None:
                self._free.remove(region)
                self.reused += 1
            else:
                self.created += 1
        if region is None:
            size = -(-max(nbytes, 1) // REGION_GRANULE_BYTES) * REGION_GRANULE_BYTES
            region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        array = np.frombuffer(region, dtype=np.uint8, count=nbytes)
        weakref.finalize(array, self._release, region)
        return torch.from_numpy(array)

    def _release(self, region: mmap.mmap) -> None:
        """The last tensor over `region` is gone: keep it for the next allocation, within `limit_bytes`."""
        with self._lock:
            self._free.append(region)
            self._trim_locked(self.limit_bytes)

    def trim(self, keep_bytes: int = 0) -> int:
        """Returns free regions to the kernel, oldest first, until at most `keep_bytes` stay pooled; the bytes
        returned."""
        with self._lock:
            return self._trim_locked(keep_bytes)

    def _trim_locked(self, keep_bytes: int) -> int:
        """Drops free regions, oldest first, down to `keep_bytes`. A dropped region is unmapped when its last
        reference goes: not closed here, because this runs from the finalizer of the array that still exports the
        region's buffer (closing it there raises BufferError)."""
        dropped = 0
        total = sum(len(r) for r in self._free)
        while self._free and total > keep_bytes:
            size = len(self._free.pop(0))
            total -= size
            dropped += size
        return dropped
