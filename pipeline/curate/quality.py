"""How well a filter found planted noise: precision and recall per rule of `contrast data filter`'s
decisions against what `contrast data synth --noise/--duplicates` planted.

- Score rules (``min_score``, ``top_fraction``) against the swapped captions: precision = swapped pairs
  dropped / pairs dropped, recall = swapped pairs dropped / swapped pairs.
- ``dedup`` against the duplicates: a group is a source pair and its copies; of the A members still there
  when dedup runs, A - 1 are redundant. A group's correct drops are min(dropped in it, A - 1); precision
  = correct / pairs dedup dropped, recall = correct / redundant.
"""
from __future__ import annotations

import io
from collections import Counter, defaultdict
from typing import Any, Mapping

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.curate.filter import DEDUP, MIN_SCORE, TOP_FRACTION

SCORE_RULES = (MIN_SCORE, TOP_FRACTION)


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def planted_quality(dropped_by: Mapping[str, str], planted: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """`dropped_by`: key → the rule that dropped the pair ("" kept), for every embedded pair; `planted`:
    key → {"noise": "caption" | "duplicate", "source": key}. Returns counts, precision and recall per rule."""
    swapped = {k for k, p in planted.items() if p["noise"] == "caption"}
    by_score = {k for k, r in dropped_by.items() if r in SCORE_RULES}
    groups: dict[str, set[str]] = defaultdict(set)
    for k, p in planted.items():
        if p["noise"] == "duplicate":
            groups[p["source"]].update((k, p["source"]))
    by_dedup = {k for k, r in dropped_by.items() if r == DEDUP}
    redundant = correct = 0
    for members in groups.values():
        alive = [k for k in members if k in dropped_by and k not in by_score]
        redundant += max(0, len(alive) - 1)
        correct += min(sum(k in by_dedup for k in alive), max(0, len(alive) - 1))
    hit = len(by_score & swapped)
    kept = [k for k, r in dropped_by.items() if not r]
    return {
        "embedded": len(dropped_by), "kept": len(kept), "dropped": dict(Counter(r for r in dropped_by.values() if r)),
        "swapped_in_pool": _ratio(len(swapped & dropped_by.keys()), len(dropped_by)),
        "swapped_in_kept": _ratio(sum(k in swapped for k in kept), len(kept)),
        "rules": {
            "score": {"against": "swapped captions", "planted": len(swapped), "dropped": len(by_score),
                      "precision": _ratio(hit, len(by_score)), "recall": _ratio(hit, len(swapped))},
            "dedup": {"against": "duplicates", "planted": redundant, "dropped": len(by_dedup),
                      "precision": _ratio(correct, len(by_dedup)), "recall": _ratio(correct, redundant)},
        },
    }


def filter_quality(decisions_url: str, planted_url: str) -> dict[str, Any]:
    """`planted_quality` of a filter's ``decisions.parquet`` against a ``planted_noise.json``."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(str(decisions_url))), columns=["key", "dropped_by"])
    dropped_by = dict(zip(table.column("key").to_pylist(), table.column("dropped_by").to_pylist()))
    planted = storage.read_json(str(planted_url))
    return planted_quality(dropped_by, planted)
