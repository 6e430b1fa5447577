"""Router overhead: the same Generate requests sent straight to an executor and through a router process in front
of it, in one run. Prints the latency the router adds (p50/p99, one request at a time) and its throughput relative
to direct calls (many requests at once). Goals: <= 0.5 ms added at p50, >= 90 % of direct throughput.

    .venv/bin/python bench/bench_router.py                      # against a fast echo executor this script starts
    .venv/bin/python bench/bench_router.py --executor HOST:PORT --model MODEL_ID   # against a real executor

The echo executor answers at once with a canned image and publishes a status on every queue change, as a real
executor does, so what is measured is the router (and the extra hop), not inference. It runs in a process of its
own, so it does not compete with this client for the interpreter lock."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import grpc.aio

from hotslot.common.v1 import common_pb2
from hotslot.executor.v1 import executor_service_pb2 as executor_pb
from hotslot.executor.v1 import executor_service_pb2_grpc as executor_grpc
from hotslot.router.v1 import router_service_pb2 as router_pb
from hotslot.router.v1 import router_service_pb2_grpc as router_grpc

ECHO_ID = "echo-0"
ECHO_QUEUE_CAPACITY = 4096


# -- the echo executor ---------------------------------------------------------------------------------------


class EchoExecutor(executor_grpc.ExecutorServiceServicer):
    def __init__(self, model_id: str, image_bytes: int, publish_changes: bool = True, work_s: float = 0.0) -> None:
        self.model_id = model_id
        self.publish_changes = publish_changes
        self.work_s = work_s
        self.image = common_pb2.Image(data=os.urandom(image_bytes), mime_type="image/png", width=64, height=64)
        self.depth = 0
        self.version = 0
        self.changed = asyncio.Condition()
        self.address = ""

    def status(self) -> executor_pb.ExecutorStatus:
        return executor_pb.ExecutorStatus(
            executor_id=ECHO_ID,
            address=self.address,
            state=common_pb2.EXECUTOR_STATE_READY,
            device="cpu",
            models=[executor_pb.HeldModel(model=common_pb2.ModelRef(model_id=self.model_id, revision=1),
                                          tier=common_pb2.TIER_ACTIVE, size_bytes=1)],
            queue_depth=self.depth,
            queue_capacity=ECHO_QUEUE_CAPACITY,
            version=self.version,
        )

    async def _bump(self, delta: int) -> None:
        if not self.publish_changes:
            return
        async with self.changed:
            self.depth += delta
            self.version += 1
            self.changed.notify_all()

    async def WatchStatus(self, request, context):
        sent = -1
        while True:
            async with self.changed:
                while self.version == sent:
                    await self.changed.wait()
                sent = self.version
                status = self.status()
            yield executor_pb.WatchStatusResponse(status=status)

    async def GetStatus(self, request, context):
        return executor_pb.GetStatusResponse(status=self.status())

    async def Generate(self, request, context):
        await self._bump(+1)
        try:
            if self.work_s:
                await asyncio.sleep(self.work_s)  # device time: the executor waits, its CPU is free
            return executor_pb.GenerateResponse(
                images=[self.image], model=request.model, tier=common_pb2.TIER_ACTIVE, executor_id=ECHO_ID,
                request_id=request.request_id,
            )
        finally:
            await self._bump(-1)


async def serve_echo(model_id: str, image_bytes: int, publish_changes: bool, work_s: float) -> None:
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20)])
    servicer = EchoExecutor(model_id, image_bytes, publish_changes, work_s)
    executor_grpc.add_ExecutorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    servicer.address = f"127.0.0.1:{port}"
    await server.start()
    print(f"PORT {port}", flush=True)
    await server.wait_for_termination()


# -- processes -----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_echo(model_id: str, image_bytes: int, publish_changes: bool, work_ms: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-echo", "--model", model_id, "--image-bytes", str(image_bytes),
         "--echo-work-ms", str(work_ms), *([] if publish_changes else ["--quiet-status"])],
        stdout=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"echo executor did not start: {line!r}")
    return proc, f"127.0.0.1:{line.split()[1]}"


def start_router(executor: str, max_inflight: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "hotslot.cli.main", "serve", "router", "--host", "127.0.0.1", "--port", str(port),
         "--executors", executor, "--registry-address", "", "--max-inflight-per-executor", str(max_inflight),
         "--log-level", "WARNING", "--metrics-port", "0"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
    )
    return proc, f"127.0.0.1:{port}"


async def wait_for_router(address: str, executor_id: str | None, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_grpc.RouterServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                status = await stub.GetClusterStatus(router_pb.GetClusterStatusRequest(), timeout=2)
                if status.executors and (executor_id is None or status.executors[0].executor_id == executor_id):
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"router at {address} did not see the executor within {timeout_s} s")


# -- load ----------------------------------------------------------------------------------------------------


async def run_load(call, n: int, concurrency: int) -> tuple[list[float], float]:
    """Sends n requests with `concurrency` in flight; returns each one's latency (s) and the wall time."""
    latencies: list[float] = []
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far (Linux /proc); None elsewhere."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench(args: argparse.Namespace, executor: str, router: str, router_pid: int | None) -> None:
    params = common_pb2.GenerationParams(prompt="a lighthouse at dusk", steps=2, width=64, height=64, seed=1)
    model = common_pb2.ModelRef(model_id=args.model)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(executor, options=options) as direct_channel, \
            grpc.aio.insecure_channel(router, options=options) as router_channel:
        direct = executor_grpc.ExecutorServiceStub(direct_channel)
        routed = router_grpc.RouterServiceStub(router_channel)

        async def via_direct() -> None:
            await direct.Generate(executor_pb.GenerateRequest(model=model, params=params), timeout=args.timeout_s)

        async def via_router() -> None:
            await routed.Generate(router_pb.GenerateRequest(model=model, params=params), timeout=args.timeout_s)

        for call in (via_direct, via_router):  # warm both connections and code paths
            await run_load(call, args.warmup, 1)

        # Latency: one request at a time, alternating blocks so drift (other load on the machine) hits both alike.
        lat = {"direct": [], "router": []}
        block = max(1, args.requests // args.rounds)
        for _ in range(args.rounds):
            for name, call in (("direct", via_direct), ("router", via_router)):
                lat[name] += (await run_load(call, block, 1))[0]
        # Throughput: many requests in flight, again alternating.
        wall = {"direct": 0.0, "router": 0.0}
        sent = {"direct": 0, "router": 0}
        router_cpu = 0.0
        block_t = max(args.concurrency, args.throughput_requests // args.rounds)
        for _ in range(args.rounds):
            for name, call in (("direct", via_direct), ("router", via_router)):
                cpu_before = cpu_seconds(router_pid)
                done, took = await run_load(call, block_t, args.concurrency)
                cpu_after = cpu_seconds(router_pid)
                if name == "router" and cpu_before is not None and cpu_after is not None:
                    router_cpu += cpu_after - cpu_before
                wall[name] += took
                sent[name] += len(done)

    ms = {name: (percentile(v, 50) * 1e3, percentile(v, 99) * 1e3) for name, v in lat.items()}
    rps = {name: sent[name] / wall[name] for name in wall}
    print(f"executor: {executor} ({args.executor_kind}); model {args.model}; image {args.image_bytes} B; "
          f"status {'once' if args.quiet_status else 'on every queue change'}; "
          f"echo work {args.echo_work_ms:g} ms")
    print(f"latency, 1 in flight, {len(lat['direct'])} requests per path:")
    print(f"  direct  p50 {ms['direct'][0]:7.3f} ms   p99 {ms['direct'][1]:7.3f} ms")
    print(f"  router  p50 {ms['router'][0]:7.3f} ms   p99 {ms['router'][1]:7.3f} ms")
    print(f"  added   p50 {ms['router'][0] - ms['direct'][0]:7.3f} ms   p99 {ms['router'][1] - ms['direct'][1]:7.3f} ms"
          "   (goal: <= 0.5 ms at p50)")
    print(f"throughput, {args.concurrency} in flight, {sent['direct']} requests per path:")
    print(f"  direct  {rps['direct']:8.0f} req/s")
    print(f"  router  {rps['router']:8.0f} req/s   ratio {rps['router'] / rps['direct']:6.1%}   (goal: >= 90 %)")
    if router_cpu:
        # Independent of how busy the machine is: what one routed request costs the router process.
        print(f"  router process CPU per request: {router_cpu / sent['router'] * 1e6:.0f} us "
              f"(bounds router throughput per core at {sent['router'] / router_cpu:.0f} req/s)")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executor", help="host:port of a running executor; default: start an echo executor")
    parser.add_argument("--model", default="bench", help="model id to generate with (held active by the executor)")
    parser.add_argument("--requests", type=int, default=2000, help="latency requests per path")
    parser.add_argument("--throughput-requests", type=int, default=4000, help="throughput requests per path")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight for throughput")
    parser.add_argument("--rounds", type=int, default=4, help="alternating blocks per measurement")
    parser.add_argument("--warmup", type=int, default=200, help="requests per path before measuring")
    parser.add_argument("--image-bytes", type=int, default=64 * 1024, help="echo executor: bytes of the image")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="deadline of each request")
    parser.add_argument("--echo-work-ms", type=float, default=0.0,
                        help="echo executor: device time per request (an async wait), like a real executor's")
    parser.add_argument("--quiet-status", action="store_true",
                        help="echo executor: publish its status once, not on every queue change")
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        asyncio.run(serve_echo(args.model, args.image_bytes, not args.quiet_status, args.echo_work_ms / 1e3))
        return

    procs: list[subprocess.Popen] = []
    try:
        if args.executor:
            executor, args.executor_kind = args.executor, "given"
        else:
            echo, executor = start_echo(args.model, args.image_bytes, not args.quiet_status, args.echo_work_ms)
            procs.append(echo)
            args.executor_kind = "echo executor process"
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_router.log"
        router, router_address = start_router(executor, max(args.concurrency * 2, 64), log_path)
        procs.append(router)
        asyncio.run(wait_for_router(router_address, None if args.executor else ECHO_ID))
        asyncio.run(bench(args, executor, router_address, router.pid))
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
