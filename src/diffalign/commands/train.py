"""``diffalign train CONFIG.yaml [dotted overrides]``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import fail


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        config: Path = typer.Argument(..., help="YAML config (see configs/)."),
        overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. lr=3e-5 algorithm.beta=0."),
        run_dir: Optional[Path] = typer.Option(None, help="Run directory (default runs/<config name>)."),
        resume: bool = typer.Option(False, help="Continue the run in --run-dir from its last checkpoint."),
        force: bool = typer.Option(False, help="Resume even if the config changed."),
        num_processes: int = typer.Option(0, help="Train in N processes through `accelerate launch` (data "
                                          "parallel, the same global batch; docs/distributed.md). 0: this process."),
        accelerate_config: Optional[Path] = typer.Option(None, help="accelerate config for the launch "
                                                         "(configs/accelerate/: DDP, FSDP, DeepSpeed ZeRO-2)."),
    ) -> None:
        """Fine-tune a model with an alignment method."""
        from ..config import dump_config, load_config
        from ..runtime.distributed import is_main_process, launch
        from ..runtime.trainer import TrainConfig, check_process_count, train as run

        cfg = load_config(TrainConfig, config, overrides or [])
        run_dir = run_dir or Path("runs") / config.stem
        if num_processes or accelerate_config is not None:
            if num_processes < 0:
                raise ValueError(f"--num-processes must be >= 0, got {num_processes}")
            check_process_count(cfg, num_processes)  # before anything is launched
            args = [str(config), *(overrides or []), "--run-dir", str(run_dir)]
            args += ["--resume"] * resume + ["--force"] * force
            status = launch(args, num_processes or None, accelerate_config)
            if status:
                ckpt = run_dir / "checkpoints" / "latest.pt"
                again = f"diffalign train {config} --run-dir {run_dir} --resume" + (
                    f" --num-processes {num_processes}" if num_processes else "") + (
                    f" --accelerate-config {accelerate_config}" if accelerate_config else "")
                fail(f"training stopped: a training process failed and the launcher ended the run (exit status "
                     f"{status}; the output above names the process and its error). "
                     + (f"The last checkpoint, {ckpt}, is intact (written atomically); continue with: {again}"
                        if ckpt.exists() else "No checkpoint was written yet."), code=1)
            return
        if is_main_process():
            typer.echo(dump_config(cfg))
        final = run(cfg, run_dir, resume=resume, force=force)
        if is_main_process():
            typer.echo(f"final model: {final}")
