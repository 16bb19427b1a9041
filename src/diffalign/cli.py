"""The ``diffalign`` command line: parses arguments and calls the layer below. No logic lives here.

Each sub-command lives in ``diffalign/commands/<name>.py`` and defines ``register(app)``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from . import __version__, commands

app = typer.Typer(
    name="diffalign",
    help="Align diffusion and flow-matching generators with rewards and human preferences.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def version() -> None:
    """Print the diffalign version."""
    typer.echo(__version__)


for _mod in sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{commands.__name__}.{_mod}").register(app)


def main() -> None:
    try:
        app()
    except (ValueError, FileNotFoundError) as e:  # input errors: the message is the whole story
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
