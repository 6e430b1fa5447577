"""The safetensors reader: bit-identical to safetensors.torch.load_file (with and without dtype conversion, at any
read concurrency), one shared buffer per file (a memfd with no pages before the read writes them), and clear
domain errors for files that are missing, corrupt or pickles."""
from __future__ import annotations

import json
import os
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as reference_load
from safetensors.torch import save_file

from hotslot.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted
from hotslot.loading import reader as reader_mod
from hotslot.loading.reader import (
    OUTPUT_ALIGNMENT_BYTES,
    PAGE_BYTES,
    ReadRequest,
    read_files,
    read_header,
    read_safetensors,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality including NaN payloads and signed zeros: compare the raw bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every dtype family the loader treats differently, odd sizes, a scalar, an empty tensor, special values."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w32": torch.randn(33, 7, generator=g),
        "w16": torch.randn(5, 3, generator=g).half(),
        "wbf16": torch.randn(9, generator=g).bfloat16(),
        "w64": torch.randn(4, 2, generator=g).double(),
        "special": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 65519.0]),
        "ids": torch.arange(77, dtype=torch.int64).reshape(1, 77),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "layers.0.wo.weight": torch.randn(6, 6, generator=g),
    }
    path = tmp_path_factory.mktemp("reader") / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("chunk_bytes", [4096, 16 * 1024 * 1024])
def test_reads_bit_identical_to_safetensors(mixed_file: Path, chunk_bytes: int) -> None:
    loaded = read_safetensors(mixed_file, chunk_bytes=chunk_bytes)
    ours, ref = loaded.tensors(), reference_load(str(mixed_file))
    assert ours.keys() == ref.keys()
    for name in ref:
        assert _same_bits(ours[name], ref[name]), name
    assert loaded.metadata == {"format": "pt"}
    assert loaded.stats.bytes_read == loaded.stats.bytes_out == read_header(mixed_file).data_bytes


def test_one_shared_buffer_per_file_and_every_tensor_is_a_view_of_it(mixed_file: Path) -> None:
    loaded = read_safetensors(mixed_file)
    assert loaded.buffer.dtype == torch.uint8 and loaded.buffer.dim() == 1
    assert loaded.buffer.is_shared()
    base = loaded.buffer.untyped_storage().data_ptr()
    for name, t in loaded.tensors().items():
        if t.numel():
            assert t.untyped_storage().data_ptr() == base, name


@pytest.mark.parametrize("shared", [True, False])
def test_unconverted_tensors_keep_the_files_page_offset(mixed_file: Path, shared: bool) -> None:
    # What an mmap of the file (diffusers/transformers from_pretrained on CPU) gives: CPU kernels choose their
    # code path by alignment, so this is what makes images bit-identical to from_pretrained.
    header = read_header(mixed_file)
    tensors = read_safetensors(mixed_file, shared=shared).tensors()
    for e in (e for e in header.tensors if e.nbytes):  # an empty tensor has no address
        assert tensors[e.name].data_ptr() % PAGE_BYTES == (header.data_start + e.begin) % PAGE_BYTES, e.name


def test_unshared_buffer_when_asked(mixed_file: Path) -> None:
    assert not read_safetensors(mixed_file, shared=False).buffer.is_shared()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk_bytes", [4096, 16 * 1024 * 1024])
def test_dtype_conversion_matches_torch_conversion_of_the_reference(
    mixed_file: Path, dtype: torch.dtype, chunk_bytes: int
) -> None:
    loaded = read_safetensors(mixed_file, dtype=dtype, chunk_bytes=chunk_bytes)
    ours, ref = loaded.tensors(), reference_load(str(mixed_file))
    for name, r in ref.items():
        expected = r.to(dtype) if r.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else r
        assert _same_bits(ours[name], expected), name
    assert loaded.buffer.is_shared()  # the converted tensors are the ones in shared memory
    for spec in loaded.specs:
        assert spec.offset % OUTPUT_ALIGNMENT_BYTES == 0


def test_keep_fp32_modules_stay_float32(mixed_file: Path) -> None:
    ours = read_safetensors(
        mixed_file, dtype=torch.float16, keep_fp32=lambda name: "wo" in name.split(".")
    ).tensors()
    ref = reference_load(str(mixed_file))
    assert _same_bits(ours["layers.0.wo.weight"], ref["layers.0.wo.weight"])
    assert ours["w32"].dtype == torch.float16
    assert ours["ids"].dtype == torch.int64  # integers are never converted


