"""Settings every service shares (address, shutdown grace, logging, message size), read from the environment and
overridden by command-line flags."""
from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

S = TypeVar("S", bound="ServiceSettings")


class ServiceSettings(BaseSettings):
    """Base of each service's settings. A service subclasses it and sets its own prefix, e.g.
    `model_config = SettingsConfigDict(env_prefix="HOTSLOT_REGISTRY_")`; the rest of this config is inherited."""

    # extra="ignore": the environment holds variables of every service under HOTSLOT_*, and a .env shared by all
    # of them must not make one service refuse to start.
    model_config = SettingsConfigDict(env_prefix="HOTSLOT_", extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="Interface to listen on; '0.0.0.0' or '::' for all interfaces.")
    port: int = Field(0, ge=0, le=65535, description="TCP port to listen on; 0 picks a free port.")
    shutdown_grace_s: float = Field(
        5.0, ge=0, description="Seconds in-flight RPCs get to finish after SIGTERM before they are cancelled."
    )
    log_level: str = Field("INFO", description="Level of the root logger: DEBUG, INFO, WARNING, ERROR.")
    log_format: Literal["text", "json"] = Field(
        "text", description="'text': one readable line per record; 'json': one JSON object per line."
    )
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES, gt=0, description="Largest gRPC message sent or received, in bytes."
    )
    shutdown_abort_margin_s: float = Field(
        1.0, ge=0, description="Seconds before the end of the shutdown grace at which calls still running are ended "
        "with UNAVAILABLE and a RetryInfo detail (so a router or client retries them elsewhere) instead of being cut "
        "with CANCELLED when the grace ends."
    )
    keepalive_min_ping_interval_s: float = Field(
        1.0, gt=0, description="Shortest interval between keepalive pings this server accepts from a client (with no "
        "call in flight or no data sent); pings more often are answered with GOAWAY. Keep it at or below the "
        "clients' keepalive_time_s."
    )
    downstream_retry_attempts: int = Field(
        3, ge=1, le=5, description="Attempts of an idempotent call to another service (registry GetModel, "
        "ListModels; storage-cache EnsureModel, RenewLease) that answers UNAVAILABLE, within the call's deadline; "
        "1 turns retries off."
    )
    downstream_reconnect_max_s: float = Field(
        5.0, gt=0, description="Longest wait between attempts to reconnect to another service this one calls "
        "(registry, storage-cache) after it went away, so a restarted peer is used again within this time "
        "(gRPC's own default grows to 120 s)."
    )
    otel_service_name: str | None = Field(
        None, description="service.name of the traces; defaults to 'hotslot-<service>'."
    )

    @property
    def address(self) -> str:
        """host:port as gRPC wants it to bind (IPv6 hosts in brackets)."""
        return format_address(self.host, self.port)


def format_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def settings_from(cls: type[S], overrides: dict[str, Any] | None = None) -> S:
    """Builds `cls` from the environment plus explicit overrides (command-line flags). An override of None means
    the flag was not given, so the precedence is flag > environment > default."""
    given = {name: value for name, value in (overrides or {}).items() if value is not None}
    return cls(**given)
