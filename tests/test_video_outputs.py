"""What video and editing models write: ``diffalign sample`` (MP4 / animated WebP, the
conditioning image beside an edit), ``evaluate`` (animated grids, frame strips) and the report
(videos embedded; a collapse of motion flagged as reward hacking)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffalign.cli import app  # noqa: E402
from diffalign.evaluation import evaluate, save_eval  # noqa: E402
from diffalign.evaluation.hacking import detect_hacking  # noqa: E402
from diffalign.evaluation.report import write_report  # noqa: E402
from diffalign.models import load_model  # noqa: E402
from diffalign.rewards import get as get_reward  # noqa: E402

pytestmark = pytest.mark.usefixtures("quiet_diffusers")


def invoke(*args, code=0):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output + repr(res.exception)
    return res


@pytest.mark.parametrize("fmt", ["mp4", "webp"])
def test_sample_writes_videos(tiny_pipeline, tmp_path, fmt):
    res = invoke("sample", "--model", tiny_pipeline("wan"), "--out", tmp_path, "--prompt", "a cat", "-k", "2",
                 "--steps", "2", "--device", "cpu", "--video-format", fmt)
    assert "wrote 2 videos" in res.output
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == [f"00000.{fmt}", f"00001.{fmt}"]
    assert all(r["frames"] == 9 and r["fps"] == 16.0 for r in rows)
    path = tmp_path / rows[0]["file"]
    if fmt == "webp":
        with Image.open(path) as im:
            assert im.n_frames == 9 and im.size == (32, 32)
    else:
        import av

        with av.open(str(path)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == 9 and frames[0].shape == (32, 32, 3)


def test_sample_writes_the_source_image_beside_an_edit(tiny_pipeline, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "cup.png")
    f = tmp_path / "edits.jsonl"
    f.write_text(json.dumps({"prompt": "make it red", "image": "cup.png", "negative_prompt": "blurry"}) + "\n")
    out = tmp_path / "out"
    invoke("sample", "--model", tiny_pipeline("flux_kontext"), "--out", out, "--prompts", f, "-k", "2",
           "--steps", "2", "--guidance", "2", "--device", "cpu")
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["sources"] == rows[1]["sources"] == ["source_0000_0.png"]
    assert rows[0]["images"] == [str((tmp_path / "cup.png").resolve())] and rows[0]["negative_prompt"] == "blurry"
    with Image.open(out / "source_0000_0.png") as im:
        assert im.size == (16, 16)  # resized to what the model conditions on
    f.write_text(json.dumps({"prompt": "x", "image": "gone.png"}) + "\n")
    res = invoke("sample", "--model", tiny_pipeline("flux_kontext"), "--out", out, "--prompts", f, code=2)
    assert "edits.jsonl:1: image 'gone.png' not found" in res.output


def test_evaluate_and_report_show_videos(tiny_pipeline, tmp_path):
    base = load_model(tiny_pipeline("wan"))
    tuned = load_model(tiny_pipeline("wan"))
    with torch.no_grad():
        for p in tuned.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    eval_dir = tmp_path / "run" / "eval"
    result = evaluate({"base": base, "tuned": tuned}, ["a cat", "a dog"], seeds_per_prompt=2, num_steps=2,
                      rewards=[get_reward("brightness", frames="min"), get_reward("motion_magnitude")],
                      target="brightness", base="base", out_dir=eval_dir)
    save_eval(result, eval_dir / "eval.json")
    entry = result["models"]["tuned"]
    suffix = "mp4" if entry["grid"].endswith("mp4") else "webp"
    assert entry["grid"] == f"images_tuned.{suffix}" and entry["strips"] == "strips_tuned.png"
    assert (eval_dir / entry["grid"]).is_file() and (eval_dir / "strips_tuned.png").is_file()
    assert entry["vs_base"]["drift"] > 0 and 0 <= entry["rewards"]["motion_magnitude"]["mean"] <= 1
    html = write_report(tmp_path / "run").read_text()
    assert html.count("<video " if suffix == "mp4" else "data:image/webp") == 2  # before and after
    assert html.count('alt="frames of') == 2


def test_a_video_that_stops_moving_is_flagged_as_hacking():
    rows = [{"epoch": e, "reward_mean": 0.2 + 0.05 * e, "heldout/motion_magnitude": 0.08 * 0.8**e} for e in range(8)]
    reasons = detect_hacking(rows)
    assert any("motion_magnitude" in r for r in reasons), reasons


def test_eval_and_search_carry_the_conditioning_image(tiny_pipeline, tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "src.png")
    f = tmp_path / "edits.jsonl"
    f.write_text(json.dumps({"prompt": "make it red", "image": "src.png"}) + "\n")
    kontext = tiny_pipeline("flux_kontext")
    invoke("eval", "--model", f"base={kontext}", "--out", tmp_path / "eval", "--prompts", f, "-k", "2",
           "--reward", "source_l2,brightness", "--target", "brightness", "--steps", "2", "--device", "cpu")
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["prompts"] == ["make it red"] and result["models"]["base"]["rewards"]["source_l2"]["mean"] < 0
    res = invoke("search", "--method", "best_of_n", "--budget", 8, "--model", kontext, "--reward", "source_l2",
                 "--out", tmp_path / "search", "--prompts", f, "--steps", 2, "--device", "cpu")
    assert "best_of_n: wrote 1 images" in res.output
    row = json.loads((tmp_path / "search" / "samples.jsonl").read_text())
    assert row["images"] == [str((tmp_path / "src.png").resolve())] and row["score"] < 0
    res = invoke("search", "--method", "best_of_n", "--budget", 4, "--model", tiny_pipeline("wan"),
                 "--reward", "motion_magnitude", "--out", tmp_path / "video", "--prompt", "a cat", "--steps", 2,
                 "--device", "cpu")
    assert (tmp_path / "video" / json.loads((tmp_path / "video" / "samples.jsonl").read_text())["file"]).is_file()
