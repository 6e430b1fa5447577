"""gRPC channel and server options for failure behaviour, held once for every service: how fast a client channel
reconnects to a peer that came back, keepalive pings that notice a silently dead peer (and the server's side that
accepts them), and a service-config retry policy for the idempotent downstream calls."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hotslot.bootstrap.settings import ServiceSettings

Options = list[tuple[str, Any]]

IDEMPOTENT_METHODS: dict[str, tuple[str, ...]] = {
    "hotslot.registry.v1.RegistryService": ("GetModel", "ListModels"),
    # EnsureModel makes a lease: a retry after a lost answer leaves one more, which expires with its TTL.
    "hotslot.storage.v1.StorageCacheService": ("EnsureModel", "RenewLease"),
}
"""Downstream calls gRPC may send again on UNAVAILABLE: reads, and calls whose repetition is harmless."""

RETRY_INITIAL_BACKOFF_S = 0.2
"""First wait before a retried attempt; gRPC randomizes each wait between 0 and the current backoff."""
RETRY_MAX_BACKOFF_S = 2.0
"""Longest wait between retried attempts."""
RETRY_BACKOFF_MULTIPLIER = 2


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def reconnect_options(initial_s: float, max_s: float) -> Options:
    """A channel that tries to reconnect first after `initial_s`, then at most every `max_s` (gRPC's defaults: 1 s
    growing to 120 s, which made a restarted executor wait ~20 s to be followed again). gRPC's
    min_reconnect_backoff is the shortest time a single connection attempt may take before it is abandoned; it is
    set to `max_s` so a peer whose packets are dropped costs one attempt at most `max_s` (default 20 s)."""
    return [
        ("grpc.initial_reconnect_backoff_ms", _ms(initial_s)),
        ("grpc.max_reconnect_backoff_ms", _ms(max(max_s, initial_s))),
        ("grpc.min_reconnect_backoff_ms", _ms(max_s)),
    ]


def keepalive_options(time_s: float, timeout_s: float) -> Options:
    """Client keepalive: a ping every `time_s` while the connection is idle, and the connection is closed (its
    streams fail with UNAVAILABLE) when one is not answered within `timeout_s`; so a peer that stopped answering
    without closing its connection (a frozen process, a vanished node) is noticed in time_s + timeout_s. Pings go
    out with no call in flight and without data in between (a status stream may be quiet for long); the servers
    must allow that interval (server_keepalive_options)."""
    return [
        ("grpc.keepalive_time_ms", _ms(time_s)),
        ("grpc.keepalive_timeout_ms", _ms(timeout_s)),
        # Recent gRPC cores time a ping out by this one (default 60 s) when it is shorter than keepalive's.
        ("grpc.http2.ping_timeout_ms", _ms(timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_keepalive_options(min_ping_interval_s: float) -> Options:
    """A server that accepts client pings as often as every `min_ping_interval_s` even with no call in flight and no
    data sent (gRPC's default answers pings more often than every 5 minutes with GOAWAY "too_many_pings")."""
    return [
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(min_ping_interval_s)),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def retry_service_config(attempts: int) -> dict[str, Any]:
    """The gRPC service config giving every method in IDEMPOTENT_METHODS up to `attempts` attempts (gRPC caps it at
    5) when one answers UNAVAILABLE. Retries stay within the call's own deadline."""
    return {
        "methodConfig": [
            {
                "name": [
                    {"service": service, "method": method}
                    for service, methods in IDEMPOTENT_METHODS.items()
                    for method in methods
                ],
                "retryPolicy": {
                    "maxAttempts": attempts,
                    "initialBackoff": f"{RETRY_INITIAL_BACKOFF_S}s",
                    "maxBackoff": f"{RETRY_MAX_BACKOFF_S}s",
                    "backoffMultiplier": RETRY_BACKOFF_MULTIPLIER,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }


def retry_options(attempts: int) -> Options:
    """Channel options carrying retry_service_config; 1 attempt (no retries) leaves the channel as gRPC makes it."""
    if attempts <= 1:
        return []
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(retry_service_config(attempts)))]


def downstream_options(settings: ServiceSettings) -> Options:
    """Options of a channel to another hotslot service that this one calls (registry, storage-cache): the retry
    policy for its idempotent calls, and reconnecting within `downstream_reconnect_max_s` once it is back."""
    reconnect_max_s = settings.downstream_reconnect_max_s
    return [
        *reconnect_options(min(1.0, reconnect_max_s), reconnect_max_s),
        *retry_options(settings.downstream_retry_attempts),
    ]
