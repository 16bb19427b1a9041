"""``diffalign sample``: images, their scores and a ``samples.jsonl`` index."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import fail


def read_prompts(prompts_file: Optional[Path], prompt: Optional[str]) -> list[str]:
    """Prompts from ``--prompts FILE`` (one per line, or JSONL lines with conditioning images:
    ``runtime.prompts.read_prompt_file``) or ``--prompt TEXT``."""
    from ..runtime.prompts import read_prompt_file

    if (prompts_file is None) == (prompt is None):
        fail("give exactly one of --prompts FILE or --prompt TEXT")
    if prompt is not None:
        return [prompt]
    try:
        return read_prompt_file(prompts_file)
    except (OSError, ValueError) as e:
        fail(str(e))


def register(app: typer.Typer) -> None:
    @app.command("sample")
    def sample_cmd(
        model: str = typer.Option(..., help="Short name (shapes-flow, shapes-vp) or model directory."),
        out: Path = typer.Option(..., help="Output directory for PNGs and samples.jsonl."),
        prompts: Optional[Path] = typer.Option(None, help="File with one prompt per line, or JSONL lines "
                                               '{"prompt": ..., "image": PATH} for image-conditioned models.'),
        prompt: Optional[str] = typer.Option(None, help="A single prompt."),
        num_per_prompt: int = typer.Option(4, "--num-per-prompt", "-k", help="Images per prompt (K)."),
        seed: int = typer.Option(0, help="Image i of a prompt uses seed + i; prompts use consecutive blocks."),
        sampler: Optional[str] = typer.Option(None, help="Sampler (default: the model's)."),
        steps: Optional[int] = typer.Option(None, help="Sampling steps (default: the model's)."),
        guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (default: the model's)."),
        eta: Optional[float] = typer.Option(None, help="Sampler noise level (default: the sampler's)."),
        device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
        video_format: str = typer.Option("auto", "--video-format",
                                         help="Video models: auto (mp4 with PyAV, else webp), mp4 or webp."),
    ) -> None:
        """Sample images from a model and score them with the shapes verifier when the prompts allow."""
        from ..runtime.sampling import sample_to_dir

        if num_per_prompt <= 0:
            fail(f"--num-per-prompt must be >= 1, got {num_per_prompt}")
        texts = read_prompts(prompts, prompt)
        try:
            summary = sample_to_dir(model, texts, out, num_per_prompt=num_per_prompt, seed=seed, sampler=sampler,
                                    num_steps=steps, guidance_scale=guidance, eta=eta, device=device,
                                    video=video_format)
        except (ImportError, ValueError) as e:  # a bad --video-format, or a prompt the model cannot take
            fail(str(e))
        typer.echo(summary)
