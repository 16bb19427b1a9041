"""``diffalign eval`` (compare models on the same prompts and seeds) and ``diffalign report``
(a run directory's self-contained HTML report)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer

from . import fail

SPLITS = ("heldout", "train")


def parse_models(items: List[str]) -> dict[str, str]:
    """``["LABEL=NAME_OR_DIR", ...]`` -> ``{label: name_or_dir}`` (labels unique, file-name safe)."""
    from ..evaluation.evaluator import LABEL_PATTERN

    out: dict[str, str] = {}
    for item in items:
        label, sep, name = item.partition("=")
        label, name = label.strip(), name.strip()
        if not sep or not label or not name:
            fail(f"--model must look like LABEL=NAME_OR_DIR (e.g. base=shapes-flow), got {item!r}")
        if not re.fullmatch(LABEL_PATTERN, label):
            fail(f"--model label {label!r} is not allowed: use letters, digits, '_', '.', '-'")
        if label in out:
            fail(f"--model label {label!r} is given twice; labels must be unique")
        out[label] = name
    return out


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    if not path.is_file():
        fail(f"prompts file not found: {path}")
    prompts = [s.strip() for s in path.read_text().splitlines() if s.strip() and not s.strip().startswith("#")]
    if not prompts:
        fail(f"prompts file {path} has no prompts (one per line; '#' starts a comment)")
    return prompts


def resolve_rewards(specs: List[str]) -> list:
    """``--reward a,b --reward c`` -> reward objects from the registry (``diffalign.rewards``)."""
    from .. import rewards as registry

    names = [n.strip() for spec in specs for n in spec.split(",") if n.strip()]
    if not names:
        fail("--reward needs at least one reward name, e.g. --reward shapes,brightness")
    if len(set(names)) != len(names):
        fail(f"--reward names must be unique, got {names}")
    if not hasattr(registry, "get_many"):
        fail("the reward registry (diffalign.rewards.get_many) is not available in this install")
    try:
        return list(registry.get_many(",".join(names)))
    except ValueError as e:  # unknown names; the registry's message lists the known rewards
        fail(f"--reward: {e}")


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: List[str] = typer.Option(..., "--model", help="LABEL=NAME_OR_DIR (short name or model directory); "
                                                             "repeat for each model."),
        out: Path = typer.Option(..., help="Output directory: eval.json and images_<label>.png grids."),
        prompts: Optional[Path] = typer.Option(None, help="File with one prompt per line ('#' comments)."),
        split: Optional[str] = typer.Option(None, help="Sample shapes-world prompts from this split: heldout or "
                                                       "train (default heldout when --prompts is not given)."),
        num_prompts: int = typer.Option(32, "--num-prompts", help="Prompts drawn from --split."),
        seeds_per_prompt: int = typer.Option(4, "--seeds-per-prompt", "-k", help="Samples (seeds) per prompt, K."),
        reward: List[str] = typer.Option(..., "--reward", help="Reward names, comma-separated or repeated."),
        target: Optional[str] = typer.Option(None, help="The optimised reward; the others are held-out."),
        base: Optional[str] = typer.Option(None, help="Label of the base model for drift, FID/KID, win rates."),
        seed: int = typer.Option(0, help="Sample k of prompt i uses seed + i*K + k; also seeds --split sampling."),
        sampler: Optional[str] = typer.Option(None, help="Sampler (default: the base/first model's)."),
        steps: Optional[int] = typer.Option(None, help="Sampling steps (default: the model's)."),
        guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (default: the model's)."),
        eta: Optional[float] = typer.Option(None, help="Sampler noise level (default: the sampler's)."),
        grid_prompts: int = typer.Option(8, "--grid-prompts", help="Prompts (rows) in each image grid."),
        batch_size: int = typer.Option(256, "--batch-size", help="Images per sampling batch."),
        device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    ) -> None:
        """Evaluate models on the same prompts and seeds; write OUT/eval.json and grids, print the table."""
        from ..evaluation import evaluate, format_table, save_eval
        from ..models import load_model
        from ..runtime.devices import resolve_device
        from ..worlds import shapes

        if seeds_per_prompt <= 0:
            fail(f"--seeds-per-prompt must be >= 1, got {seeds_per_prompt}")
        if num_prompts <= 0:
            fail(f"--num-prompts must be >= 1, got {num_prompts}")
        if grid_prompts < 0 or batch_size <= 0:
            fail(f"--grid-prompts must be >= 0 and --batch-size >= 1, got {grid_prompts} and {batch_size}")
        if steps is not None and steps <= 0:
            fail(f"--steps must be >= 1, got {steps}")
        sources = parse_models(model)
        if base is not None and base not in sources:
            fail(f"--base {base!r} is not a --model label; labels: {', '.join(sources)}")
        if prompts is not None and split is not None:
            fail("give either --prompts FILE or --split, not both")
        if prompts is not None:
            texts = read_prompt_file(prompts)
        else:
            split = split or "heldout"
            if split not in SPLITS:
                fail(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
            texts = shapes.sample_prompts(num_prompts, split, seed)
        rewards = resolve_rewards(reward)
        names = [r.name for r in rewards]
        if target is not None and target not in names:
            fail(f"--target {target!r} is not one of the --reward names: {', '.join(names)}")
        dev = resolve_device(device)
        models = {label: load_model(src, device=dev) for label, src in sources.items()}
        result = evaluate(models, texts, seeds_per_prompt=seeds_per_prompt, seed=seed, rewards=rewards,
                          target=target, sampler=sampler, num_steps=steps, guidance_scale=guidance, eta=eta,
                          base=base, batch_size=batch_size, out_dir=out, grid_prompts=grid_prompts)
        result["sources"] = sources
        path = save_eval(result, out / "eval.json")
        typer.echo(format_table(result))
        typer.echo(f"saved {path}")

    @app.command("report")
    def report_cmd(
        run_dir: Path = typer.Argument(..., help="Run directory (metrics.jsonl, config.yaml, eval/eval.json)."),
        out: Optional[Path] = typer.Option(None, help="HTML file to write (default RUN_DIR/report.html)."),
        heldout_drop: float = typer.Option(0.05, "--heldout-drop", help="Relative held-out drop that warns."),
        diversity_drop: float = typer.Option(0.3, "--diversity-drop", help="Relative diversity drop that warns."),
    ) -> None:
        """Write a run's self-contained HTML report (curves, config, evaluation, reward-hacking check)."""
        from ..evaluation import write_report

        if not run_dir.is_dir():
            fail(f"run directory not found: {run_dir}")
        path = write_report(run_dir, out, heldout_drop=heldout_drop, diversity_drop=diversity_drop)
        typer.echo(f"wrote {path}")
