"""The executor with registry and storage-cache as separate processes and tiny real pipelines: generation and
determinism, tier transitions, lookahead preloading, the preloader dying mid-load, cancellation, refusals, and
batching of compatible queued requests with the queue and costs in the status."""
from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from PIL import Image

from hotslot.common.v1 import common_pb2
from hotslot.executor.v1 import executor_service_pb2 as epb
from tests.support.metrics import Scrape
from tests.support.stack import Stack, executor_stub, generate_request, ms, start_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

COLD = (common_pb2.TIER_BACKING_STORE, common_pb2.TIER_LOCAL_DISK)
MODEL_BYTES = 6_735_569  # weights of one tiny pipeline (fp32)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_family: list[Path]):
    s = start_stack(tmp_path_factory.mktemp("executor-stack"), tiny_family)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def executor(stack: Stack):
    """One executor whose standby tier holds one tiny model and host tier two. The family's models share their VAE
    and text encoder (2.8 MB), counted once in the fastest tier holding them: a model beside the active one costs
    the standby tier its UNet (3.96 MB) alone, so 7 MB holds one whole model (6.72 MB) or one UNet beside the
    active model, not two."""
    svc = stack.start_executor("--standby-budget-bytes", "7MB", "--host-budget-bytes", "16MB",
                               "--queue-capacity", "2")
    with grpc.insecure_channel(svc.address) as channel:
        yield svc, executor_stub(channel)


def status(stub) -> epb.ExecutorStatus:
    return stub.GetStatus(epb.GetStatusRequest()).status


def tiers_held(stub) -> dict[str, int]:
    return {m.model.model_id: m.tier for m in status(stub).models}


def test_generate_is_deterministic_by_seed(executor) -> None:
    _, stub = executor
    first = stub.Generate(generate_request("tiny-sd-0", seed=11, num_images=2), timeout=120)
    again = stub.Generate(generate_request("tiny-sd-0", seed=11, num_images=2), timeout=120)
    other = stub.Generate(generate_request("tiny-sd-0", seed=12), timeout=120)
    assert [i.data for i in first.images] == [i.data for i in again.images]
    assert first.images[0].data != first.images[1].data  # image i uses seed + i
    assert [i.seed for i in first.images] == [11, 12]
    assert other.images[0].data != first.images[0].data
    img = Image.open(io.BytesIO(first.images[0].data))
    assert img.format == "PNG" and img.size == (64, 64) and first.images[0].mime_type == "image/png"
    assert first.model.model_id == "tiny-sd-0" and first.model.revision == 1
    assert first.request_id and first.executor_id == status(stub).executor_id
    assert ms(first.timings.denoise) > 0 and ms(first.timings.encode) > 0


def test_switching_models_walks_the_tiers(executor) -> None:
    _, stub = executor
    for m in list(tiers_held(stub)):
        stub.Evict(epb.EvictRequest(model=common_pb2.ModelRef(model_id=m)))
    sequence = ["tiny-sd-0", "tiny-sd-0", "tiny-sd-1", "tiny-sd-0", "tiny-sd-2", "tiny-sd-1", "tiny-sd-0"]
    replies = [stub.Generate(generate_request(m), timeout=120) for m in sequence]
    tiers = [r.tier for r in replies]
    assert tiers[0] in COLD and tiers[2] in COLD and tiers[4] in COLD
    assert tiers[1] == common_pb2.TIER_ACTIVE
    assert tiers[3] == common_pb2.TIER_STANDBY  # swapped back from beside the active one
    assert tiers[5] == common_pb2.TIER_HOST and tiers[6] == common_pb2.TIER_HOST  # standby budget holds one
    cold, warm = replies[0].timings, replies[3].timings
    assert ms(cold.read) > 0 and ms(cold.materialize) > 0 and ms(cold.ensure) > 0
    assert ms(warm.read) == 0 and ms(warm.materialize) == 0 and ms(warm.ensure) == 0
    host = replies[5].timings
    assert ms(host.read) == 0 and ms(host.materialize) > 0
    usage = {t.tier: t for t in status(stub).tiers}
    for tier in (common_pb2.TIER_STANDBY, common_pb2.TIER_HOST):
        assert usage[tier].used_bytes <= usage[tier].budget_bytes
    assert tiers_held(stub) == {"tiny-sd-0": common_pb2.TIER_ACTIVE, "tiny-sd-1": common_pb2.TIER_STANDBY,
                                "tiny-sd-2": common_pb2.TIER_HOST}


