"""The labelling page: tokens, votes, undo, images, export; under concurrent load; in a real browser."""

import importlib.util
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("jinja2")
pytest.importorskip("python_multipart")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from diffalign.data import PreferencePair, load_pairs, write_jsonl_pairs  # noqa: E402
from diffalign.data.label_app import create_app, left_first  # noqa: E402
from diffalign.data.votes import PairSet, VoteStore, export_votes, read_tokens_file  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_label.py"
TOKENS = {"tok-alice-0123456789abcdef": "alice", "tok-bob-0123456789abcdef00": "bob",
          "tok-carol-0123456789abcdef0": "carol"}
ALICE = {"Authorization": "Bearer tok-alice-0123456789abcdef"}


def bench():
    spec = importlib.util.spec_from_file_location("bench_label", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_pairs_dir(folder, n=5):
    rng = np.random.default_rng(0)
    pairs = [PreferencePair(f"prompt {i}", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8),
                            rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), pair_id=f"p{i}") for i in range(n)]
    write_jsonl_pairs(pairs, folder / "pairs.jsonl")
    return pairs


@pytest.fixture
def setup(tmp_path):
    pairs = make_pairs_dir(tmp_path / "pairs")
    app = create_app(tmp_path / "pairs", tmp_path / "votes.sqlite", TOKENS)
    with TestClient(app) as client:
        yield client, pairs, tmp_path


def vote(client, pid, choice, headers=ALICE):
    return client.post("/api/vote", json={"pair_id": pid, "choice": choice}, headers=headers)


def test_no_token_is_401_and_a_bad_token_403(setup):
    client, _, _ = setup
    for method, path in [("get", "/"), ("get", "/api/next"), ("get", "/pair/p0"),
                         ("get", "/images/images/000000_chosen.png"), ("post", "/api/undo"), ("post", "/undo")]:
        assert getattr(client, method)(path).status_code == 401, path
        assert getattr(client, method)(path, headers={"Authorization": "Bearer wrong-token"}).status_code == 403, path
        assert getattr(client, method)(path, headers=ALICE).status_code in (200, 303), path
    assert vote(client, "p0", "a", headers={}).status_code == 401
    assert vote(client, "p0", "a", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.post("/vote", data={"pair_id": "p0", "choice": "a"}).status_code == 401
    assert client.get("/health").json() == {"ok": True, "pairs": 5}  # no token needed
    page = client.get("/", headers={"accept": "text/html"})  # a browser gets a page that says what to do
    assert page.status_code == 401 and "?token=" in page.text and 'data-status="401"' in page.text
    # nothing was recorded by the refused requests
    assert VoteStore(setup[2] / "votes.sqlite").all_votes() == []


def test_login_link_sets_a_cookie_and_the_page_shows_the_next_pair(setup):
    client, pairs, _ = setup
    r = client.get("/?token=tok-bob-0123456789abcdef00", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = client.get("/")  # the cookie alone authenticates now
    assert page.status_code == 200 and "prompt 0" in page.text and ">bob<" in page.text and "0 / 5" in page.text
    # the form votes and redirects to the next pair
    left_key = "a" if left_first("bob", "p0") else "b"
    r = client.post("/vote", data={"pair_id": "p0", "choice": left_key}, follow_redirects=False)
    assert r.status_code == 303
    page = client.get("/")
    assert "prompt 1" in page.text and "1 / 5" in page.text
    assert client.get("/api/next").json()["pair_id"] == "p1"


def test_images_are_served_only_from_the_pairs_file(setup):
    client, pairs, tmp = setup
    r = client.get("/images/images/000000_chosen.png", headers=ALICE)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    from PIL import Image
    import io
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), pairs[0].chosen)
    (tmp / "pairs" / "secret.txt").write_text("no")
    shutil.copy(tmp / "votes.sqlite", tmp / "pairs" / "votes.sqlite")
    for path in ["/images/..%2Fvotes.sqlite", "/images/%2E%2E/votes.sqlite", "/images/images/..%2F..%2Fvotes.sqlite",
                 "/images/pairs.jsonl", "/images/secret.txt", "/images/votes.sqlite", "/images/%2Fetc%2Fpasswd",
                 "/images//etc/passwd", "/images/images/../pairs.jsonl", "/images/images/missing.png"]:
        assert client.get(path, headers=ALICE).status_code == 404, path


