"""Labelling page under load: N annotators vote as fast as they can for S seconds against a real
server (``diffalign label`` in its own process, uvicorn + SQLite WAL); every acknowledged vote
must be in the database exactly once.

Each annotator walks the pairs in its own random order, votes a/b/tie/skip at random, re-sends
every 10th vote (a client retry: must come back ``duplicate`` and add nothing) and undoes every
25th vote (must remove exactly that vote). Prints votes/s and the lost / duplicated counts.

    python benchmarks/bench_label.py                      # 20 annotators, 30 s
    python benchmarks/bench_label.py --annotators 5 --seconds 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

CHOICES = ("a", "b", "tie", "skip")


def write_pairs_dir(folder: Path, n_pairs: int) -> list[str]:
    """A pairs directory of ``n_pairs`` pairs that share two tiny PNGs (the load is on votes, not images)."""
    from PIL import Image

    img = folder / "images"
    img.mkdir(parents=True, exist_ok=True)
    for name, value in (("a.png", 40), ("b.png", 200)):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(img / name)
    ids = [f"pair{i:05d}" for i in range(n_pairs)]
    with (folder / "pairs.jsonl").open("w") as f:
        for pid in ids:
            f.write(json.dumps({"prompt": f"prompt {pid}", "chosen": "images/a.png", "rejected": "images/b.png",
                                "id": pid}) + "\n")
    return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"labelling server at {url} did not come up in {timeout} s")


@contextlib.contextmanager
def server_thread(app):
    """A uvicorn server for ``app`` on a free port in a background thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def server_process(pairs_dir: Path, db: Path, tokens_file: Path):
    """``diffalign label`` in its own process; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "diffalign", "label", str(pairs_dir), "--db", str(db), "--tokens", str(tokens_file),
           "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def annotator_loop(url: str, name: str, token: str, pair_ids: list[str], deadline: float, seed: int) -> dict:
    """One annotator voting until ``deadline``; returns what the server acknowledged."""
    import httpx

    rng = random.Random(seed)
    order = list(pair_ids)
    rng.shuffle(order)
    kept: dict[str, str] = {}  # pair -> choice, for votes acknowledged and not undone
    stack: list[str] = []
    out = {"name": name, "recorded": 0, "requests": 0, "retries_ok": 0, "undos_ok": 0, "errors": [],
           "transport_retries": 0}

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        def post(path: str, body: dict | None = None):
            for _ in range(5):  # a lost response is retried: votes are idempotent
                try:
                    out["requests"] += 1
                    return client.post(path, json=body) if body is not None else client.post(path)
                except httpx.TransportError:
                    out["transport_retries"] += 1
            raise RuntimeError(f"{name}: {path} failed 5 times")

        for i, pid in enumerate(order):
            if time.monotonic() >= deadline:
                break
            choice = rng.choice(CHOICES)
            r = post("/api/vote", {"pair_id": pid, "choice": choice})
            if r.status_code != 200 or r.json().get("status") != "recorded":
                out["errors"].append(f"vote {pid}: {r.status_code} {r.text[:200]}")
                continue
            kept[pid] = choice
            stack.append(pid)
            out["recorded"] += 1
            if i % 10 == 9:  # a client retry of the same vote
                r = post("/api/vote", {"pair_id": pid, "choice": choice})
                if r.status_code == 200 and r.json().get("status") == "duplicate":
                    out["retries_ok"] += 1
                else:
                    out["errors"].append(f"retry {pid}: {r.status_code} {r.text[:200]}")
            if i % 25 == 24:  # undo the vote just cast
                r = post("/api/undo")
                undone = r.json().get("undone") if r.status_code == 200 else None
                if undone == {"pair_id": pid, "choice": choice}:
                    del kept[pid]
                    stack.pop()
                    out["undos_ok"] += 1
                else:
                    out["errors"].append(f"undo after {pid}: {r.status_code} {r.text[:200]}")
    out["kept"] = kept
    return out


def hammer(url: str, tokens: dict[str, str], pair_ids: list[str], seconds: float) -> list[dict]:
    """Every annotator (``{name: token}``) votes in its own thread for ``seconds``."""
    deadline = time.monotonic() + seconds
    results: list[dict] = []
    lock = threading.Lock()

    def run(k: int, name: str, token: str) -> None:
        try:
            res = annotator_loop(url, name, token, pair_ids, deadline, seed=k)
        except Exception as e:  # noqa: BLE001 - reported, and counted as an error
            res = {"name": name, "kept": {}, "errors": [repr(e)], "recorded": 0, "requests": 0, "retries_ok": 0,
                   "undos_ok": 0, "transport_retries": 0}
        with lock:
            results.append(res)

    threads = [threading.Thread(target=run, args=(k, n, t)) for k, (n, t) in enumerate(tokens.items())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def audit(results: list[dict], db_votes: list[tuple[str, str, str]]) -> dict:
    """Compare what the clients were told with what the database holds."""
    acked = {(r["name"], pid): c for r in results for pid, c in r["kept"].items()}
    rows = Counter((a, p) for a, p, _ in db_votes)
    stored = {(a, p): c for a, p, c in db_votes}
    lost = sum(1 for k, c in acked.items() if stored.get(k) != c)
    duplicated = sum(n - 1 for n in rows.values()) + sum(1 for k in stored if k not in acked)
    return {"acknowledged": len(acked), "stored": len(db_votes), "lost": lost, "duplicated": duplicated,
            "errors": sum(len(r["errors"]) for r in results), "retries_ok": sum(r["retries_ok"] for r in results),
            "undos_ok": sum(r["undos_ok"] for r in results),
            "transport_retries": sum(r["transport_retries"] for r in results),
            "requests": sum(r["requests"] for r in results), "recorded": sum(r["recorded"] for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotators", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--pairs", type=int, default=20000)
    args = ap.parse_args()

    from diffalign.data.votes import VoteStore

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ids = write_pairs_dir(tmp / "pairs", args.pairs)
        tokens = {f"annotator{k:02d}": f"token-{k:02d}-{os.urandom(12).hex()}" for k in range(args.annotators)}
        (tmp / "tokens.txt").write_text("".join(f"{n} {t}\n" for n, t in tokens.items()))
        db = tmp / "votes.sqlite"
        with server_process(tmp / "pairs", db, tmp / "tokens.txt") as url:
            t0 = time.monotonic()
            results = hammer(url, tokens, ids, args.seconds)
            wall = time.monotonic() - t0
        store = VoteStore(db)
        a = audit(results, store.all_votes())
        store.close()
    print(f"{args.annotators} annotators x {args.seconds:.0f} s against `diffalign label` (uvicorn, SQLite WAL, "
          f"synchronous=FULL), {os.cpu_count()} CPUs")
    print(f"  requests {a['requests']} in {wall:.1f} s = {a['requests'] / wall:.0f} requests/s; "
          f"votes recorded {a['recorded']} = {a['recorded'] / wall:.0f} votes/s ({a['acknowledged']} kept after undos)")
    print(f"  retries acknowledged as duplicate {a['retries_ok']}, undos {a['undos_ok']}, "
          f"transport retries {a['transport_retries']}, errors {a['errors']}")
    print(f"  lost {a['lost']}  duplicated {a['duplicated']}  (stored {a['stored']} rows)")
    if a["lost"] or a["duplicated"] or a["errors"]:
        for r in results:
            for e in r["errors"][:3]:
                print("  error:", e)
        sys.exit(1)


if __name__ == "__main__":
    main()
