"""Prompt sets shipped inside the package (``src/diffalign/data/prompts/``; sources, commits and
licences in ``prompts/README.md``).

A set is named ``<source>/<split>``: ``prompt_sets.load("pickscore/train")`` returns its prompts;
``prompts: {set: pickscore/train}`` in a training config draws from it. GenEval sets are JSONL
files whose lines also carry the evaluation metadata (``tag``, ``include``, ``exclude``) that
the ``geneval`` reward checks; :func:`metadata` returns those dicts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "prompts"


@dataclass(frozen=True)
class PromptSet:
    file: str  # path under ROOT
    count: int  # prompts in the file (checked on load)
    source: str  # where it comes from (README.md has the commit and the licence)


SETS: dict[str, PromptSet] = {
    "ddpo/simple_animals": PromptSet("ddpo/simple_animals.txt", 45, "DDPO (kvablack/ddpo-pytorch), MIT"),
    "geneval/benchmark": PromptSet("geneval/benchmark.jsonl", 553, "GenEval (djghosh13/geneval), MIT"),
    # Flow-GRPO's GenEval test split is GenEval's 553 prompts, each listed 4 times (checked line by
    # line); shipped once, evaluated with 4 seeds per prompt
    "geneval/test": PromptSet("geneval/benchmark.jsonl", 553, "Flow-GRPO test split = GenEval's 553, MIT"),
    "ocr/test": PromptSet("ocr/test.txt", 1018, "Flow-GRPO (yifan123/flow_grpo), MIT"),
    "pickscore/train": PromptSet("pickscore/train.txt", 25432, "Flow-GRPO, Pick-a-Pic v1 captions, MIT"),
    "pickscore/test": PromptSet("pickscore/test.txt", 2048, "Flow-GRPO, Pick-a-Pic v1 captions, MIT"),
}
GENEVAL_OBJECTS = ROOT / "geneval" / "object_names.txt"  # GenEval's 80 COCO class names, detector order


def names() -> list[str]:
    """The shipped sets, sorted."""
    return sorted(SETS)


def _entry(name: str) -> PromptSet:
    if name not in SETS:
        raise ValueError(f"unknown prompt set {name!r}; shipped sets: {', '.join(names())} "
                         f"(src/diffalign/data/prompts/README.md lists their sources)")
    return SETS[name]


def path(name: str) -> Path:
    """The file that holds set ``name``."""
    return ROOT / _entry(name).file


@lru_cache(maxsize=None)
def _read(name: str) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    entry, file = _entry(name), path(name)
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    meta = None
    if file.suffix == ".jsonl":
        meta = tuple(lines)
        lines = [json.loads(line)["prompt"] for line in lines]
    if len(lines) != entry.count:
        raise RuntimeError(f"prompt set {name!r} ({file}) holds {len(lines)} prompts, expected {entry.count}: "
                           "the package data is damaged; reinstall diffalign")
    return tuple(lines), meta


def load(name: str) -> list[str]:
    """The prompts of set ``name`` in file order."""
    return list(_read(name)[0])


def metadata(name: str) -> list[dict]:
    """The per-prompt metadata dicts of a JSONL set (GenEval's ``tag`` / ``include`` / ``exclude``)."""
    meta = _read(name)[1]
    if meta is None:
        raise ValueError(f"prompt set {name!r} is a plain prompt list and has no metadata; "
                         f"sets with metadata: {', '.join(n for n in names() if SETS[n].file.endswith('.jsonl'))}")
    return [json.loads(line) for line in meta]


def geneval_object_names() -> list[str]:
    """GenEval's 80 class names in the COCO order of the detector's outputs."""
    return [line.strip() for line in GENEVAL_OBJECTS.read_text(encoding="utf-8").splitlines() if line.strip()]
