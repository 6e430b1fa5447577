"""The preloader subprocess: a real spawned child hands weights over as shared memory without copying them,
reports load errors without dying, is noticed when it dies (kill -9) and can be restarted."""
from __future__ import annotations

import gc
import os
import pickle
import shutil
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from hotslot.errors import DataLoss, InvalidArgument, NotFound, Unavailable
from hotslot.loading import preloader as messages
from hotslot.loading.pipeline_loader import load_pipeline
from hotslot.loading.preloader import Preloader
from tests.support.corruption import flip_byte, record_checksum
from tests.support.waiting import wait_for

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
WAIT_S = 60.0  # generous: the CI box is shared and spawning imports torch


def _image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np", generator=generator).images


@pytest.fixture(scope="module")
def preloader():
    with Preloader() as p:
        yield p


def test_the_messages_between_the_halves_are_typed_and_survive_the_queue() -> None:
    sent = [
        messages.LoadRequest("r1", "m@1", "/views/m", "cpu", "float16", ("unet",), {"unet": ("norm",)},
                             read_bytes_per_s=None, files=(("lora", "a.safetensors"),)),
        messages.VerifyRequest("r6", (("/views/m/unet/w.safetensors", (66, 1234)),), 2, 1e9),
        messages.ReleaseRequest("r2", "m@1"), messages.HeldQuery("r3"), messages.InfoQuery("r4"),
        messages.DebugFill("r5", "m@1", "unet", "w", 7.0), messages.Stop(), messages.Ready(12),
        messages.Started("r1"), messages.Loaded("r1", b"payload", 1.5), messages.Answered("r3", {"m@1": 10}),
        messages.Failed("r1", "NotFound", "no such file", "Traceback..."),
    ]
    assert [pickle.loads(pickle.dumps(m)) for m in sent] == sent
    assert {m.kind for m in sent if isinstance(m, messages.Request)} == {"load", "verify", "release", "held", "info",
                                                                          "debug_fill"}


def test_child_is_a_separate_light_process(preloader: Preloader) -> None:
    info = preloader.info()
    assert preloader.is_alive() and info["pid"] == preloader.pid != os.getpid()
    # the child reads bytes; diffusers and transformers are the parent's business
    assert not info["diffusers_imported"] and not info["transformers_imported"]


def test_handoff_is_zero_copy_shared_memory(preloader: Preloader, tiny_family: list[Path]) -> None:
    weights = preloader.load("zc-1", "zero-copy", tiny_family[0]).result(WAIT_S)
    try:
        assert sorted(weights.components) == ["text_encoder", "unet", "vae"]
        # One shared-memory buffer per file, and every tensor a view into one of them: 3 handles, ~450 tensors.
        assert weights.timings.files == len(weights.buffers) == 3
        storages = {b.untyped_storage().data_ptr() for b in weights.buffers}
        n_tensors = 0
        for sd in weights.components.values():
            for t in sd.values():
                assert t.untyped_storage().data_ptr() in storages
                n_tensors += 1
        assert n_tensors > 100
        assert all(b.is_shared() for b in weights.buffers)
        # The message that crossed the queue holds handles and tensor layouts, not tensor bytes.
        assert weights.timings.bytes > 5_000_000
        assert weights.timings.wire_bytes < 64 * 1024 < weights.timings.bytes // 50

        # The decisive check: the child writes into its own memory and the parent's tensor changes. A pickled
        # copy (or any copy at all) would keep the old values, as the clone below does.
        name = "conv_in.weight"
        mine = weights.components["unet"][name]
        pointer, control = mine.data_ptr(), mine.clone()
        preloader.debug_fill("zero-copy", "unet", name, 7.0).result(WAIT_S)
        assert bool((mine == 7.0).all())
        assert not bool((control == 7.0).all())
        assert mine.data_ptr() == pointer

        # and assignment keeps the same memory: the pipeline's parameter is the handed-over tensor
        from hotslot.loading.layout import read_layout
        from hotslot.loading.materialize import build_pipeline

        pipe, _ = build_pipeline(read_layout(tiny_family[0]), weights.components)
        assert pipe.unet.conv_in.weight.data_ptr() == pointer
    finally:
        preloader.release("zero-copy").result(WAIT_S)


