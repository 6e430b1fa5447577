"""Settings of the executor (environment variables HOTSLOT_EXECUTOR_*)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    ByteSize,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_settings import SettingsConfigDict

from hotslot.bootstrap.settings import ServiceSettings, metrics_port_field

DEFAULT_PORT = 50053
DEFAULT_METRICS_PORT = 9463
GiB = 1024**3
# Reads in flight per load (the reader's DEFAULT_READ_CONCURRENCY; not imported, it would pull torch into the CLI).
DEFAULT_READ_CONCURRENCY = 4
MAX_READ_CONCURRENCY = 64
# host_pool_bytes=auto: the pool grows to the largest model converted, up to host_budget_bytes / this.
HOST_POOL_AUTO_DIVISOR = 2


class ExecutorSettings(ServiceSettings):
    """Settings of one executor. Byte sizes take plain numbers or units: 512MiB, 8GiB."""

    model_config = SettingsConfigDict(env_prefix="HOTSLOT_EXECUTOR_", extra="ignore")

    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="TCP port to listen on; 0 picks a free port.")
    metrics_port: int = metrics_port_field(DEFAULT_METRICS_PORT)
    executor_id: str = Field(
        "", description="Id of this executor in the cluster; defaults to `<hostname>-<device>-<port>`."
    )
    advertise_address: str = Field(
        "", description="host:port the router should use to reach this executor; defaults to host:port."
    )
    device: str = Field("cpu", description="Torch device: `cpu`, `cuda`, `cuda:0` (one executor per GPU/MIG slice).")
    dtype: str = Field(
        "",
        description="Weight dtype after loading: float32, float16 or bfloat16; empty = float16 on CUDA, float32 on CPU.",
    )
    registry_address: str = Field("127.0.0.1:50051", description="host:port of the model-registry.")
    storage_address: str = Field("127.0.0.1:50052", description="host:port of the storage-cache on this node.")
    resolve_cache_s: float = Field(
        5.0,
        ge=0,
        description="Seconds a registry answer (model -> latest revision) is reused; held models keep serving on "
        "the last answer while the registry is unreachable.",
    )
    rpc_timeout_s: float = Field(600.0, gt=0, description="Deadline of each call to the registry and storage-cache.")
    active_budget_bytes: ByteSize = Field(
        ByteSize(16 * GiB), gt=0, description="Largest model the active slot may hold (device memory)."
    )
    standby_budget_bytes: ByteSize = Field(
        ByteSize(16 * GiB),
        ge=0,
        description="Bytes of materialized pipelines kept ready to swap in beside the active one (device memory).",
    )
    host_budget_bytes: ByteSize = Field(
        ByteSize(32 * GiB),
        gt=0,
        description="Bytes of weights kept in host memory (shared memory; pinned on CUDA), least recently used first.",
    )
    queue_capacity: int = Field(64, gt=0, description="Requests waiting beyond the running one; more are refused.")
    lookahead: bool = Field(
        True, description="Preload the next distinct model waiting in the queue while the current one computes."
    )
    max_overtake_s: float = Field(
        10.0,
        ge=0,
        description="Most seconds requests for held (active or standby) models may delay, by running first, a request "
        "whose model is still loading; each passed request keeps this budget, charged the estimated (or measured, if "
        "longer) device time of every call that passes it, and a request whose model is ready is never passed. 10 s "
        "is about one cold load from the backing store: a cold request waits at most about twice its load while hot "
        "traffic is not stuck behind it. 0 = strictly first in, first out.",
    )
    max_batch_images: int = Field(
        0,
        ge=0,
        le=64,
        description="Most images in one pipeline call: queued requests for the same model with equal steps, guidance "
        "scale and size run together (each with its own prompts and seeds); 0 = auto, 8 on CUDA and 1 (off) on CPU, "
        "where batching gained 1.02-1.26x (bench/bench_batching.py: the larger the model, the less). A batched image "
        "may differ from the same seed run alone in the last bits (on CPU, at most one level of a channel on the test "
        "pipelines).",
    )
    max_adapters: int = Field(
        4, ge=0, le=64,
        description="Most LoRA adapters one request may apply (an adapter given as the model counts); 0 refuses "
        "adapters.",
    )
    max_pipeline_adapters: int = Field(
        8, ge=1, le=256,
        description="LoRA adapters a resident pipeline keeps loaded (so switching to one is setting the pipeline's "
        "adapters, no load); beyond it the least recently used is unloaded. Their weights stay in the host tier.",
    )
    status_min_interval_s: float = Field(
        0.005,
        ge=0,
        description="Least time between two WatchStatus updates; changes in between are coalesced into one.",
    )
    lease_ttl_s: float = Field(
        300.0, gt=0, description="Lease on the storage-cache views of held models; renewed at a third of it."
    )
    preloader_restarts: int = Field(
        100, ge=0, description="Times a dead preloader subprocess is restarted automatically."
    )
    preload_read_bytes_per_s: ByteSize = Field(
        ByteSize(0),
        ge=0,
        description="Cap on the read rate of model loads in bytes/s (the preloader's reads and the executor's own: "
        "files converted in the executor, mapped files verified or populated), so loading beside inference does "
        "not starve other I/O on the node; 0 = no cap.",
    )
    read_chunk_bytes: ByteSize = Field(
        ByteSize(16 * 1024 * 1024), ge=4096, le=GiB, description="Read size when loading weights (4 KiB to 1 GiB)."
    )
    read_concurrency: int = Field(
        DEFAULT_READ_CONCURRENCY,
        ge=1,
        le=MAX_READ_CONCURRENCY,
        description="Reads in flight at once when the preloader loads a model: several files, and large files in "
        "read_chunk_bytes ranges. More streams reach a network mount's bandwidth; on a local disk 2-4 suffice.",
    )
    map_view_files: bool = Field(
        True,
        description="On CPU, map weight files that need no dtype conversion straight from the storage-cache's view "
        "(copy-on-write, the page cache's pages, as from_pretrained does) instead of copying them into shared "
        "memory; only files that are converted go through the preloader. With convert_in_executor, converted files "
        "are also converted from a mapping of the view, without a staging copy. Turn off if the node cache is on a "
        "network file system.",
    )
    convert_in_executor: bool = Field(
        True,
        description="On CPU, read and convert weight files that need a dtype conversion in the executor's own "
        "threads (read_concurrency of them, GIL released) into private memory instead of in the preloader child's "
        "shared memory: private pages cost ~30% less to fill. Off: the preloader child does it, isolated.",
    )
    host_pool_bytes: Annotated[ByteSize, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="On CPU, keep up to this many bytes of the memory that dropped converted weights (convert_in_"
        "executor) occupied, and convert the next models into it: pages written before need no page fault and no "
        "zeroing (an fp16 -> fp32 SD 1.5 UNet: 0.27 s against 0.9 s into fresh memory on a 2-core VM). The "
        "executor's memory can exceed its budgets by this much. auto = as much as the largest model converted so "
        "far (about one model), up to half of host_budget_bytes, when convert_in_executor is on; 0 = off: freed "
        "weights go back to the kernel.",
    )
    host_pool_reserve: bool = Field(
        False,
        description="Make the whole host pool (host_pool_bytes, a size: not auto) at start, faulted in, before the "
        "executor serves: the first conversions of a fresh executor then write to memory touched before too "
        "(~0.35 s per GiB moved from the first loads to the start). The executor holds host_pool_bytes from its "
        "start.",
    )
    verify_reads: bool = Field(
        True,
        description="Check each cached weight file against the checksum (XXH3) the storage-cache recorded when it cached it, "
        "while reading it. A mismatch is reported to the storage-cache (which drops the blob) and the load is "
        "retried once from the backing store, then fails with DATA_LOSS naming the file. Turn off only on a node "
        "that trusts its disk.",
    )
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads for CPU inference; 0 = torch default.")
    max_width: int = Field(1024, gt=0, description="Largest image width in pixels.")
    max_height: int = Field(1024, gt=0, description="Largest image height in pixels.")
    max_steps: int = Field(150, gt=0, description="Most denoising steps per request.")
    max_images: int = Field(4, gt=0, description="Most images per request.")
    max_prompt_chars: int = Field(2000, gt=0, description="Longest prompt and negative prompt.")
    default_steps: int = Field(25, gt=0, description="Steps when a request gives none.")
    default_guidance: float = Field(7.5, ge=0, description="Guidance scale when a request gives none.")
    default_width: int = Field(512, gt=0, description="Width when a request gives none.")
    default_height: int = Field(512, gt=0, description="Height when a request gives none.")
    max_guidance: float = Field(
        50.0, gt=0, le=1000, description="Largest classifier-free guidance scale a request may ask for (0 to this)."
    )
    load_timeout_s: float = Field(
        1800.0, gt=0, description="Longest a model's read into host memory may take before the load fails "
        "(UNAVAILABLE); raise it for very large models on slow storage."
    )
    retry_after_s: float = Field(
        1.0, ge=0, description="Delay suggested to clients (google.rpc.RetryInfo) when the queue is full."
    )
    preloader_restart_wait_s: float = Field(
        60.0, gt=0, description="Longest a load waits for a dead preloader subprocess to be restarted before it "
        "fails (UNAVAILABLE)."
    )
    max_load_attempts: int = Field(
        3, ge=1, le=100, description="Loads one request may start for its model (or adapter) before it fails: a "
        "model evicted between its load and its turn (tier budgets too small for the traffic) is loaded again, but "
        "not forever."
    )

    @field_validator("host_pool_bytes", mode="wrap")
    @classmethod
    def _one_error_for_host_pool_bytes(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        """One message instead of the union's two (the byte size's and the literal's)."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("give a byte size (4GiB, 512MiB; 0 = off) or auto") from None

    @model_validator(mode="after")
    def _reserve_needs_a_size(self) -> ExecutorSettings:
        if self.host_pool_reserve and self.host_pool_bytes == "auto":
            raise ValueError("host_pool_reserve makes the whole pool at start, so it needs a size: give host_pool_bytes "
                             "(about one model's converted weights, e.g. 5GiB for SD 1.5 as fp32)")
        if self.host_pool_reserve and not self.host_pool_bytes:
            raise ValueError("host_pool_reserve with host_pool_bytes 0: there is no pool to reserve")
        return self

    def host_pool_sizing(self) -> tuple[int, int]:
        """(limit, grow_up_to) of the host pool (hostpool.HostPool): a fixed size is (size, 0); auto is (0, half the
        host budget), grown to the largest model converted; (0, 0) = no pool. Only CPU executors make one."""
        if self.host_pool_bytes == "auto":
            return (0, int(self.host_budget_bytes) // HOST_POOL_AUTO_DIVISOR) if self.convert_in_executor else (0, 0)
        return int(self.host_pool_bytes), 0
