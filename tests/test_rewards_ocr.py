"""OCR reward: quoted-text extraction, Flow-GRPO's edit-distance score, and RapidOCR (its models ship
inside the wheel) reading text rendered with PIL."""

import pytest
import torch

from diffalign import rewards
from diffalign.data import prompt_sets
from diffalign.rewards.ocr import edit_distance, ocr_score, quoted_text, render_text


@pytest.mark.parametrize("prompt,text", [
    ('A sign that says "OPEN 24/7" on a door', "OPEN 24/7"),
    ("A banner reading \u201cHappy Birthday\u201d in gold", "Happy Birthday"),
    ("Une affiche \u00abBonjour\u00bb", "Bonjour"),
    ("Ein Schild \u201eAchtung\u201c", "Achtung"),
    ("a mug with \u2018Coffee First\u2019 printed", "Coffee First"),
    ("a neon sign 'Bar' above the door", "Bar"),
    ("the dog's collar tag says 'Rex'", "Rex"),  # the apostrophe is not a quote
    ('first "one" then "two"', "one"),  # the first quoted span, as Flow-GRPO takes it
    ("\u300cHello\u300d on a lantern", "Hello"),
])
def test_quoted_text_styles(prompt, text):
    assert quoted_text(prompt) == text


@pytest.mark.parametrize("prompt", ["a cat on a sofa", "the dog's bowl", 'an empty sign ""', "it's Tom's"])
def test_no_quote_is_a_clear_error(prompt):
    with pytest.raises(ValueError, match="ocr: "):
        quoted_text(prompt)


def test_edit_distance_and_score_on_known_strings():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3 and edit_distance("ab", "ab") == 0
    assert edit_distance("flaw", "lawn") == edit_distance("lawn", "flaw") == 2
    assert ocr_score("Hello World", "hello world") == 1.0  # case and spaces ignored
    assert ocr_score("xx HELLO yy", "hello") == 1.0  # the target inside what was read: distance 0
    assert ocr_score("helo", "hello") == pytest.approx(1 - 1 / 5)
    assert ocr_score("", "hello") == 0.0
    assert ocr_score("a completely different and much longer text", "hello") == 0.0  # capped at |t|
    with pytest.raises(ValueError, match="no characters"):
        ocr_score("x", "   ")


def test_reward_with_a_stub_engine_and_meta():
    seen = []

    def engine(image):
        seen.append(image.shape)
        return [("Grand", 0.9), ("Opening", 0.8), ("noise", 0.0)]

    r = rewards.get("ocr", engine=engine)
    meta = [{}, {}]
    out = r(torch.rand(2, 3, 20, 30), ['a shop with "Grand Opening" banner', 'a card saying "Grand Openings"'], meta)
    assert seen == [(20, 30, 3)] * 2
    assert out.tolist() == pytest.approx([1.0, 1 - 1 / 13]) and not r.differentiable
    assert meta[0]["ocr"] == {"target": "Grand Opening", "read": "GrandOpening"}
    with pytest.raises(ValueError, match="quotes no text"):
        r(torch.rand(1, 3, 8, 8), ["no quotes here"])
    assert len(seen) == 2  # the prompt is checked before any OCR runs


def test_rapidocr_reads_rendered_text():
    prompts = prompt_sets.load("ocr/test")[:4]
    images = torch.stack([render_text(quoted_text(p), size=256, font_size=28, seed=i) for i, p in enumerate(prompts)])
    r = rewards.get("ocr", threads=1)
    scores = r(images, prompts)
    assert scores.min() >= 0.8 and scores.mean() >= 0.9, scores
    wrong = r(images, ['a sign "Zebra Quartz Jukebox"'] * 4)
    assert wrong.max() <= 0.5, wrong