def test_pipeline_through_the_preloader_matches_from_pretrained(
    preloader: Preloader, tiny_family: list[Path]
) -> None:
    from diffusers import StableDiffusionPipeline

    pipe, report = load_pipeline(tiny_family[1], preloader=preloader, model_key="tiny-1")
    assert report.via_preloader and report.files == 3 and report.wire_bytes < 64 * 1024
    assert report.read_s > 0 and report.materialize_s > 0 and report.handoff_s >= 0
    # on CPU the child lets go once the pipeline holds the tensors; shared memory stays mapped in this process
    wait_for(lambda: "tiny-1" not in preloader.held(), "the automatic release")
    reference = StableDiffusionPipeline.from_pretrained(tiny_family[1], local_files_only=True)
    np.testing.assert_array_equal(_image(pipe), _image(reference))


def test_release_drops_the_childs_references(preloader: Preloader, tiny_family: list[Path]) -> None:
    a = preloader.load("rel-a", "model-a", tiny_family[0]).result(WAIT_S)
    preloader.load("rel-b", "model-b", tiny_family[1]).result(WAIT_S)
    held = preloader.held()
    assert held["model-a"] >= a.timings.bytes and "model-b" in held
    assert preloader.release("model-a").result(WAIT_S) == held["model-a"]
    assert "model-a" not in preloader.held() and "model-b" in preloader.held()
    assert bool(torch.isfinite(a.components["unet"]["conv_in.weight"]).all())  # still readable here
    assert preloader.release("model-b").result(WAIT_S) > 0
    assert preloader.release("never-loaded").result(WAIT_S) == 0
    assert preloader.held() == {}


def test_a_corrupt_file_comes_back_as_an_error_and_the_child_lives_on(
    preloader: Preloader, tiny_family: list[Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_family[0], broken)
    unet = broken / "unet" / "diffusion_pytorch_model.safetensors"
    raw = unet.read_bytes()
    unet.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])  # header length past the end of the file
    pid = preloader.pid
    with pytest.raises(DataLoss, match=r"unet/diffusion_pytorch_model\.safetensors is not a valid safetensors file"):
        preloader.load("bad-1", "broken", broken).result(WAIT_S)
    assert preloader.is_alive() and preloader.pid == pid
    assert preloader.held().get("broken") is None  # nothing half-loaded is kept
    with pytest.raises(NotFound, match="does not exist"):
        preloader.load("bad-2", "missing", tmp_path / "no-such-model").result(WAIT_S)
    weights = preloader.load("good-after-bad", "good", tiny_family[0]).result(WAIT_S)
    assert weights.timings.files == 3
    preloader.release("good").result(WAIT_S)


def test_bad_arguments_are_refused_in_the_parent(preloader: Preloader, tiny_family: list[Path]) -> None:
    with pytest.raises(InvalidArgument, match="dtype"):
        preloader.load("arg-1", "m", tiny_family[0], dtype="float8")
    with pytest.raises(InvalidArgument, match="device"):
        preloader.load("arg-2", "m", tiny_family[0], device="tpu")
    with pytest.raises(InvalidArgument, match="request_id"):
        preloader.load("", "m", tiny_family[0])


async def test_load_async_converts_dtype_once(preloader: Preloader, tiny_family: list[Path]) -> None:
    weights = await preloader.load_async("async-1", "async-fp16", tiny_family[0], dtype=torch.float16)
    try:
        assert weights.components["unet"]["conv_in.weight"].dtype == torch.float16
        assert weights.timings.bytes * 2 == pytest.approx(weights.timings.bytes_read, rel=0.01)
        assert all(b.is_shared() for b in weights.buffers)  # converted tensors are the shared ones
    finally:
        preloader.release("async-fp16").result(WAIT_S)


@pytest.mark.slow
def test_kill_9_mid_load_fails_the_load_and_restart_recovers(tiny_family: list[Path]) -> None:
    # The rate cap stretches a 7 MB load to seconds, so the kill lands while the child is reading.
    with Preloader(read_bytes_per_s=2_000_000) as p:
        first_pid = p.pid
        future = p.load("doomed", "tiny-0", tiny_family[0])
        wait_for(lambda: "doomed" in p.in_flight(), "the child to start loading")
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(Unavailable, match=r"preloader died while loading tiny-0 \(killed by SIGKILL, signal 9\)"):
            future.result(WAIT_S)
        wait_for(lambda: not p.is_alive(), "the death to be noticed")
        late = p.load("too-late", "tiny-0", tiny_family[0])
        with pytest.raises(Unavailable, match="not running"):
            late.result(WAIT_S)

        p.restart()
        assert p.is_alive() and p.pid != first_pid and p.restarts == 1
        weights = p.load("after-restart", "tiny-0", tiny_family[0], read_bytes_per_s=None).result(WAIT_S)
        assert weights.timings.files == 3


