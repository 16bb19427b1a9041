"""Training curves from ``metrics.jsonl`` as PNG bytes (matplotlib's Agg canvas, no pyplot state).

Whatever numeric keys the rows have are plotted, each on its own small panel, against ``step``
(else ``images_seen``, else the row index). Known keys get a fixed order and nicer titles:
``reward_mean`` (with a +-``reward_std`` band), ``heldout/<name>``, ``kl``, ``clip_frac``, ``lr``
(log axis), ``loss``; every other numeric key follows in alphabetical order.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

X_KEYS = ("step", "images_seen")
NOT_PLOTTED = {"step", "images_seen", "elapsed_s", "reward_std", "time", "epoch"}
KNOWN = {"reward_mean": "training reward (mean ± std)", "kl": "KL to the reference", "clip_frac": "clip fraction",
         "lr": "learning rate", "loss": "loss"}
ORDER = ("reward_mean", "heldout/", "diversity", "kl", "clip_frac", "lr", "loss")
COLOR, BAND = "#1f5fa8", "#1f5fa833"


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of a JSON-lines file and how many lines were skipped (blank lines aside) because they
    are not JSON objects -- e.g. a last line cut short by a killed run."""
    rows, skipped = [], 0
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def x_key(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The x axis: the first of ``X_KEYS`` present in most rows, else ``None`` (row index)."""
    for k in X_KEYS:
        if sum(_is_num(r.get(k)) for r in rows) >= max(1, len(rows) // 2):
            return k
    return None


def plotted_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys that get a panel, in display order."""
    keys = {k for r in rows for k, v in r.items() if _is_num(v) and k not in NOT_PLOTTED}

    def rank(k: str) -> tuple[int, str]:
        for i, prefix in enumerate(ORDER):
            if k == prefix or (prefix.endswith("/") and k.startswith(prefix)):
                return i, k
        return len(ORDER), k

    return sorted(keys, key=rank)


def _series(rows: Sequence[Mapping[str, Any]], key: str, xk: str | None) -> tuple[list[float], list[float], list[int]]:
    xs, ys, idx = [], [], []
    for i, r in enumerate(rows):
        if _is_num(r.get(key)) and (xk is None or _is_num(r.get(xk))):
            xs.append(float(r[xk]) if xk else float(i))
            ys.append(float(r[key]))
            idx.append(i)
    return xs, ys, idx


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def panel(rows: Sequence[Mapping[str, Any]], key: str, xk: str | None, *, size=(4.4, 2.9), dpi=110) -> bytes:
    """One key's curve as PNG bytes (``reward_mean`` gets a ±``reward_std`` band)."""
    xs, ys, idx = _series(rows, key, xk)
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(xs, ys, color=COLOR, lw=1.6, marker="o" if len(xs) < 30 else None, ms=3)
    if key == "reward_mean":
        std = [rows[i].get("reward_std") for i in idx]
        if all(_is_num(s) for s in std) and std:
            ax.fill_between(xs, [y - s for y, s in zip(ys, std)], [y + s for y, s in zip(ys, std)],
                            color=BAND, lw=0, label="± std")
    if key == "lr" and ys and min(ys) > 0 and max(ys) / min(ys) > 10:
        ax.set_yscale("log")
    title = KNOWN.get(key) or (f"held-out: {key[len('heldout/'):]}" if key.startswith("heldout/") else key)
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel(xk or "row", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _png(fig)


def training_panels(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, bytes]]:
    """``[(key, png_bytes)]`` for every plotted key of the rows."""
    xk = x_key(rows)
    return [(k, panel(rows, k, xk)) for k in plotted_keys(rows)]
