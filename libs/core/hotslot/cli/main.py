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
app.add_typer(dev_app, name="dev")

HostOpt = Annotated[str | None, typer.Option(help="Address to listen on. [env: HOTSLOT_<SERVICE>_HOST]")]
PortOpt = Annotated[int | None, typer.Option(help="Port to listen on; 0 picks a free one. [env: HOTSLOT_<SERVICE>_PORT]")]
LogLevelOpt = Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR. [env: HOTSLOT_<SERVICE>_LOG_LEVEL]")]
LogFormatOpt = Annotated[str | None, typer.Option(help="text or json. [env: HOTSLOT_<SERVICE>_LOG_FORMAT]")]
GraceOpt = Annotated[
    float | None, typer.Option(help="Seconds to finish in-flight calls on SIGTERM. [env: HOTSLOT_<SERVICE>_SHUTDOWN_GRACE_S]")
]


@serve_app.command("registry")
def serve_registry(
    host: HostOpt = None,
    port: PortOpt = None,
    models_root: Annotated[
        Path | None, typer.Option(help="Root of the shared model store (NFS mount). [env: HOTSLOT_REGISTRY_MODELS_ROOT]")
    ] = None,
    database: Annotated[
        Path | None, typer.Option(help="SQLite database file. [env: HOTSLOT_REGISTRY_DATABASE]")
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