def test_lookahead_preloads_the_next_model_while_the_current_one_computes(stack: Stack) -> None:
    svc = stack.start_executor(name="lookahead")
    try:
        with grpc.insecure_channel(svc.address) as channel:
            stub = executor_stub(channel)
            stub.Generate(generate_request("tiny-sd-0"), timeout=120)  # A active
            slow = stub.GenerateStream(epb.GenerateStreamRequest(
                model=common_pb2.ModelRef(model_id="tiny-sd-0"),
                params=common_pb2.GenerationParams(prompt="slow", steps=150, width=128, height=128)), timeout=300)
            next(m for m in slow if m.HasField("step"))  # A is denoising
            result = {}
            queued = threading.Thread(
                target=lambda: result.update(b=stub.Generate(generate_request("tiny-sd-1"), timeout=300)))
            queued.start()
            # B waits behind A; the executor loads it beside A's computation.
            wait_for(lambda: tiers_held(stub).get("tiny-sd-1") == common_pb2.TIER_STANDBY, what="B in standby")
            slow.cancel()
            queued.join(120)
            b = result["b"]
            assert b.tier == common_pb2.TIER_STANDBY
            assert ms(b.timings.read) == 0 and ms(b.timings.ensure) == 0 and ms(b.timings.materialize) == 0
    finally:
        svc.stop()


def test_a_host_pool_converts_the_next_model_into_the_memory_an_evicted_one_used(stack: Stack) -> None:
    # The tiny family is stored float32: served as bfloat16 every file is converted in the executor, into memory
    # from the pool once an evicted model has left some there. The pool is on by default, sized automatically: it
    # keeps as much as the first model's conversion took. (A pool of a given size: the reserve test below, and
    # tests/unit/test_loading_hostpool.py.)
    svc = stack.start_executor("--dtype", "bfloat16", "--no-lookahead", name="pool")
    try:
        with grpc.insecure_channel(svc.address) as channel:
            stub = executor_stub(channel)
            first = stub.Generate(generate_request("tiny-sd-0", seed=9), timeout=120)
            stub.Evict(epb.EvictRequest(model=common_pb2.ModelRef(model_id="tiny-sd-0")), timeout=60)
            wait_for(lambda: Scrape(svc).value("hotslot_executor_host_pool_free_bytes") > 0,
                     what="the evicted model's memory in the pool")
            stub.Generate(generate_request("tiny-sd-1"), timeout=120)
            scrape = Scrape(svc)
            assert scrape.value("hotslot_executor_host_pool_allocations_total", result="reused") >= 1
            stub.Evict(epb.EvictRequest(model=common_pb2.ModelRef(model_id="tiny-sd-1")), timeout=60)
            again = stub.Generate(generate_request("tiny-sd-0", seed=9), timeout=120)
            assert again.images[0].data == first.images[0].data  # read into recycled memory: the same image
    finally:
        svc.stop()


def test_a_reserved_host_pool_is_made_before_the_executor_serves_and_takes_its_first_conversions(
        stack: Stack) -> None:
    svc = stack.start_executor("--dtype", "bfloat16", "--host-pool-bytes", "64MiB", "--host-pool-reserve",
                               "--no-lookahead", name="reserve")
    try:
        assert Scrape(svc).value("hotslot_executor_host_pool_free_bytes") == 64 * 1024 * 1024  # before any load
        with grpc.insecure_channel(svc.address) as channel:
            executor_stub(channel).Generate(generate_request("tiny-sd-0", seed=9), timeout=120)
        scrape = Scrape(svc)
        assert scrape.value("hotslot_executor_host_pool_allocations_total", result="reused") >= 1
        assert scrape.value("hotslot_executor_host_pool_allocations_total", result="created") == 0
    finally:
        svc.stop()


