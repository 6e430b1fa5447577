"""Builds a `hotslot serve <service>` command whose flags are exactly the fields of the service's settings class,
so every setting has a flag, each flag names its environment variable, and the two cannot drift apart.

The same command is each service distribution's own console script (`hotslot-router`, `hotslot-registry`,
`hotslot-storage-cache`, `hotslot-executor`: see `service_main`), so a service runs with only hotslot-core and
its own distribution installed: the router, registry and storage-cache never import the executor or torch."""
from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import typer
from pydantic import ValidationError

from hotslot.bootstrap.settings import ServiceSettings, settings_from


def _cli_type(annotation: Any) -> type:
    """The flag's type: typer parses bool/int/float/Path; everything else (byte sizes with units, lists) is
    passed as text for pydantic to validate like an environment variable."""
    args = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) else []
    base = args[0] if len(args) == 1 else annotation
    return base if base in (bool, int, float, Path) else str


def settings_command(cls: type[ServiceSettings], run: Callable[[Any], None], doc: str) -> Callable[..., None]:
    prefix = cls.model_config.get("env_prefix", "")
    parameters = []
    for name, field in cls.model_fields.items():
        env = f"{prefix}{name}".upper()
        help_text = f"{field.description or ''} \\[env: {env}]".strip()
        flag = name.replace("_", "-")
        cli_type = _cli_type(field.annotation)
        decl = f"--{flag}/--no-{flag}" if cli_type is bool else f"--{flag}"
        option = typer.Option(decl, help=help_text, show_default=False)
        parameters.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[cli_type | None, option]
            )
        )

    def command(**flags: Any) -> None:
        try:
            settings = settings_from(cls, flags)
        except ValidationError as error:
            # One line per bad setting, naming both the flag and the variable, instead of a pydantic traceback.
            for problem in error.errors():
                message = problem["msg"].removeprefix("Value error, ")
                if not problem["loc"]:  # a check across settings (model_validator): its message names them
                    typer.echo(f"INVALID_ARGUMENT: settings: {message}", err=True)
                    continue
                name = str(problem["loc"][0])
                typer.echo(
                    f"INVALID_ARGUMENT: setting {name} (--{name.replace('_', '-')} or {prefix}{name.upper()}): "
                    f"{message} (got {problem.get('input')!r})",
                    err=True,
                )
            raise typer.Exit(2) from None
        run(settings)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]  # typer reads the flags here
    command.__doc__ = doc
    return command


def serve_command(cls: type[ServiceSettings], module: str, doc: str) -> Callable[..., None]:
    """The command that runs `<module>.serve(settings)`; the module is imported only when the command runs, so
    `--help` stays fast."""

    def run(settings: ServiceSettings) -> None:
        from hotslot.bootstrap.security import SecurityConfigError

        try:
            asyncio.run(importlib.import_module(module).serve(settings))
        except (OSError, SecurityConfigError) as error:  # the port is taken, a TLS or token file is unusable, ...
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None

    return settings_command(cls, run, doc)


def service_main(cls: type[ServiceSettings], module: str, doc: str) -> None:
    """Runs one service as a console script: the flags of `hotslot serve <service>`, without the subcommand."""
    from hotslot.bootstrap.parent import die_with_parent

    die_with_parent()
    app = typer.Typer(add_completion=False)
    app.command()(serve_command(cls, module, doc))
    app()
