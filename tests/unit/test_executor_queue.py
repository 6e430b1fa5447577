"""The executor's queue with a fake loader the test releases by hand: requests for held models overtake a slow load
within max_overtake_s, a ready request is never overtaken, compatible requests share a pipeline call, and the status
lists the queue in service order with measured costs. No timing: loads end when the test says so."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest

from hotslot.errors import InvalidArgument, ResourceExhausted, Unavailable
from hotslot.loading.preloader import Preloader
from hotslot.services.executor.core import ExecutorCore, QueuedState
from hotslot.services.executor.costs import CostModel, Line, fit_line, work_units
from hotslot.services.executor.downstream import EnsuredView, ResolvedModel
from hotslot.services.executor.generation import GenerationLimits, GenerationParams
from hotslot.services.executor.loader import HostWeights, ModelLoader
from hotslot.services.executor.lora import AdapterWeights
from hotslot.services.executor.ports import Loader, PreloaderHandle, SharedParts
from hotslot.services.executor.queue_policy import plan_next, service_order
from hotslot.services.executor.slots import ModelKey, SlotManager, Tier

MODEL_BYTES = 1000
LIMITS = GenerationLimits(default_steps=2, default_width=64, default_height=64)


class FakePipeline:
    """Stands in for a diffusers pipeline: one image per prompt, its pixels a function of prompt and seed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[list[str]] = []
        self.adapters: list[str] = []  # set by FakeLoader.apply_adapters
        self.adapter_calls: list[tuple[list[str], list[str]]] = []  # (prompts, adapters) per call

    def set_progress_bar_config(self, **kwargs) -> None:
        pass

    def __call__(self, *, prompt, negative_prompt, num_inference_steps, guidance_scale, width, height, generator,
                 output_type, callback_on_step_end):
        self.calls.append(list(prompt))
        self.adapter_calls.append((list(prompt), list(self.adapters)))
        for step in range(num_inference_steps):
            callback_on_step_end(self, step, 0, {})
        images = np.stack([np.full((8, 8, 3), (hash((self.name, p)) % 97 + g.initial_seed() % 97) / 255.0)
                           for p, g in zip(prompt, generator, strict=True)])
        return type("Out", (), {"images": images})()


@dataclass
class FakeWeights:
    name: str
    nbytes: int = MODEL_BYTES


class FakeLoader:
    """read() blocks until the test opens the model's gate (open by default)."""

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.pipelines: dict[str, FakePipeline] = {}

    def warmup(self) -> float:
        return 0.0

    def gate(self, model_id: str) -> threading.Event:
        return self.gates.setdefault(model_id, threading.Event())

    def read(self, key: str, view_path: str, timeout_s: float, digests=None, hashed=frozenset()):
        model_id = key.split("@")[0]
        if model_id in self.gates:
            assert self.gates[model_id].wait(30), "the test never opened the gate"
        return type("Read", (), {"weights": FakeWeights(model_id), "handoff_s": 0.0})()

    def read_adapter(self, key: str, view_path: str, timeout_s: float):
        return self.read(key, view_path, timeout_s)

    def apply_adapters(self, pipeline: FakePipeline, wanted, held) -> None:
        pipeline.adapters = [name for name, _, _ in wanted]

    def materialize(self, weights: FakeWeights):
        return self.pipelines.setdefault(weights.name, FakePipeline(weights.name)), 0.0

    def demote(self, weights) -> None:
        pass


class FakePreloader:
    pid = 1
    restarts = 0
    restarting = False

    def is_alive(self) -> bool:
        return True

    def restart(self) -> None:
        raise AssertionError("the fake preloader never dies")


class FakeRegistry:
    """Every model is a pipeline, but `lora-*`, LoRA adapters of model `a` (`lora-on-b`: of `b`)."""

    async def resolve(self, model_id: str, revision: int) -> ResolvedModel:
        if model_id.startswith("lora-"):
            return ResolvedModel(model_id, 1, "LORA_ADAPTER", 10, "", "b" if model_id == "lora-on-b" else "a")
        return ResolvedModel(model_id, 1, "DIFFUSERS_PIPELINE", MODEL_BYTES, "StableDiffusionPipeline")