@pytest.mark.slow
def test_auto_restart_replaces_a_dead_child_a_bounded_number_of_times(tiny_family: list[Path]) -> None:
    with Preloader(auto_restart=1) as p:
        first_pid = p.pid
        os.kill(first_pid, signal.SIGKILL)
        wait_for(lambda: p.is_alive() and p.pid != first_pid, "the automatic restart")
        assert p.auto_restarts_used == 1 and "signal 9" in p.last_exit
        assert p.load("auto-1", "tiny-0", tiny_family[0]).result(WAIT_S).timings.files == 3

        os.kill(p.pid, signal.SIGKILL)  # the budget is spent: it stays down
        wait_for(lambda: not p.is_alive() and p.last_exit is not None, "the second death")
        with pytest.raises(Unavailable):
            p.load("auto-2", "tiny-0", tiny_family[0]).result(WAIT_S)
        assert p.auto_restarts_used == 1


def test_requests_after_close_fail_unavailable(tiny_family: list[Path]) -> None:
    p = Preloader()
    p.start()
    p.close()
    assert not p.is_alive()
    with pytest.raises(Unavailable, match="closed"):
        p.load("closed-1", "tiny-0", tiny_family[0]).result(WAIT_S)


@pytest.mark.gpu
@cuda
def test_cuda_handoff_uses_ipc_and_the_child_keeps_the_memory(tiny_family: list[Path]) -> None:
    with Preloader() as p:
        weights = p.load("cuda-1", "tiny-cuda", tiny_family[0], device="cuda", dtype=torch.float16).result(WAIT_S)
        assert all(b.is_cuda for b in weights.buffers) and weights.timings.wire_bytes < 64 * 1024
        w = weights.components["unet"]["conv_in.weight"]
        p.debug_fill("tiny-cuda", "unet", "conv_in.weight", 3.0).result(WAIT_S)
        assert bool((w == 3.0).all())  # same device memory
        assert p.held()["tiny-cuda"] > 0
        owned = weights.owned_copy()
        p.release("tiny-cuda").result(WAIT_S)
        assert bool((owned.components["unet"]["conv_in.weight"] == 3.0).all())


