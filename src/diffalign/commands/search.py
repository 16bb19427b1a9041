"""``diffalign search``: inference-time alignment under an NFE budget; images, scores, ``samples.jsonl``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import fail


def register(app: typer.Typer) -> None:
    @app.command("search")
    def search_cmd(
        method: str = typer.Option(..., help="best_of_n, smc, beam, code, svdd, dts, reno, dno, mira or rlg."),
        budget: int = typer.Option(..., help="Total NFE for all images (one per guided denoiser evaluation "
                                             "of one sample; CFG's two branches count as one)."),
        model: str = typer.Option(..., help="Short name (shapes-flow, shapes-vp) or model directory."),
        reward: str = typer.Option(..., help="Registered reward name, e.g. shapes, shapes_soft, brightness."),
        out: Path = typer.Option(..., help="Output directory for PNGs, samples.jsonl and summary.json."),
        prompts: Optional[Path] = typer.Option(None, help="File with one prompt per line, or JSONL lines "
                                               '{"prompt": ..., "image": PATH} for image-conditioned models.'),
        prompt: Optional[str] = typer.Option(None, help="A single prompt."),
        tuned: Optional[Path] = typer.Option(None, help="rlg: fine-tuned model directory or `diffalign train` run."),
        weight: Optional[float] = typer.Option(None, help="rlg: guidance weight w (1 = tuned, >1 extrapolates)."),
        num_per_prompt: int = typer.Option(1, "--num-per-prompt", "-k", help="Images per prompt."),
        seed: int = typer.Option(0, help="Image i uses seed + i."),
        sampler: Optional[str] = typer.Option(None, help="Sampler (default: the model's; branching methods "
                                                         "switch a deterministic default to its SDE)."),
        steps: Optional[int] = typer.Option(None, help="Sampling steps (default: the model's)."),
        guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (default: the model's)."),
        eta: Optional[float] = typer.Option(None, help="Sampler noise level (default: the sampler's)."),
        option: Optional[List[str]] = typer.Option(None, "--set", help="Method option KEY=VALUE, repeatable, e.g. "
                                                                       "--set num_particles=8 --set potential=max."),
        device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    ) -> None:
        """Search for high-reward samples at inference time with a fixed NFE budget."""
        from .. import rewards, search
        from ..config import parse_overrides
        from ..models import load_model
        from ..runtime.devices import resolve_device
        from .sample import read_prompts

        if method not in search.METHODS:
            fail(f"unknown method {method!r}; choose one of {', '.join(sorted(search.METHODS))}")
        if num_per_prompt <= 0:
            fail(f"--num-per-prompt must be >= 1, got {num_per_prompt}")
        if (tuned is not None or weight is not None) and method != "rlg":
            fail("--tuned and --weight are rlg options")
        if method == "rlg" and tuned is None:
            fail("rlg needs --tuned DIR (a fine-tuned model directory or a `diffalign train` run)")
        texts = read_prompts(prompts, prompt)
        opts = parse_overrides(option or [])
        nested = [k for k, v in opts.items() if isinstance(v, dict)]
        if nested:
            fail(f"method options are flat KEY=VALUE, got dotted keys {nested}; {method} accepts "
                 f"{search.options(method)}")
        if weight is not None:
            opts["weight"] = weight
        dev = resolve_device(device)
        base = load_model(model, device=dev)
        tuned_model = search.resolve_tuned(tuned, device=dev) if tuned is not None else None
        r = rewards.get(reward)
        r.to(dev)
        result = search.run(method, base, texts, r, budget=budget, tuned=tuned_model,
                            num_images_per_prompt=num_per_prompt, seed=seed, sampler=sampler, num_steps=steps,
                            guidance_scale=guidance, eta=eta, **opts)
        summary = search.save_result(result, out, fps=getattr(base, "fps", 8.0))
        t = result.trace
        line = (f"{method}: wrote {summary['images']} images to {out}; spent {result.nfe} of {budget} NFE "
                f"({t['nfe_per_image']:.1f} per image; {t['sampler']}, {t['num_steps']} steps, guidance "
                f"{t['guidance_scale']}); mean {t['reward']} {summary['mean_score']:.3f}")
        if "exact_accuracy" in summary:
            line += f"; verifier score {summary['verifier_score']:.3f}, exact accuracy {summary['exact_accuracy']:.3f}"
        typer.echo(line)
