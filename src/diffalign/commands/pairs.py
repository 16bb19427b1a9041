"""``diffalign make-pairs``: on-policy preference pairs ranked by a reward, as ``DIR/pairs.jsonl`` + PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import fail


def register(app: typer.Typer) -> None:
    @app.command("make-pairs")
    def make_pairs_cmd(
        model: str = typer.Option(..., help="Short name (shapes-flow, shapes-vp) or model directory."),
        reward: str = typer.Option(..., help="Registered reward that ranks each prompt's images, e.g. shapes."),
        out: Path = typer.Option(..., help="Output directory: pairs.jsonl and images/."),
        prompts: Optional[Path] = typer.Option(None, help="File with one prompt per line."),
        split: Optional[str] = typer.Option(None, help="Shapes-world split to draw prompts from (train, heldout, "
                                                       "all), instead of --prompts."),
        n_prompts: Optional[int] = typer.Option(None, "--n-prompts", help="Prompts drawn from --split "
                                                                          "(or the first N of --prompts)."),
        per_prompt: int = typer.Option(4, "--per-prompt", "-k", help="Images per prompt (K >= 2)."),
        mode: str = typer.Option("best_worst", help="best_worst: best vs worst image of each prompt; "
                                                    "all: every pair of a prompt's images."),
        min_gap: float = typer.Option(0.0, "--min-gap", help="Keep a pair only if the chosen image scores more "
                                                             "than this above the rejected one."),
        seed: int = typer.Option(0, help="Image k of prompt i uses seed + i*K + k; --split draws with this seed."),
        sampler: Optional[str] = typer.Option(None, help="Sampler (default: the model's)."),
        steps: Optional[int] = typer.Option(None, help="Sampling steps (default: the model's)."),
        guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (default: the model's)."),
        eta: Optional[float] = typer.Option(None, help="Sampler noise level (default: the sampler's)."),
        device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    ) -> None:
        """Sample K images per prompt, score them with a reward and write preference pairs."""
        from .. import rewards
        from ..data.make_pairs import make_pairs_to_dir
        from ..models import load_model
        from ..runtime.devices import resolve_device
        from ..runtime.sampling import resolve_sampling
        from ..worlds import shapes
        from .sample import read_prompts

        if (prompts is None) == (split is None):
            fail("give exactly one of --prompts FILE or --split {train,heldout,all}")
        if n_prompts is not None and n_prompts < 1:
            fail(f"--n-prompts must be >= 1, got {n_prompts}")
        if per_prompt < 2:
            fail(f"--per-prompt must be >= 2 (a pair needs two images), got {per_prompt}")
        if split is not None:
            if split not in shapes.SPLITS:
                fail(f"--split must be one of {', '.join(shapes.SPLITS)}, got {split!r}")
            if n_prompts is None:
                fail("--split needs --n-prompts N")
            texts = shapes.sample_prompts(n_prompts, split, seed=seed)
        else:
            texts = read_prompts(prompts, None)[:n_prompts]
        dev = resolve_device(device)
        m = load_model(model, device=dev)
        r = rewards.get(reward)
        r.to(dev)
        s = make_pairs_to_dir(m, texts, r, out, per_prompt=per_prompt, seed=seed, mode=mode, min_gap=min_gap,
                              sampling=resolve_sampling(m, sampler, steps, guidance, eta))
        st = s["sampling"]
        typer.echo(f"wrote {s['pairs']} pairs to {s['path']} from {s['prompts']} prompts x {per_prompt} images "
                   f"({st['sampler']}, {st['num_steps']} steps, guidance {st['guidance_scale']}); mean {s['reward']} "
                   f"{s['mean_score']:.3f}, mean chosen-rejected gap {s['mean_gap']:.3f}; "
                   f"{s['prompts_without_pair']} prompts gave no pair (gap <= {min_gap})")
