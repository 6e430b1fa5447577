"""`hotslot dev ...`: developer tools. `make-model` writes tiny random Stable-Diffusion pipelines for tests and
demos (see hotslot.modelgen)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

dev_app = typer.Typer(no_args_is_help=True)


@dev_app.callback()
def dev() -> None:
    """Developer tools: tiny test models and the like."""
    # A callback keeps `make-model` a sub-command even while it is the only command (typer would otherwise
    # run a lone command as the app itself).


@dev_app.command("make-model")
def make_model(
    dest: Annotated[
        Path,
        typer.Argument(help="Model directory to write; with --family, the directory to write the family in."),
    ],
    seed: Annotated[
        int, typer.Option(help="Seed of the UNet weights (with --family: of the whole family).")
    ] = 0,
    shared_seed: Annotated[
        int | None,
        typer.Option(help="Seed of the vae and text encoder weights; defaults to --seed."),
    ] = None,
    family: Annotated[
        int | None,
        typer.Option(min=1, help="Write N models DEST/<prefix>-0..N-1 that differ only in their UNet."),
    ] = None,
    prefix: Annotated[str, typer.Option(help="Name prefix of family members.")] = "tiny-sd",
    image_size: Annotated[int, typer.Option(help="Default image height and width (a multiple of 8).")] = 64,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace non-empty destinations.")] = False,
) -> None:
    """Write a tiny random-weight StableDiffusionPipeline (diffusers layout, safetensors only, ~7 MB)."""
    from hotslot.modelgen import tree_stats, write_family, write_tiny_pipeline

    try:
        if family is None:
            paths = [
                write_tiny_pipeline(
                    dest, seed=seed, shared_seed=shared_seed, image_size=image_size, overwrite=overwrite
                )
            ]
        else:
            paths = write_family(
                dest,
                family,
                prefix=prefix,
                seed=seed,
                shared_seed=shared_seed,
                image_size=image_size,
                overwrite=overwrite,
            )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc

    total_files = total_bytes = 0
    for path in paths:
        files, size = tree_stats(path)
        total_files += files
        total_bytes += size
        typer.echo(f"wrote {path}  ({files} files, {size} bytes)")
    if len(paths) > 1:
        typer.echo(f"total: {len(paths)} models, {total_files} files, {total_bytes} bytes")


@dev_app.command("make-lora")
def make_lora(
    dest: Annotated[Path, typer.Argument(help="Adapter directory to write (one pytorch_lora_weights.safetensors).")],
    base: Annotated[Path, typer.Option(help="The pipeline directory the adapter is for (its configs give the shapes).")],
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the adapter's weights.")] = 0,
    text_encoder: Annotated[
        bool, typer.Option("--text-encoder", help="Adapt the text encoder's attention too (else the UNet only).")
    ] = False,
    kohya: Annotated[bool, typer.Option("--kohya", help="Write kohya/A1111 key names instead of diffusers/PEFT.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty destination.")] = False,
) -> None:
    """Write a tiny random LoRA adapter (safetensors) for a pipeline such as `make-model` writes; register it with
    `hotslot models register ID SOURCE --lora-base BASE`."""
    from hotslot.modelgen import tree_stats
    from hotslot.modelgen.lora import write_lora

    if not (base / "model_index.json").is_file():
        typer.echo(f"error: {base} is not a pipeline directory (no model_index.json)", err=True)
        raise typer.Exit(code=2)
    try:
        path = write_lora(dest, base, rank=rank, seed=seed, text_encoder=text_encoder,
                          fmt="kohya" if kohya else "peft", overwrite=overwrite)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    files, size = tree_stats(path)
    typer.echo(f"wrote {path}  ({files} files, {size} bytes)")
