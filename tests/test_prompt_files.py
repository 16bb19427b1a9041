"""Prompt files: one prompt per line, or JSONL lines with conditioning images and a negative
prompt (relative paths resolved against the file's directory); errors name the line and the path."""

import json
import pickle

import pytest

from diffalign.core.prompts import Prompt, negative_prompts
from diffalign.runtime.prompts import PromptsConfig, PromptSource, read_prompt_file


def test_plain_and_jsonl_lines(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    lines = ["a red cube", "# a comment", "", json.dumps({"prompt": "make it red", "image": "imgs/a.png"}),
             json.dumps({"prompt": "merge", "images": ["imgs/a.png", str(tmp_path / "b.png")],
                         "negative_prompt": "blurry"}), json.dumps({"prompt": "no image", "negative_prompt": "ugly"})]
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(lines))
    p = read_prompt_file(f)
    assert p[0] == "a red cube" and type(p[0]) is str
    assert p[1] == Prompt("make it red", [str((tmp_path / "imgs" / "a.png").resolve())])
    assert p[2].images == (str((tmp_path / "imgs" / "a.png").resolve()), str((tmp_path / "b.png").resolve()))
    assert p[2].negative == "blurry" and p[3].negative == "ugly" and not p[3].images
    # prompts stay strings everywhere: JSON, equality with plain text, pickling (multi-process runs)
    assert json.dumps(p[1]) == '"make it red"' and Prompt("x") == "x" and p[1] != "make it red"
    assert pickle.loads(pickle.dumps(p[2])) == p[2]
    neg = negative_prompts(p)
    assert neg[0] == "" and neg[0].unconditional and neg[2] == Prompt("blurry", p[2].images)
    # the training prompt source draws from the same reader
    src = PromptSource(PromptsConfig(file=str(f)))
    assert set(src.sample(20, seed=0)) <= set(p)


@pytest.mark.parametrize("line,message", [
    ({"prompt": "x", "image": "missing.png"}, r"prompts.jsonl:2: image 'missing.png' not found \(looked for .*missing.png\)"),
    ({"prompt": "x", "imgae": "a.png"}, r"prompts.jsonl:2: unknown key\(s\) \['imgae'\]; allowed: \['prompt', 'image'"),
    ({"prompt": 3}, r"prompts.jsonl:2: \"prompt\" must be a string, got 3"),
    ({"prompt": "x", "image": "a.png", "images": ["a.png"]}, r"prompts.jsonl:2: give \"image\" .* not both"),
    ({"prompt": "x", "images": "a.png"}, r"prompts.jsonl:2: \"image\" must be a path and \"images\" a list"),
    ({"prompt": "x", "negative_prompt": None}, r"prompts.jsonl:2: \"negative_prompt\" must be a string"),
])
def test_bad_lines_name_the_line(tmp_path, line, message):
    (tmp_path / "a.png").write_bytes(b"")
    f = tmp_path / "prompts.jsonl"
    f.write_text("first\n" + json.dumps(line) + "\n")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_prompt_file(f)


def test_a_missing_image_fails_before_training(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "x", "image": "gone.png"}\n{not json\n')
    with pytest.raises(FileNotFoundError, match=r"p.jsonl:1: image 'gone.png' not found"):
        PromptSource(PromptsConfig(file=str(f)))
    f.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: not valid JSON"):
        read_prompt_file(f)
    f.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="has no prompts"):
        read_prompt_file(f)
