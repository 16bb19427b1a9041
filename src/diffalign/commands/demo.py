"""``diffalign demo``: the shapes-world alignment loop end to end (what ``make demo`` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides of the demo config."),
        config: Path = typer.Option(Path("configs/demo.yaml"), help="Training config of the demo."),
        run_dir: Path = typer.Option(Path("runs/demo"), help="Run directory (replaced if it exists)."),
        eval_prompts: int = typer.Option(100, help="Held-out prompts in the before/after evaluation."),
        seeds_per_prompt: int = typer.Option(4, help="Samples per held-out prompt."),
    ) -> None:
        """Evaluate the base model, fine-tune it with the demo config's method, evaluate again, write the report."""
        from ..runtime.demo import run_demo

        run_demo(config, run_dir, eval_prompts=eval_prompts, seeds_per_prompt=seeds_per_prompt,
                 overrides=overrides or [], echo=typer.echo)
