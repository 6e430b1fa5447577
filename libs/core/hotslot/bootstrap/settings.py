"""Settings every service shares (address, shutdown grace, logging, message size), read from the environment and
overridden by command-line flags."""
from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
METRICS_OFF = -1  # metrics_port: no /metrics endpoint (the base default; each service sets a port of its own)
METRICS_PORT_DESCRIPTION = (
    "TCP port of the Prometheus /metrics endpoint (plain HTTP on `host`); 0 picks a free port (logged at start), "
    "-1 turns the endpoint off."
)

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
    metrics_port: int = Field(METRICS_OFF, ge=METRICS_OFF, le=65535, description=METRICS_PORT_DESCRIPTION)
    otel_service_name: str | None = Field(
        None, description="service.name of the traces; defaults to 'hotslot-<service>'."
    )

    @property
    def address(self) -> str:
        """host:port as gRPC wants it to bind (IPv6 hosts in brackets)."""
        return format_address(self.host, self.port)


def metrics_port_field(default: int) -> Any:
    """The metrics_port field of a service whose endpoint is on by default, at port `default`."""
    return Field(default, ge=METRICS_OFF, le=65535, description=METRICS_PORT_DESCRIPTION)


def format_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def settings_from(cls: type[S], overrides: dict[str, Any] | None = None) -> S:
    """Builds `cls` from the environment plus explicit overrides (command-line flags). An override of None means
    the flag was not given, so the precedence is flag > environment > default."""
    given = {name: value for name, value in (overrides or {}).items() if value is not None}
    return cls(**given)
