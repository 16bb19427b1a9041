"""``diffalign pretrain``: reproduce the shipped shapes-world base models."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import fail


def register(app: typer.Typer) -> None:
    @app.command()
    def pretrain(
        out: Path = typer.Option(..., help="Output directory (model + checkpoint + metrics)."),
        world: str = typer.Option("shapes", help="The embedded world to pretrain on."),
        model: Optional[str] = typer.Option(None, help="flow (velocity, rectified flow) or vp (epsilon, cosine VP "
                                            "schedule); default flow, or the config file's."),
        config: Optional[Path] = typer.Option(None, help="A pretrain config (YAML), e.g. a shipped model's "
                                              "pretrain_config.yaml; overrides apply on top."),
        resume: bool = typer.Option(False, help="Continue from OUT/checkpoint.pt."),
        force: bool = typer.Option(False, help="Resume even if the config changed."),
        overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. steps=100 lr=5e-4."),
    ) -> None:
        """Pretrain a base model on an embedded world (seeded, resumable)."""
        from ..config import dump_config, load_config
        from ..runtime.pretrain import PretrainConfig, pretrain as run

        if world != "shapes":
            fail(f"--world must be 'shapes', got {world!r}")
        model_override = [f"model={model}"] if model is not None or config is None else []
        try:
            cfg = load_config(PretrainConfig, config, overrides=[*model_override, *(overrides or [])])
        except (FileNotFoundError, ValueError) as err:
            fail(str(err))
        typer.echo(dump_config(cfg))
        run(cfg, out, resume=resume, force=force)
        typer.echo(f"saved {out}")
