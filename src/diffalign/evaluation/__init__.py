"""Evaluation and reporting: compare models on identical prompts and seeds, and render a run's
HTML report.

Public API (see docs/evaluation.md for the metric definitions):

* :func:`evaluate` -- rewards (target and held-out), shapes verifier accuracy, diversity, drift
  (per-image and FID/KID), win rates and seed stability of several models;
* :func:`format_table`, :func:`save_eval`, :func:`load_eval` -- show and persist its result;
* :func:`make_grid` / :func:`save_grid` -- labelled image grids;
* :func:`detect_hacking` -- reward-hacking signals in an evaluation or in training curves;
* :func:`write_report` -- the self-contained HTML report of a run directory.

Library functions take reward *objects*; only the CLI resolves reward names.
"""

from .evaluator import DEFINITIONS, eval_seeds, evaluate, load_eval, reward_stats, save_eval, win_rate
from .features import FeatureEncoder, fid_kid, paired_drift, pooled_pixels, within_prompt_diversity
from .grid import make_grid, save_grid
from .hacking import detect_hacking
from .report import write_report
from .table import format_table

__all__ = [
    "DEFINITIONS", "FeatureEncoder", "detect_hacking", "eval_seeds", "evaluate", "fid_kid", "format_table",
    "load_eval", "make_grid", "paired_drift", "pooled_pixels", "reward_stats", "save_eval", "save_grid",
    "win_rate", "within_prompt_diversity", "write_report",
]