@pytest.mark.parametrize(("dtype", "convert_here"), [(None, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_map_files_maps_what_needs_no_conversion_and_the_rest_is_converted_once(
    preloader: Preloader, tiny_family: list[Path], dtype: torch.dtype | None, convert_here: bool
) -> None:
    """The tiny family is stored as float32: kept as it is, every file is mapped and the child reads nothing;
    converted to bfloat16, the child converts them into shared memory, or with `convert_here` this process does,
    into private memory, and the child is not asked at all. Every way, the images equal from_pretrained's."""
    from diffusers import StableDiffusionPipeline

    from hotslot.loading.layout import read_layout
    from hotslot.loading.materialize import build_pipeline
    from hotslot.loading.pipeline_loader import read_weights

    layout = read_layout(tiny_family[2])
    prefetched = []
    weights = read_weights(preloader, layout, "mapped", "cpu", dtype, map_files=True, convert_here=convert_here,
                           meanwhile=lambda: prefetched.append(True))
    try:
        assert prefetched == [True]
        shared = [buf.is_shared() for buf in weights.buffers]
        assert len(shared) == 3 and len(weights.components) == 3
        if dtype is None or convert_here:
            assert not any(shared) and "mapped" not in preloader.held()  # nothing went through the child
        else:
            assert all(shared) and "mapped" in preloader.held()  # converted in the child, handed over
        if dtype is not None:
            assert all(t.dtype == dtype for t in weights.components["unet"].values() if t.is_floating_point())
        pipe, _ = build_pipeline(layout, weights.components, dtype=dtype)
        reference = StableDiffusionPipeline.from_pretrained(
            tiny_family[2], local_files_only=True, dtype=dtype or torch.float32
        )
        np.testing.assert_array_equal(_image(pipe), _image(reference))
    finally:
        preloader.release("mapped").result(WAIT_S)


def _copy_of(model: Path, tmp_path: Path, *, checksummed: bool):
    """A copy of `model` to change, with the read checksum recorded on its weight files when `checksummed` (as the
    storage-cache records it); returns its layout and weight files."""
    from hotslot.loading.layout import read_layout

    root = tmp_path / "model"
    shutil.copytree(model, root)
    layout = read_layout(root)
    weight_files = [p for comp in layout.weight_components().values() for p in comp.weight_files]
    if checksummed:
        for path in weight_files:
            record_checksum(path)
    return layout, weight_files


@pytest.mark.parametrize(("dtype", "convert_here"), [(None, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["mapped", "converted in the child", "converted here"])
def test_files_the_storage_cache_hashed_for_this_load_are_not_hashed_again_the_others_are(
    preloader: Preloader, tiny_family: list[Path], tmp_path: Path, dtype: torch.dtype | None, convert_here: bool
) -> None:
    """`hashed` names the files the storage-cache copied and hashed for this very load: read_weights (mapped,
    converted in the child or here) reads them unchecked, and still checks every other file."""
    from hotslot.errors import CorruptRead
    from hotslot.loading.pipeline_loader import read_weights

    layout, _ = _copy_of(tiny_family[2], tmp_path, checksummed=True)
    unet = layout.component("unet").weight_files[0]
    flip_byte(unet)  # a flipped byte under the recorded checksum
    rel = layout.relative(unet)

    def read(hashed: frozenset[str]):
        return read_weights(preloader, layout, "hashed", "cpu", dtype, map_files=True, convert_here=convert_here,
                            hashed=hashed)

    with pytest.raises(CorruptRead) as caught:
        read(frozenset({"vae/diffusion_pytorch_model.safetensors"}))  # another file: the UNet is still checked
    assert caught.value.path == str(unet)
    try:
        weights = read(frozenset({rel}))
        assert set(weights.components) == {"unet", "vae", "text_encoder"}
    finally:
        preloader.release("hashed").result(WAIT_S)


@pytest.mark.parametrize(("dtype", "checksummed"), [(None, False), (None, True), (torch.bfloat16, True)],
                         ids=["mapped, populated", "mapped, verified", "converted here"])
def test_a_read_rate_cap_paces_what_the_executor_reads_itself_too(
    preloader: Preloader, tiny_family: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype | None, checksummed: bool,
) -> None:
    """`read_bytes_per_s` used to pace only the preloader child: with the CPU defaults (files mapped, conversions
    done in the executor) nothing went through the child, so the cap did nothing. Every byte this process reads
    (populated, verified or converted) is now accounted to the cap, which sleeps when the reads run ahead."""
    from hotslot.loading import reader as reader_mod
    from hotslot.loading.pipeline_loader import read_weights

    layout, weight_files = _copy_of(tiny_family[2], tmp_path, checksummed=checksummed)
    accounted: list[int] = []
    slept: list[float] = []
    real = reader_mod._RateCap.account

    def spy(self, nbytes: int) -> float:
        accounted.append(nbytes)
        slept.append(real(self, nbytes))
        return slept[-1]

    monkeypatch.setattr(reader_mod._RateCap, "account", spy)
    data_bytes = sum(reader_mod.read_header(p).data_bytes for p in weight_files)
    rate = data_bytes / 0.5  # half a second's worth: the reads run ahead of it, so the cap must sleep
    weights = read_weights(preloader, layout, "capped", "cpu", dtype, map_files=True, convert_here=True,
                           read_bytes_per_s=rate)
    try:
        assert "capped" not in preloader.held()  # everything was read here, not by the child
        assert sum(accounted) >= data_bytes
        assert sum(slept) > 0
    finally:
        del weights
        preloader.release("capped").result(WAIT_S)


def test_a_conversion_here_sizes_the_automatic_host_pool_and_the_next_one_reuses_that_memory(
    preloader: Preloader, tiny_family: list[Path], tmp_path: Path
) -> None:
    from hotslot.loading.hostpool import HostPool
    from hotslot.loading.pipeline_loader import read_weights
    from hotslot.loading.reader import set_host_pool

    layout, _ = _copy_of(tiny_family[2], tmp_path, checksummed=False)
    pool = HostPool(0, grow_up_to=1 << 40)
    previous = set_host_pool(pool)
    try:
        weights = read_weights(preloader, layout, "pooled", "cpu", torch.bfloat16, map_files=True, convert_here=True)
        converted = weights.timings.bytes
        tensors = {c: {k: v.clone() for k, v in sd.items()} for c, sd in weights.components.items()}
        assert converted > 0 and pool.limit_bytes >= converted  # the pool keeps room for this model
        assert pool.created > 0 and pool.reused == 0
        del weights
        gc.collect()
        assert pool.free_bytes >= converted  # its memory stayed in the pool when it was dropped
        created = pool.created
        again = read_weights(preloader, layout, "pooled", "cpu", torch.bfloat16, map_files=True, convert_here=True)
        assert pool.created == created and pool.reused > 0  # converted into that memory: nothing new made
        for c, sd in again.components.items():
            assert all(torch.equal(v, tensors[c][k]) for k, v in sd.items())
        del again
    finally:
        set_host_pool(previous)


def test_an_idle_preloader_checks_the_mapped_files_in_its_process_and_catches_a_corrupt_one(
    preloader: Preloader, tiny_family: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files mapped in this process are hashed by the idle preloader child (its own core, its own interpreter)
    while this process faults them in: this process hashes nothing, the weights equal the files', and a flipped
    byte still fails the read with CorruptRead naming the file."""
    from hotslot.errors import CorruptRead
    from hotslot.loading import pipeline_loader
    from hotslot.loading.pipeline_loader import read_weights
    from hotslot.loading.reader import read_safetensors

    layout, weight_files = _copy_of(tiny_family[2], tmp_path, checksummed=True)
    hashed_here: list[int] = []
    real = pipeline_loader.verify_mapped
    monkeypatch.setattr(pipeline_loader, "verify_mapped", lambda files, *a: hashed_here.append(len(files)) or
                        real(files, *a))
    weights = read_weights(preloader, layout, "checked", "cpu", None, map_files=True, convert_here=True)
    assert weights.timings.mapped_checked_by == "preloader" and hashed_here == []
    assert "checked" not in preloader.held()  # the child only checked: it holds nothing
    unet = layout.component("unet").weight_files[0]
    for name, tensor in read_safetensors(unet).tensors().items():
        assert torch.equal(weights.components["unet"][name], tensor)
    del weights

    flip_byte(unet)
    with pytest.raises(CorruptRead) as caught:
        read_weights(preloader, layout, "checked", "cpu", None, map_files=True, convert_here=True)
    assert caught.value.path == str(unet) and hashed_here == []
    assert preloader.is_alive()


@pytest.mark.parametrize("why", ["busy", "child failed"])
def test_mapped_files_are_checked_here_when_the_preloader_is_busy_or_cannot_check(
    preloader: Preloader, tiny_family: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    """A check queued behind a load would wait for it, so with a load in the child the files are hashed here;
    and when the child cannot answer (it died, or a path names another file now) they are hashed here too.
    Either way a corrupt file is still caught."""
    from concurrent.futures import Future

    from hotslot.errors import CorruptRead, Unavailable
    from hotslot.loading.pipeline_loader import read_weights

    layout, _ = _copy_of(tiny_family[2], tmp_path, checksummed=True)
    if why == "busy":
        monkeypatch.setattr(preloader, "idle", lambda: False)
    else:
        def died(*_a, **_k) -> Future:
            future: Future = Future()
            future.set_exception(Unavailable("the preloader died while answering verify"))
            return future

        monkeypatch.setattr(preloader, "verify", died)
    weights = read_weights(preloader, layout, "here", "cpu", None, map_files=True, convert_here=True)
    assert weights.timings.mapped_checked_by == "executor"
    del weights
    unet = layout.component("unet").weight_files[0]
    flip_byte(unet)
    with pytest.raises(CorruptRead) as caught:
        read_weights(preloader, layout, "here", "cpu", None, map_files=True, convert_here=True)
    assert caught.value.path == str(unet)


def test_the_child_refuses_to_check_a_path_that_names_another_file_than_the_mapping(
    preloader: Preloader, tiny_family: list[Path], tmp_path: Path
) -> None:
    """The check answers for the bytes the parent mapped: a path replaced since (a corrupt blob refetched into a
    new file) is refused with FailedPrecondition rather than checked, and the same file passes."""
    from hotslot.errors import FailedPrecondition
    from hotslot.loading.reader import map_safetensors

    _, weight_files = _copy_of(tiny_family[2], tmp_path, checksummed=True)
    path = weight_files[0]
    mapped = map_safetensors(path)
    assert preloader.verify([(path, mapped.identity)]).result(WAIT_S) == path.stat().st_size
    replacement = path.with_suffix(".new")
    shutil.copy2(path, replacement)
    os.replace(replacement, path)  # same path and bytes, another file: the mapping still shows the old one
    with pytest.raises(FailedPrecondition, match="not the file that was mapped"):
        preloader.verify([(path, mapped.identity)]).result(WAIT_S)
    assert preloader.is_alive()
