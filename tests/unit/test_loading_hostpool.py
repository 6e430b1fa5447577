"""The host pool recycles the private memory of dropped converted weights: a region goes back to the pool only once
no tensor views it, is handed to a later allocation that fits it, and is returned to the kernel beyond the pool's
limit; reads into recycled memory (which holds the previous weights' bytes) are bit-identical to fresh reads."""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hotslot.loading.hostpool import REGION_GRANULE_BYTES, HostPool
from hotslot.loading.reader import read_files, set_host_pool

MIB = 1024 * 1024


def test_a_region_returns_to_the_pool_only_when_no_tensor_views_it_and_is_then_reused() -> None:
    pool = HostPool(64 * MIB)
    first = pool.allocate(3 * MIB)
    address = first.data_ptr()
    view = first[10:20].view(torch.int16)
    del first
    gc.collect()
    assert pool.free_bytes == 0  # a view is still alive: the region is in use
    del view
    gc.collect()
    assert pool.free_bytes == 4 * MIB  # rounded to the region granule
    again = pool.allocate(3 * MIB + 5)
    assert again.data_ptr() == address and again.numel() == 3 * MIB + 5
    assert (pool.reused, pool.created) == (1, 1)
    assert pool.free_bytes == 0


def test_a_region_much_larger_than_the_request_is_kept_for_a_request_it_fits() -> None:
    pool = HostPool(256 * MIB)
    big = pool.allocate(64 * MIB)
    del big
    gc.collect()
    small = pool.allocate(MIB)
    assert pool.created == 2 and pool.reused == 0  # 64 MiB for 1 MiB would idle 63 MiB
    assert pool.free_bytes == 64 * MIB
    del small


def test_beyond_its_limit_the_pool_returns_regions_to_the_kernel_oldest_first() -> None:
    pool = HostPool(REGION_GRANULE_BYTES * 2)
    a, b, c = (pool.allocate(REGION_GRANULE_BYTES) for _ in range(3))
    del a
    gc.collect()
    del b
    gc.collect()
    del c
    gc.collect()
    assert pool.free_bytes == 2 * REGION_GRANULE_BYTES  # the oldest free region went back to the kernel
    assert pool.trim(0) == 2 * REGION_GRANULE_BYTES and pool.free_bytes == 0


def test_a_pool_without_room_keeps_nothing() -> None:
    pool = HostPool(0)
    x = pool.allocate(MIB)
    del x
    gc.collect()
    assert pool.free_bytes == 0


@pytest.fixture
def two_files(tmp_path: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(3)
    paths = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.safetensors"
        save_file({f"w{i}": torch.randn(300, 257, generator=g).half() for i in range(6)}, str(path))
        paths.append(path)
    return paths[0], paths[1]


@pytest.mark.parametrize("map_source", [False, True])
def test_a_conversion_into_recycled_memory_equals_one_into_fresh_memory(two_files: tuple[Path, Path],
                                                                         map_source: bool) -> None:
    first, second = two_files
    fresh = read_files([second], dtype=torch.float32, shared=False, verify=False)[0].tensors()
    pool = HostPool(64 * MIB)
    previous = set_host_pool(pool)
    try:
        held = read_files([first], dtype=torch.float32, shared=False, map_source=map_source)[0]
        address = held.buffer.data_ptr()
        del held
        gc.collect()
        recycled = read_files([second], dtype=torch.float32, shared=False, map_source=map_source)[0]
        assert recycled.buffer.data_ptr() == address and pool.reused == 1  # the first file's memory, reused
        assert all(torch.equal(recycled.tensors()[k], v) for k, v in fresh.items())
        shared = read_files([second], dtype=torch.float32, shared=True)[0]
        assert pool.reused == 1 and pool.created == 1  # shared memory never comes from the pool
        del shared
    finally:
        set_host_pool(previous)


def test_the_executor_setting_installs_the_pool_its_conversions_use(two_files: tuple[Path, Path]) -> None:
    from hotslot.services.executor.settings import ExecutorSettings
    from hotslot.services.executor.wiring import configure_host_pool

    first, _ = two_files
    try:
        assert configure_host_pool(ExecutorSettings(device="cpu")) is None  # default: off
        pool = configure_host_pool(ExecutorSettings(device="cpu", host_pool_bytes="64MiB"))
        assert pool is not None and pool.limit_bytes == 64 * MIB
        held = read_files([first], dtype=torch.float32, shared=False)[0]
        assert pool.created == 1
        del held
        gc.collect()
        assert pool.free_bytes > 0
    finally:
        set_host_pool(None)
