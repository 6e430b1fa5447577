"""Settings of the router (environment variables HOTSLOT_ROUTER_*)."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from hotslot.bootstrap.settings import ServiceSettings, metrics_port_field

from .membership import split_host_port
from .refusals import DEFAULT_REFUSAL_LOG_INTERVAL_S

DEFAULT_PORT = 50050
DEFAULT_METRICS_PORT = 9460


class RouterSettings(ServiceSettings):
    """Settings of the router (environment variables HOTSLOT_ROUTER_*)."""

    model_config = SettingsConfigDict(env_prefix="HOTSLOT_ROUTER_", extra="ignore")

    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="TCP port to listen on; 0 picks a free port.")
    metrics_port: int = metrics_port_field(DEFAULT_METRICS_PORT)
    executors: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Executor addresses, comma-separated host:port. Ones not up yet are retried until they are.",
    )
    executors_dns: str = Field(
        "",
        description="name:port whose every A/AAAA record is one executor (a Kubernetes headless Service); "
        "re-resolved every dns_refresh_s. Combines with `executors`.",
    )
    dns_refresh_s: float = Field(5.0, gt=0, description="Seconds between resolutions of executors_dns.")
    registry_address: str = Field(
        "127.0.0.1:50051",
        description="host:port of the model-registry for ListModels/GetModel and for refusing unknown models "
        "early; empty for none.",
    )
    registry_timeout_s: float = Field(10.0, gt=0, description="Deadline of each call to the registry.")
    max_queue: int = Field(
        256, ge=0, description="Requests that may wait in the router while every executor is full; beyond it "
        "RESOURCE_EXHAUSTED."
    )
    max_inflight_per_executor: int = Field(
        32, gt=0, description="Requests the router keeps outstanding on one executor at most."
    )
    queue_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait in the router queue before RESOURCE_EXHAUSTED (the client's "
        "deadline, if sooner, ends it first)."
    )
    retry_after_s: float = Field(
        1.0, ge=0, description="Delay suggested to clients (google.rpc.RetryInfo) when the router refuses work."
    )
    retry_attempts: int = Field(
        1, ge=0, description="Times a request is placed again on another executor when its executor dies or "
        "answers UNAVAILABLE; 0 turns retries off."
    )
    watch_backoff_s: float = Field(
        0.5, gt=0, description="First wait before reconnecting a broken executor status stream; doubles per failure."
    )
    watch_backoff_max_s: float = Field(
        10.0, gt=0, description="Longest wait between reconnection attempts; also bounds gRPC's own reconnect "
        "backoff on the executor channels, so an executor that comes back is followed again within this time."
    )
    keepalive_time_s: float = Field(
        10.0, gt=0, description="Interval of keepalive pings on each executor channel while it is quiet (status "
        "streams often are): an executor that stops answering without closing its connection (frozen, or its node "
        "gone) is dropped after keepalive_time_s + keepalive_timeout_s. Executors must accept pings this often "
        "(their keepalive_min_ping_interval_s)."
    )
    keepalive_timeout_s: float = Field(
        5.0, gt=0, description="Time a keepalive ping may go unanswered before the executor's connection is closed "
        "and its requests are retried elsewhere."
    )

    refusal_log_interval_s: float = Field(
        DEFAULT_REFUSAL_LOG_INTERVAL_S, gt=0, description="Requests refused with RESOURCE_EXHAUSTED are logged at most once per this many "
        "seconds per reason (router queue full, queue wait timed out, executor refused), with a count of the "
        "others."
    )

    @field_validator("executors", mode="before")
    @classmethod
    def _split_targets(cls, value: object) -> object:
        if isinstance(value, str):
            return [target.strip() for target in value.split(",") if target.strip()]
        return value

    @field_validator("executors")
    @classmethod
    def _check_targets(cls, value: list[str]) -> list[str]:
        for target in value:
            split_host_port(target)
        return value

    @field_validator("executors_dns")
    @classmethod
    def _check_dns_target(cls, value: str) -> str:
        if value:
            split_host_port(value)
        return value
