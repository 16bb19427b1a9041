"""One self-contained HTML report for a run directory (``diffalign report RUN_DIR``).

Reads whatever of these the run has: ``metrics.jsonl`` (training curves), ``config.yaml`` (the
resolved config) and ``eval/eval.json`` with its ``images_<label>.png`` grids (videos: an animated
grid, MP4 or WebP, and ``strips_<label>.png`` frame strips). Every image or video is
embedded (base64 PNG, WebP or MP4) and the styles are inline, so the file can be mailed or attached to CI.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from pathlib import Path
from typing import Any, Mapping, Sequence

from .evaluator import load_eval
from .hacking import detect_hacking, quarter_means
from .plots import read_metrics, training_panels
from .table import fmt, table_rows

METRICS_FILE, CONFIG_FILE, EVAL_DIR, EVAL_FILE = "metrics.jsonl", "config.yaml", "eval", "eval.json"
REPORT_FILE = "report.html"

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
main{max-width:1120px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:19px;margin:32px 0 12px;border-bottom:2px solid #d9dde5;padding-bottom:4px}
.meta{color:#5b6475;font-size:13px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:14px 18px;margin:12px 0}
.hack{background:#fdecea;border:2px solid #c62828;border-left:12px solid #c62828;border-radius:8px;
padding:16px 22px;margin:18px 0}
.hack h2{color:#b71c1c;border:none;margin:0 0 8px;font-size:22px} .hack li{margin:4px 0;font-size:15px}
.ok{background:#e8f5e9;border:1px solid #2e7d32;border-left:8px solid #2e7d32;border-radius:8px;padding:10px 18px;
margin:18px 0;font-size:14px} .none{background:#eef0f4;border-left:8px solid #8a93a5;border-radius:8px;
padding:10px 18px;margin:18px 0;font-size:14px}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
.plots img{width:100%;background:#fff;border:1px solid #dde1e8;border-radius:6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 16px;background:#fff}
th,td{border:1px solid #dde1e8;padding:5px 9px;text-align:right} th{background:#eef1f6}
td:first-child,th:first-child{text-align:left} caption{text-align:left;font-weight:600;padding:4px 0;white-space:nowrap}
.grids{display:flex;flex-wrap:wrap;gap:18px} figure{margin:0;background:#fff;border:1px solid #dde1e8;
border-radius:6px;padding:10px;flex:1 1 440px;max-width:max-content}
figure img,figure video{max-width:100%;height:auto;display:block;margin-bottom:6px} figcaption{font-weight:600;margin-bottom:6px}
.headline li{margin:3px 0} pre{background:#1d2330;color:#e8eaf0;padding:12px;border-radius:6px;overflow:auto;
font-size:12px} summary{cursor:pointer;font-weight:600}
"""


def _img(png: bytes, alt: str, mime: str = "image/png") -> str:
    return f'<img src="data:{mime};base64,{base64.b64encode(png).decode("ascii")}" alt="{html.escape(alt)}">'


