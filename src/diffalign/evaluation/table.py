"""Readable tables of an evaluation result: rich tables for the terminal, rows for HTML."""

from __future__ import annotations

import io
from typing import Any, Mapping

from rich import box
from rich.console import Console
from rich.table import Table

SHAPES_COLUMNS = ("one", "two", "three", "four", "count", "relation", "overall")
# worlds.shapes.breakdown: what is right short of exact accuracy (absent in results written before it existed)
BREAKDOWN_COLUMNS = (("colour", "colour right"), ("both_right", "both objects right"),
                     ("relation_given_both", "relation | both right"), ("swapped_given_both", "swapped | both right"))


def fmt(x: Any) -> str:
    """A number for a table cell: ``-`` for missing, 3 decimals, scientific for tiny values."""
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) < 0.01:
        return f"{x:.2e}"
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.4g}"


def reward_header(result: Mapping[str, Any], name: str) -> str:
    if result.get("target") is None:
        return name
    return f"{name} (target)" if name == result["target"] else f"{name} (held-out)"


def ordered_rewards(result: Mapping[str, Any]) -> list[str]:
    """Target first, then held-out rewards in the order given."""
    names = list(result.get("rewards", []))
    t = result.get("target")
    return ([t] if t in names else []) + [n for n in names if n != t]


def table_rows(result: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``[(title, header, rows)]`` -- the tables shown for ``result``, as plain strings, shared by
    the terminal table (:func:`format_table`) and the HTML report."""
    models: Mapping[str, Any] = result["models"]
    names = ordered_rewards(result)
    base = result.get("base")
    tables = []
    header = ["model", *(reward_header(result, n) for n in names)]
    rows = [[_label(label, base), *(f"{fmt(m['rewards'][n]['mean'])} ± {fmt(m['rewards'][n]['stderr'])}"
                                    for n in names)] for label, m in models.items()]
    tables.append(("Rewards (mean ± stderr over prompts)", header, rows))

    header = ["model", "diversity", "stability (seed-block std)"]
    if base is not None:
        header += ["drift", "FID", "KID"]
    rows = []
    for label, m in models.items():
        vb = m.get("vs_base") or {}
        row = [_label(label, base), fmt(m.get("diversity")), fmt(m.get("stability"))]
        rows.append(row + ([fmt(vb.get("drift")), fmt(vb.get("fid")), fmt(vb.get("kid"))] if base is not None else []))
    tables.append(("Diversity, stability and drift from the base" if base else "Diversity and stability", header,
                   rows))
    if base is not None and names:
        header = ["model", *(reward_header(result, n) for n in names)]
        rows = [[label, *(fmt(((m.get("vs_base") or {}).get("win_rate") or {}).get(n)) for n in names)]
                for label, m in models.items() if label != base]
        if rows:
            tables.append((f"Win rate against the base {base!r} (same seed; ties count 1/2)", header, rows))

    if result.get("shapes_world"):
        cols = [c for c in SHAPES_COLUMNS if any(c in (m.get("shapes") or {}).get("accuracy", {})
                                                 for m in models.values())]
        parts = [(k, h) for k, h in BREAKDOWN_COLUMNS if any(k in (m.get("shapes") or {}).get("breakdown", {})
                                                              for m in models.values())]
        header = ["model", "verifier score", *(f"acc {c}" for c in cols), *(h for _, h in parts)]
        rows = [[_label(label, base), fmt((m.get("shapes") or {}).get("verifier_score")),
                 *(fmt((m.get("shapes") or {}).get("accuracy", {}).get(c)) for c in cols),
                 *(fmt((m.get("shapes") or {}).get("breakdown", {}).get(k)) for k, _ in parts)]
                for label, m in models.items()]
        tables.append(("Shapes verifier (exact accuracy by category)", header, rows))
    return tables


def _label(label: str, base: str | None) -> str:
    return f"{label} (base)" if label == base else label


def summary_line(result: Mapping[str, Any]) -> str:
    s = result.get("sampling", {})
    return (f"{len(result.get('prompts', []))} prompts x {result.get('seeds_per_prompt')} seeds (from seed "
            f"{result.get('seed')}); sampler {s.get('sampler')}, {s.get('num_steps')} steps, guidance "
            f"{s.get('guidance_scale')}; target: {result.get('target') or '-'}; base: {result.get('base') or '-'}")


def format_table(result: Mapping[str, Any], width: int = 160) -> str:
    """The evaluation result as plain-text tables (rich box drawing, no colour codes)."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False)
    console.print(summary_line(result))
    for title, header, rows in table_rows(result):
        table = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left")
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"
