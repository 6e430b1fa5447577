"""The host pool recycles the private memory of dropped converted weights: an extent goes back to the pool only once
no tensor views it, is carved for later allocations of any size (from a reservation made up front too), and is
returned to the kernel beyond the pool's limit; reads into recycled memory (which holds the previous weights'
bytes) are bit-identical to fresh reads."""
from __future__ import annotations

import gc
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hotslot.loading.hostpool import REGION_GRANULE_BYTES, HostPool
from hotslot.loading.reader import read_files, set_host_pool

MIB = 1024 * 1024
GIB = 1024 * MIB


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


def test_a_larger_free_extent_is_split_and_the_rest_stays_free_for_another_allocation() -> None:
    pool = HostPool(256 * MIB)
    big = pool.allocate(64 * MIB)
    base = big.data_ptr()
    del big
    gc.collect()
    small = pool.allocate(MIB)
    rest = pool.allocate(60 * MIB)
    assert (pool.created, pool.reused) == (1, 2)  # both carved out of the first allocation's memory
    assert small.data_ptr() == base and rest.data_ptr() == base + REGION_GRANULE_BYTES
    assert pool.free_bytes == 64 * MIB - REGION_GRANULE_BYTES - 60 * MIB
    del small, rest
    gc.collect()
    whole = pool.allocate(64 * MIB)  # the freed extents merged back into one
    assert whole.data_ptr() == base and pool.created == 1


def test_a_reserved_pool_serves_the_first_allocations_of_any_size_from_its_reservation() -> None:
    pool = HostPool(32 * MIB)
    pool.reserve()
    assert pool.reserved_bytes == 32 * MIB and pool.free_bytes == 32 * MIB
    a = pool.allocate(5 * MIB)
    b = pool.allocate(20 * MIB + 1)
    assert (pool.created, pool.reused) == (0, 2)
    assert b.data_ptr() == a.data_ptr() + 6 * MIB  # side by side in the one reserved arena
    assert pool.free_bytes == 32 * MIB - 6 * MIB - 22 * MIB
    too_big = pool.allocate(8 * MIB)  # 4 MiB are left: a new arena
    assert pool.created == 1
    del a, b, too_big
    gc.collect()
    assert pool.free_bytes == 32 * MIB  # the extra arena went back to the kernel, the reservation stayed


def test_trimming_an_arena_in_use_gives_its_free_pages_back_and_keeps_them_as_cold_extents() -> None:
    pool = HostPool(64 * MIB)
    pool.reserve(8 * REGION_GRANULE_BYTES)
    held = pool.allocate(2 * REGION_GRANULE_BYTES)
    scratch = pool.allocate(6 * REGION_GRANULE_BYTES)
    scratch.fill_(7)
    del scratch
    gc.collect()
    assert pool.trim(2 * REGION_GRANULE_BYTES) == 4 * REGION_GRANULE_BYTES
    assert pool.free_bytes == 2 * REGION_GRANULE_BYTES
    warm = pool.allocate(REGION_GRANULE_BYTES)  # a faulted-in extent is preferred
    assert warm.data_ptr() == held.data_ptr() + 2 * REGION_GRANULE_BYTES and bool((warm == 7).all())
    cold = pool.allocate(3 * REGION_GRANULE_BYTES)  # no warm extent fits: a cold one, its pages given back (zeros)
    assert cold.data_ptr() == held.data_ptr() + 4 * REGION_GRANULE_BYTES
    assert int(cold.count_nonzero()) == 0 and pool.created == 0


def test_beyond_its_limit_the_pool_returns_regions_to_the_kernel_oldest_first() -> None:
    pool = HostPool(REGION_GRANULE_BYTES * 2)
    a, b, c = (pool.allocate(REGION_GRANULE_BYTES) for _ in range(3))
    kept = {b.data_ptr(), c.data_ptr()}
    del a
    gc.collect()
    del b
    gc.collect()
    del c
    gc.collect()
    assert pool.free_bytes == 2 * REGION_GRANULE_BYTES  # the oldest free region went back to the kernel
    again = [pool.allocate(REGION_GRANULE_BYTES) for _ in range(2)]
    assert {t.data_ptr() for t in again} == kept and pool.reused == 2  # the two newer ones stayed
    del again
    gc.collect()
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


def test_an_automatically_sized_pool_keeps_as_much_as_the_largest_load_fitted_and_never_more_than_its_cap() -> None:
    pool = HostPool(0, grow_up_to=20 * MIB)
    before = [pool.allocate(3 * MIB), pool.allocate(MIB)]
    del before
    gc.collect()
    assert pool.free_bytes == 0  # no load fitted yet: a limit of 0 gives everything back
    load = [pool.allocate(3 * MIB), pool.allocate(MIB)]
    assert pool.fit(t.numel() for t in load) == 6 * MIB  # in granules: 4 + 2 MiB
    del load
    gc.collect()
    assert pool.free_bytes == 6 * MIB
    again = [pool.allocate(3 * MIB), pool.allocate(MIB)]
    assert pool.reused == 2 and pool.free_bytes == 0
    assert pool.fit([64 * MIB]) == 20 * MIB  # a larger load: up to the cap, not beyond
    assert pool.fit([MIB]) == 20 * MIB  # a smaller one never shrinks it
    assert HostPool(8 * MIB).fit([64 * MIB]) == 8 * MIB  # a fixed size does not grow
    del again


def test_the_executor_setting_installs_the_pool_its_conversions_use(two_files: tuple[Path, Path],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from hotslot.services.executor.settings import ExecutorSettings
    from hotslot.services.executor.wiring import configure_host_pool

    first, _ = two_files
    caplog.set_level(logging.INFO, logger="hotslot.services.executor.wiring")
    try:
        for off in ({"host_pool_bytes": 0}, {"device": "cuda"}, {"convert_in_executor": False}):
            assert configure_host_pool(ExecutorSettings(**{"device": "cpu", **off})) is None, off
        auto = configure_host_pool(ExecutorSettings(device="cpu", host_budget_bytes="8GiB"))  # the default: auto
        assert auto is not None and (auto.limit_bytes, auto.grow_up_to) == (0, 4 * GIB)
        assert f"as much as the largest model converted here, up to {4 * GIB} bytes" in caplog.text
        assert "--host-pool-bytes auto" in caplog.text
        pool = configure_host_pool(ExecutorSettings(device="cpu", host_pool_bytes="64MiB"))
        assert pool is not None and pool.limit_bytes == 64 * MIB
        held = read_files([first], dtype=torch.float32, shared=False)[0]
        assert pool.created == 1
        del held
        gc.collect()
        assert pool.free_bytes > 0
    finally:
        set_host_pool(None)
