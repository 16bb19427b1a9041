"""The ``diffalign`` command line: parses arguments and calls the layer below. No logic lives here."""

from __future__ import annotations

import sys

import typer

from . import __version__

app = typer.Typer(
    name="diffalign",
    help="Align diffusion and flow-matching generators with rewards and human preferences.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error (no traceback: the message says what to do) and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _not_built(command: str, issue: str) -> None:
    fail(f"`diffalign {command}` is not built yet ({issue})", code=3)


@app.command()
def version() -> None:
    """Print the diffalign version."""
    typer.echo(__version__)


@app.command()
def pretrain() -> None:
    """Pretrain a base model on an embedded world."""
    _not_built("pretrain", "shapes-world issue")


@app.command("sample")
def sample_cmd() -> None:
    """Sample images from a model."""
    _not_built("sample", "shapes-world issue")


@app.command()
def train() -> None:
    """Fine-tune a model with an alignment method from a YAML config."""
    _not_built("train", "online-RL issue")


@app.command()
def eval() -> None:  # noqa: A001 - the sub-command is called eval
    """Evaluate models: target and held-out rewards, accuracy, diversity, drift, win rate."""
    _not_built("eval", "rewards/evaluation issue")


@app.command()
def search() -> None:
    """Inference-time alignment: best-of-N, SMC, beam/tree search, noise optimisation."""
    _not_built("search", "inference-time search issue")


@app.command()
def report() -> None:
    """Write the HTML report of a run."""
    _not_built("report", "rewards/evaluation issue")


@app.command("serve-reward")
def serve_reward() -> None:
    """Serve a registry reward over HTTP."""
    _not_built("serve-reward", "rewards/evaluation issue")


def main() -> None:
    try:
        app()
    except ValueError as e:  # configuration and input errors: the message is the whole story
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
