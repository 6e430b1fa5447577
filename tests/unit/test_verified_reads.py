"""Verified reads: a file carrying the CRC-32C recorded when it was cached is checked while the reader reads it, on
every read path (shared memory by sendfile, private memory, converted through staging chunks or from a mapping of
the file, mapped, CUDA), and
a flipped byte fails the read with CorruptRead naming the file; a file without a checksum, or verify=False, reads
as before."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hotslot import checksum
from hotslot.errors import CorruptRead, DataLoss
from hotslot.loading.reader import map_safetensors, read_files, verify_mapped
from tests.support.corruption import flip_byte, record_checksum

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_xxhash = pytest.mark.skipif(not checksum.available(), reason="xxhash is not installed")

MODES = {
    "shared, unconverted (sendfile)": {"shared": True},
    "private, unconverted (pread)": {"shared": False},
    "converted through staging chunks": {"shared": True, "dtype": torch.float16},
    "converted from a mapping of the file": {"shared": False, "dtype": torch.float16, "map_source": True},
}


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "unet.safetensors"
    # ~6 MB: several 1 MiB checksum blocks, tensors that straddle them, an odd size at the end
    save_file({f"layer{i}.weight": torch.randn(256, 511, generator=g) for i in range(12)}, str(path))
    record_checksum(path)
    return path


@needs_xxhash
def test_blocks_hashed_apart_in_any_order_give_the_checksum_of_bytes_fed_in_order() -> None:
    block = checksum.BLOCK_BYTES
    data = os.urandom(3 * block + 12_345)
    fed = checksum.BlockHasher()
    for lo in range(0, len(data), 77_777):  # pieces that do not line up with blocks
        fed.update(data[lo : lo + 77_777])
    apart = {k: checksum.block_digest(data[k * block : (k + 1) * block]) for k in reversed(range(4))}
    assert checksum.root(apart, len(data)) == fed.value()
    assert checksum.root({k: v for k, v in apart.items() if k != 2}, len(data)) is None  # a block missing
    changed = bytearray(data)
    changed[block + 5] ^= 1
    again = checksum.BlockHasher()
    again.update(bytes(changed))
    assert again.value() != fed.value()


@needs_xxhash
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("concurrency", [1, 4])
def test_an_intact_file_with_a_recorded_checksum_reads_as_before(model_file: Path, mode: str, concurrency: int) -> None:
    kwargs = MODES[mode]
    checked = read_files([model_file], chunk_bytes=8192, concurrency=concurrency, **kwargs)[0]
    plain = read_files([model_file], chunk_bytes=8192, concurrency=concurrency, verify=False, **kwargs)[0]
    assert all(torch.equal(checked.tensors()[k], v) for k, v in plain.tensors().items())


@needs_xxhash
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("where", [1, 30_000, 3_000_000])
def test_a_flipped_byte_fails_the_read_with_corrupt_read_naming_the_file(model_file: Path, mode: str,
                                                                          where: int) -> None:
    flip_byte(model_file, where)
    with pytest.raises(CorruptRead) as caught:
        read_files([model_file], chunk_bytes=8192, concurrency=4, **MODES[mode])
    assert caught.value.path == str(model_file)
    assert isinstance(caught.value, DataLoss)
    assert str(model_file) in caught.value.message


@needs_xxhash
def test_verify_off_reads_a_corrupted_file_without_noticing(model_file: Path) -> None:
    flip_byte(model_file, 1)
    read_files([model_file], verify=False)


@needs_xxhash
def test_a_file_without_a_recorded_checksum_is_read_unchecked(model_file: Path) -> None:
    os.removexattr(model_file, checksum.XATTR)
    flip_byte(model_file, 1)
    read_files([model_file])


@needs_xxhash
def test_a_corrupted_mapped_file_is_caught_when_its_pages_are_checksummed(model_file: Path, tmp_path: Path) -> None:
    good = tmp_path / "vae.safetensors"
    save_file({"w": torch.ones(1000)}, str(good))
    record_checksum(good)
    mapped = [map_safetensors(good), map_safetensors(model_file)]
    assert verify_mapped(mapped, 2) == good.stat().st_size + model_file.stat().st_size
    flip_byte(model_file, 5)
    with pytest.raises(CorruptRead) as caught:
        verify_mapped([map_safetensors(good), map_safetensors(model_file)], 2)
    assert caught.value.path == str(model_file)


def test_corrupt_read_keeps_its_path_across_a_process_boundary() -> None:
    sent = CorruptRead.of("/cache/views/abc/unet/diffusion_pytorch_model.safetensors")
    rebuilt = CorruptRead(sent.message)  # what the preloader's parent rebuilds from class name and message
    assert rebuilt.path == "/cache/views/abc/unet/diffusion_pytorch_model.safetensors"


@cuda
@needs_xxhash
def test_cuda_reads_are_checked_too(model_file: Path) -> None:
    read_files([model_file], device="cuda", dtype=torch.float16)
    flip_byte(model_file, 1)
    with pytest.raises(CorruptRead):
        read_files([model_file], device="cuda", dtype=torch.float16, chunk_bytes=8192)


@needs_xxhash
@pytest.mark.parametrize("mode", list(MODES))
def test_reads_end_on_checksum_blocks_so_no_block_is_read_twice(model_file: Path, mode: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    reread = []
    real = os.pread

    def counting(fd, n, offset):
        if offset:  # the header is read once at offset 0; any other pread is a block read again
            reread.append((offset, n))
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting)
    read_files([model_file], chunk_bytes=2 * 1024 * 1024, concurrency=3, **MODES[mode])
    assert reread == []


@needs_xxhash
@pytest.mark.parametrize("verify_reads", [True, False])
def test_the_preloader_child_checks_what_it_reads_unless_told_not_to(model_file: Path, verify_reads: bool) -> None:
    from hotslot.loading.preloader import Preloader

    flip_byte(model_file, 1)
    with Preloader(verify_reads=verify_reads) as preloader:
        future = preloader.load("r1", "m", model_file.parent, files=[("unet", model_file.name)])
        if not verify_reads:
            assert future.result(120).nbytes > 0
            return
        with pytest.raises(CorruptRead) as caught:
            future.result(120)
    assert caught.value.path == str(model_file)  # rebuilt in the parent with the file it names


@needs_xxhash
def test_only_buffers_this_process_has_not_touched_are_left_to_populate(model_file: Path, tmp_path: Path) -> None:
    # Hashing a mapped file and converting into private memory fault every page in already; a second populate would
    # only walk the page tables again. A mapped file nobody hashed, or shared memory filled by sendfile, is not.
    from hotslot.loading.preloader import LoadedWeights

    unverified = tmp_path / "vae.safetensors"
    save_file({"w": torch.ones(1000)}, str(unverified))
    verified, plain = map_safetensors(model_file), map_safetensors(unverified)
    verify_mapped([verified, plain], 2)
    assert verified.resident and not plain.resident
    converted = read_files([model_file], dtype=torch.float16, shared=False)[0]
    by_sendfile = read_files([model_file], shared=True)[0]
    assert converted.resident and not by_sendfile.resident
    files = {"unet": verified, "vae": plain, "text_encoder": converted, "extra": by_sendfile}
    weights = LoadedWeights("r", "m", "cpu", None, {}, []).with_files(
        [(c, f"{c}/{Path(f.path).name}", f.buffer, f.specs) for c, f in files.items()],
        [f"{c}/{Path(f.path).name}" for c, f in files.items() if f.resident])
    left = {id(b) for b in weights.to_populate}
    assert left == {id(plain.buffer), id(by_sendfile.buffer)}


@needs_xxhash
def test_an_error_in_a_verifying_thread_is_raised_not_taken_for_a_corrupt_file(model_file: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A failure in a helper thread used to leave its blocks unhashed, which then read as a checksum mismatch.
    import threading

    real = checksum.block_digest
    helper_ran = threading.Event()

    def failing_in_helpers(*parts):
        if threading.current_thread().name.startswith("hotslot-verify-"):
            helper_ran.set()
            raise MemoryError("no memory for the digest")
        helper_ran.wait(10)  # the calling thread leaves work for the helpers
        return real(*parts)

    monkeypatch.setattr(checksum, "block_digest", failing_in_helpers)
    monkeypatch.setattr("hotslot.loading.reader._POPULATE_RANGE_BYTES", checksum.BLOCK_BYTES)  # many work items
    with pytest.raises(MemoryError):
        verify_mapped([map_safetensors(model_file)], 4)


@needs_xxhash
@pytest.mark.parametrize("flipped", [False, True])
def test_a_mapped_conversion_leaves_blocks_it_cannot_fault_in_to_pread_and_still_checks_them(
        model_file: Path, flipped: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Converted from a mapping, a range hashes the blocks that start in it to their ends, past the range: ranges
    # and blocks need not line up. Where the pages past the range cannot be faulted in (an I/O error from some
    # offset on), that block is read with pread at the end instead of touched (a SIGBUS), and is still checked.
    from hotslot.loading import reader as reader_mod

    bad_from = int(2.5 * checksum.BLOCK_BYTES)  # inside the third block
    bases: list[int] = []
    real_map, real_populate = reader_mod._map_whole, reader_mod._madvise_populate

    def mapping(path, f):
        whole = real_map(path, f)
        bases.append(whole.data_ptr())
        return whole

    def populate(part):
        start = part.data_ptr() - bases[-1]
        return start + part.numel() <= bad_from and real_populate(part)

    expected = read_files([model_file], dtype=torch.float16, shared=False, verify=False)[0].tensors()
    if flipped:
        flip_byte(model_file, model_file.stat().st_size - bad_from - 100)  # just past where faulting in fails
    monkeypatch.setattr(reader_mod, "_map_whole", mapping)
    monkeypatch.setattr(reader_mod, "_madvise_populate", populate)
    reread = []
    real_pread = os.pread

    def counting(fd, n, offset):
        if offset:
            reread.append(offset)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting)
    kwargs = {"dtype": torch.float16, "shared": False, "map_source": True, "chunk_bytes": 1_500_000,
              "concurrency": 3}
    if flipped:
        with pytest.raises(CorruptRead):
            read_files([model_file], **kwargs)
        return
    got = read_files([model_file], **kwargs)[0].tensors()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert 2 * checksum.BLOCK_BYTES in reread  # the block that straddles the failing offset: read and hashed