def _media(path: Path, alt: str) -> str:
    """A PNG or animated WebP as an image, an MP4 as a looping muted video, embedded in the page."""
    data = path.read_bytes()
    if path.suffix.lower() == ".mp4":
        return (f'<video autoplay loop muted playsinline controls title="{html.escape(alt)}" '
                f'src="data:video/mp4;base64,{base64.b64encode(data).decode("ascii")}"></video>')
    return _img(data, alt, "image/webp" if path.suffix.lower() == ".webp" else "image/png")


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><caption>{e(title)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def headline(result: Mapping[str, Any]) -> list[str]:
    """Before -> after lines for every model against the base: target, held-outs, diversity,
    verifier accuracy and drift (empty without a base)."""
    base, models = result.get("base"), result["models"]
    if base is None or base not in models:
        return []
    b, lines = models[base], []
    for label, m in models.items():
        if label == base:
            continue
        parts = []
        for n in ([result["target"]] if result.get("target") else []) + list(result.get("heldout", [])):
            kind = "target" if n == result.get("target") else "held-out"
            parts.append(f"{kind} {n}: {fmt(b['rewards'][n]['mean'])} → {fmt(m['rewards'][n]['mean'])}")
        if not result.get("target"):
            parts += [f"{n}: {fmt(b['rewards'][n]['mean'])} → {fmt(m['rewards'][n]['mean'])}"
                      for n in result["rewards"]]
        parts.append(f"diversity {fmt(b.get('diversity'))} → {fmt(m.get('diversity'))}")
        if b.get("shapes") and m.get("shapes"):
            parts.append(f"verifier accuracy {fmt(b['shapes']['accuracy'].get('overall'))} → "
                         f"{fmt(m['shapes']['accuracy'].get('overall'))}")
        vb = m.get("vs_base") or {}
        parts.append(f"drift {fmt(vb.get('drift'))}, FID {fmt(vb.get('fid'))}")
        lines.append(f"{base} → {label}: " + "; ".join(parts))
    return lines


def _hacking_box(reasons: list[str], checked: list[str], thresholds: str) -> str:
    e = html.escape
    if reasons:
        items = "".join(f"<li>{e(r)}</li>" for r in reasons)
        return (f'<section class="hack" id="reward-hacking-warning"><h2>⚠ Possible reward hacking</h2>'
                f"<p>The target reward went up while a held-out signal went down ({e(thresholds)}). Inspect the "
                f"samples before trusting the target reward.</p><ul>{items}</ul></section>")
    if checked:
        return (f'<section class="ok">No reward-hacking signal in {e(" and ".join(checked))} '
                f"({e(thresholds)}).</section>")
    return ('<section class="none">Reward-hacking check not possible: it needs training curves with '
            "<code>reward_mean</code> and held-out keys, or an evaluation with a target and a base.</section>")


def _curves_section(rows: list[dict], skipped: int, metrics_path: Path) -> str:
    e = html.escape
    if not rows:
        return (f'<h2>Training curves</h2><p class="meta">No training metrics ({e(str(metrics_path))} missing or '
                f"empty).</p>")
    panels = training_panels(rows)
    note = f" {skipped} malformed line(s) skipped." if skipped else ""
    last = rows[-1]
    facts = ", ".join(f"{k} {fmt(last[k])}" for k in ("step", "images_seen", "elapsed_s") if k in last)
    imgs = "".join(_img(png, f"training curve: {k}") for k, png in panels)
    return (f'<h2>Training curves</h2><p class="meta">{len(rows)} logged points; last: {e(facts) or "-"}.{e(note)}'
            f'</p><div class="plots">{imgs}</div>')


def _eval_section(result: Mapping[str, Any] | None, eval_dir: Path) -> str:
    e = html.escape
    if result is None:
        return f'<h2>Evaluation</h2><p class="meta">No evaluation ({e(str(eval_dir / EVAL_FILE))} missing).</p>'
    from .table import summary_line

    lines = "".join(f"<li>{e(s)}</li>" for s in headline(result))
    out = [f'<h2>Evaluation</h2><p class="meta">{e(summary_line(result))}</p>']
    if lines:
        out.append(f'<div class="card headline"><b>Before → after</b><ul>{lines}</ul></div>')
    out += [_table(*t) for t in table_rows(result)]
    figs = []
    base = result.get("base")
    labels = sorted(result["models"], key=lambda lab: lab != base)  # the base ("before") first
    for label in labels:
        grid = result["models"][label].get("grid")
        path = eval_dir / grid if grid else None
        if path is None or not path.is_file():
            continue
        role = "" if base is None else ("before — base " if label == base else "after — ")
        strips = result["models"][label].get("strips")
        strip = (_media(eval_dir / strips, f"frames of {label}") if strips and (eval_dir / strips).is_file() else "")
        figs.append(f"<figure><figcaption>{e(role + repr(label))}</figcaption>"
                    f"{_media(path, f'samples of {label}')}{strip}</figure>")
    if figs:
        frames = "; green frame = verified correct, red = wrong" if result.get("shapes_world") else ""
        out.append(f"<h2>Samples</h2><p class=\"meta\">The first {result.get('grid_prompts', '')} prompts (rows) x "
                   f"{result.get('seeds_per_prompt')} seeds (columns), identical noise for every model{frames}.</p>"
                   f'<div class="grids">{"".join(figs)}</div>')
    return "".join(out)


def _efficiency_section(run_dir: Path) -> str:
    """The sample-efficiency curves of ``make bench-efficiency`` when the directory holds them."""
    import json

    from .efficiency import EFFICIENCY_FILE, efficiency_plot, efficiency_rows

    path = run_dir / EFFICIENCY_FILE
    if not path.is_file():
        return ""
    summary = json.loads(path.read_text())
    header, rows = efficiency_rows(summary)
    return ("<h2>Sample efficiency</h2>" + _img(efficiency_plot(summary), "held-out accuracy against generated images")
            + _table(f"held-out accuracy ({summary.get('eval_prompts', '?')} prompts) against generated images",
                     header, rows))


def write_report(run_dir: str | Path, out: str | Path | None = None, *, heldout_drop: float = 0.05,
                 diversity_drop: float = 0.3) -> Path:
    """Write the HTML report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``); returns its path."""
    from .. import __version__

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    metrics_path, config_path = run_dir / METRICS_FILE, run_dir / CONFIG_FILE
    eval_dir = run_dir / EVAL_DIR
    eval_path = eval_dir / EVAL_FILE
    if not any(p.is_file() for p in (metrics_path, config_path, eval_path, run_dir / "efficiency.json")):
        raise FileNotFoundError(f"nothing to report in {run_dir}: expected {METRICS_FILE}, {CONFIG_FILE} or "
                                f"{EVAL_DIR}/{EVAL_FILE}")
    rows, skipped = read_metrics(metrics_path) if metrics_path.is_file() else ([], 0)
    result = load_eval(eval_path) if eval_path.is_file() else None

    reasons, checked = [], []
    if result is not None and result.get("target") and result.get("base"):
        checked.append("the evaluation (base → models)")
        reasons += detect_hacking(result, heldout_drop=heldout_drop, diversity_drop=diversity_drop)
    if quarter_means([r["reward_mean"] for r in rows if isinstance(r.get("reward_mean"), (int, float))]):
        checked.append("the training curves (first vs last quarter)")
        reasons += detect_hacking(rows, heldout_drop=heldout_drop, diversity_drop=diversity_drop)
    thresholds = f"held-out drop > {heldout_drop:.0%}, diversity drop > {diversity_drop:.0%}"

    e = html.escape
    config = ""
    if config_path.is_file():
        config = (f"<h2>Configuration</h2><details><summary>Resolved config ({e(str(config_path))})</summary>"
                  f"<pre>{e(config_path.read_text())}</pre></details>")
    efficiency = _efficiency_section(run_dir)
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = (f"<main><h1>diffalign report: {e(run_dir.resolve().name)}</h1>"
            f'<p class="meta">{e(str(run_dir.resolve()))} · generated {e(now)} · diffalign {e(__version__)}</p>'
            f"{_hacking_box(reasons, checked, thresholds)}{_curves_section(rows, skipped, metrics_path)}"
            f"{_eval_section(result, eval_dir)}{efficiency}{config}</main>")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>diffalign report: '
            f"{e(run_dir.resolve().name)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")
    out = Path(out) if out is not None else run_dir / REPORT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
