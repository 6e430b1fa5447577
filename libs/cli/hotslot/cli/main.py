"""Entry point of the `hotslot` console command: `serve <service>`, `up`, the client commands and `dev` tools."""
from __future__ import annotations

import typer

from hotslot.cli.dev import dev_app

app = typer.Typer(no_args_is_help=True, help="hotslot: hot-swap serving of diffusion models over gRPC.")
serve_app = typer.Typer(
    no_args_is_help=True,
    help="Run one hotslot service in the foreground. Every setting is a flag and a HOTSLOT_<SERVICE>_* variable.",
)
app.add_typer(serve_app, name="serve")
app.add_typer(dev_app, name="dev")


@serve_app.callback()
def _serve_setup() -> None:
    from hotslot.bootstrap.parent import die_with_parent

    die_with_parent()


def _register_serve_commands() -> None:
    from hotslot.bootstrap.settings import ServiceSettings
    from hotslot.bootstrap.settings_command import serve_command
    from hotslot.services.executor.settings import ExecutorSettings
    from hotslot.services.registry.settings import RegistrySettings
    from hotslot.services.router.settings import RouterSettings
    from hotslot.services.storage_cache.settings import StorageCacheSettings

    services: list[tuple[str, type[ServiceSettings], str, str]] = [
        ("registry", RegistrySettings, "hotslot.services.registry.wiring",
         "Run the model-registry: the catalogue of models with checksummed manifests."),
        ("storage-cache", StorageCacheSettings, "hotslot.services.storage_cache.wiring",
         "Run the storage-cache: the node-local, content-addressed copy of model files in front of the backing store."),
        ("executor", ExecutorSettings, "hotslot.services.executor.wiring",
         "Run an executor: inference on one device, with a hot-swap slot filled by a preloading subprocess."),
        ("router", RouterSettings, "hotslot.services.router.wiring",
         "Run the router: the public entry point that places each request on the best executor."),
    ]
    for name, settings_cls, module, doc in services:
        serve_app.command(name)(serve_command(settings_cls, module, doc))


def _register_client_commands() -> None:
    from hotslot.cli.client import evict, generate, models_app, preload, status
    from hotslot.cli.up import up

    app.command("generate")(generate)
    app.command("status")(status)
    app.command("preload")(preload)
    app.command("evict")(evict)
    app.command("up")(up)
    app.add_typer(models_app, name="models")


_register_serve_commands()
_register_client_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