def test_preloader_killed_mid_load_executor_keeps_serving(stack: Stack) -> None:
    # A read-rate cap makes each load last a few seconds, so the kill lands mid-load.
    # Files kept in their dtype would be mapped, not read: this test needs the preloader to read them.
    svc = stack.start_executor("--preload-read-bytes-per-s", "2MB", "--no-map-view-files", name="kill")
    try:
        with grpc.insecure_channel(svc.address) as channel:
            stub = executor_stub(channel)
            stub.Generate(generate_request("tiny-sd-0"), timeout=120)
            old_pid = status(stub).preloader.pid
            outcome = {}

            def preload() -> None:
                try:
                    outcome["reply"] = stub.Preload(epb.PreloadRequest(model=common_pb2.ModelRef(model_id="tiny-sd-1")),
                                                    timeout=120)
                except grpc.RpcError as err:
                    outcome["error"] = err

            thread = threading.Thread(target=preload)
            thread.start()
            wait_for(lambda: status(stub).preloader.loading.model_id == "tiny-sd-1", what="preload started")
            time.sleep(1.0)  # let the child read part of the files
            os.kill(old_pid, signal.SIGKILL)
            served = stub.Generate(generate_request("tiny-sd-0"), timeout=120)  # the active model still serves
            assert served.tier == common_pb2.TIER_ACTIVE and served.images
            thread.join(120)
            if "error" in outcome:  # the lost preload may fail with UNAVAILABLE; it must not be anything else
                assert outcome["error"].code() == grpc.StatusCode.UNAVAILABLE
            after = wait_for(lambda: (s := status(stub)).preloader.alive and s.preloader.pid != old_pid and s,
                             what="preloader restarted")
            assert after.preloader.restarts >= 1
            wait_for(lambda: Scrape(svc).value("hotslot_executor_preloader_restarts_total") >= 1,
                     what="the restart counted on /metrics")
            again = stub.Preload(epb.PreloadRequest(model=common_pb2.ModelRef(model_id="tiny-sd-1")), timeout=120)
            assert again.tier == common_pb2.TIER_STANDBY
            assert stub.Generate(generate_request("tiny-sd-1"), timeout=120).tier == common_pb2.TIER_STANDBY
    finally:
        svc.stop()
    assert "preloader process" in svc.log() and "died" in svc.log()


def test_cancelled_and_expired_calls_stop_denoising_and_free_the_executor(executor) -> None:
    svc, stub = executor
    stub.Generate(generate_request("tiny-sd-0"), timeout=120)
    stream = stub.GenerateStream(epb.GenerateStreamRequest(
        model=common_pb2.ModelRef(model_id="tiny-sd-0"),
        params=common_pb2.GenerationParams(prompt="long", steps=150, width=128, height=128)), timeout=300)
    next(m for m in stream if m.HasField("step"))
    stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(generate_request("tiny-sd-0", steps=150, width=128, height=128), timeout=1.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    reply = stub.Generate(generate_request("tiny-sd-0"), timeout=120)
    assert reply.images
    wait_for(lambda: status(stub).queue_depth == 0, what="idle executor")
    log = svc.log()
    assert "cancelled after" in log and "of 150 steps" in log


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (dict(width=65), "params.width"),
        (dict(height=4096), "params.height"),
        (dict(steps=1000), "params.steps"),
        (dict(num_images=99), "params.num_images"),
        (dict(prompt="x" * 5000), "params.prompt"),
        (dict(prompt=""), "params.prompt"),
    ],
)
def test_bad_parameters_are_invalid_argument(executor, params, field) -> None:
    _, stub = executor
    kwargs = {"prompt": "ok", **params}
    request = generate_request("tiny-sd-0", **{k: v for k, v in kwargs.items() if k != "prompt"})
    request.params.prompt = kwargs["prompt"]
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


@pytest.mark.parametrize("request_id", ["r1\n2026-01-01T00:00:00.000Z INFO    forged [executor] hello", "r" * 100_000])
def test_a_request_id_with_a_newline_or_100_kb_long_is_invalid_argument(executor, request_id) -> None:
    svc, stub = executor
    request = generate_request("tiny-sd-0")
    request.request_id = request_id
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.value.details()
    assert "forged" not in svc.log()


def test_a_long_prompt_leaves_no_prompt_text_in_the_log(executor) -> None:
    svc, stub = executor
    # Longer than the text encoder's 77 tokens: the pipeline truncates it and (unfiltered) quotes the rest.
    prompt = "a lighthouse at dusk " * 40 + "zanzibarquetzal"
    reply = stub.Generate(generate_request("tiny-sd-0", prompt=prompt), timeout=120)
    assert reply.images
    log = svc.log()
    assert "was truncated" in log  # the fact is kept ...
    assert "zanzibarquetzal" not in log and "lighthouse at dusk" not in log  # ... the prompt is not