def _write_raw(path: Path, header: dict, data: bytes, pad_to: int = 8) -> Path:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % pad_to)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_misaligned_tensors_are_realigned_not_rejected(tmp_path: Path) -> None:
    # A writer that does not align: a 3-byte uint8 tensor first puts the float32 tensor at offset 3.
    values = torch.tensor([1.5, -2.25, 3.0])
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "F32", "shape": [3], "data_offsets": [3, 15]},
    }
    path = _write_raw(tmp_path / "odd.safetensors", header, bytes([7, 8, 9]) + values.numpy().tobytes())
    ours = read_safetensors(path).tensors()
    assert ours["a"].tolist() == [7, 8, 9]
    assert _same_bits(ours["b"], values)
    assert _same_bits(ours["b"], reference_load(str(path))["b"])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: struct.pack("<Q", 2**40) + raw[8:], "exceeds"),
        (lambda raw: struct.pack("<Q", len(raw)) + raw[8:], "runs past the end"),
        (lambda raw: raw[:8] + b"\xff" + raw[9:], "not UTF-8 JSON"),
        (lambda raw: raw[:-10], "cover"),
        (lambda raw: raw[:5], "shorter than the 8-byte header length"),
    ],
    ids=["huge-length", "length-past-end", "not-json", "truncated-data", "tiny"],
)
def test_corrupt_files_raise_data_loss_naming_the_file(tmp_path: Path, mixed_file: Path, mutate, message) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mutate(mixed_file.read_bytes()))
    with pytest.raises(DataLoss, match=message) as err:
        read_safetensors(bad)
    assert str(bad) in err.value.message


def test_header_validation_rejects_inconsistent_entries(tmp_path: Path) -> None:
    header = {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}
    path = _write_raw(tmp_path / "short.safetensors", header, b"\0" * 12)
    with pytest.raises(DataLoss, match="12 bytes for shape"):
        read_header(path)
    header = {"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}
    with pytest.raises(DataLoss, match="unsupported dtype"):
        read_header(_write_raw(tmp_path / "dtype.safetensors", header, b"\0" * 4))


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        read_safetensors(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".pkl"])
def test_pickle_files_are_refused_without_being_opened(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(b"\x80\x04anything")  # a pickle stream; it must never be parsed
    with pytest.raises(InvalidArgument, match="pickle"):
        read_safetensors(path)


def test_full_dev_shm_is_resource_exhausted_with_advice(mixed_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader_mod, "_shm_free_bytes", lambda: 1024)
    with pytest.raises(ResourceExhausted, match=r"shared memory is full: .*larger /dev/shm"):
        read_safetensors(mixed_file, shm="torch")
    assert read_safetensors(mixed_file, shared=False).stats.bytes_out > 0  # private memory is not limited by it
    assert read_safetensors(mixed_file).buffer.is_shared()  # nor is a memfd: it does not live in /dev/shm


def test_too_little_memory_for_a_memfd_is_resource_exhausted(mixed_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader_mod, "_mem_available_bytes", lambda: 1024)
    with pytest.raises(ResourceExhausted, match=r"not enough memory for \d+ bytes of weights: 1024 bytes available"):
        read_safetensors(mixed_file)


def test_memfd_buffer_has_no_pages_until_written_and_is_shareable() -> None:
    """The point of the memfd: ftruncate makes a sparse file, so nothing is zero-filled before the read writes
    it (torch's _new_shared reserves and clears every page). Its descriptor is what the hand-off passes."""
    stats = reader_mod.ReadStats()
    buf = reader_mod._allocate(64 * PAGE_BYTES, torch.device("cpu"), True, stats, "memfd")
    fd, size = buf.untyped_storage()._share_fd_cpu_()
    assert size == 64 * PAGE_BYTES and buf.is_shared()
    assert os.fstat(fd).st_blocks == 0  # no page exists yet
    buf[:PAGE_BYTES].fill_(7)
    assert 0 < os.fstat(fd).st_blocks * 512 <= 4 * PAGE_BYTES  # writing one page allocates about one page
    torch_buf = reader_mod._allocate(64 * PAGE_BYTES, torch.device("cpu"), True, stats, "torch")
    assert os.fstat(torch_buf.untyped_storage()._share_fd_cpu_()[0]).st_blocks * 512 >= 64 * PAGE_BYTES


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("concurrency", [2, 3, 8])
@pytest.mark.parametrize("shared", [True, False])
def test_parallel_reads_are_bit_identical_to_a_sequential_read(
    mixed_file: Path, dtype: torch.dtype | None, concurrency: int, shared: bool
) -> None:
    # 4 kB chunks cut the file into many ranges, read and converted by different threads in any order
    one = read_safetensors(mixed_file, dtype=dtype, chunk_bytes=4096, concurrency=1).tensors()
    many = read_safetensors(mixed_file, dtype=dtype, chunk_bytes=4096, concurrency=concurrency, shared=shared)
    assert many.buffer.is_shared() == shared
    ours = many.tensors()
    assert ours.keys() == one.keys()
    for name in one:
        assert _same_bits(ours[name], one[name]), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("concurrency", [1, 3])
def test_converting_from_a_mapping_of_the_file_is_bit_identical_and_copies_nothing_through_staging(
    mixed_file: Path, tmp_path: Path, dtype: torch.dtype, concurrency: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The misaligned file puts a float32 tensor at an odd offset of the mapping: it is realigned, not rejected.
    odd = _write_raw(tmp_path / "odd.safetensors", {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "F32", "shape": [3], "data_offsets": [3, 15]},
    }, bytes([7, 8, 9]) + torch.tensor([1.5, -2.25, 3.0]).numpy().tobytes())
    staged = read_files([mixed_file, odd], dtype=dtype, chunk_bytes=4096, concurrency=concurrency, shared=False)
    preads = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, views, offset: preads.append(offset) or real(fd, views, offset))
    mapped = read_files([mixed_file, odd], dtype=dtype, chunk_bytes=4096, concurrency=concurrency, shared=False,
                        map_source=True)
    assert preads == []  # every byte was converted where the page cache holds it
    for a, b in zip(staged, mapped, strict=True):
        ours, ref = b.tensors(), a.tensors()
        assert ours.keys() == ref.keys()
        for name in ref:
            assert _same_bits(ours[name], ref[name]), name
        assert b.stats.bytes_read == a.stats.bytes_read


