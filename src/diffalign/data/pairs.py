"""Preference pairs: one in-memory type and the file layouts diffalign reads and writes.

A :class:`PreferencePair` is a prompt with a *chosen* and a *rejected* image (``uint8 [H, W, 3]``)
and an optional tie flag, annotator and id. Three sources give pairs:

* **JSONL** (:func:`read_jsonl_pairs` / :func:`write_jsonl_pairs`): one object a line,
  ``{"prompt", "chosen", "rejected"[, "tie", "annotator", "id", "vote_split", "rejected_prompt"]}``;
  ``chosen`` / ``rejected`` are image paths relative to the JSONL file's folder (absolute paths
  are read as they are); ``vote_split`` is ``{"chosen", "rejected", "tie"}`` vote counts.
  ``diffalign make-pairs`` and ``diffalign label --export`` write this layout.
* **Pick-a-Pic v2 parquet** (:func:`read_pickapic_parquet`), the layout of the dataset of
  Kirstain et al. 2023 ("Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image
  Generation") on which Diffusion-DPO (Wallace et al. 2023) trains: ``caption``, ``jpg_0``,
  ``jpg_1`` (encoded image bytes), ``label_0``, ``label_1`` (floats: 1/0 when image 0 won, 0/1
  when image 1 won, 0.5/0.5 for a tie). Read in record batches one row group at a time, so a
  shard of hundreds of MB never sits in memory at once.
* :func:`load_pairs` dispatches on the source: ``.jsonl``, ``.parquet``, or a directory holding
  ``pairs.jsonl`` (else its ``*.parquet`` shards, in name order).

Ties: a tie keeps both images with ``tie=True`` and an arbitrary order (image 0 as ``chosen``
for Pick-a-Pic); trainers skip ties unless told otherwise. See docs/preference_data.md.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..config import atomic_write

PICKAPIC_REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
JSONL_FIELDS = ("prompt", "chosen", "rejected", "tie", "annotator", "id", "vote_split", "rejected_prompt")
PAIRS_FILE = "pairs.jsonl"  # the file a pairs directory holds
UI_HINT = "pip install diffalign[ui]"


def _check_image(name: str, value: Any) -> None:
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3:
        desc = (f"{type(value).__name__} {value.dtype} {value.shape}" if isinstance(value, np.ndarray)
                else type(value).__name__)
        raise ValueError(f"PreferencePair.{name} must be a uint8 numpy array [H, W, 3], got {desc}")


@dataclass(eq=False)
class PreferencePair:
    """A prompt, the image preferred for it and the other one.

    ``tie=True`` marks a tie: the chosen/rejected order is arbitrary, and trainers skip ties unless
    told otherwise. ``annotator`` says who labelled it (a person, or the reward that ranked an
    on-policy pair); ``pair_id`` is a stable id (the labelling page keys votes by it).
    ``votes`` is ``(for chosen, for rejected, tie)`` when several people voted (the labelling
    page's export): how far they agreed. ``rejected_prompt`` is a second caption that describes
    the rejected image (Dual Caption Preference Optimization's distractor caption).
    """

    prompt: str
    chosen: np.ndarray  # uint8 [H, W, 3]
    rejected: np.ndarray  # uint8 [H, W, 3]
    tie: bool = False
    annotator: str | None = None
    pair_id: str | None = None
    votes: tuple[int, int, int] | None = None
    rejected_prompt: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"PreferencePair.prompt must be a str, got {type(self.prompt).__name__}")
        _check_image("chosen", self.chosen)
        _check_image("rejected", self.rejected)
        if not isinstance(self.tie, (bool, np.bool_)):
            raise ValueError(f"PreferencePair.tie must be a bool, got {self.tie!r}")
        self.tie = bool(self.tie)
        for name in ("annotator", "pair_id", "rejected_prompt"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"PreferencePair.{name} must be a str or None, got {v!r}")
        if self.votes is not None:
            self.votes = check_votes(self.votes, "PreferencePair.votes")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PreferencePair):
            return NotImplemented
        return (self.prompt == other.prompt and self.tie == other.tie and self.annotator == other.annotator
                and self.pair_id == other.pair_id and self.votes == other.votes
                and self.rejected_prompt == other.rejected_prompt and np.array_equal(self.chosen, other.chosen)
                and np.array_equal(self.rejected, other.rejected))

    def __repr__(self) -> str:
        return (f"PreferencePair(prompt={self.prompt!r}, chosen={self.chosen.shape}, rejected={self.rejected.shape}, "
                f"tie={self.tie}, annotator={self.annotator!r}, pair_id={self.pair_id!r}, votes={self.votes})")

    def swapped(self) -> "PreferencePair":
        """The same pair with chosen and rejected exchanged (Diffusion-NPO trains on these)."""
        votes = None if self.votes is None else (self.votes[1], self.votes[0], self.votes[2])
        return PreferencePair(self.prompt, self.rejected, self.chosen, self.tie, self.annotator, self.pair_id, votes)

    @property
    def agreement(self) -> float | None:
        """Share of the decisive votes that went to the chosen image (``None`` without votes or
        without a decisive vote): 1 when every voter agreed, near 1/2 for a disputed pair."""
        if self.votes is None or self.votes[0] + self.votes[1] == 0:
            return None
        return self.votes[0] / (self.votes[0] + self.votes[1])


def check_votes(votes: Any, where: str) -> tuple[int, int, int]:
    """``(for chosen, for rejected, tie)`` as non-negative integers; a ``ValueError`` names ``where``."""
    if isinstance(votes, dict):
        votes = [votes.get(k) for k in ("chosen", "rejected", "tie")]
    if (not isinstance(votes, (tuple, list)) or len(votes) != 3
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in votes)):
        raise ValueError(f"{where} must be three counts (for chosen, for rejected, tie) >= 0, got {votes!r}")
    return int(votes[0]), int(votes[1]), int(votes[2])


def decode_image(data: bytes | str | os.PathLike, where: str) -> np.ndarray:
    """Encoded image bytes or an image file -> ``uint8 [H, W, 3]`` (RGB; alpha is dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: cannot decode image ({e})") from e


def encode_png(image: np.ndarray) -> bytes:
    """``uint8 [H, W, 3]`` -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- JSONL

def parse_jsonl_record(line: str, where: str) -> dict[str, Any]:
    """One JSONL pairs line -> its validated fields (image paths still as strings)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; a pair line needs 'prompt', 'chosen', 'rejected' "
                         f"(optional: 'tie', 'annotator', 'id', 'vote_split', 'rejected_prompt')")
    for k in ("prompt", "chosen", "rejected"):
        if not isinstance(rec[k], str) or (k != "prompt" and not rec[k]):
            raise ValueError(f"{where}: field {k!r} must be a {'string' if k == 'prompt' else 'non-empty path'}, "
                             f"got {rec[k]!r}")
    tie = rec.get("tie", False)
    if not isinstance(tie, bool):
        raise ValueError(f"{where}: field 'tie' must be true or false, got {tie!r}")
    for k in ("annotator", "id", "rejected_prompt"):
        if rec.get(k) is not None and not isinstance(rec[k], str):
            raise ValueError(f"{where}: field {k!r} must be a string or null, got {rec[k]!r}")
    split = rec.get("vote_split")  # the labelling export: votes oriented as chosen / rejected / tie
    votes = None if split is None else check_votes(split, f"{where}: field 'vote_split'")
    return {"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"], "tie": tie,
            "annotator": rec.get("annotator"), "id": rec.get("id"), "votes": votes,
            "rejected_prompt": rec.get("rejected_prompt")}


def resolve_image_path(root: Path, rel: str) -> Path:
    """An image path of a pairs file: absolute as given, relative to the file's folder otherwise."""
    p = Path(rel)
    return p if p.is_absolute() else root / p


def iter_jsonl_records(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for every non-blank line of a JSONL pairs file; ``where`` is ``FILE:LINE``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {str(path)!r} does not exist")
    with path.open(encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if line.strip():
                where = f"{path}:{ln}"
                yield where, parse_jsonl_record(line, where)


def read_jsonl_pairs(path: str | os.PathLike) -> Iterator[PreferencePair]:
    """Pairs from a JSONL file, one line at a time (images are decoded as each line is read).

    A line whose image is missing raises ``FileNotFoundError`` naming the file, line and image."""
    path = Path(path)
    for where, rec in iter_jsonl_records(path):
        images = []
        for k in ("chosen", "rejected"):
            img = resolve_image_path(path.parent, rec[k])
            if not img.is_file():
                raise FileNotFoundError(f"{where}: {k} image {rec[k]!r} not found (looked for {img})")
            images.append(decode_image(img, f"{where}: {k} image {rec[k]!r}"))
        yield PreferencePair(rec["prompt"], images[0], images[1], rec["tie"], rec["annotator"], rec["id"],
                             rec["votes"], rec["rejected_prompt"])


def pair_record(pair: PreferencePair, chosen: str, rejected: str) -> dict[str, Any]:
    """The JSONL object of a pair whose images are stored at ``chosen`` / ``rejected``."""
    rec: dict[str, Any] = {"prompt": pair.prompt, "chosen": chosen, "rejected": rejected}
    if pair.tie:
        rec["tie"] = True
    if pair.annotator is not None:
        rec["annotator"] = pair.annotator
    if pair.pair_id is not None:
        rec["id"] = pair.pair_id
    if pair.votes is not None:
        rec["vote_split"] = dict(zip(("chosen", "rejected", "tie"), pair.votes))
    if pair.rejected_prompt is not None:
        rec["rejected_prompt"] = pair.rejected_prompt
    return rec


def write_jsonl_records(records: Iterable[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write JSONL objects atomically (a crash never leaves a half-written file)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def write_jsonl_pairs(pairs: Iterable[PreferencePair], path: str | os.PathLike,
                      image_dir: str | os.PathLike | None = None, *,
                      extra: Sequence[dict[str, Any]] | None = None) -> Path:
    """Write each pair's images as PNGs into ``image_dir`` (default: ``images/`` beside ``path``) and
    the JSONL index to ``path``, with image paths relative to ``path``'s folder. Returns ``path``.

    Images are written first and the index last, each file atomically, so the index never names an
    image that is not on disk. Image names are ``{i:06d}_chosen.png`` / ``{i:06d}_rejected.png``.
    ``extra[i]`` adds fields to line ``i`` (e.g. reward scores); readers ignore unknown fields.
    """
    path = Path(path)
    pairs = list(pairs)
    if extra is not None and len(extra) != len(pairs):
        raise ValueError(f"extra must hold one dict per pair ({len(pairs)}), got {len(extra)}")
    image_dir = Path(image_dir) if image_dir is not None else path.parent / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, PreferencePair):
            raise ValueError(f"pairs[{i}] must be a PreferencePair, got {type(pair).__name__}")
        names = []
        for k in ("chosen", "rejected"):
            file = image_dir / f"{i:06d}_{k}.png"
            png = encode_png(getattr(pair, k))
            atomic_write(file, lambda f, png=png: f.write(png))
            names.append(Path(os.path.relpath(file, path.parent)).as_posix())
        clash = sorted(set(extra[i]) & set(JSONL_FIELDS)) if extra is not None else []
        if clash:
            raise ValueError(f"extra[{i}] may not set the pair fields {clash}")
        records.append({**pair_record(pair, *names), **(extra[i] if extra is not None else {})})
    return write_jsonl_records(records, path)


# ----------------------------------------------------------------------------------- Pick-a-Pic parquet

def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading parquet needs pyarrow ({UI_HINT})") from e
    return pq


def read_pickapic_parquet(path: str | os.PathLike, *, batch_rows: int = 64,
                          limit: int | None = None) -> Iterator[PreferencePair]:
    """Pairs from a Pick-a-Pic v2 parquet shard, streamed ``batch_rows`` rows at a time, row group
    by row group (only the needed columns are read).

    Mapping: ``label_0 > label_1`` -> image 0 chosen; ``label_1 > label_0`` -> image 1 chosen;
    ``label_0 == label_1`` (0.5/0.5) -> ``tie=True`` with image 0 as ``chosen``. Rows whose
    ``has_label`` column (when present) is false carry no preference and are skipped.
    ``annotator`` is ``user_id`` and ``pair_id`` is ``"{image_0_uid}_{image_1_uid}"`` when those
    columns exist (else ``"{file stem}:{row}"``). Missing required columns raise ``ValueError``
    naming them; a null or non-finite label raises ``ValueError`` naming the row.
    """
    if not isinstance(batch_rows, int) or isinstance(batch_rows, bool) or batch_rows < 1:
        raise ValueError(f"batch_rows must be an integer >= 1, got {batch_rows!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be None or an integer >= 0, got {limit!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parquet file {str(path)!r} does not exist")
    pq = _pyarrow_parquet()
    pf = pq.ParquetFile(path)
    present = list(pf.schema_arrow.names)
    missing = [c for c in PICKAPIC_REQUIRED if c not in present]
    if missing:
        raise ValueError(f"{path}: missing Pick-a-Pic column(s) {missing}; the layout needs "
                         f"{list(PICKAPIC_REQUIRED)}, the file has {present}")
    optional = [c for c in ("has_label", "user_id", "image_0_uid", "image_1_uid") if c in present]
    uid = "image_0_uid" in optional and "image_1_uid" in optional
    row, emitted = 0, 0
    for group in range(pf.num_row_groups):
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group],
                                     columns=list(PICKAPIC_REQUIRED) + optional):
            cols = batch.to_pydict()
            for j in range(batch.num_rows):
                if limit is not None and emitted >= limit:
                    return
                where = f"{path}: row {row}"
                row += 1
                if "has_label" in cols and cols["has_label"][j] is False:
                    continue
                l0, l1 = cols["label_0"][j], cols["label_1"][j]
                if l0 is None or l1 is None or not (math.isfinite(l0) and math.isfinite(l1)):
                    raise ValueError(f"{where}: label_0/label_1 must be finite numbers, got {l0!r}/{l1!r}")
                caption = cols["caption"][j]
                if not isinstance(caption, str):
                    raise ValueError(f"{where}: caption must be a string, got {caption!r}")
                im0 = decode_image(cols["jpg_0"][j] or b"", f"{where}: jpg_0")
                im1 = decode_image(cols["jpg_1"][j] or b"", f"{where}: jpg_1")
                chosen, rejected = (im1, im0) if l1 > l0 else (im0, im1)
                user = cols["user_id"][j] if "user_id" in cols else None
                pid = (f"{cols['image_0_uid'][j]}_{cols['image_1_uid'][j]}" if uid else f"{path.stem}:{row - 1}")
                emitted += 1
                yield PreferencePair(caption, chosen, rejected, tie=l0 == l1,
                                     annotator=None if user is None else str(user), pair_id=pid)


# ------------------------------------------------------------------------------------------- dispatch

def load_pairs(source: str | os.PathLike) -> list[PreferencePair]:
    """All pairs of ``source``: a ``.jsonl`` file, a ``.parquet`` file (Pick-a-Pic v2 layout), or a
    directory holding ``pairs.jsonl`` (else ``*.parquet`` shards, read in name order)."""
    source = Path(source)
    if source.is_dir():
        if (source / PAIRS_FILE).is_file():
            return list(read_jsonl_pairs(source / PAIRS_FILE))
        shards = sorted(source.glob("*.parquet"))
        if not shards:
            raise FileNotFoundError(f"pairs directory {str(source)!r} holds neither {PAIRS_FILE} nor *.parquet files")
        return [p for shard in shards for p in read_pickapic_parquet(shard)]
    if not source.exists():
        raise FileNotFoundError(f"pairs source {str(source)!r} does not exist")
    if source.suffix == ".jsonl":
        return list(read_jsonl_pairs(source))
    if source.suffix == ".parquet":
        return list(read_pickapic_parquet(source))
    raise ValueError(f"pairs source {str(source)!r}: expected a .jsonl file, a .parquet file (Pick-a-Pic v2 layout) "
                     f"or a directory holding {PAIRS_FILE}, got suffix {source.suffix!r}")
