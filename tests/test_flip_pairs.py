"""benchmarks/flip_pairs.py: the noisy-label pairs file of docs/algorithms/preference.md ("Noisy labels")."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from diffalign.data import PreferencePair, load_pairs, write_jsonl_pairs

ROOT = Path(__file__).resolve().parents[1]


def _image(v: int) -> np.ndarray:
    return np.full((4, 4, 3), v, dtype=np.uint8)


def test_flip_pairs_swaps_the_stated_share_and_leaves_ties(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import flip_pairs

    pairs = [PreferencePair(f"p{i}", _image(2 * i), _image(2 * i + 1), tie=(i == 0)) for i in range(9)]
    write_jsonl_pairs(pairs, tmp_path / "pairs.jsonl",
                      extra=[{"chosen_score": 1.0, "rejected_score": 0.0} for _ in pairs])
    dest = flip_pairs.main([str(tmp_path), "--fraction", "0.5", "--seed", "3"])
    assert dest.name == "pairs_flip50.jsonl"
    lines = [json.loads(x) for x in dest.read_text().splitlines()]
    flipped = [i for i, rec in enumerate(lines) if rec.get("label_flipped")]
    assert len(flipped) == 4 and 0 not in flipped  # round(0.5 * 8) of the 8 non-tie pairs; the tie never
    noisy = load_pairs(dest)
    for i, (a, b) in enumerate(zip(noisy, pairs)):
        swap = i in flipped
        assert (a.chosen == (b.rejected if swap else b.chosen)).all()
        assert (a.rejected == (b.chosen if swap else b.rejected)).all()
        assert lines[i]["chosen_score"] == (0.0 if swap else 1.0)
    # the seed decides which pairs flip
    source = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert flip_pairs.flip(source, 0.5, 3) == lines and flip_pairs.flip(source, 0.5, 4) != lines
    with pytest.raises(ValueError, match="fraction must be in"):
        flip_pairs.flip(lines, 1.5, 0)
    with pytest.raises(SystemExit, match="holds no pairs.jsonl"):
        flip_pairs.main([str(tmp_path / "nope")])
