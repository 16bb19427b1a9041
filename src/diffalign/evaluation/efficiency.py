"""Sample-efficiency curves: held-out accuracy against generated images, one curve per method
(written by ``benchmarks/bench_efficiency.py``; embedded by the report when a run directory holds
``efficiency.json``)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from matplotlib.figure import Figure

from .plots import _png

EFFICIENCY_FILE = "efficiency.json"
KEY = "eval/heldout_accuracy"


def images_to_reach(curve: Sequence[Mapping[str, Any]], target: float) -> int | None:
    """The first image count at which the curve's accuracy is ``>= target`` (None if never)."""
    for point in curve:
        if point[KEY] >= target - 1e-12:
            return int(point["images"])
    return None


def efficiency_plot(summary: Mapping[str, Any], *, size=(6.0, 3.8), dpi=110) -> bytes:
    """PNG: held-out accuracy against generated images, a line per method."""
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    for name, result in summary["methods"].items():
        curve = result["curve"]
        ax.plot([c["images"] for c in curve], [c[KEY] for c in curve], marker="o", ms=3, lw=1.6, label=name)
    if summary.get("flow_grpo_final") is not None:
        ax.axhline(summary["flow_grpo_final"], color="0.5", lw=0.8, ls="--", label="Flow-GRPO final")
    ax.set_xlabel("generated images", fontsize=9)
    ax.set_ylabel("held-out exact accuracy", fontsize=9)
    ax.set_title("sample efficiency (shapes world)", fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _png(fig)


def efficiency_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the efficiency table (accuracy at each evaluated image count)."""
    cols = sorted({c["images"] for r in summary["methods"].values() for c in r["curve"]})
    header = ["method", *[str(c) for c in cols], "images to Flow-GRPO final", "speed-up", "wall s"]
    rows = []
    for name, r in summary["methods"].items():
        acc = {c["images"]: c[KEY] for c in r["curve"]}
        n, s = r.get("images_to_flow_grpo_final"), r.get("speedup_vs_flow_grpo")
        rows.append([name, *[f"{acc[c]:.3f}" if c in acc else "" for c in cols], "-" if n is None else str(n),
                     "-" if s is None else f"{s:g}", f"{r.get('wall_s', 0):.0f}"])
    return header, rows