def test_votes_unknown_pairs_duplicates_conflicts_and_undo(setup):
    client, _, tmp = setup
    assert vote(client, "nope", "a").status_code == 404
    assert client.get("/pair/nope", headers=ALICE).status_code == 404
    assert client.post("/vote", data={"pair_id": "nope", "choice": "a"}, headers=ALICE).status_code == 404
    assert vote(client, "p0", "left").status_code == 422
    assert client.post("/api/vote", json={"pair_id": "p0"}, headers=ALICE).status_code == 422
    assert vote(client, "p0", "a").json()["status"] == "recorded"
    assert vote(client, "p0", "a").json()["status"] == "duplicate"  # a retry is stored once
    r = vote(client, "p0", "b")
    assert r.status_code == 409 and "undo" in r.json()["detail"]
    assert vote(client, "p1", "skip").json()["status"] == "recorded"
    shown = client.get("/pair/p0", headers=ALICE).text  # a voted pair shows the vote on its image
    assert "your vote on this pair: a" in shown
    side = "left" if left_first("alice", "p0") else "right"
    assert f'value="a" id="{side}"\n                class="current"' in shown
    bob = {"Authorization": "Bearer tok-bob-0123456789abcdef00"}
    assert vote(client, "p0", "b", headers=bob).json()["status"] == "recorded"  # votes are per annotator
    store = VoteStore(tmp / "votes.sqlite")
    assert store.all_votes() == [("alice", "p0", "a"), ("alice", "p1", "skip"), ("bob", "p0", "b")]
    # undo removes one's own latest vote only, then the one before
    assert client.post("/api/undo", headers=ALICE).json() == {"undone": {"pair_id": "p1", "choice": "skip"}}
    assert client.get("/api/next", headers=ALICE).json()["pair_id"] == "p1"
    assert client.post("/api/undo", headers=ALICE).json() == {"undone": {"pair_id": "p0", "choice": "a"}}
    assert client.post("/api/undo", headers=ALICE).json() == {"undone": None}
    assert vote(client, "p0", "b").json()["status"] == "recorded"  # after undo, a new vote is allowed
    assert store.all_votes() == [("bob", "p0", "b"), ("alice", "p0", "b")]
    # the form undo sends the annotator back to the pair they undid
    r = client.post("/undo", headers=ALICE, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/pair/p0"
    store.close()


def test_display_order_is_shuffled_per_annotator_and_pair(setup):
    client, _, _ = setup
    flips = [left_first(n, f"p{i}") for n in ("alice", "bob", "carol") for i in range(40)]
    assert 0.3 < np.mean(flips) < 0.7  # both orders occur
    nxt = client.get("/api/next", headers=ALICE).json()
    assert {nxt["left"]["key"], nxt["right"]["key"]} == {"a", "b"}
    assert (nxt["left"]["key"] == "a") == left_first("alice", "p0")
    assert client.get("/api/next", headers=ALICE).json() == nxt  # stable across requests


def test_tokens_added_while_running_and_tokens_files(setup):
    client, _, tmp = setup
    store = VoteStore(tmp / "votes.sqlite")
    token = store.add_annotator("dave")
    assert vote(client, "p0", "tie", headers={"Authorization": f"Bearer {token}"}).json()["status"] == "recorded"
    with pytest.raises(ValueError, match="already exists"):
        store.add_annotator("dave")
    with pytest.raises(ValueError, match="annotator name must match"):
        store.add_annotator("no spaces")
    assert store.annotators() == ["dave"]
    # the database keeps only token hashes
    con = sqlite3.connect(tmp / "votes.sqlite")
    assert token not in json.dumps(con.execute("SELECT * FROM annotators").fetchall())
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    store.close()
    f = tmp / "tokens.txt"
    f.write_text("# name token\nalice   aaaaaaaaaaaaaaaaaaaa\n\nbob bbbbbbbbbbbbbbbbbbbbb  # comment\n")
    assert read_tokens_file(f) == {"aaaaaaaaaaaaaaaaaaaa": "alice", "bbbbbbbbbbbbbbbbbbbbb": "bob"}
    for text, msg in [("alice short\n", "at least 16"), ("alice\n", "expected 'NAME TOKEN'"),
                      ("a b c\n", "expected 'NAME TOKEN'"), ("al!ce aaaaaaaaaaaaaaaaaaaa\n", "name must match"),
                      ("a aaaaaaaaaaaaaaaaaaaa\nb aaaaaaaaaaaaaaaaaaaa\n", "also the token of")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=msg):
            read_tokens_file(f)


def test_pairs_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no pairs.jsonl"):
        PairSet(tmp_path)
    make_pairs_dir(tmp_path / "d", 2)
    outside = tmp_path / "outside.png"
    shutil.copy(tmp_path / "d" / "images" / "000000_chosen.png", outside)
    lines = (tmp_path / "d" / "pairs.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    (tmp_path / "d" / "pairs.jsonl").write_text(lines[0] + "\n" + json.dumps({**rec, "chosen": "../outside.png"}))
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: chosen image '\.\./outside\.png' lies outside"):
        PairSet(tmp_path / "d")
    (tmp_path / "d" / "pairs.jsonl").write_text(lines[0] + "\n" + json.dumps({**rec, "id": "p0"}))
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: pair id 'p0' is used twice"):
        PairSet(tmp_path / "d")


def test_export_is_the_majority_vote_and_reads_back_as_pairs(setup):
    client, pairs, tmp = setup
    heads = {n: {"Authorization": f"Bearer {t}"} for t, n in TOKENS.items()}
    votes = {"p0": ["a", "a", "b"], "p1": ["b", "b", "tie"], "p2": ["a", "b", "skip"], "p3": ["tie", "skip"],
             "p4": ["skip"]}
    for pid, choices in votes.items():
        for name, c in zip(("alice", "bob", "carol"), choices):
            assert vote(client, pid, c, headers=heads[name]).json()["status"] == "recorded"
    summary = export_votes(tmp / "pairs", tmp / "votes.sqlite", tmp / "out" / "labelled.jsonl")
    assert summary == {"pairs": 4, "ties": 2, "votes": 12, "left_out": 1, "votes_on_unknown_pairs": 0}
    got = load_pairs(tmp / "out" / "labelled.jsonl")
    p = {q.pair_id: q for q in pairs}
    assert [g.pair_id for g in got] == ["p0", "p1", "p2", "p3"]
    assert got[0] == PreferencePair("prompt 0", p["p0"].chosen, p["p0"].rejected, annotator="alice,bob,carol",
                                    pair_id="p0", votes=(2, 1, 0))
    assert got[1] == PreferencePair("prompt 1", p["p1"].rejected, p["p1"].chosen, annotator="alice,bob,carol",
                                    pair_id="p1", votes=(2, 0, 1))  # b won: the file's second image is now chosen
    assert got[0].agreement == pytest.approx(2 / 3) and got[1].agreement == 1.0 and got[2].votes == (1, 1, 0)
    assert got[2].tie and got[2].annotator == "alice,bob" and np.array_equal(got[2].chosen, p["p2"].chosen)
    assert got[3].tie and got[3].annotator == "alice"
    line = json.loads((tmp / "out" / "labelled.jsonl").read_text().splitlines()[0])
    assert line["votes"] == {"a": 2, "b": 1, "tie": 0} and line["chosen"].startswith("../pairs/images/")


def test_per_annotator_export_keeps_each_voters_own_choice(tmp_path):
    pairs = make_pairs_dir(tmp_path / "pairs", 3)
    store = VoteStore(tmp_path / "v.sqlite")
    for name, pid, choice in [("alice", "p0", "a"), ("bob", "p0", "b"), ("alice", "p1", "tie"), ("bob", "p2", "skip"),
                              ("carol", "p2", "b")]:
        store.vote(name, pid, choice)
    store.close()
    s = export_votes(tmp_path / "pairs", tmp_path / "v.sqlite", tmp_path / "per.jsonl", per_annotator=True)
    assert s["pairs"] == 3 and s["left_out"] == 2
    got = load_pairs(tmp_path / "per.jsonl")
    assert [(g.annotator, g.pair_id, g.votes) for g in got] == [("alice", "p0", (1, 0, 0)), ("bob", "p0", (1, 0, 0)),
                                                                ("carol", "p2", (1, 0, 0))]
    assert np.array_equal(got[0].chosen, pairs[0].chosen) and np.array_equal(got[1].chosen, pairs[0].rejected)
    assert np.array_equal(got[2].chosen, pairs[2].rejected)


def test_label_cli_adds_annotators_and_exports(tmp_path):
    from typer.testing import CliRunner

    from diffalign.cli import app

    make_pairs_dir(tmp_path / "pairs", 3)
    base = ["label", str(tmp_path / "pairs"), "--db", str(tmp_path / "v.sqlite")]
    out = CliRunner().invoke(app, base + ["--port", "1"])
    assert out.exit_code == 2 and "no annotators" in out.output
    out = CliRunner().invoke(app, base + ["--add-annotator", "erin"])
    assert out.exit_code == 0, out.output
    token = out.stdout.strip()
    store = VoteStore(tmp_path / "v.sqlite")
    assert store.annotator_for(token) == "erin"
    store.vote("erin", "p2", "b")
    store.close()
    out = CliRunner().invoke(app, base + ["--export", str(tmp_path / "e.jsonl")])
    assert out.exit_code == 0 and "wrote 1 pairs (0 ties)" in out.stdout, out.output
    assert [p.pair_id for p in load_pairs(tmp_path / "e.jsonl")] == ["p2"]
    out = CliRunner().invoke(app, base + ["--export", str(tmp_path / "u.jsonl"), "--per-annotator"])
    assert out.exit_code == 0 and "wrote 1 per-annotator pairs" in out.stdout, out.output
    assert [p.annotator for p in load_pairs(tmp_path / "u.jsonl")] == ["erin"]
    # the one real process start: the console entry point
    out = subprocess.run([sys.executable, "-m", "diffalign", "label", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--add-annotator" in out.stdout


@pytest.mark.slow
def test_twenty_concurrent_annotators_lose_and_duplicate_no_vote(tmp_path):
    b = bench()
    ids = b.write_pairs_dir(tmp_path / "pairs", 3000)
    tokens = {f"a{k:02d}": f"token-{k:02d}-abcdefghijklmnop" for k in range(20)}
    app = create_app(tmp_path / "pairs", tmp_path / "votes.sqlite", {t: n for n, t in tokens.items()})
    with b.server_thread(app) as url:  # a real uvicorn server on a real socket
        results = b.hammer(url, tokens, ids, seconds=3.0)
    store = VoteStore(tmp_path / "votes.sqlite")
    a = b.audit(results, store.all_votes())
    store.close()
    assert a["errors"] == 0, [e for r in results for e in r["errors"]][:5]
    assert a["lost"] == 0 and a["duplicated"] == 0
    assert a["stored"] == a["acknowledged"] > 20  # every annotator got votes through
    assert all(r["recorded"] > 0 for r in results)
    assert a["retries_ok"] > 0 and a["undos_ok"] >= 0


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_the_page_in_a_real_browser_votes_by_click_and_key_undoes_and_exports(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    b = bench()
    pairs = make_pairs_dir(tmp_path / "pairs", 4)
    app = create_app(tmp_path / "pairs", tmp_path / "votes.sqlite", TOKENS)
    with b.server_thread(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{url}/")
            assert "401" in page.inner_text("#error")  # no token, no page
            page.goto(f"{url}/?token=tok-alice-0123456789abcdef")
            assert page.url == f"{url}/"  # the token left the address bar for a cookie

            def showing():
                return page.get_attribute(".pair", "data-pair-id"), page.inner_text("#prompt")

            def left_key():
                return page.get_attribute("#left img", "data-key")

            # the images really load (served through the token cookie)
            assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth === 6)")
            assert showing() == ("p0", "prompt 0") and "0 / 4" in page.inner_text("#progress")
            expected = {}
            expected["p0"] = left_key()
            with page.expect_navigation():
                page.click("#left")  # a click on the left image
            assert showing() == ("p1", "prompt 1") and "1 / 4" in page.inner_text("#progress")
            right = "b" if left_key() == "a" else "a"
            with page.expect_navigation():
                page.keyboard.press("ArrowRight")  # a key press for the right image
            expected["p1"] = right
            assert showing()[0] == "p2"
            with page.expect_navigation():
                page.keyboard.press("t")  # tie by key
            expected["p2"] = "tie"
            assert showing()[0] == "p3" and "3 / 4" in page.inner_text("#progress")
            with page.expect_navigation():
                page.click("#undo")  # undo the tie: back on p2
            del expected["p2"]
            assert showing()[0] == "p2" and "2 / 4" in page.inner_text("#progress")
            expected["p2"] = left_key()
            assert expected["p2"] == ("a" if left_first("alice", "p2") else "b")  # the page shows the server's order
            with page.expect_navigation():
                page.keyboard.press("ArrowLeft")
            with page.expect_navigation():
                page.keyboard.press("s")  # skip p3
            assert page.inner_text("#done").startswith("All 4 pairs are labelled")
            with page.expect_navigation():
                page.keyboard.press("u")  # undo by key: the skip goes, p3 is shown again
            assert showing()[0] == "p3"
        finally:
            browser.close()
    store = VoteStore(tmp_path / "votes.sqlite")
    stored = {p: c for _, p, c in store.all_votes()}
    store.close()
    assert stored == expected
    export_votes(tmp_path / "pairs", tmp_path / "votes.sqlite", tmp_path / "labelled.jsonl")
    got = {p.pair_id: p for p in load_pairs(tmp_path / "labelled.jsonl")}
    assert sorted(got) == ["p0", "p1", "p2"]
    for pid, choice in expected.items():
        src = pairs[int(pid[1])]
        want = (src.chosen, src.rejected) if choice == "a" else (src.rejected, src.chosen)
        assert np.array_equal(got[pid].chosen, want[0]) and np.array_equal(got[pid].rejected, want[1]), pid
        assert got[pid].annotator == "alice" and not got[pid].tie


def test_the_load_audit_counts_lost_and_duplicated_votes():
    b = bench()
    results = [{"name": "x", "kept": {"p0": "a", "p1": "b", "p2": "tie"}, "errors": [], "recorded": 3, "requests": 3,
                "retries_ok": 0, "undos_ok": 0, "transport_retries": 0}]
    ok = b.audit(results, [("x", "p0", "a"), ("x", "p1", "b"), ("x", "p2", "tie")])
    assert ok["lost"] == 0 and ok["duplicated"] == 0
    bad = b.audit(results, [("x", "p0", "a"), ("x", "p1", "a"), ("x", "p0", "a"), ("x", "p9", "skip")])
    assert bad["lost"] == 2  # p1 stored with another choice, p2 missing
    assert bad["duplicated"] == 2  # p0 twice, p9 never acknowledged
