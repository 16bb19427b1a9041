"""Human preference votes on a pairs directory: the pairs being labelled, the SQLite vote store,
annotator tokens, and the export of votes to JSONL pairs (``diffalign label``).

A pairs directory holds ``pairs.jsonl`` (the layout of :mod:`diffalign.data.pairs`); for labelling,
its ``chosen`` / ``rejected`` fields are just images **a** and **b** of each pair. A vote is one
of ``a``, ``b``, ``tie``, ``skip``; the store keeps at most one vote per (annotator, pair) -- a
``UNIQUE`` constraint, so a retried request can never count twice -- and undo deletes the
annotator's latest vote. The database runs in WAL mode, so readers never block the writer.

Export (majority vote per pair): ``a`` votes against ``b`` votes; more ``a`` -> a chosen, more
``b`` -> b chosen, equal counts (including pairs with only ``tie`` votes) -> ``tie: true`` with a
first. ``tie`` votes are otherwise abstentions; ``skip`` votes and pairs nobody voted on are left
out. Exported lines point at the original images (paths relative to the output file's folder)
and carry ``vote_split`` (votes for the exported chosen / rejected image and ties), which
:func:`diffalign.data.load_pairs` reads as ``PreferencePair.votes`` (minority-aware Adaptive-DPO
weighs disputed pairs by it). ``per_annotator=True`` writes one line per (annotator, decisive
vote) instead, with that annotator alone -- the layout personalised methods group by user.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .pairs import PAIRS_FILE, iter_jsonl_records, resolve_image_path, write_jsonl_records

CHOICES = ("a", "b", "tie", "skip")
NAME_PATTERN = r"[A-Za-z0-9_.@-]{1,64}"

SCHEMA = """
CREATE TABLE IF NOT EXISTS annotators (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- order of votes, for undo; never reused
    annotator TEXT NOT NULL,
    pair_id TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'skip')),
    created_at REAL NOT NULL,
    UNIQUE (annotator, pair_id)
);
"""


class VoteConflict(Exception):
    """The annotator already voted differently on this pair (undo first)."""

    def __init__(self, existing: str):
        super().__init__(f"already voted {existing!r} on this pair; undo it first")
        self.existing = existing


def check_name(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(f"annotator name must match {NAME_PATTERN} (letters, digits, _ . @ -), got {name!r}")
    return name


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def read_tokens_file(path: str | os.PathLike) -> dict[str, str]:
    """``{token: annotator}`` from a file of ``NAME TOKEN`` lines (``#`` comments, blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokens file {str(path)!r} does not exist")
    out: dict[str, str] = {}
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{ln}: expected 'NAME TOKEN', got {len(parts)} fields")
        name, token = check_name(parts[0]), parts[1]
        if len(token) < 16:
            raise ValueError(f"{path}:{ln}: token of {name!r} is {len(token)} characters; use at least 16")
        if token in out:
            raise ValueError(f"{path}:{ln}: token of {name!r} is also the token of {out[token]!r}")
        out[token] = name
    return out


@dataclass(frozen=True)
class LabelPair:
    pair_id: str
    prompt: str
    a: str  # image paths as written in pairs.jsonl
    b: str


class PairSet:
    """The pairs of a pairs directory, without decoding images; ids are the ``id`` field, else the
    0-based line index among pairs. Every image must lie inside the directory."""

    def __init__(self, pairs_dir: str | os.PathLike):
        self.root = Path(pairs_dir).resolve()
        file = self.root / PAIRS_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{str(self.root)!r} holds no {PAIRS_FILE}; make one with `diffalign make-pairs`")
        self.pairs: list[LabelPair] = []
        self.by_id: dict[str, LabelPair] = {}
        self.images: dict[str, Path] = {}  # URL path (relative to root) -> file
        for where, rec in iter_jsonl_records(file):
            pid = rec["id"] if rec["id"] is not None else str(len(self.pairs))
            if pid in self.by_id:
                raise ValueError(f"{where}: pair id {pid!r} is used twice")
            for k in ("chosen", "rejected"):
                img = resolve_image_path(self.root, rec[k]).resolve()
                if not img.is_relative_to(self.root):
                    raise ValueError(f"{where}: {k} image {rec[k]!r} lies outside the pairs directory {self.root}; "
                                     f"the labelling page serves images from that directory only")
                if not img.is_file():
                    raise FileNotFoundError(f"{where}: {k} image {rec[k]!r} not found (looked for {img})")
                self.images[img.relative_to(self.root).as_posix()] = img
            pair = LabelPair(pid, rec["prompt"], self.rel(rec["chosen"]), self.rel(rec["rejected"]))
            self.pairs.append(pair)
            self.by_id[pid] = pair
        if not self.pairs:
            raise ValueError(f"{file} holds no pairs")

    def rel(self, image: str) -> str:
        return resolve_image_path(self.root, image).resolve().relative_to(self.root).as_posix()

    def __len__(self) -> int:
        return len(self.pairs)


class VoteStore:
    """SQLite (WAL) store of annotators and votes; safe to share between threads (one connection
    per thread) and between processes (SQLite's locking; writers wait up to ``timeout`` s)."""

    def __init__(self, db_path: str | os.PathLike, timeout: float = 30.0):
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        con = self.connection()
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise ValueError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); put the database on a local disk")
        con.executescript(SCHEMA)

    def connection(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            # autocommit: each statement is its own transaction; FULL sync: an acknowledged vote survives power loss
            con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            con.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            con.execute("PRAGMA synchronous=FULL")
            self._local.con = con
            with self._lock:
                self._all.append(con)
        return con

    def close(self) -> None:
        with self._lock:
            for con in self._all:
                con.close()
            self._all.clear()
        self._local = threading.local()

    # ---------------------------------------------------------------- annotators
    def add_annotator(self, name: str) -> str:
        """Register ``name`` and return its new token (printed once; the store keeps only its hash)."""
        check_name(name)
        token = secrets.token_urlsafe(24)
        try:
            self.connection().execute("INSERT INTO annotators (name, token_sha256, created_at) VALUES (?, ?, ?)",
                                      (name, token_digest(token), time.time()))
        except sqlite3.IntegrityError:
            raise ValueError(f"annotator {name!r} already exists in {self.path}") from None
        return token

    def annotator_for(self, token: str) -> str | None:
        row = self.connection().execute("SELECT name FROM annotators WHERE token_sha256 = ?",
                                        (token_digest(token),)).fetchone()
        return None if row is None else row[0]

    def annotators(self) -> list[str]:
        return [r[0] for r in self.connection().execute("SELECT name FROM annotators ORDER BY name")]

    # ---------------------------------------------------------------- votes
    def vote(self, annotator: str, pair_id: str, choice: str) -> bool:
        """Record a vote; ``True`` if it was new, ``False`` for a repeat of the same vote (a retry).
        A different earlier vote on the pair raises :class:`VoteConflict`."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {list(CHOICES)}, got {choice!r}")
        con = self.connection()
        for _ in range(2):  # the second round covers an undo between our insert and select
            cur = con.execute("INSERT INTO votes (annotator, pair_id, choice, created_at) VALUES (?, ?, ?, ?) "
                              "ON CONFLICT (annotator, pair_id) DO NOTHING", (annotator, pair_id, choice, time.time()))
            if cur.rowcount == 1:
                return True
            row = con.execute("SELECT choice FROM votes WHERE annotator = ? AND pair_id = ?",
                              (annotator, pair_id)).fetchone()
            if row is not None:
                if row[0] != choice:
                    raise VoteConflict(row[0])
                return False
        raise RuntimeError("vote neither inserted nor found twice in a row")

    def undo(self, annotator: str) -> tuple[str, str] | None:
        """Delete the annotator's latest vote; ``(pair_id, choice)`` of it, or ``None`` if none is left."""
        row = self.connection().execute(
            "DELETE FROM votes WHERE id = (SELECT max(id) FROM votes WHERE annotator = ?) RETURNING pair_id, choice",
            (annotator,)).fetchone()
        return None if row is None else (row[0], row[1])

    def votes_of(self, annotator: str) -> dict[str, str]:
        return dict(self.connection().execute("SELECT pair_id, choice FROM votes WHERE annotator = ?", (annotator,)))

    def all_votes(self) -> list[tuple[str, str, str]]:
        """``(annotator, pair_id, choice)`` of every vote, in the order they were cast."""
        return list(self.connection().execute("SELECT annotator, pair_id, choice FROM votes ORDER BY id"))


class Auth:
    """Token -> annotator: tokens given in memory (``--tokens FILE``) plus tokens registered in the store."""

    def __init__(self, store: VoteStore, tokens: Mapping[str, str] | None = None):
        self.store = store
        self.static = {token_digest(t): check_name(n) for t, n in (tokens or {}).items()}

    def __call__(self, token: str) -> str | None:
        return self.static.get(token_digest(token)) or self.store.annotator_for(token)


def tally(votes: list[tuple[str, str, str]]) -> dict[str, dict[str, Any]]:
    """``pair_id -> {"a", "b", "tie", "skip": counts, "annotators": [names of non-skip voters]}``."""
    out: dict[str, dict[str, Any]] = {}
    for annotator, pid, choice in votes:
        t = out.setdefault(pid, {"a": 0, "b": 0, "tie": 0, "skip": 0, "annotators": []})
        t[choice] += 1
        if choice != "skip":
            t["annotators"].append(annotator)
    return out


def export_votes(pairs_dir: str | os.PathLike, db_path: str | os.PathLike, out: str | os.PathLike, *,
                 per_annotator: bool = False) -> dict[str, int]:
    """Write the majority-vote pairs (module docstring) to ``out`` as JSONL pairs that
    :func:`diffalign.data.load_pairs` reads; or, with ``per_annotator``, each annotator's own
    decisive votes (``a`` / ``b``), one line each. Returns counts of what was written and left out."""
    pairs = PairSet(pairs_dir)
    db_path = Path(db_path)
    if not db_path.is_file():
        raise FileNotFoundError(f"votes database {str(db_path)!r} does not exist")
    store = VoteStore(db_path)
    try:
        votes = store.all_votes()
    finally:
        store.close()
    counts = tally(votes)
    out = Path(out)
    base = out.parent.resolve()

    def rel(image: str) -> str:
        return Path(os.path.relpath(pairs.root / image, base)).as_posix()

    records, ties = [], 0
    if per_annotator:
        for annotator, pid, choice in votes:
            p = pairs.by_id.get(pid)
            if p is None or choice not in ("a", "b"):
                continue
            first, second = (p.b, p.a) if choice == "b" else (p.a, p.b)
            records.append({"prompt": p.prompt, "chosen": rel(first), "rejected": rel(second), "annotator": annotator,
                            "id": pid, "vote_split": {"chosen": 1, "rejected": 0, "tie": 0}})
        write_jsonl_records(records, out)
        return {"pairs": len(records), "ties": 0, "votes": len(votes),
                "left_out": len(votes) - len(records),
                "votes_on_unknown_pairs": sum(pid not in pairs.by_id for _, pid, _ in votes)}
    for p in pairs.pairs:
        t = counts.get(p.pair_id)
        if t is None or t["a"] + t["b"] + t["tie"] == 0:
            continue
        first, second = (p.b, p.a) if t["b"] > t["a"] else (p.a, p.b)
        tie = t["a"] == t["b"]
        ties += tie
        rec: dict[str, Any] = {"prompt": p.prompt, "chosen": rel(first), "rejected": rel(second)}
        if tie:
            rec["tie"] = True
        won, lost = (t["b"], t["a"]) if t["b"] > t["a"] else (t["a"], t["b"])
        rec.update({"annotator": ",".join(sorted(set(t["annotators"]))), "id": p.pair_id,
                    "votes": {k: t[k] for k in ("a", "b", "tie")},
                    "vote_split": {"chosen": won, "rejected": lost, "tie": t["tie"]}})
        records.append(rec)
    write_jsonl_records(records, out)
    return {"pairs": len(records), "ties": ties, "votes": len(votes), "left_out": len(pairs) - len(records),
            "votes_on_unknown_pairs": sum(sum(t[k] for k in CHOICES) for pid, t in counts.items()
                                          if pid not in pairs.by_id)}