def test_a_mapped_range_that_cannot_be_faulted_in_is_read_with_pread_instead(mixed_file: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # An old kernel, an I/O error or a file cut short: touching the mapping would be SIGBUS, so pread reads it.
    monkeypatch.setattr(reader_mod, "_madvise_populate", lambda part: False)
    preads = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, views, offset: preads.append(offset) or real(fd, views, offset))
    loaded = read_files([mixed_file], dtype=torch.float16, shared=False, map_source=True, chunk_bytes=4096)[0]
    assert preads
    ref = reference_load(str(mixed_file))
    assert _same_bits(loaded.tensors()["w32"], ref["w32"].half())
    assert _same_bits(loaded.tensors()["ids"], ref["ids"])


def test_a_rate_cap_reads_through_staging_even_when_mapping_is_allowed(mixed_file: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    preads = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, views, offset: preads.append(offset) or real(fd, views, offset))
    loaded = read_files([mixed_file], dtype=torch.float16, shared=False, map_source=True,
                        read_bytes_per_s=1e12)
    assert preads  # paced reads, not page faults the cap cannot see
    assert _same_bits(loaded[0].tensors()["w32"], reference_load(str(mixed_file))["w32"].half())


@pytest.fixture(scope="module")
def big_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three files of ~1-3 MB each: many 64 kB ranges per file, tensors larger than one range."""
    root = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(1)
    paths = []
    for i in range(3):
        tensors = {f"t{j}": torch.randn(257 * (i + 1), 129 + j, generator=g) for j in range(5)}
        tensors["half"] = torch.randn(1000, 33, generator=g).half()
        paths.append(root / f"part-{i}.safetensors")
        save_file(tensors, str(paths[-1]))
    return paths


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_read_files_reads_several_files_at_once_in_order(big_files: list[Path], dtype: torch.dtype | None) -> None:
    seen: set[str] = set()
    real = os.preadv

    def spy(fd, buffers, offset):
        seen.add(threading.current_thread().name)
        time.sleep(0.002)  # a slow mount: no one thread can take every range before the others start
        return real(fd, buffers, offset)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reader_mod.os, "preadv", spy)
        loaded = read_files(big_files, dtype=dtype, chunk_bytes=64 * 1024, concurrency=4, shared=False)
    assert len(seen) > 1  # the ranges were read by more than one thread
    assert [f.path for f in loaded] == [str(p) for p in big_files]
    for path, got in zip(big_files, loaded, strict=True):
        ref = reference_load(str(path))
        for name, t in got.tensors().items():
            expected = ref[name].to(dtype) if dtype is not None else ref[name]
            assert _same_bits(t, expected), (path.name, name)
        assert got.stats.bytes_read == path.stat().st_size - read_header(path).data_start


def test_keep_fp32_per_file_in_read_files(big_files: list[Path]) -> None:
    loaded = read_files(
        [ReadRequest(big_files[0], keep_fp32=lambda name: name == "t0"), big_files[1]],
        dtype=torch.float16,
        concurrency=2,
    )
    assert loaded[0].tensors()["t0"].dtype == torch.float32 and loaded[0].tensors()["t1"].dtype == torch.float16
    assert loaded[1].tensors()["t0"].dtype == torch.float16


def test_a_truncated_file_among_several_fails_the_whole_read_with_data_loss(
    tmp_path: Path, big_files: list[Path]
) -> None:
    bad = tmp_path / "cut.safetensors"
    data = big_files[2].read_bytes()
    bad.write_bytes(data[: len(data) - 1000])
    before = threading.active_count()
    with pytest.raises(DataLoss, match="cut.safetensors"):
        read_files([big_files[0], bad, big_files[1]], chunk_bytes=64 * 1024, concurrency=4)
    assert threading.active_count() == before  # no reading thread outlives the call


def test_concurrency_below_one_is_refused(mixed_file: Path) -> None:
    with pytest.raises(InvalidArgument, match="concurrency"):
        read_safetensors(mixed_file, concurrency=0)


def test_rate_cap_is_accounted_as_throttle_time(mixed_file: Path) -> None:
    size = mixed_file.stat().st_size
    loaded = read_safetensors(mixed_file, chunk_bytes=4096, read_bytes_per_s=size * 10)  # ~0.1 s at most
    assert loaded.stats.throttle_s > 0
    assert _same_bits(loaded.tensors()["w32"], reference_load(str(mixed_file))["w32"])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_cuda_read_is_bit_identical(mixed_file: Path, dtype: torch.dtype | None) -> None:
    loaded = read_safetensors(mixed_file, device="cuda", dtype=dtype, chunk_bytes=4096)
    assert loaded.buffer.is_cuda
    ref = reference_load(str(mixed_file))
    for name, t in loaded.tensors().items():
        expected = ref[name]
        if dtype is not None and expected.is_floating_point():
            expected = expected.to(dtype)
        assert t.is_cuda and _same_bits(t, expected), name


def test_a_mapped_file_gives_the_same_bits_without_reading_it(mixed_file: Path) -> None:
    mapped = reader_mod.map_safetensors(mixed_file)
    assert not mapped.buffer.is_shared() and mapped.stats.bytes_read == 0  # nothing copied: the page cache's pages
    ref = reference_load(str(mixed_file))
    ours = mapped.tensors()
    for name in ref:
        assert _same_bits(ours[name], ref[name]), name


def test_writing_a_mapped_tensor_copies_the_page_and_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(path))
    before = path.read_bytes()
    tensors = reader_mod.map_safetensors(path).tensors()
    tensors["w"].add_(1.0)  # e.g. a LoRA fused into the weight
    assert tensors["w"][0].item() == 1.0
    assert path.read_bytes() == before  # copy-on-write: a blob shared by many views is never changed
    assert reader_mod.map_safetensors(path).tensors()["w"][0].item() == 0.0


def test_keeps_dtypes_says_when_a_file_can_be_mapped(mixed_file: Path, tmp_path: Path) -> None:
    header = read_header(mixed_file)
    assert reader_mod.keeps_dtypes(header, None)
    assert not reader_mod.keeps_dtypes(header, torch.float16)  # w32, w64, wbf16 would be converted
    halves = tmp_path / "halves.safetensors"
    save_file({"a.weight": torch.ones(8).half(), "norm.weight": torch.ones(8).half()}, str(halves))
    assert reader_mod.keeps_dtypes(read_header(halves), torch.float16)
    keep_norm = reader_mod.module_predicate(("norm",))
    assert not reader_mod.keeps_dtypes(read_header(halves), torch.float16, keep_norm)  # norm becomes float32


def test_populate_maps_every_page_of_mapped_and_shared_buffers(mixed_file: Path) -> None:
    mapped = reader_mod.map_safetensors(mixed_file)
    shared = read_safetensors(mixed_file)
    assert reader_mod.populate([mapped.buffer, shared.buffer], concurrency=2) == (
        mapped.buffer.numel() + shared.buffer.numel()
    )
    assert reader_mod.populate([torch.empty(0, dtype=torch.uint8)]) == 0
