"""``diffalign train CONFIG.yaml [dotted overrides]``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        config: Path = typer.Argument(..., help="YAML config (see configs/)."),
        overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. lr=3e-5 algorithm.beta=0."),
        run_dir: Optional[Path] = typer.Option(None, help="Run directory (default runs/<config name>)."),
        resume: bool = typer.Option(False, help="Continue the run in --run-dir from its last checkpoint."),
        force: bool = typer.Option(False, help="Resume even if the config changed."),
    ) -> None:
        """Fine-tune a model with an alignment method."""
        from ..config import dump_config, load_config
        from ..runtime.trainer import TrainConfig, train as run

        cfg = load_config(TrainConfig, config, overrides or [])
        run_dir = run_dir or Path("runs") / config.stem
        typer.echo(dump_config(cfg))
        final = run(cfg, run_dir, resume=resume, force=force)
        typer.echo(f"final model: {final}")
