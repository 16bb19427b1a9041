"""Where training prompts come from: a split of the shapes world, a prompts file, or a prompt set
shipped in the package (``set: pickscore/train``; ``diffalign.data.prompt_sets``).

A prompts file has one prompt per line (blank lines and lines starting with ``#`` are skipped).
A line that starts with ``{`` is a JSON object (JSONL): ``{"prompt": ..., "image": PATH}`` or
``"images": [PATH, ...]`` for the conditioning images of image-to-video and editing models, and
``"negative_prompt"`` for the unconditional branch of guidance; image paths are resolved against
the file's directory. Such lines become ``core.prompts.Prompt`` objects, which every command
carries through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import check_choice, check_range
from ..core.prompts import Prompt
from ..worlds import shapes

PROMPT_FIELDS = ("prompt", "image", "images", "negative_prompt")  # the keys of a JSONL prompt line


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a file (see the module docstring): plain strings, or ``Prompt`` objects for
    JSONL lines. Errors name the file, the line and what is wrong; a missing image names the path
    as written and as resolved."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    out: list[str] = []
    for n, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        out.append(_json_prompt(line, path, n) if line.startswith("{") else line)
    if not out:
        raise ValueError(f"prompts file {path} has no prompts (one per line or JSONL; '#' starts a comment)")
    return out


def _json_prompt(line: str, path: Path, n: int) -> str:
    where = f"{path}:{n}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a JSONL prompt line must be an object with the keys {list(PROMPT_FIELDS)}")
    unknown = sorted(set(obj) - set(PROMPT_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {list(PROMPT_FIELDS)}")
    text = obj.get("prompt")
    if not isinstance(text, str):
        raise ValueError(f"{where}: \"prompt\" must be a string, got {text!r}")
    if "image" in obj and "images" in obj:
        raise ValueError(f"{where}: give \"image\" (one path) or \"images\" (a list), not both")
    images = [obj["image"]] if "image" in obj else obj.get("images", [])
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise ValueError(f"{where}: \"image\" must be a path and \"images\" a list of paths, got {images!r}")
    negative = obj.get("negative_prompt", "")
    if not isinstance(negative, str):
        raise ValueError(f"{where}: \"negative_prompt\" must be a string, got {negative!r}")
    resolved = []
    for image in images:
        p = Path(image).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise FileNotFoundError(f"{where}: image {image!r} not found (looked for {p.resolve()})")
        resolved.append(str(p.resolve()))
    return Prompt(text, resolved, negative) if resolved or negative else text


@dataclass
class PromptsConfig:
    split: str = "train"  # shapes-world split: train | heldout | all (ignored with `file`)
    file: str = ""  # one prompt per line, or JSONL with conditioning images (read_prompt_file), instead of shapes
    relation_fraction: float = 0.5  # share of relation prompts drawn from the shapes world
    set: str = ""  # a shipped prompt set (`diffalign.data.prompt_sets.names()`), instead of the shapes world

    def __post_init__(self) -> None:
        check_choice("prompts.split", self.split, list(shapes.SPLITS))
        if self.set:
            from ..data import prompt_sets

            check_choice("prompts.set", self.set, prompt_sets.names())
            if self.file:
                raise ValueError(f"prompts.set={self.set!r} and prompts.file={self.file!r} are both given; use one")
        check_range("prompts.relation_fraction", self.relation_fraction, 0, 1)


class PromptSource:
    def __init__(self, cfg: PromptsConfig):
        self.cfg = cfg
        self.lines = None
        if cfg.set:
            from ..data import prompt_sets

            self.lines = prompt_sets.load(cfg.set)
        elif cfg.file:
            if not Path(cfg.file).is_file():
                raise FileNotFoundError(f"prompts.file not found: {cfg.file}")
            self.lines = read_prompt_file(cfg.file)

    def sample(self, n: int, seed: int) -> list[str]:
        """``n`` distinct-as-possible prompts, a pure function of ``seed``."""
        if self.lines is not None:
            rng = np.random.default_rng(seed)
            return [self.lines[i] for i in rng.choice(len(self.lines), n, replace=len(self.lines) < n)]
        return shapes.sample_prompts(n, self.cfg.split, seed=seed, relation_fraction=self.cfg.relation_fraction)
