"""Builds the executor from its settings: preloader subprocess, loader, slot manager, registry and storage-cache
clients, core, servicer, and the gRPC server around them."""
from __future__ import annotations

import asyncio
import logging
import socket

import torch
from opentelemetry import trace

from hotslot.bootstrap.channels import downstream_options
from hotslot.bootstrap.logging import configure_logging
from hotslot.bootstrap.metrics import MetricsEndpoint
from hotslot.bootstrap.registry_client import RegistryClient
from hotslot.bootstrap.security import service_channel
from hotslot.bootstrap.server import ServiceRegistration, run_server, service_resource_name
from hotslot.executor.v1 import executor_service_pb2 as pb
from hotslot.executor.v1 import executor_service_pb2_grpc as pb_grpc
from hotslot.loading.hostpool import HostPool
from hotslot.loading.preloader import Preloader
from hotslot.loading.reader import host_pool, set_host_pool

from .clients import RegistryResolver, StorageClient
from .core import ExecutorCore
from .generation import GenerationLimits
from .loader import ModelLoader, device_memory, resolve_dtype
from .metrics import ExecutorMetrics
from .servicer import ExecutorServicer
from .settings import ExecutorSettings
from .slots import SlotManager

log = logging.getLogger(__name__)

SERVICE_NAME = "executor"
AUTO_BATCH_IMAGES_CUDA = 8  # max_batch_images = 0 on CUDA


def limits_from(settings: ExecutorSettings) -> GenerationLimits:
    return GenerationLimits(
        max_width=settings.max_width, max_height=settings.max_height, max_steps=settings.max_steps,
        max_images=settings.max_images, max_prompt_chars=settings.max_prompt_chars,
        default_steps=settings.default_steps, default_guidance=settings.default_guidance,
        default_width=settings.default_width, default_height=settings.default_height,
        max_guidance=settings.max_guidance,
    )


def batch_images(settings: ExecutorSettings) -> int:
    """max_batch_images with auto (0) resolved: batching pays on a GPU, not on CPU cores already kept busy."""
    if settings.max_batch_images:
        return settings.max_batch_images
    return AUTO_BATCH_IMAGES_CUDA if torch.device(settings.device).type == "cuda" else 1


def check_device(device: str) -> None:
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device {device!r}: CUDA is not available in this process (torch {torch.__version__})")
    if kind not in ("cpu", "cuda"):
        raise SystemExit(f"device {device!r}: use cpu, cuda or cuda:N")


