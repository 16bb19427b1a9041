"""Preference data: the :class:`PreferencePair` type, JSONL and Pick-a-Pic v2 parquet readers,
on-policy pair generation (:mod:`diffalign.data.make_pairs`) and the labelling web page
(:mod:`diffalign.data.label_app`, ``diffalign label``). Layouts: docs/preference_data.md.
"""

from __future__ import annotations

from .pairs import (PreferencePair, load_pairs, read_jsonl_pairs, read_pickapic_parquet,
                    write_jsonl_pairs)

__all__ = ["PreferencePair", "load_pairs", "read_jsonl_pairs", "read_pickapic_parquet", "write_jsonl_pairs"]
