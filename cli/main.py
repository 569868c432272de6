"""`hub`: the command line, one module per noun (`cli.train`, `cli.store`, `cli.serve`, `cli.eval`, `cli.vae`,
`cli.keys`) over
`cli.common`. Errors print one clear line, never a traceback."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

import typer

from cli import eval as eval_commands
from cli import serve, store, train
from cli.keys import keys_app
from cli.vae import vae_app
from hub.errors import HubError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-task adapter hub for one shared, frozen GPT-2.")

train.register(app)
store.register(app)
serve.register(app)
eval_commands.register(app)
app.add_typer(vae_app, name="vae")
app.add_typer(keys_app, name="keys")

DISTRIBUTION = "gpt2-adapter-hub"  # the name in pyproject.toml


def hub_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"hub {hub_version()} ({DISTRIBUTION})")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the installed version and exit.")) -> None:
    """Multi-task adapter hub for one shared, frozen GPT-2."""


def main() -> None:
    try:
        app()
    except HubError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