def test_unknown_model_bad_tier_and_unknown_evict(executor) -> None:
    _, stub = executor
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(generate_request("ghost"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "ghost" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Preload(epb.PreloadRequest(model=common_pb2.ModelRef(model_id="tiny-sd-0"),
                                        target_tier=common_pb2.TIER_ACTIVE), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "target_tier" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Evict(epb.EvictRequest(model=common_pb2.ModelRef(model_id="never-loaded")), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_full_queue_is_resource_exhausted_with_retry_hint(executor) -> None:
    _, stub = executor
    stub.Generate(generate_request("tiny-sd-0"), timeout=120)
    long = [stub.GenerateStream(epb.GenerateStreamRequest(
        model=common_pb2.ModelRef(model_id="tiny-sd-0"),
        params=common_pb2.GenerationParams(prompt="long", steps=150, width=128, height=128)), timeout=300)
        for _ in range(3)]  # one runs, two wait: the queue (capacity 2) is full
    next(m for m in long[0] if m.HasField("step"))
    wait_for(lambda: status(stub).queue_depth == 3, what="full queue")
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(generate_request("tiny-sd-0"), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "capacity 2" in err.value.details()
    for call in long:
        call.cancel()
    wait_for(lambda: status(stub).queue_depth == 0, what="drained queue")


def test_watch_status_reports_changes(executor) -> None:
    _, stub = executor
    watch = stub.WatchStatus(epb.WatchStatusRequest(), timeout=120)
    first = next(watch).status
    assert first.state == common_pb2.EXECUTOR_STATE_READY and first.queue_capacity == 2
    stub.Generate(generate_request("tiny-sd-2"), timeout=120)
    seen = [next(watch).status for _ in range(2)]
    assert all(s.version > first.version for s in seen)
    watch.cancel()


def test_held_models_keep_serving_while_the_registry_is_down(tmp_path: Path, tiny_family: list[Path]) -> None:
    own = start_stack(tmp_path, tiny_family[:2])
    try:
        svc = own.start_executor("--resolve-cache-s", "0")  # every request asks the registry
        with grpc.insecure_channel(svc.address) as channel:
            stub = executor_stub(channel)
            assert stub.Generate(generate_request("tiny-sd-0"), timeout=120).images
            assert own.registry.stop() == 0
            held = stub.Generate(generate_request("tiny-sd-0"), timeout=120)
            assert held.tier == common_pb2.TIER_ACTIVE and held.images
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(generate_request("tiny-sd-1"), timeout=60)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "registry" in err.value.details()
        assert "serving tiny-sd-0 from the last answer" in svc.log()
    finally:
        own.stop()


def pixels(image: common_pb2.Image):
    import numpy as np

    return np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"), dtype=np.int16)


def test_queued_compatible_requests_run_as_one_batch_with_their_own_seeds(stack: Stack) -> None:
    svc = stack.start_executor("--max-batch-images", "4", name="batch")
    try:
        with grpc.insecure_channel(svc.address) as channel:
            stub = executor_stub(channel)
            stub.Generate(generate_request("tiny-sd-0"), timeout=120)  # active
            slow = stub.GenerateStream(epb.GenerateStreamRequest(
                model=common_pb2.ModelRef(model_id="tiny-sd-0"),
                params=common_pb2.GenerationParams(prompt="slow", steps=150, width=128, height=128)), timeout=300)
            next(m for m in slow if m.HasField("step"))  # the device is busy: the next ones queue up
            requests = [generate_request("tiny-sd-0", prompt=f"a lighthouse {i}", seed=20 + 10 * i,
                                         num_images=1 + i % 2) for i in range(3)]
            for i, r in enumerate(requests):
                r.request_id = f"batched-{i}"
            results: dict[int, epb.GenerateResponse] = {}
            threads = [threading.Thread(target=lambda i=i, r=r: results.__setitem__(i, stub.Generate(r, timeout=300)))
                       for i, r in enumerate(requests)]
            for thread in threads:
                thread.start()
            queued = wait_for(lambda: (s := status(stub)).queue_depth == 4 and s, what="three queued")
            assert [q.state for q in queued.queue] == [epb.QUEUED_STATE_RUNNING] + [epb.QUEUED_STATE_READY] * 3
            assert sorted(q.request_id for q in queued.queue[1:]) == ["batched-0", "batched-1", "batched-2"]
            slow.cancel()
            for thread in threads:
                thread.join(120)
            batched = [results[i] for i in range(3)]
            assert [r.batch_requests for r in batched] == [3, 3, 3]
            alone = [stub.Generate(r, timeout=120) for r in requests]
            assert all(r.batch_requests == 1 for r in alone)
            for b, a in zip(batched, alone, strict=True):
                assert [i.seed for i in b.images] == [i.seed for i in a.images]
                for bi, ai in zip(b.images, a.images, strict=True):
                    # Batched kernels may sum in another order: equal up to one level of an 8-bit channel.
                    assert abs(pixels(bi) - pixels(ai)).max() <= 1
            assert batched[1].images[0].data != batched[1].images[1].data
            costs = status(stub).costs
            assert costs.seconds_per_work_unit + costs.seconds_per_request > 0
            assert sum(t.samples for t in costs.load_costs) >= 1
            assert (costs.default_width, costs.default_height) == (64, 64) and costs.default_steps > 0
            assert status(stub).queue == [] and costs.backlog_seconds == 0
    finally:
        svc.stop()


def test_held_model_requests_overtake_a_slow_load_until_its_overtake_budget_is_spent(stack: Stack) -> None:
    # A read-rate cap makes each load take seconds; files kept in their dtype would be mapped, not read.
    budget_s = 1.5
    svc = stack.start_executor("--preload-read-bytes-per-s", "1MB", "--no-map-view-files", "--no-lookahead",
                               "--max-overtake-s", str(budget_s), name="overtake")
    try:
        with grpc.insecure_channel(svc.address) as channel:
            stub = executor_stub(channel)
            # Active, and its call cost measured (the process's first call is a warm-up, not counted).
            stub.Generate(generate_request("tiny-sd-0"), timeout=120)
            stub.Generate(generate_request("tiny-sd-0"), timeout=120)
            cold: dict[str, epb.GenerateResponse] = {}
            loading = threading.Thread(target=lambda: cold.update(b=stub.Generate(generate_request("tiny-sd-1"),
                                                                                  timeout=300)))
            loading.start()
            wait_for(lambda: [(q.model.model_id, q.state) for q in status(stub).queue]
                     == [("tiny-sd-1", epb.QUEUED_STATE_LOADING)], what="tiny-sd-1 loading")
            # Requests for the active model run while tiny-sd-1 loads, one after another, until the next one
            # would delay tiny-sd-1 by more than the budget: that one waits behind the load.
            overtook = 0
            while True:
                waiting: dict[str, epb.GenerateResponse] = {}
                hot = threading.Thread(target=lambda w=waiting: w.update(a=stub.Generate(generate_request("tiny-sd-0"),
                                                                                         timeout=300)))
                hot.start()
                # Served, or listed behind the load (the status lists the queue in the order it will be served).
                queued = wait_for(lambda h=hot: (not h.is_alive() and [True]) or (
                    len(q := status(stub).queue) == 2 and q[0].model.model_id == "tiny-sd-1" and list(q)),
                    what="served or queued behind the load")
                if queued != [True]:
                    break
                assert waiting["a"].tier == common_pb2.TIER_ACTIVE
                assert "b" not in cold, "the load ended before the budget was spent; slow the reads down"
                overtook += 1
            assert overtook >= 1
            assert [(q.model.model_id, q.state) for q in queued] == [
                ("tiny-sd-1", epb.QUEUED_STATE_LOADING), ("tiny-sd-0", epb.QUEUED_STATE_READY)]
            # Charged for the calls that passed it. The budget is enforced on estimated call times (with fakes, in
            # tests/unit/test_executor_queue.py); measured ones on this busy box may run past it, so no upper bound.
            assert queued[0].overtaken.ToNanoseconds() > 0
            loading.join(120)
            hot.join(120)
            assert cold["b"].tier in COLD and cold["b"].images
            assert waiting["a"].tier == common_pb2.TIER_STANDBY  # served after tiny-sd-1 became active
    finally:
        svc.stop()
