"""``diffalign eval`` (compare models on the same prompts and seeds) and ``diffalign report``
(a run directory's self-contained HTML report)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer

from . import fail

SPLITS = ("heldout", "train")
BENCHMARKS = ("geneval",)


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
    """One prompt per line (or JSONL with conditioning images); blank lines and lines starting with
    ``#`` are skipped (``runtime.prompts.read_prompt_file``)."""
    from ..runtime.prompts import read_prompt_file as read

    try:
        return read(path)
    except (OSError, ValueError) as e:
        fail(str(e))


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


def geneval_reward(path: Optional[Path]) -> object:
    """The GenEval verdict reward (``mode="correct"``) for ``--benchmark geneval``."""
    from ..rewards.geneval import GenEvalReward

    if path is None:
        fail("--benchmark geneval needs --benchmark-path DIR, a directory with mask2former/ (a transformers "
             "Mask2Former COCO instance model) and clip/ (CLIP ViT-L/14); see docs/rewards.md")
    try:
        return GenEvalReward(path=path, mode="correct")
    except (FileNotFoundError, ValueError) as e:
        fail(f"--benchmark-path: {e}")


def geneval_table(result: dict) -> str:
    """GenEval's per-task table for every model (from the per-image verdicts in ``result``); the
    summaries go to ``result["benchmark"]``."""
    from ..data import prompt_sets
    from ..rewards.geneval_rules import format_summary, summary

    tag = {m["prompt"]: m["tag"] for m in prompt_sets.metadata("geneval/benchmark")}
    k = result["seeds_per_prompt"]
    flat = [p for p in result["prompts"] for _ in range(k)]
    out, summaries = [], {}
    for label, entry in result["models"].items():
        s = summary([tag[p] for p in flat], flat, [v > 0.5 for v in entry["scores"]["geneval_correct"]])
        summaries[label] = s
        out.append(f"== GenEval: {label} ==\n{format_summary(s)}")
    result["benchmark"] = {"name": "geneval", "summaries": summaries}
    return "\n\n".join(out)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: List[str] = typer.Option(..., "--model", help="LABEL=NAME_OR_DIR (short name or model directory); "
                                                             "repeat for each model."),
        out: Path = typer.Option(..., help="Output directory: eval.json and images_<label>.png grids."),
        prompts: Optional[Path] = typer.Option(None, help="File with one prompt per line ('#' comments), or JSONL "
                                               'lines {"prompt": ..., "image": PATH} for image-conditioned models.'),
        split: Optional[str] = typer.Option(None, help="Sample shapes-world prompts from this split: heldout or "
                                                       "train (default heldout when --prompts is not given)."),
        num_prompts: Optional[int] = typer.Option(None, "--num-prompts", help="Prompts drawn from --split (default "
                                                  "32), or the first N of --prompt-set / --benchmark (default all)."),
        seeds_per_prompt: int = typer.Option(4, "--seeds-per-prompt", "-k", help="Samples (seeds) per prompt, K."),
        reward: List[str] = typer.Option([], "--reward", help="Reward names, comma-separated or repeated."),
        prompt_set: Optional[str] = typer.Option(None, "--prompt-set", help="A shipped prompt set, e.g. "
                                                 "pickscore/test (diffalign.data.prompt_sets.names())."),
        benchmark: Optional[str] = typer.Option(None, help="geneval: GenEval's 553 prompts, scored by the GenEval "
                                                           "rules; prints GenEval's per-task table."),
        benchmark_path: Optional[Path] = typer.Option(None, "--benchmark-path", help="Model directory of the "
                                                      "benchmark (geneval: mask2former/ + clip/)."),
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
        if num_prompts is not None and num_prompts <= 0:
            fail(f"--num-prompts must be >= 1, got {num_prompts}")
        if grid_prompts < 0 or batch_size <= 0:
            fail(f"--grid-prompts must be >= 0 and --batch-size >= 1, got {grid_prompts} and {batch_size}")
        if steps is not None and steps <= 0:
            fail(f"--steps must be >= 1, got {steps}")
        sources = parse_models(model)
        if base is not None and base not in sources:
            fail(f"--base {base!r} is not a --model label; labels: {', '.join(sources)}")
        if benchmark is not None and benchmark not in BENCHMARKS:
            fail(f"--benchmark must be one of {', '.join(BENCHMARKS)}, got {benchmark!r}")
        if benchmark is not None:
            prompt_set = prompt_set or "geneval/benchmark"
            if prompt_set not in ("geneval/benchmark", "geneval/test"):
                fail(f"--benchmark geneval runs on GenEval's prompts; --prompt-set {prompt_set!r} is not allowed")
        if sum(x is not None for x in (prompts, split, prompt_set)) > 1:
            fail("give one of --prompts FILE, --split and --prompt-set (or --benchmark)")
        if prompt_set is not None:
            from ..data import prompt_sets

            if prompt_set not in prompt_sets.names():
                fail(f"--prompt-set must be one of {', '.join(prompt_sets.names())}, got {prompt_set!r}")
            texts = prompt_sets.load(prompt_set)[:num_prompts]
        elif prompts is not None:
            texts = read_prompt_file(prompts)
        else:
            split = split or "heldout"
            if split not in SPLITS:
                fail(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
            texts = shapes.sample_prompts(num_prompts or 32, split, seed)
        rewards = resolve_rewards(reward) if reward or benchmark is None else []
        if benchmark == "geneval":
            rewards.insert(0, geneval_reward(benchmark_path))
            target = target or "geneval_correct"
        names = [r.name for r in rewards]
        if target is not None and target not in names:
            fail(f"--target {target!r} is not one of the --reward names: {', '.join(names)}")
        dev = resolve_device(device)
        models = {label: load_model(src, device=dev) for label, src in sources.items()}
        result = evaluate(models, texts, seeds_per_prompt=seeds_per_prompt, seed=seed, rewards=rewards,
                          target=target, sampler=sampler, num_steps=steps, guidance_scale=guidance, eta=eta,
                          base=base, batch_size=batch_size, out_dir=out, grid_prompts=grid_prompts,
                          keep_scores=benchmark is not None)
        result["sources"] = sources
        table = geneval_table(result) if benchmark == "geneval" else None
        path = save_eval(result, out / "eval.json")
        typer.echo(format_table(result))
        if table:
            typer.echo(table)
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
