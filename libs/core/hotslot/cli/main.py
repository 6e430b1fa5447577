"""Entry point of the `hotslot` console command."""
import typer

app = typer.Typer(no_args_is_help=True, help="hotslot: hot-swap serving of diffusion models.")
