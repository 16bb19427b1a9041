"""evaluation/hacking.py and evaluation/report.py: the reward-hacking check and the HTML report."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from diffalign.evaluation import detect_hacking, save_eval, save_grid, write_report
from diffalign.evaluation.evaluator import RESULT_VERSION

# ------------------------------------------------------------------------------- fixtures


def stats(mean, stderr=0.01):
    return {"mean": mean, "std": 0.1, "stderr": stderr, "seed_block_std": 0.01}


def synthetic_result(target=(0.4, 0.8), heldout=(0.6, 0.4), diversity=(0.2, 0.18)):
    """An evaluation result, base -> tuned, with the given (before, after) values."""
    def model(i, grid):
        return {"rewards": {"shapes": stats(target[i]), "brightness": stats(heldout[i])},
                "diversity": diversity[i], "stability": 0.01,
                "shapes": {"accuracy": {"one": 0.5 + 0.2 * i, "relation": 0.1 + 0.3 * i, "overall": 0.3 + 0.25 * i},
                           "verifier_score": target[i]},
                "vs_base": None if i == 0 else {"drift": 0.08, "fid": 1.5, "kid": 0.02, "kid_std": 0.001,
                                                "win_rate": {"shapes": 0.8, "brightness": 0.3}},
                "grid": grid, "seconds": 1.0}

    return {"version": RESULT_VERSION, "prompts": ["one red circle", "two blue squares"], "seeds_per_prompt": 4,
            "seed": 0, "sampling": {"sampler": "flow_ode", "num_steps": 10, "guidance_scale": 3.0, "eta": None},
            "rewards": ["shapes", "brightness"], "target": "shapes", "heldout": ["brightness"], "base": "base",
            "shapes_world": True, "encoder": "random-conv-v1", "grid_prompts": 2,
            "models": {"base": model(0, "images_base.png"), "tuned": model(1, "images_tuned.png")}}


def rising_rows(n=40, heldout_slope=-0.01, with_kl=True):
    """Training metric rows: reward_mean rises; heldout/brightness follows ``heldout_slope``."""
    rows = []
    for i in range(n):
        row = {"step": i * 10, "images_seen": i * 640, "reward_mean": 0.3 + 0.015 * i, "reward_std": 0.1,
               "heldout/brightness": 0.7 + heldout_slope * i, "lr": 1e-4 * min(1.0, (i + 1) / 5),
               "loss": 1.0 / (i + 1), "elapsed_s": 3.0 * i}
        if with_kl:
            row.update(kl=0.001 * i, clip_frac=0.1 + 0.002 * i)
        rows.append(row)
    return rows


def make_run(tmp_path, *, hacking=True):
    """A run directory with metrics.jsonl, config.yaml, eval/eval.json and two grid PNGs."""
    run = tmp_path / ("hacked" if hacking else "healthy")
    (run / "eval").mkdir(parents=True)
    rows = rising_rows(heldout_slope=-0.01 if hacking else 0.002)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 4')  # cut-off line
    (run / "config.yaml").write_text("algorithm:\n  name: grpo\n  clip_range: 0.0002\nnote: '<script>x</script>'\n")
    result = synthetic_result(heldout=(0.6, 0.4) if hacking else (0.6, 0.65))
    save_eval(result, run / "eval" / "eval.json")
    g = torch.Generator().manual_seed(0)
    for label in ("base", "tuned"):
        save_grid(torch.rand(8, 3, 32, 32, generator=g), run / "eval" / f"images_{label}.png", 4,
                  row_labels=result["prompts"], marks=[True, False] * 4)
    return run


class Page(HTMLParser):
    """Collects img sources, external references, element ids and visible text of a page."""

    def __init__(self):
        super().__init__()
        self.imgs, self.external, self.ids, self.text = [], [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith(("data:", "#")):
                self.external.append(a[key])
        if tag in ("link", "script"):
            self.external.append(tag)
        if "id" in a:
            self.ids.add(a["id"])

    def handle_data(self, data):
        self.text.append(data)


def parse(path):
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


# -------------------------------------------------------------------------- detect_hacking


def test_hacking_fires_when_target_rises_and_heldout_falls():
    reasons = detect_hacking(synthetic_result(target=(0.4, 0.8), heldout=(0.6, 0.4)))
    assert len(reasons) == 1
    assert "tuned" in reasons[0] and "'brightness'" in reasons[0] and "0.6 -> 0.4" in reasons[0]


def test_hacking_silent_when_both_rise_or_the_target_does_not():
    assert detect_hacking(synthetic_result(target=(0.4, 0.8), heldout=(0.6, 0.7))) == []
    assert detect_hacking(synthetic_result(target=(0.8, 0.4), heldout=(0.6, 0.4))) == []


def test_hacking_thresholds():
    small = synthetic_result(heldout=(0.6, 0.58))  # a 3.3% drop
    assert detect_hacking(small) == []
    assert len(detect_hacking(small, heldout_drop=0.02)) == 1
    collapse = synthetic_result(heldout=(0.6, 0.7), diversity=(0.2, 0.1))  # diversity halves
    reasons = detect_hacking(collapse)
    assert len(reasons) == 1 and "diversity fell 0.2 -> 0.1" in reasons[0]
    assert detect_hacking(collapse, diversity_drop=0.6) == []


def test_hacking_from_training_curves():
    reasons = detect_hacking(rising_rows(heldout_slope=-0.01))
    assert len(reasons) == 1 and "held-out 'brightness'" in reasons[0] and "first vs last quarter" in reasons[0]
    assert detect_hacking(rising_rows(heldout_slope=0.01)) == []
    assert detect_hacking(rising_rows(n=3, heldout_slope=-0.1)) == []  # too few points for a trend
    rows = [{**r, "diversity": 0.3 - 0.007 * i} for i, r in enumerate(rising_rows(heldout_slope=0.0))]
    assert any("diversity" in r for r in detect_hacking(rows))


def test_detect_hacking_rejects_other_input():
    with pytest.raises(ValueError, match="evaluation result"):
        detect_hacking({"step": 1})
    with pytest.raises(ValueError, match="heldout_drop must be a number >= 0"):
        detect_hacking([], heldout_drop=-1)


# ---------------------------------------------------------------------------------- report


def test_report_embeds_everything_and_warns(tmp_path):
    out = write_report(make_run(tmp_path, hacking=True))
    assert out.name == "report.html"
    page = parse(out)
    plots = [s for s in page.imgs if s.startswith("data:image/png;base64,")]
    assert len(plots) == len(page.imgs) >= 8  # 6 curve panels (reward, held-out, kl, clip, lr, loss) + 2 grids
    assert page.external == []  # self-contained
    png = Image.open(io.BytesIO(base64.b64decode(plots[0].split(",", 1)[1])))
    assert png.format == "PNG" and png.width > 200
    assert "reward-hacking-warning" in page.ids
    text = " ".join(page.text)
    assert "Possible reward hacking" in text
    assert "training curves" in text and "tuned: target 'shapes' rose" in text  # both checks fired
    assert "1 malformed line(s) skipped" in text
    assert "before — base 'base'" in text and "after — 'tuned'" in text
    assert "diversity 0.200 → 0.180" in text
    html = out.read_text()
    assert "<script>x</script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html  # escaped
    assert "<details>" in html  # config collapsed


def test_report_without_hacking_says_so(tmp_path):
    out = write_report(make_run(tmp_path, hacking=False), tmp_path / "r" / "page.html")
    page = parse(out)
    assert out == tmp_path / "r" / "page.html"
    assert "reward-hacking-warning" not in page.ids
    assert "No reward-hacking signal" in " ".join(page.text)


def test_report_with_metrics_only_plots_whatever_keys_exist(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"images_seen": 64 * i, "reward_mean": 0.1 * i, "my_metric": i % 3} for i in range(6)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    page = parse(write_report(run))
    assert len(page.imgs) == 2  # reward_mean and my_metric
    assert "No evaluation" in " ".join(page.text)


def test_report_errors_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        write_report(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nothing to report"):
        write_report(tmp_path)


def test_report_cli(tmp_path):
    from diffalign.commands import evaluate as cmd

    app = typer.Typer()
    cmd.register(app)
    run = make_run(tmp_path)
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "x.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "x.html").is_file()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "run directory not found" in res.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_report_renders_in_a_browser(tmp_path):
    report = write_report(make_run(tmp_path, hacking=True))
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2400",
           report.resolve().as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), out.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    assert (px.min(1) < 235).mean() > 0.05  # not blank: plenty of non-white pixels
    assert len(np.unique(px // 16, axis=0)) > 50  # plots, grids, text: many distinct colours
    red = (abs(px[:, 0] - 0xC6) < 12) & (abs(px[:, 1] - 0x28) < 12) & (abs(px[:, 2] - 0x28) < 12)
    assert red.sum() > 2000  # the warning box's thick red border is drawn


def test_report_embeds_sample_efficiency_curves(tmp_path):
    from diffalign.evaluation.efficiency import images_to_reach

    curve_a = [{"images": 0, "eval/heldout_accuracy": 0.3}, {"images": 640, "eval/heldout_accuracy": 0.5}]
    curve_b = [{"images": 0, "eval/heldout_accuracy": 0.3}, {"images": 640, "eval/heldout_accuracy": 0.35},
               {"images": 1280, "eval/heldout_accuracy": 0.5}]
    assert images_to_reach(curve_a, 0.5) == 640 and images_to_reach(curve_b, 0.5) == 1280
    assert images_to_reach(curve_b, 0.9) is None
    curve_a[1].update({"minutes": 1.5, "eval/heldout_relation": 0.25})
    summary = {"images": 1280, "eval_prompts": 128, "flow_grpo_best": 0.5,
               "methods": {"flow_grpo": {"curve": curve_b, "wall_s": 10, "images_to_flow_grpo_best": 1280,
                                         "speedup_vs_flow_grpo": 1.0},
                           "dense_grpo": {"curve": curve_a, "wall_s": 5, "images_to_flow_grpo_best": 640,
                                          "speedup_vs_flow_grpo": 2.0, "nfe_sample_per_image": 110.0,
                                          "nfe_train_per_image": 40.0, "scored_per_image": 11.0}}}
    (tmp_path / "efficiency.json").write_text(json.dumps(summary))
    page = write_report(tmp_path).read_text()
    assert "Sample efficiency" in page and page.count("data:image/png;base64") == 1
    assert "<td>dense_grpo</td>" in page and "<td>2</td>" in page
    # the cost of dense rewards is in the table, and the accuracy by category where the trainer reported it
    for cell in ("NFE/img sample", "<td>110</td>", "<td>40</td>", "<td>11</td>", "final relation", "<td>0.250</td>",
                 "<td>1.5</td>"):
        assert cell in page, cell
