"""Settings every service shares (address, shutdown grace, logging, message size), read from the environment and
overridden by command-line flags."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hotslot.bootstrap.security import ClientSecurity, ServerTls

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
    # Security (README "Security"). Server side: TLS with this certificate, mTLS with a client CA, bearer tokens.
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate chain this server presents; with tls_key_file turns TLS on. Re-read "
        "when it changes on disk (new connections get the new one)."
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle that clients' certificates must chain to: set, every client must present "
        "one (mTLS). Needs tls_cert_file."
    )
    tokens_file: Path | None = Field(
        None, description="File of `TOKEN SCOPE` lines (scope `generate` or `admin`): set, every call but health "
        "and reflection needs `authorization: Bearer TOKEN` of the method's scope. Re-read when it changes."
    )
    health_port: int | None = Field(
        None, ge=0, le=65535, description="Also serve grpc.health.v1 alone, in plaintext without tokens, on this "
        "port (for probes that cannot speak TLS, like Kubernetes' gRPC probes); unset: none."
    )
    # Client side: how this service calls the others (registry, storage-cache, executors).
    client_tls_ca_file: Path | None = Field(
        None, description="PEM CA bundle that the servers this service calls must chain to; set, its outgoing "
        "channels use TLS. Channels are rebuilt when a client TLS or token file changes."
    )
    client_tls_cert_file: Path | None = Field(
        None, description="PEM certificate this service presents to the services it calls (mTLS)."
    )
    client_tls_key_file: Path | None = Field(None, description="PEM private key of client_tls_cert_file.")
    client_tls_server_name: str = Field(
        "", description="Name the certificates of the services this one calls are checked against, instead of the "
        "host of each address (needed when addresses are IPs, e.g. executors found through DNS)."
    )
    client_token_file: Path | None = Field(
        None, description="File holding the bearer token this service sends on its outgoing calls."
    )

    @model_validator(mode="after")
    def _check_security(self) -> ServiceSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs TLS: set tls_cert_file and tls_key_file too")
        if (self.client_tls_cert_file is None) != (self.client_tls_key_file is None):
            raise ValueError("a client certificate needs both client_tls_cert_file and client_tls_key_file")
        if self.client_tls_cert_file is not None and self.client_tls_ca_file is None:
            raise ValueError("client_tls_cert_file needs client_tls_ca_file (the client certificate is sent over TLS)")
        # The files themselves are read when the server starts (a missing one stops it with its path): settings
        # are also built where the files do not exist, e.g. to check the Kubernetes manifests.
        return self

    def server_tls(self) -> ServerTls | None:
        """The server's TLS files, or None for plaintext."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        return ServerTls(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)

    def client_security(self) -> ClientSecurity:
        """How this service's outgoing channels authenticate: TLS, client certificate, token."""
        return ClientSecurity(
            ca_file=self.client_tls_ca_file, cert_file=self.client_tls_cert_file, key_file=self.client_tls_key_file,
            token_file=self.client_token_file, server_name=self.client_tls_server_name,
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
