"""LoRA adapters served by a real executor (registry and storage-cache as separate processes, tiny real pipelines
and adapters written by hotslot.modelgen.lora): an adapter changes the image and gives the same bytes every time,
A, B, A gives A's bytes again and the base alone its own, without rereading or rebuilding the base; kohya naming,
scales, refusals (wrong shapes, two bases, too many), Preload of an adapter, and the preloader killed while it
reads an adapter; the router passing adapters on and listing them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from safetensors.torch import load_file, save_file

from hotslot.common.v1 import common_pb2
from hotslot.executor.v1 import executor_service_pb2 as epb
from hotslot.modelgen.lora import LORA_FILE, write_lora
from hotslot.registry.v1 import registry_service_pb2 as rpb
from hotslot.registry.v1 import registry_service_pb2_grpc as rgrpc
from hotslot.router.v1 import router_service_pb2 as rpb_router
from hotslot.router.v1 import router_service_pb2_grpc as rgrpc_router
from tests.support.stack import Stack, executor_stub, generate_request, ms, start_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

BASE = "tiny-sd-0"


def register_adapters(stack: Stack, adapters: dict[str, tuple[Path, str]]) -> None:
    """Copies each adapter directory into the share and registers it as a LORA_ADAPTER of its base."""
    import shutil

    with grpc.insecure_channel(stack.registry.address) as channel:
        stub = rgrpc.RegistryServiceStub(channel)
        for model_id, (path, base) in adapters.items():
            shutil.copytree(path, stack.share / "loras" / model_id)
            stub.RegisterModel(rpb.RegisterModelRequest(
                model_id=model_id, kind=common_pb2.MODEL_KIND_LORA_ADAPTER, base_model_id=base,
                source=f"loras/{model_id}"), timeout=60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_family: list[Path]):
    root = tmp_path_factory.mktemp("lora-stack")
    s = start_stack(root, tiny_family)
    made = root / "made"
    base0, base1 = tiny_family[0], tiny_family[1]
    bad = write_lora(made / "lora-bad", base0, seed=5)
    tensors = load_file(str(bad / LORA_FILE))
    first = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    tensors[first] = tensors[first][:, :-8].contiguous()  # one factor narrower than its module's input
    save_file(tensors, str(bad / LORA_FILE))
    register_adapters(s, {
        "lora-a": (write_lora(made / "lora-a", base0, seed=1), BASE),
        "lora-b": (write_lora(made / "lora-b", base0, seed=2, rank=8, text_encoder=True), BASE),
        "lora-a-kohya": (write_lora(made / "lora-a-kohya", base0, seed=1, fmt="kohya"), BASE),
        "lora-c": (write_lora(made / "lora-c", base0, seed=3), BASE),
        "lora-bad": (bad, BASE),
        "lora-on-1": (write_lora(made / "lora-on-1", base1, seed=4), "tiny-sd-1"),
        "lora-big": (write_lora(made / "lora-big", base0, seed=6, rank=256), BASE),
    })
    s.bad_key = first
    yield s
    s.stop()


@pytest.fixture(scope="module")
def executor(stack: Stack):
    svc = stack.start_executor("--max-adapters", "3")
    with grpc.insecure_channel(svc.address) as channel:
        yield svc, executor_stub(channel)


def adapter_ref(model_id: str, scale: float | None = None) -> common_pb2.AdapterRef:
    ref = common_pb2.AdapterRef(model=common_pb2.ModelRef(model_id=model_id))
    if scale is not None:
        ref.scale = scale
    return ref


def run(stub, model: str = BASE, *adapters: common_pb2.AdapterRef, seed: int = 7) -> epb.GenerateResponse:
    request = generate_request(model, seed=seed)
    request.adapters.extend(adapters)
    return stub.Generate(request, timeout=120)


def png(reply: epb.GenerateResponse) -> bytes:
    return reply.images[0].data


def held_adapters(stub) -> dict[str, epb.HeldAdapter]:
    return {a.model.model_id: a for a in stub.GetStatus(epb.GetStatusRequest()).status.adapters}


def test_an_adapter_changes_the_image_and_gives_the_same_bytes_every_time(executor) -> None:
    _, stub = executor
    base = run(stub)
    as_model = run(stub, "lora-a")
    on_base = run(stub, BASE, adapter_ref("lora-a"))
    again = run(stub, "lora-a")
    assert png(as_model) != png(base)
    assert png(as_model) == png(on_base) == png(again)
    assert as_model.model.model_id == BASE  # it ran on its base
    assert [(a.model.model_id, a.model.revision, a.scale) for a in as_model.adapters] == [("lora-a", 1, 1.0)]
    assert as_model.adapters[0].tier in (common_pb2.TIER_LOCAL_DISK, common_pb2.TIER_BACKING_STORE)
    assert again.adapters[0].tier == common_pb2.TIER_ACTIVE  # loaded in the active pipeline already
    assert run(stub, "lora-a", seed=8).images[0].data != png(as_model)


def test_switching_a_b_a_gives_a_again_and_the_base_after_without_rebuilding_the_base(executor) -> None:
    _, stub = executor
    other = run(stub, "tiny-sd-1")  # shares tiny-sd-0's text encoder files; lora-b adapts the text encoder
    base = run(stub)
    a, b, a2, plain = run(stub, "lora-a"), run(stub, "lora-b"), run(stub, "lora-a"), run(stub)
    assert png(a2) == png(a) and png(plain) == png(base)
    assert len({png(base), png(a), png(b)}) == 3
    for reply in (a, b, a2, plain):
        assert reply.tier == common_pb2.TIER_ACTIVE and ms(reply.timings.materialize) == 0  # the base stayed resident
    for reply in (a, a2, plain):  # nothing read at all (b's first use read b, not the base)
        assert ms(reply.timings.read) == 0 and ms(reply.timings.ensure) == 0
    assert b.adapters[0].tier in (common_pb2.TIER_LOCAL_DISK, common_pb2.TIER_BACKING_STORE)
    assert a2.adapters[0].tier == common_pb2.TIER_ACTIVE
    held = held_adapters(stub)
    assert held["lora-a"].tier == held["lora-b"].tier == common_pb2.TIER_ACTIVE
    assert held["lora-a"].base.model_id == BASE and held["lora-a"].size_bytes > 0
    host = next(t for t in stub.GetStatus(epb.GetStatusRequest()).status.tiers if t.tier == common_pb2.TIER_HOST)
    assert host.used_bytes >= held["lora-a"].size_bytes + held["lora-b"].size_bytes
    assert png(run(stub, "tiny-sd-1")) == png(other)  # a text-encoder adapter changes only its requests' images


def test_fine_tunes_hold_their_shared_vae_and_text_encoder_once_and_status_shows_it(executor) -> None:
    _, stub = executor
    run(stub, "tiny-sd-1")
    run(stub, "lora-b")  # a text-encoder adapter on tiny-sd-0, which shares its text encoder with tiny-sd-1
    status = stub.GetStatus(epb.GetStatusRequest()).status
    held = {m.model.model_id: m for m in status.models}
    family = [held[m] for m in ("tiny-sd-0", "tiny-sd-1", "tiny-sd-2") if m in held]
    assert len(family) >= 2
    for m in family:
        assert m.shared_bytes > 0 and m.unique_bytes > 0 and m.unique_bytes + m.shared_bytes == m.size_bytes
    assert len({m.shared_bytes for m in family}) == 1  # the same VAE and text encoder
    adapters = sum(a.size_bytes for a in status.adapters)
    # the tiers count the shared bytes once: each model's UNet, one VAE and text encoder, and the adapters
    assert sum(t.used_bytes for t in status.tiers) == sum(m.unique_bytes for m in family) + family[0].shared_bytes \
        + adapters


def test_kohya_naming_and_scales(executor) -> None:
    _, stub = executor
    base, a = run(stub), run(stub, "lora-a")
    assert png(run(stub, "lora-a-kohya")) == png(a)
    assert png(run(stub, BASE, adapter_ref("lora-a", 0.0))) == png(base)  # an explicit 0 is kept
    half = run(stub, BASE, adapter_ref("lora-a", 0.5))
    assert png(half) not in (png(a), png(base)) and half.adapters[0].scale == 0.5
    stacked = run(stub, "lora-a", adapter_ref("lora-c", 0.7))
    assert [x.model.model_id for x in stacked.adapters] == ["lora-a", "lora-c"]
    assert png(stacked) not in (png(a), png(run(stub, "lora-c")))


def test_refusals_name_what_is_wrong_and_the_base_keeps_serving(executor, stack: Stack) -> None:
    _, stub = executor
    base = run(stub)
    with pytest.raises(grpc.RpcError) as err:
        run(stub, "lora-bad")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stack.bad_key in err.value.details() and "lora-bad" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        run(stub, BASE, adapter_ref("lora-a"), adapter_ref("lora-on-1"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "one base" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        run(stub, "lora-a", adapter_ref("lora-b"), adapter_ref("lora-c"), adapter_ref("lora-a-kohya"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 3" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        run(stub, BASE, adapter_ref("tiny-sd-1"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a LORA_ADAPTER" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        run(stub, BASE, adapter_ref("ghost"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert png(run(stub)) == png(base)


def test_preload_of_an_adapter_puts_its_weights_in_the_host_tier(executor) -> None:
    _, stub = executor
    stub.Evict(epb.EvictRequest(model=common_pb2.ModelRef(model_id="lora-c")))
    reply = stub.Preload(epb.PreloadRequest(model=common_pb2.ModelRef(model_id="lora-c")), timeout=120)
    assert reply.model.model_id == "lora-c" and reply.tier == common_pb2.TIER_HOST
    held = held_adapters(stub)["lora-c"]
    assert held.tier == common_pb2.TIER_HOST and held.size_bytes > 0
    served = run(stub, "lora-c")
    assert served.adapters[0].tier == common_pb2.TIER_HOST and ms(served.timings.read) == 0


def test_the_router_forwards_adapters_and_lists_them(executor, stack: Stack) -> None:
    svc, stub = executor
    direct = run(stub, BASE, adapter_ref("lora-a"), adapter_ref("lora-c", 0.5))
    router = stack.start_router(executors=[svc], name="lora-router")
    with grpc.insecure_channel(router.address) as channel:
        front = rgrpc_router.RouterServiceStub(channel)
        wait_for(lambda: front.GetClusterStatus(rpb_router.GetClusterStatusRequest()).executors, what="executor seen")
        request = rpb_router.GenerateRequest(model=common_pb2.ModelRef(model_id=BASE),
                                             params=common_pb2.GenerationParams(prompt="a lighthouse at dusk", seed=7))
        request.adapters.extend([adapter_ref("lora-a"), adapter_ref("lora-c", 0.5)])
        routed = front.Generate(request, timeout=120)
        assert routed.images[0].data == png(direct)
        assert [a.model.model_id for a in routed.adapters] == ["lora-a", "lora-c"]
        as_model = front.Generate(rpb_router.GenerateRequest(
            model=common_pb2.ModelRef(model_id="lora-a"),
            params=common_pb2.GenerationParams(prompt="a lighthouse at dusk", seed=7)), timeout=120)
        assert as_model.images[0].data == png(run(stub, "lora-a"))
        cluster = front.GetClusterStatus(rpb_router.GetClusterStatusRequest())
        listed = {a.model.model_id: a for e in cluster.executors for a in e.adapters}
        assert {"lora-a", "lora-c"} <= set(listed) and listed["lora-a"].size_bytes > 0
    shown = subprocess.run([sys.executable, "-m", "hotslot.cli.main", "status", "--router", router.address],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "300"})
    assert shown.returncode == 0, shown.stderr
    assert "lora-a@1 (active)" in shown.stdout, shown.stdout


def test_preloader_killed_while_reading_an_adapter_leaves_the_base_serving(stack: Stack) -> None:
    # Reads go through the preloader (not mapped) at 2 MB/s, so the rank-256 adapter takes seconds to read.
    svc = stack.start_executor("--preload-read-bytes-per-s", "2MB", "--no-map-view-files",
                               "--no-convert-in-executor", name="lora-kill")
    try:
        with grpc.insecure_channel(svc.address) as channel:
            stub = executor_stub(channel)
            base = run(stub)
            old_pid = stub.GetStatus(epb.GetStatusRequest()).status.preloader.pid
            outcome = {}

            def with_adapter() -> None:
                try:
                    outcome["reply"] = run(stub, "lora-big")
                except grpc.RpcError as err:
                    outcome["error"] = err

            thread = threading.Thread(target=with_adapter)
            thread.start()
            wait_for(lambda: stub.GetStatus(epb.GetStatusRequest()).status.preloader.loading.model_id == "lora-big",
                     what="adapter read started")
            time.sleep(0.5)
            os.kill(old_pid, signal.SIGKILL)
            served = run(stub)  # the base is active and keeps serving
            assert served.tier == common_pb2.TIER_ACTIVE and png(served) == png(base)
            thread.join(120)
            if "error" in outcome:  # the lost read may fail with UNAVAILABLE; it must not be anything else
                assert outcome["error"].code() == grpc.StatusCode.UNAVAILABLE
            else:
                assert outcome["reply"].adapters[0].model.model_id == "lora-big"
            after = wait_for(lambda: (s := stub.GetStatus(epb.GetStatusRequest()).status).preloader.alive
                             and s.preloader.pid != old_pid and s, what="preloader restarted")
            assert after.preloader.restarts >= 1
            assert png(run(stub)) == png(base)
    finally:
        svc.stop()
