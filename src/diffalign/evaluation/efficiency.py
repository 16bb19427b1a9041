"""Sample-efficiency curves: held-out accuracy against generated images and against minutes, one curve
per method (written by ``benchmarks/bench_efficiency.py``; embedded by the report when a run directory
holds ``efficiency.json``)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from matplotlib.figure import Figure

from .plots import _png

EFFICIENCY_FILE = "efficiency.json"
KEY = "eval/heldout_accuracy"
CATEGORIES = {"eval/heldout_count": "count", "eval/heldout_relation": "relation"}  # where the trainer reports them


def images_to_reach(curve: Sequence[Mapping[str, Any]], target: float) -> int | None:
    """The first image count at which the curve's accuracy is ``>= target`` (None if never)."""
    for point in curve:
        if point[KEY] >= target - 1e-12:
            return int(point["images"])
    return None


def efficiency_plot(summary: Mapping[str, Any], *, size=(9.5, 3.8), dpi=110) -> bytes:
    """PNG: held-out accuracy against generated images (left) and against minutes (right), a line per method."""
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    panels = ((axes[0], "images", "generated images"), (axes[1], "minutes", "minutes (sampling + training)"))
    for ax, x, label in panels:
        for name, result in summary["methods"].items():
            curve = [c for c in result["curve"] if x in c]
            if curve:
                ax.plot([c[x] for c in curve], [c[KEY] for c in curve], marker="o", ms=3, lw=1.6, label=name)
        best = summary.get("flow_grpo_best")
        if best is not None:
            ax.axhline(best, color="0.5", lw=0.8, ls="--", label="Flow-GRPO best")
        ax.set_xlabel(label, fontsize=9)
        ax.grid(alpha=0.3)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[0].set_ylabel("held-out exact accuracy", fontsize=9)
    axes[0].set_title("sample efficiency (shapes world)", fontsize=10, loc="left")
    axes[1].legend(fontsize=7)
    return _png(fig)


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def efficiency_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the efficiency table: accuracy at each evaluated image count, the last
    evaluation's accuracy by category, its minutes, the network evaluations per generated image (sampling,
    training), images scored per generated image, and the images to Flow-GRPO's best accuracy."""
    cols = sorted({c["images"] for r in summary["methods"].values() for c in r["curve"]})
    cats = [k for k in CATEGORIES if any(k in c for r in summary["methods"].values() for c in r["curve"])]
    header = ["method", *[str(c) for c in cols], *[f"final {CATEGORIES[k]}" for k in cats], "minutes",
              "NFE/img sample", "NFE/img train", "scored/img", "images to Flow-GRPO best", "speed-up", "wall s"]
    rows = []
    for name, r in summary["methods"].items():
        acc = {c["images"]: c[KEY] for c in r["curve"]}
        last = r["curve"][-1]
        rows.append([name, *[f"{acc[c]:.3f}" if c in acc else "" for c in cols],
                     *[_num(last.get(k), ".3f") for k in cats], _num(last.get("minutes"), ".1f"),
                     _num(r.get("nfe_sample_per_image"), "g"), _num(r.get("nfe_train_per_image"), "g"),
                     _num(r.get("scored_per_image"), "g"), _num(r.get("images_to_flow_grpo_best"), "d"),
                     _num(r.get("speedup_vs_flow_grpo"), "g"), f"{r.get('wall_s', 0):.0f}"])
    return header, rows
