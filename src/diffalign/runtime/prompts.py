"""Where training prompts come from: a split of the shapes world, a prompts file, or a prompt set
shipped in the package (``set: pickscore/train``; ``diffalign.data.prompt_sets``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import check_choice, check_range
from ..worlds import shapes


@dataclass
class PromptsConfig:
    split: str = "train"  # shapes-world split: train | heldout | all (ignored with `file`)
    file: str = ""  # a text file with one prompt per line, instead of the shapes world
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
            path = Path(cfg.file)
            if not path.is_file():
                raise FileNotFoundError(f"prompts.file not found: {path}")
            self.lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if not self.lines:
                raise ValueError(f"prompts.file {path} has no prompts")

    def sample(self, n: int, seed: int) -> list[str]:
        """``n`` distinct-as-possible prompts, a pure function of ``seed``."""
        if self.lines is not None:
            rng = np.random.default_rng(seed)
            return [self.lines[i] for i in rng.choice(len(self.lines), n, replace=len(self.lines) < n)]
        return shapes.sample_prompts(n, self.cfg.split, seed=seed, relation_fraction=self.cfg.relation_fraction)
