"""Preference data: PreferencePair, JSONL and Pick-a-Pic parquet readers, make-pairs."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from diffalign import rewards  # noqa: E402
from diffalign.data import (PreferencePair, load_pairs, read_jsonl_pairs, read_pickapic_parquet,  # noqa: E402
                            write_jsonl_pairs)
from diffalign.data.make_pairs import make_pairs, make_pairs_to_dir, select_pairs  # noqa: E402
from test_online_rl import tiny_model  # noqa: E402


def jpeg(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def decoded(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# label_0, label_1, has_label: image 0 wins, image 1 wins, a tie, an unlabelled row (skipped), image 0 wins
ROWS = [(1.0, 0.0, True), (0.0, 1.0, True), (0.5, 0.5, True), (0.0, 0.0, False), (1.0, 0.0, True)]


def pickapic_table(n_rows=len(ROWS), seed=0, **drop):
    rng = np.random.default_rng(seed)
    rows = [ROWS[i % len(ROWS)] for i in range(n_rows)]
    jpg = [[jpeg(rng.integers(0, 256, (16 + 4 * i, 12, 3), dtype=np.uint8)) for i in range(n_rows)] for _ in "01"]
    cols = {
        "are_different": [True] * n_rows, "caption": [f"prompt {i}" for i in range(n_rows)],
        "has_label": [r[2] for r in rows], "image_0_uid": [f"u{i}a" for i in range(n_rows)],
        "image_1_uid": [f"u{i}b" for i in range(n_rows)], "jpg_0": jpg[0], "jpg_1": jpg[1],
        "label_0": [r[0] for r in rows], "label_1": [r[1] for r in rows],
        "model_0": ["m"] * n_rows, "model_1": ["m"] * n_rows, "ranking_id": list(range(n_rows)),
        "user_id": [100 + i for i in range(n_rows)],
    }
    for c in drop:
        cols.pop(c)
    return pa.table(cols)


def expected_pairs(table):
    out = []
    for r in table.to_pylist():
        if not r["has_label"]:
            continue
        a, b = decoded(r["jpg_0"]), decoded(r["jpg_1"])
        chosen, rejected = (b, a) if r["label_1"] > r["label_0"] else (a, b)
        out.append(PreferencePair(r["caption"], chosen, rejected, tie=r["label_0"] == r["label_1"],
                                  annotator=str(r["user_id"]), pair_id=f"{r['image_0_uid']}_{r['image_1_uid']}"))
    return out


def test_pickapic_parquet_and_jsonl_round_trip_into_the_same_pairs(tmp_path):
    table = pickapic_table()
    pq.write_table(table, tmp_path / "shard.parquet", row_group_size=2)
    assert pq.ParquetFile(tmp_path / "shard.parquet").num_row_groups == 3
    from_parquet = list(read_pickapic_parquet(tmp_path / "shard.parquet", batch_rows=1))
    assert from_parquet == expected_pairs(table)
    assert [p.tie for p in from_parquet] == [False, False, True, False]  # the 0.5/0.5 row is a tie
    # the tie keeps image 0 as "chosen"; label_1 > label_0 puts image 1 first
    assert np.array_equal(from_parquet[2].chosen, decoded(table["jpg_0"][2].as_py()))
    assert np.array_equal(from_parquet[1].chosen, decoded(table["jpg_1"][1].as_py()))

    path = write_jsonl_pairs(from_parquet, tmp_path / "out" / "pairs.jsonl")
    lines = [json.loads(s) for s in path.read_text().splitlines()]
    assert lines[2]["tie"] is True and "tie" not in lines[0]
    assert all(not rec["chosen"].startswith("/") for rec in lines)  # relative to the JSONL's folder
    from_jsonl = list(read_jsonl_pairs(path))
    assert from_jsonl == from_parquet
    # load_pairs dispatches on all three source kinds
    assert load_pairs(path) == load_pairs(tmp_path / "out") == load_pairs(tmp_path / "shard.parquet") == from_jsonl
    pq.write_table(table, tmp_path / "shard2.parquet")
    (tmp_path / "out" / "pairs.jsonl").unlink()
    assert len(load_pairs(tmp_path)) == 2 * len(from_parquet)  # a folder of shards
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes left no temporaries


def test_parquet_is_streamed_row_group_by_row_group(tmp_path):
    table = pickapic_table(6)
    labels = table["label_0"].to_pylist()
    labels[5] = None  # a broken row in the last row group
    table = table.set_column(table.schema.get_field_index("label_0"), "label_0", pa.array(labels, pa.float64()))
    pq.write_table(table, tmp_path / "s.parquet", row_group_size=2)
    it = read_pickapic_parquet(tmp_path / "s.parquet", batch_rows=2)
    first = [next(it) for _ in range(4)]  # rows 0-4 (row 3 unlabelled) are read before row 5 is touched
    assert [p.pair_id for p in first] == ["u0a_u0b", "u1a_u1b", "u2a_u2b", "u4a_u4b"]
    with pytest.raises(ValueError, match=r"row 5: label_0/label_1 must be finite"):
        next(it)
    assert len(list(read_pickapic_parquet(tmp_path / "s.parquet", limit=2))) == 2


def test_parquet_without_the_expected_columns_names_them(tmp_path):
    pq.write_table(pickapic_table(jpg_1=None, label_1=None), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"missing Pick-a-Pic column\(s\) \['jpg_1', 'label_1'\]"):
        list(read_pickapic_parquet(tmp_path / "bad.parquet"))
    # optional columns may be absent: ids fall back to file:row, annotator to None, every row is labelled
    pq.write_table(pickapic_table(has_label=None, user_id=None, image_0_uid=None), tmp_path / "min.parquet")
    pairs = list(read_pickapic_parquet(tmp_path / "min.parquet"))
    assert len(pairs) == len(ROWS) and pairs[0].pair_id == "min:0" and pairs[0].annotator is None
    with pytest.raises(ValueError, match="batch_rows"):
        next(read_pickapic_parquet(tmp_path / "min.parquet", batch_rows=0))


def write_pngs(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(folder / n)


def test_jsonl_line_with_a_missing_image_names_file_and_line(tmp_path):
    write_pngs(tmp_path / "img", ["a.png", "b.png"])
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": "img/a.png", "rejected": "img/b.png"}) + "\n\n"
                 + json.dumps({"prompt": "q", "chosen": "img/a.png", "rejected": "img/gone.png"}) + "\n")
    it = read_jsonl_pairs(f)
    assert next(it).prompt == "p"
    with pytest.raises(FileNotFoundError, match=r"pairs\.jsonl:3: rejected image 'img/gone\.png' not found"):
        next(it)


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"prompt": "p", "chosen": "img/a.png"}), r"missing field\(s\) \['rejected'\]"),
    (json.dumps({"prompt": 3, "chosen": "img/a.png", "rejected": "img/b.png"}), "field 'prompt' must be a string"),
    (json.dumps({"prompt": "p", "chosen": "img/a.png", "rejected": "img/b.png", "tie": "yes"}), "field 'tie' must be"),
    (json.dumps([1, 2]), "expected a JSON object"),
])
def test_bad_jsonl_lines_are_errors_naming_the_line(tmp_path, line, message):
    write_pngs(tmp_path / "img", ["a.png", "b.png"])
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": "img/a.png", "rejected": "img/b.png"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"pairs\.jsonl:2: {message}"):
        list(read_jsonl_pairs(f))


def test_pair_validation_and_load_pairs_errors(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match=r"PreferencePair\.rejected must be a uint8 numpy array \[H, W, 3\]"):
        PreferencePair("p", img, img.astype(np.float32))
    with pytest.raises(ValueError, match=r"PreferencePair\.chosen"):
        PreferencePair("p", img[..., 0], img)
    with pytest.raises(ValueError, match="tie must be a bool"):
        PreferencePair("p", img, img, tie=1)
    a = PreferencePair("p", img, img + 1, pair_id="x")
    assert a.swapped().chosen[0, 0, 0] == 1 and a.swapped().swapped() == a and a != a.swapped()
    (tmp_path / "x.csv").write_text("")
    with pytest.raises(ValueError, match=r"expected a \.jsonl file, a \.parquet file"):
        load_pairs(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither pairs.jsonl nor"):
        load_pairs(tmp_path / "empty")
    with pytest.raises(ValueError, match="may not set the pair fields"):
        write_jsonl_pairs([a], tmp_path / "o.jsonl", extra=[{"prompt": "q"}])


def test_select_pairs_best_worst_all_and_min_gap():
    s = np.array([[0.2, 0.9, 0.5], [0.4, 0.4, 0.4], [1.0, 0.0, 0.95]])
    assert select_pairs(s) == [[(1, 0)], [], [(0, 1)]]
    assert select_pairs(s, min_gap=0.5) == [[(1, 0)], [], [(0, 1)]]
    assert select_pairs(s, min_gap=0.7) == [[], [], [(0, 1)]]
    assert select_pairs(s, "all") == [[(1, 0), (1, 2), (2, 0)], [], [(0, 1), (0, 2), (2, 1)]]
    assert select_pairs(s, "all", min_gap=0.3) == [[(1, 0), (1, 2)], [], [(0, 1), (2, 1)]]
    with pytest.raises(ValueError, match="mode must be one of"):
        select_pairs(s, "top")
    with pytest.raises(ValueError, match="min_gap must be in"):
        select_pairs(s, min_gap=-1)
    with pytest.raises(ValueError, match="finite"):
        select_pairs(np.array([[0.0, np.nan]]))


PROMPTS = ["two red circles", "a blue square left of a green triangle", "one yellow square"]


def test_make_pairs_on_a_tiny_model_writes_readable_pairs_ranked_by_the_reward(tmp_path):
    model = tiny_model("flow")
    reward = rewards.get("brightness")
    sampling = {"sampler": "flow_ode", "num_steps": 3, "guidance_scale": 1.0, "eta": None}
    summary = make_pairs_to_dir(model, PROMPTS, reward, tmp_path, per_prompt=4, seed=3, mode="all", sampling=sampling)
    lines = [json.loads(s) for s in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    pairs = load_pairs(tmp_path)
    assert len(pairs) == len(lines) == summary["pairs"] > 0
    # re-scoring the saved PNGs gives the recorded scores, and chosen outscores rejected in every pair
    x = lambda imgs: torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    prompts = [p.prompt for p in pairs]
    sc = reward(x([p.chosen for p in pairs]), prompts).numpy()
    sr = reward(x([p.rejected for p in pairs]), prompts).numpy()
    assert np.allclose(sc, [rec["chosen_score"] for rec in lines], atol=1e-6)
    assert np.allclose(sr, [rec["rejected_score"] for rec in lines], atol=1e-6)
    assert (sc > sr).all()
    assert all(p.annotator == "reward:brightness" and not p.tie for p in pairs)
    assert len({p.pair_id for p in pairs}) == len(pairs)
    # "all" with K = 4 gives up to 6 pairs a prompt; best_worst gives the max-gap one of each prompt
    best = make_pairs(model, PROMPTS, reward, 4, seed=3, sampling=sampling)
    assert len(best) == len(PROMPTS) and [p.prompt for p in best] == PROMPTS
    for b in best:
        mine = [rec for rec in lines if rec["prompt"] == b.prompt]
        gap = max(rec["chosen_score"] - rec["rejected_score"] for rec in mine)
        s = reward(x([b.chosen, b.rejected]), [b.prompt] * 2).numpy()
        assert s[0] - s[1] == pytest.approx(gap, abs=1e-6)
    # deterministic in the seed
    assert make_pairs(model, PROMPTS, "brightness", 4, seed=3, sampling=sampling) == best
    assert make_pairs(model, PROMPTS, reward, 4, seed=4, sampling=sampling) != best
    with pytest.raises(ValueError, match="per_prompt must be an integer in"):
        make_pairs(model, PROMPTS, reward, 1, sampling=sampling)


def test_make_pairs_cli(tmp_path):
    tiny_model("flow").save_pretrained(tmp_path / "m")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cmd = [sys.executable, "-m", "diffalign", "make-pairs", "--model", str(tmp_path / "m"), "--reward", "brightness",
           "--prompts", str(tmp_path / "prompts.txt"), "--n-prompts", "2", "--per-prompt", "3", "--steps", "2",
           "--out", str(tmp_path / "out")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "wrote 2 pairs" in out.stdout
    assert [p.prompt for p in load_pairs(tmp_path / "out")] == PROMPTS[:2]
    from typer.testing import CliRunner

    from diffalign.cli import app

    bad = CliRunner().invoke(app, cmd[3:-2] + ["--split", "train", "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "exactly one of --prompts FILE or --split" in bad.output
    bad = CliRunner().invoke(app, cmd[3:-6] + ["--per-prompt", "1", "--steps", "2", "--out", str(tmp_path / "o3")])
    assert bad.exit_code == 2 and "--per-prompt must be >= 2" in bad.output