class FakeStorage:
    async def ensure(self, model_id: str, revision: int, lease_ttl_s: float) -> EnsuredView:
        return EnsuredView(f"/views/{model_id}", "", 0, all_local=False)

    async def renew(self, lease_id: str, lease_ttl_s: float) -> None:
        pass

    async def unpin(self, lease_id: str) -> None:
        pass


class FixedCosts(CostModel):
    """Every pipeline call is estimated at `seconds`, whatever was measured."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def call_seconds(self, params):
        return self.seconds


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


def make_core(loader: FakeLoader, views: FakeStorage | None = None, standby_budget_bytes: int = 10 * MODEL_BYTES,
              **kwargs) -> ExecutorCore:
    slots = SlotManager(active_budget_bytes=10 * MODEL_BYTES, standby_budget_bytes=standby_budget_bytes,
                        host_budget_bytes=10 * MODEL_BYTES)
    return ExecutorCore(executor_id="x", address="x:1", device="cpu", loader=loader, preloader=FakePreloader(),
                        slots=slots, resolver=FakeRegistry(), views=views or FakeStorage(), limits=LIMITS,
                        queue_capacity=16, **{"lookahead": False, **kwargs})


def test_the_real_loader_and_preloader_and_these_fakes_are_what_the_core_expects(loader) -> None:
    assert issubclass(ModelLoader, Loader) and isinstance(loader, Loader)
    assert isinstance(Preloader(), PreloaderHandle) and isinstance(FakePreloader(), PreloaderHandle)
    # a pipeline's held weights may share components with other models; an adapter's never do
    assert issubclass(HostWeights, SharedParts) and not issubclass(AdapterWeights, SharedParts)


async def until(predicate, what: str) -> None:
    """Yields to the loop (and the loader's threads) until `predicate` holds; fails after many tries."""
    for _ in range(5000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


def request(prompt: str = "p", **kw) -> GenerationParams:
    return GenerationParams(prompt=prompt, **kw)


def states(core: ExecutorCore) -> list[tuple[str, QueuedState]]:
    return [(q.key.model_id, q.state) for q in core.status().queue]


async def started(core: ExecutorCore):
    await core.start()
    return core


async def test_the_id_and_address_given_once_the_port_is_bound_are_what_status_and_answers_name(loader) -> None:
    core = make_core(loader)
    core.identify("host-cpu-41071", "host:41071")  # what wiring does when the server has bound its port
    await core.start()
    try:
        done = await core.generate("a", 0, request())
        status = core.status()
        assert (status.executor_id, status.address, done.executor_id) == ("host-cpu-41071", "host:41071",
                                                                          "host-cpu-41071")
    finally:
        await core.close()


async def test_a_request_for_the_active_model_is_not_stuck_behind_another_models_load(loader) -> None:
    core = await started(make_core(loader, costs=FixedCosts(1.0)))
    try:
        await core.generate("a", 0, request())  # a is active
        gate = loader.gate("b")
        b = asyncio.ensure_future(core.generate("b", 0, request("for b")))
        await until(lambda: states(core) == [("b", QueuedState.LOADING)], "b loading")
        a = await asyncio.wait_for(core.generate("a", 0, request("for a")), 30)
        assert not b.done() and not gate.is_set()  # a finished while b's load was still under way
        assert a.tier == Tier.ACTIVE and a.batch_requests == 1
        assert [q.overtaken_s for q in core.status().queue] == [1.0]  # b was charged a's estimated call
        gate.set()
        done = await asyncio.wait_for(b, 30)
        assert done.tier in (Tier.BACKING_STORE, Tier.LOCAL_DISK) and done.images
    finally:
        await core.close()


async def test_with_max_overtake_0_requests_are_served_first_in_first_out(loader) -> None:
    core = await started(make_core(loader, costs=FixedCosts(1.0), max_overtake_s=0))
    try:
        await core.generate("a", 0, request())
        gate = loader.gate("b")
        finished: list[str] = []
        b = asyncio.ensure_future(core.generate("b", 0, request()))
        b.add_done_callback(lambda _: finished.append("b"))
        await until(lambda: states(core) == [("b", QueuedState.LOADING)], "b loading")
        a = asyncio.ensure_future(core.generate("a", 0, request()))
        a.add_done_callback(lambda _: finished.append("a"))
        await until(lambda: len(core.status().queue) == 2, "a queued")
        assert states(core) == [("b", QueuedState.LOADING), ("a", QueuedState.READY)]
        for _ in range(50):
            await asyncio.sleep(0)
        assert not a.done()
        gate.set()
        await asyncio.wait_for(asyncio.gather(a, b), 30)
        assert finished == ["b", "a"]
    finally:
        await core.close()


async def test_overtaking_stops_once_the_passed_requests_budget_is_spent(loader) -> None:
    core = await started(make_core(loader, costs=FixedCosts(4.0), max_overtake_s=10))
    try:
        await core.generate("a", 0, request())
        gate = loader.gate("b")
        b = asyncio.ensure_future(core.generate("b", 0, request()))
        await until(lambda: states(core) == [("b", QueuedState.LOADING)], "b loading")
        for _ in range(2):  # 4 s + 4 s fit in b's 10 s
            await asyncio.wait_for(core.generate("a", 0, request()), 30)
        assert [q.overtaken_s for q in core.status().queue] == [8.0]
        third = asyncio.ensure_future(core.generate("a", 0, request()))
        await until(lambda: len(core.status().queue) == 2, "third queued")
        # 12 s would not fit: the third waits behind b, and the status says so.
        assert states(core) == [("b", QueuedState.LOADING), ("a", QueuedState.READY)]
        for _ in range(50):
            await asyncio.sleep(0)
        assert not third.done()
        gate.set()
        await asyncio.wait_for(b, 30)
        await asyncio.wait_for(third, 30)
    finally:
        await core.close()


async def test_compatible_requests_for_one_model_share_a_pipeline_call_with_their_own_seeds(loader) -> None:
    core = await started(make_core(loader, costs=FixedCosts(1.0), max_batch_images=4))
    try:
        await core.generate("a", 0, request())
        gate = loader.gate("b")
        b = asyncio.ensure_future(core.generate("b", 0, request()))
        await until(lambda: states(core) == [("b", QueuedState.LOADING)], "b loading")
        # Queued together while the worker is busy: one call for the three compatible ones, the odd size alone.
        calls = [core.generate("a", 0, request(f"p{i}", seed=10 * i, num_images=1 + i % 2)) for i in range(3)]
        odd = core.generate("a", 0, request("odd", width=128))
        gate.set()
        *outcomes, odd_outcome = await asyncio.wait_for(asyncio.gather(*calls, odd), 30)
        await asyncio.wait_for(b, 30)
        assert [o.batch_requests for o in outcomes] == [3, 3, 3] and odd_outcome.batch_requests == 1
        assert [[seed for *_, seed in o.images] for o in outcomes] == [[0], [10, 11], [20]]
        pipe = loader.pipelines["a"]
        assert ["p0", "p1", "p1", "p2"] in pipe.calls
        alone = await core.generate("a", 0, request("p1", seed=10, num_images=2))
        assert alone.images == outcomes[1].images and alone.batch_requests == 1
    finally:
        await core.close()


async def test_requests_with_different_adapters_never_share_a_pipeline_call(loader) -> None:
    core = await started(make_core(loader, costs=FixedCosts(1.0), max_batch_images=8))
    try:
        await core.generate("a", 0, request())
        gates = [loader.gate(m) for m in ("b", "lora-x", "lora-y")]
        b = asyncio.ensure_future(core.generate("b", 0, request()))
        await until(lambda: states(core) == [("b", QueuedState.LOADING)], "b loading")
        calls = asyncio.gather(
            core.generate("a", 0, request("x1"), adapters=[("lora-x", 0, None)]),
            core.generate("a", 0, request("plain")),
            core.generate("lora-x", 0, request("x2")),  # the adapter as the model: the same adapter set as x1
            core.generate("a", 0, request("y"), adapters=[("lora-y", 0, 0.5)]),
        )
        await until(lambda: loader.pipelines["a"].calls[-1:] == [["plain"]], "plain ran while the adapters load")
        for gate in gates:
            gate.set()
        x1, plain, x2, y = await asyncio.wait_for(calls, 30)
        await asyncio.wait_for(b, 30)
        assert (x1.batch_requests, x2.batch_requests, plain.batch_requests, y.batch_requests) == (2, 2, 1, 1)
        assert [(a.key.model_id, a.scale) for a in x1.adapters] == [("lora-x", 1.0)] == \
            [(a.key.model_id, a.scale) for a in x2.adapters]
        assert [(a.key.model_id, a.scale) for a in y.adapters] == [("lora-y", 0.5)] and plain.adapters == []
        assert x2.key == ModelKey("a", 1)  # ran on the adapter's base
        by_prompts = {tuple(prompts): adapters for prompts, adapters in loader.pipelines["a"].adapter_calls}
        assert by_prompts[("x1", "x2")] == ["lora-x@1"] and by_prompts[("y",)] == ["lora-y@1"]
        assert by_prompts[("plain",)] == []
        held = core.status().adapters
        assert [(h.key.model_id, h.base, h.tier) for h in held] == [("lora-x", ModelKey("a", 1), Tier.HOST),
                                                                     ("lora-y", ModelKey("a", 1), Tier.HOST)]
    finally:
        await core.close()


async def test_adapters_on_two_bases_or_too_many_are_refused_before_queueing(loader) -> None:
    core = await started(make_core(loader, max_adapters=2))
    try:
        with pytest.raises(InvalidArgument, match="share one base"):
            await core.generate("a", 0, request(), adapters=[("lora-x", 0, None), ("lora-on-b", 0, None)])
        with pytest.raises(InvalidArgument, match="share one base"):
            await core.generate("lora-on-b", 0, request(), adapters=[("lora-x", 0, None)])
        with pytest.raises(InvalidArgument, match="at most 2"):
            await core.generate("lora-x", 0, request(), adapters=[("lora-y", 0, None), ("lora-z", 0, None)])
        with pytest.raises(InvalidArgument, match="not a LORA_ADAPTER"):
            await core.generate("a", 0, request(), adapters=[("b", 0, None)])
        with pytest.raises(InvalidArgument, match="finite"):
            await core.generate("a", 0, request(), adapters=[("lora-x", 0, float("nan"))])
        assert core.status().queue == [] and core.status().adapters == []
    finally:
        await core.close()


class LeasingStorage(FakeStorage):
    """Hands out one lease per view and records the renewals."""

    def __init__(self) -> None:
        self.renewed: list[str] = []

    async def ensure(self, model_id: str, revision: int, lease_ttl_s: float) -> EnsuredView:
        return EnsuredView(f"/views/{model_id}", f"lease-{model_id}", 0, all_local=False)

    async def renew(self, lease_id: str, lease_ttl_s: float) -> None:
        self.renewed.append(lease_id)


async def test_the_leases_of_held_adapters_are_renewed_like_models(loader) -> None:
    storage = LeasingStorage()
    core = make_core(loader, views=storage, lease_ttl_s=0.15)
    await core.start()
    try:
        await core.generate("lora-x", 0, request())
        await until(lambda: {"lease-a", "lease-lora-x"} <= set(storage.renewed), "both leases renewed")
    finally:
        await core.close()


async def test_status_lists_the_queue_in_service_order_and_the_measured_costs(loader) -> None:
    core = await started(make_core(loader, max_batch_images=1))
    try:
        empty = core.status().costs
        assert (empty.seconds_per_work_unit, empty.backlog_seconds) == (0.0, 0.0)
        assert all(line.samples == 0 for line in empty.load_costs.values())
        assert (empty.default_steps, empty.default_width, empty.default_height) == (2, 64, 64)
        for steps in (1, 2, 4):
            await core.generate("a", 0, request(steps=steps))
        costs = core.status().costs
        # Measured, whichever way the noise splits the fake's few microseconds between the two parts.
        assert costs.seconds_per_work_unit + costs.seconds_per_request > 0
        assert costs.seconds_per_work_unit >= 0 and costs.seconds_per_request >= 0
        assert costs.load_costs[Tier.BACKING_STORE].samples == 1 and costs.load_costs[Tier.HOST].samples == 0
        gate = loader.gate("b")
        b = asyncio.ensure_future(core.generate("b", 0, request()))
        await until(lambda: states(core) == [("b", QueuedState.LOADING)], "b loading")
        c = asyncio.ensure_future(core.generate("c", 0, request()))
        await until(lambda: len(core.status().queue) == 2, "c queued")
        status = core.status()
        assert states(core) == [("b", QueuedState.LOADING), ("c", QueuedState.WAITING)]
        assert status.costs.backlog_seconds > 0 and status.queue_depth == 2
        gate.set()
        await asyncio.wait_for(asyncio.gather(b, c), 30)
        assert core.status().queue == [] and core.status().costs.load_costs[Tier.BACKING_STORE].samples == 3
    finally:
        await core.close()


# -- the policy on its own ----------------------------------------------------------------------------------
@dataclass(eq=False)
class Job:
    model: str
    params: GenerationParams = field(default_factory=lambda: request(steps=2, width=64, height=64,
                                                                     guidance_scale=7.5, num_images=1))
    overtaken_s: float = 0.0
    adapters: tuple = ()

    @property
    def key(self) -> ModelKey:
        return ModelKey(self.model, 1)


def plan(queue, held=("a",), seconds=1.0, budget=10.0, images=1):
    return plan_next(queue, ready=lambda j: j.model in held, call_seconds=lambda p: seconds,
                     max_overtake_s=budget, max_batch_images=images)


def test_policy_never_overtakes_a_ready_request_and_needs_an_estimate() -> None:
    b, c, a = Job("b"), Job("c"), Job("a")
    assert plan([b, c, a]).run == [a] and plan([b, c, a]).passed == [b, c]
    assert plan([b, c, a], held=("a", "c")).run == [c]  # c is ready: a may not pass it
    assert plan([b, a], seconds=None).run == []  # nothing measured yet: no overtaking
    assert plan([b, a], seconds=11.0).run == [] and plan([b, a], budget=0).run == []
    assert plan([b, a]).head is b


def test_policy_batches_compatible_requests_up_to_the_image_bound_without_passing_ready_ones() -> None:
    a1, a2, a3 = Job("a"), Job("a"), Job("a")
    other = Job("a", params=request(steps=3, width=64, height=64, guidance_scale=7.5, num_images=1))
    assert plan([a1, a2, a3], images=2).run == [a1, a2]
    assert plan([a1, other, a2], images=4).run == [a1]  # other (ready, incompatible) is not passed
    b = Job("b")
    p = plan([a1, b, a2], images=4)
    assert p.run == [a1, a2] and p.passed == [b]
    assert plan([a1, b, a2], images=4, budget=0).run == [a1]


def test_policy_never_batches_requests_with_different_adapters() -> None:
    lora_x, lora_y = (ModelKey("x", 1), 1.0), (ModelKey("y", 1), 1.0)
    plain, x1, x2, y, x_half = Job("a"), Job("a", adapters=(lora_x,)), Job("a", adapters=(lora_x,)), \
        Job("a", adapters=(lora_y,)), Job("a", adapters=((ModelKey("x", 1), 0.5),))
    assert plan([x1, plain, y, x_half, x2], images=8).run == [x1]  # the others are ready: x2 may not pass them
    assert plan([x1, x2, plain], images=8).run == [x1, x2]
    assert plan([plain, x1, Job("a")], images=8).run == [plain]


def test_service_order_charges_budgets_as_it_goes() -> None:
    b, a1, a2, a3 = Job("b"), Job("a"), Job("a"), Job("a")
    order = service_order([b, a1, a2, a3], ready=lambda j: j.model == "a", call_seconds=lambda p: 4.0,
                          max_overtake_s=10, max_batch_images=1)
    assert order == [a1, a2, b, a3]


def test_fit_recovers_a_line_and_falls_back_to_a_ratio() -> None:
    exact = fit_line([(1, 3.0), (2, 5.0), (4, 9.0)])
    assert (round(exact.fixed, 9), round(exact.per_unit, 9), exact.samples) == (1.0, 2.0, 3)
    assert fit_line([(2, 4.0), (2, 6.0)]) == Line(0.0, 2.5, 2)
    assert fit_line([]) == Line()
    assert fit_line([(1, 5.0), (2, 1.0)]).per_unit == 0.0  # never negative
    # One size seen: at most the given slope, the rest fixed (a 6.4 MiB load of 0.3 s is not 48 s/GiB).
    small = fit_line([(0.00625, 0.3)], max_slope_when_one_size=1.0)
    assert (round(small.fixed, 9), small.per_unit) == (0.29375, 1.0)
    assert fit_line([(2, 1.0)], max_slope_when_one_size=1.0) == Line(0.0, 0.5, 1)  # below the bound: a ratio


def test_load_costs_seen_at_one_size_do_not_blow_up_for_a_larger_model() -> None:
    costs = CostModel()
    costs.record_load(Tier.LOCAL_DISK, 6_735_569, 0.3)  # a tiny pipeline
    assert 0.3 < costs.load_seconds(Tier.LOCAL_DISK, 2 * 1024**3) < 3.0  # a 2 GiB model: not 96 s
    assert work_units(request(steps=25, width=512, height=512, num_images=2)) == 50


async def test_the_lookahead_does_not_load_again_a_model_whose_load_kept_its_pipeline_for_the_waiting_request(
    loader,
) -> None:
    # The standby tier cannot hold the model: its load keeps the pipeline for the request that waits for it, which
    # then runs, instead of the lookahead starting the same load over and over.
    core = await started(make_core(loader, lookahead=True, standby_budget_bytes=MODEL_BYTES // 2))
    try:
        done = await asyncio.wait_for(core.generate("a", 0, request()), 30)
        assert done.images and done.tier in (Tier.BACKING_STORE, Tier.LOCAL_DISK)
    finally:
        await core.close()


class DeadPreloader(FakePreloader):
    """A preloader that died and cannot be started again."""

    def is_alive(self) -> bool:
        return False

    def restart(self) -> None:
        raise RuntimeError("still dead")


def test_a_dead_preloader_is_waited_for_as_long_as_the_setting_says_then_the_load_is_unavailable(loader) -> None:
    core = make_core(loader, preloader_restart_wait_s=0.2)
    core.preparations.preloader = DeadPreloader()
    with pytest.raises(Unavailable, match=r"within 0\.2 s \(HOTSLOT_EXECUTOR_PRELOADER_RESTART_WAIT_S\)"):
        core.preparations._ensure_preloader()


async def test_a_full_queue_suggests_the_configured_retry_delay(loader) -> None:
    core = await started(make_core(loader, retry_after_s=7.0))
    core.scheduler.queue_capacity = 0
    try:
        with pytest.raises(ResourceExhausted) as refused:
            await core.generate("m", 1, request())
        assert refused.value.retry_after_s == 7.0
    finally:
        await core.close()
