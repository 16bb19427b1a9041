"""Sub-commands of the ``diffalign`` CLI, one module each, each defining ``register(app)``.

Commands parse arguments and call the library; they hold no logic of their own.
"""

from __future__ import annotations

import typer


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error (no traceback: the message says what to do) and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
