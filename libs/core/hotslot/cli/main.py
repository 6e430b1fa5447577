"""Entry point of the `hotslot` console command: `serve <service>` and `dev` tools."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from hotslot.cli.dev import dev_app

app = typer.Typer(no_args_is_help=True, help="hotslot: hot-swap serving of diffusion models over gRPC.")
serve_app = typer.Typer(no_args_is_help=True, help="Run one hotslot service in the foreground.")
app.add_typer(serve_app, name="serve")


@serve_app.callback()
def _serve_setup() -> None:
    from hotslot.bootstrap.parent import die_with_parent

    die_with_parent()
app.add_typer(dev_app, name="dev")

HostOpt = Annotated[str | None, typer.Option(help="Address to listen on. \\[env: HOTSLOT_<SERVICE>_HOST]")]
PortOpt = Annotated[int | None, typer.Option(help="Port to listen on; 0 picks a free one. \\[env: HOTSLOT_<SERVICE>_PORT]")]
LogLevelOpt = Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR. \\[env: HOTSLOT_<SERVICE>_LOG_LEVEL]")]
LogFormatOpt = Annotated[str | None, typer.Option(help="text or json. \\[env: HOTSLOT_<SERVICE>_LOG_FORMAT]")]
GraceOpt = Annotated[
    float | None, typer.Option(help="Seconds to finish in-flight calls on SIGTERM. \\[env: HOTSLOT_<SERVICE>_SHUTDOWN_GRACE_S]")
]


@serve_app.command("registry")
def serve_registry(
    host: HostOpt = None,
    port: PortOpt = None,
    models_root: Annotated[
        Path | None, typer.Option(help="Root of the shared model store (NFS mount). \\[env: HOTSLOT_REGISTRY_MODELS_ROOT]")
    ] = None,
    database: Annotated[
        Path | None, typer.Option(help="SQLite database file. \\[env: HOTSLOT_REGISTRY_DATABASE]")
    ] = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
    shutdown_grace_s: GraceOpt = None,
) -> None:
    """Run the model-registry: the catalogue of models with checksummed manifests."""
    from hotslot.bootstrap.settings import settings_from
    from hotslot.services.registry.wiring import RegistrySettings, serve

    settings = settings_from(
        RegistrySettings,
        {
            "host": host,
            "port": port,
            "models_root": models_root,
            "database": database,
            "log_level": log_level,
            "log_format": log_format,
            "shutdown_grace_s": shutdown_grace_s,
        },
    )
    asyncio.run(serve(settings))


@serve_app.command("storage-cache")
def serve_storage_cache(
    host: HostOpt = None,
    port: PortOpt = None,
    backing_root: Annotated[
        Path | None,
        typer.Option(help="Shared backing store (NFS mount), the registry's models root. "
                     "\\[env: HOTSLOT_STORAGE_CACHE_BACKING_ROOT]"),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Node-local cache directory. \\[env: HOTSLOT_STORAGE_CACHE_CACHE_DIR]")
    ] = None,
    capacity_bytes: Annotated[
        str | None,
        typer.Option(help="Bytes the cache may hold, e.g. 50GiB; must be > 0. \\[env: HOTSLOT_STORAGE_CACHE_CAPACITY_BYTES]"),
    ] = None,
    parallel_fetches: Annotated[
        int | None, typer.Option(help="Files fetched at once. \\[env: HOTSLOT_STORAGE_CACHE_PARALLEL_FETCHES]")
    ] = None,
    read_chunk_bytes: Annotated[
        str | None,
        typer.Option(help="Read size on the backing store, e.g. 8MiB. \\[env: HOTSLOT_STORAGE_CACHE_READ_CHUNK_BYTES]"),
    ] = None,
    fsync: Annotated[
        bool | None,
        typer.Option("--fsync/--no-fsync", help="fsync blobs and uploads before they become visible. "
                     "\\[env: HOTSLOT_STORAGE_CACHE_FSYNC]"),
    ] = None,
    registry_address: Annotated[
        str | None,
        typer.Option(help="host:port of the model-registry; empty for manifests only. "
                     "\\[env: HOTSLOT_STORAGE_CACHE_REGISTRY_ADDRESS]"),
    ] = None,
    registry_timeout_s: Annotated[
        float | None, typer.Option(help="Deadline of a registry lookup. \\[env: HOTSLOT_STORAGE_CACHE_REGISTRY_TIMEOUT_S]")
    ] = None,
    lease_ttl_s: Annotated[
        float | None, typer.Option(help="Default lease duration. \\[env: HOTSLOT_STORAGE_CACHE_LEASE_TTL_S]")
    ] = None,
    max_lease_ttl_s: Annotated[
        float | None, typer.Option(help="Longest lease allowed. \\[env: HOTSLOT_STORAGE_CACHE_MAX_LEASE_TTL_S]")
    ] = None,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Re-hash every blob before serving and drop bad ones. "
                     "\\[env: HOTSLOT_STORAGE_CACHE_VERIFY_ON_START]"),
    ] = False,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
    shutdown_grace_s: GraceOpt = None,
) -> None:
    """Run the storage-cache: the node-local, content-addressed copy of model files in front of the backing store."""
    from pydantic import ValidationError

    from hotslot.bootstrap.settings import settings_from
    from hotslot.services.storage_cache.wiring import StorageCacheSettings, serve

    overrides = {
        "host": host,
        "port": port,
        "backing_root": backing_root,
        "cache_dir": cache_dir,
        "capacity_bytes": capacity_bytes,
        "parallel_fetches": parallel_fetches,
        "read_chunk_bytes": read_chunk_bytes,
        "fsync": fsync,
        "registry_address": registry_address,
        "registry_timeout_s": registry_timeout_s,
        "lease_ttl_s": lease_ttl_s,
        "max_lease_ttl_s": max_lease_ttl_s,
        "verify_on_start": True if verify else None,
        "log_level": log_level,
        "log_format": log_format,
        "shutdown_grace_s": shutdown_grace_s,
    }
    try:
        settings = settings_from(StorageCacheSettings, overrides)
    except ValidationError as error:
        # One line per bad setting, naming both the flag and the variable, instead of a pydantic traceback.
        for problem in error.errors():
            name = str(problem["loc"][0]) if problem["loc"] else "settings"
            message = problem["msg"].removeprefix("Value error, ")
            typer.echo(
                f"INVALID_ARGUMENT: setting {name} (--{name.replace('_', '-')} or HOTSLOT_STORAGE_CACHE_{name.upper()})"
                f": {message} (got {problem.get('input')!r})",
                err=True,
            )
        raise typer.Exit(2) from None
    asyncio.run(serve(settings))


@serve_app.command("router")
def serve_router(
    host: HostOpt = None,
    port: PortOpt = None,
    executors: Annotated[
        str | None, typer.Option(help="Executor addresses, comma-separated host:port. \\[env: HOTSLOT_ROUTER_EXECUTORS]")
    ] = None,
    executors_dns: Annotated[
        str | None,
        typer.Option(help="name:port whose every A/AAAA record is an executor. \\[env: HOTSLOT_ROUTER_EXECUTORS_DNS]"),
    ] = None,
    dns_refresh_s: Annotated[
        float | None, typer.Option(help="Seconds between DNS resolutions. \\[env: HOTSLOT_ROUTER_DNS_REFRESH_S]")
    ] = None,
    registry_address: Annotated[
        str | None,
        typer.Option(help="host:port of the model-registry; empty for none. \\[env: HOTSLOT_ROUTER_REGISTRY_ADDRESS]"),
    ] = None,
    registry_timeout_s: Annotated[
        float | None, typer.Option(help="Deadline of registry calls. \\[env: HOTSLOT_ROUTER_REGISTRY_TIMEOUT_S]")
    ] = None,
    max_queue: Annotated[
        int | None,
        typer.Option(help="Requests waiting in the router at most. \\[env: HOTSLOT_ROUTER_MAX_QUEUE]"),
    ] = None,
    max_inflight_per_executor: Annotated[
        int | None,
        typer.Option(help="Requests outstanding on one executor at most. "
                     "\\[env: HOTSLOT_ROUTER_MAX_INFLIGHT_PER_EXECUTOR]"),
    ] = None,
    queue_timeout_s: Annotated[
        float | None,
        typer.Option(help="Longest wait in the router queue. \\[env: HOTSLOT_ROUTER_QUEUE_TIMEOUT_S]"),
    ] = None,
    retry_after_s: Annotated[
        float | None,
        typer.Option(help="Retry delay suggested when refusing work. \\[env: HOTSLOT_ROUTER_RETRY_AFTER_S]"),
    ] = None,
    retry_attempts: Annotated[
        int | None,
        typer.Option(help="Retries on another executor when one dies; 0 for none. "
                     "\\[env: HOTSLOT_ROUTER_RETRY_ATTEMPTS]"),
    ] = None,
    watch_backoff_s: Annotated[
        float | None,
        typer.Option(help="First reconnect delay of an executor status stream. \\[env: HOTSLOT_ROUTER_WATCH_BACKOFF_S]"),
    ] = None,
    watch_backoff_max_s: Annotated[
        float | None,
        typer.Option(help="Longest reconnect delay. \\[env: HOTSLOT_ROUTER_WATCH_BACKOFF_MAX_S]"),
    ] = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
    shutdown_grace_s: GraceOpt = None,
) -> None:
    """Run the router: the public entry point that places each request on the best executor."""
    from pydantic import ValidationError

    from hotslot.bootstrap.settings import settings_from
    from hotslot.services.router.wiring import RouterSettings, serve

    overrides = {
        "host": host,
        "port": port,
        "executors": executors,
        "executors_dns": executors_dns,
        "dns_refresh_s": dns_refresh_s,
        "registry_address": registry_address,
        "registry_timeout_s": registry_timeout_s,
        "max_queue": max_queue,
        "max_inflight_per_executor": max_inflight_per_executor,
        "queue_timeout_s": queue_timeout_s,
        "retry_after_s": retry_after_s,
        "retry_attempts": retry_attempts,
        "watch_backoff_s": watch_backoff_s,
        "watch_backoff_max_s": watch_backoff_max_s,
        "log_level": log_level,
        "log_format": log_format,
        "shutdown_grace_s": shutdown_grace_s,
    }
    try:
        settings = settings_from(RouterSettings, overrides)
    except ValidationError as error:
        for problem in error.errors():
            name = str(problem["loc"][0]) if problem["loc"] else "settings"
            message = problem["msg"].removeprefix("Value error, ")
            typer.echo(
                f"INVALID_ARGUMENT: setting {name} (--{name.replace('_', '-')} or HOTSLOT_ROUTER_{name.upper()})"
                f": {message} (got {problem.get('input')!r})",
                err=True,
            )
        raise typer.Exit(2) from None
    asyncio.run(serve(settings))


def _serve_executor(settings) -> None:
    from hotslot.services.executor.wiring import serve

    asyncio.run(serve(settings))


def _register_executor() -> None:
    from hotslot.cli.settings_command import settings_command
    from hotslot.services.executor.settings import ExecutorSettings

    serve_app.command("executor")(
        settings_command(
            ExecutorSettings,
            _serve_executor,
            "Run an executor: inference on one device, with a hot-swap slot filled by a preloading subprocess.",
        )
    )


_register_executor()


def _register_client_commands() -> None:
    from hotslot.cli.client import generate, models_app, status
    from hotslot.cli.up import up

    app.command("generate")(generate)
    app.command("status")(status)
    app.command("up")(up)
    app.add_typer(models_app, name="models")


_register_client_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