def log_libraries_through_root() -> None:
    """diffusers and transformers install their own stderr handler; through the root logger instead, their records
    get the service's format, escaping and the filter that keeps prompts out (bootstrap/logging.PromptFilter)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.disable_default_handler()
        library.enable_propagation()


def configure_host_pool(settings: ExecutorSettings) -> HostPool | None:
    """The process's pool of recycled memory for weights converted here (`host_pool_bytes`; CPU only, as only CPU
    conversions write private host memory), or none."""
    pool = None
    limit, grow_up_to = settings.host_pool_sizing()
    if (limit or grow_up_to) and torch.device(settings.device).type == "cpu":
        pool = HostPool(limit, grow_up_to=grow_up_to)
        size = f"as much as the largest model converted here, up to {grow_up_to}" if grow_up_to else f"up to {limit}"
        log.info("host pool: keeps %s bytes of the memory of dropped converted weights for the next conversions "
                 "(--host-pool-bytes %s; 0 turns it off)", size, settings.host_pool_bytes)
    set_host_pool(pool)
    return pool


async def start_core(core: ExecutorCore, pool: HostPool | None, settings: ExecutorSettings) -> None:
    """Starts `core` (imports the pipeline classes); with `host_pool_reserve`, makes the host pool's memory meanwhile
    in another thread (the kernel faulting pages in on one core while the imports run on another). Both happen
    before health says SERVING."""
    if pool is None or not settings.host_pool_reserve:
        await core.start()
        return
    took, _ = await asyncio.gather(asyncio.to_thread(pool.reserve), core.start())
    log.info("host pool: reserved %d bytes, faulted in, in %.2f s", pool.reserved_bytes, took)


def build_core(
    settings: ExecutorSettings, port: int, tracer_provider: trace.TracerProvider | None = None,
    metrics: ExecutorMetrics | None = None,
) -> tuple[ExecutorCore, Preloader, list]:
    check_device(settings.device)
    log_libraries_through_root()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    dtype = resolve_dtype(settings.dtype, settings.device)
    preloader = Preloader(
        auto_restart=settings.preloader_restarts,
        chunk_bytes=int(settings.read_chunk_bytes),
        read_concurrency=settings.read_concurrency,
        read_bytes_per_s=float(settings.preload_read_bytes_per_s) or None,
        verify_reads=settings.verify_reads,
    )
    preloader.start()
    pool = configure_host_pool(settings)
    if pool is not None and metrics is not None:
        metrics.observe_host_pool(pool)
    loader = ModelLoader(preloader, device=settings.device, dtype=dtype, chunk_bytes=int(settings.read_chunk_bytes),
                         read_concurrency=settings.read_concurrency, map_files=settings.map_view_files,
                         convert_here=settings.convert_in_executor,
                         max_pipeline_adapters=settings.max_pipeline_adapters, verify_reads=settings.verify_reads,
                         read_bytes_per_s=float(settings.preload_read_bytes_per_s) or None)

    security = settings.client_security()

    def channel(address: str):
        return service_channel(address, security=security, tracer_provider=tracer_provider,
                               max_message_bytes=settings.max_message_bytes, options=downstream_options(settings))

    registry = RegistryResolver(
        RegistryClient(settings.registry_address, channel_factory=channel, timeout_s=settings.rpc_timeout_s)
    )
    storage = StorageClient(settings.storage_address, channel_factory=channel, timeout_s=settings.rpc_timeout_s)
    slots = SlotManager(
        active_budget_bytes=int(settings.active_budget_bytes),
        standby_budget_bytes=int(settings.standby_budget_bytes),
        host_budget_bytes=int(settings.host_budget_bytes),
    )
    executor_id, address = identity(settings, port)
    core = ExecutorCore(
        executor_id=executor_id,
        address=address,
        device=settings.device,
        loader=loader,
        preloader=preloader,
        slots=slots,
        resolver=registry,
        views=storage,
        limits=limits_from(settings),
        queue_capacity=settings.queue_capacity,
        lookahead=settings.lookahead,
        lease_ttl_s=settings.lease_ttl_s,
        device_memory=lambda: device_memory(settings.device),
        resolve_cache_s=settings.resolve_cache_s,
        max_overtake_s=settings.max_overtake_s,
        max_batch_images=batch_images(settings),
        max_adapters=settings.max_adapters,
        load_timeout_s=settings.load_timeout_s,
        retry_after_s=settings.retry_after_s,
        preloader_restart_wait_s=settings.preloader_restart_wait_s,
        max_load_attempts=settings.max_load_attempts,
        tracer_provider=tracer_provider,
        metrics=metrics,
    )
    return core, preloader, [registry, storage]


def registrations(core: ExecutorCore, status_min_interval_s: float = 0.0) -> list[ServiceRegistration]:
    return [
        ServiceRegistration.of(pb.DESCRIPTOR, "ExecutorService", ExecutorServicer(core, status_min_interval_s), pb_grpc.add_ExecutorServiceServicer_to_server)
    ]


def identity(settings: ExecutorSettings, port: int) -> tuple[str, str]:
    """(executor id, address the router should dial) once the port is bound."""
    host = settings.host if settings.host not in ("0.0.0.0", "::", "[::]", "") else socket.gethostname()
    address = settings.advertise_address or f"{host}:{port}"
    executor_id = settings.executor_id or f"{socket.gethostname()}-{settings.device.replace(':', '')}-{port}"
    return executor_id, address


async def serve(settings: ExecutorSettings) -> None:
    # Before run_server (which configures it again): building the core (device check, preloader) logs too.
    configure_logging(SERVICE_NAME, settings.log_level, settings.log_format)
    endpoint = MetricsEndpoint(service_resource_name(settings, SERVICE_NAME))
    core, preloader, clients = build_core(settings, settings.port,
                                          metrics=ExecutorMetrics(endpoint.meter(__name__)))
    pool = host_pool()

    async def started(port: int) -> None:
        # The id and advertised address name the bound port, known only now (port 0 picks one).
        core.identify(*identity(settings, port))
        await start_core(core, pool, settings)

    async def stopping() -> None:
        await core.drain()

    try:
        await run_server(registrations(core, settings.status_min_interval_s), settings=settings, service_name=SERVICE_NAME,
                         on_started=started, on_shutdown=[stopping], metrics_endpoint=endpoint)
    finally:
        await core.close()
        for client in clients:
            await client.close()
        preloader.close()
