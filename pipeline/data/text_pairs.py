"""Text pairs for text–text training: the stream's rows and batches, and `contrast data pack --jsonl`.

A text pair is a query, its positive passage and optional hard-negative passages, stored in the same
WebDataset layout as image-text samples: ``KEY.query.txt``, ``KEY.pos.txt``, ``KEY.neg.json`` (rules in
`pipeline.data.samples`). The stream reads them through `TextPairRows`, so the stream's guarantees (the
same batches at any world size, exact resume, bad rows skipped and counted) are the image stream's.

Hard negatives per row: a batch carries exactly `data.hard_negatives` = k of them per row (every rank
must gather the same shape). A pair with more keeps k drawn without replacement, one with fewer but
some repeats its own (each once before any twice), and one with none is skipped and counted as
``missing_negatives``. The draw is seeded by the pair's place in the stream, like image augmentation.

Duplicates (`loss.duplicates: mask`): a batch's "caption_id" holds two ids per row, its query's and its
positive's (`samples.caption_id`: equal after NFKC, case folding and whitespace). Two rows sharing either
one are not each other's negatives, in both directions and for every loss (transitively: the loss groups
rows that share any id); their hard negatives stay negatives (a row's own negatives are never masked).

The JSONL input is what sentence-transformers, FlagEmbedding and tevatron users have: one object a line,
``{"query": str, "pos": str or [str, ...], "neg": [str, ...]}`` (an ``id`` or ``_id`` field names the key).
A list of positives keeps its first one (counted as ``extra_positives_dropped``: several rows of one
query in a batch would be each other's false negatives).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from pipeline import storage
from pipeline.data.mixture import DEFAULT_SOURCE
from pipeline.data.pack import TOKENIZER_CAPTIONS, PackSummary, safe_key
from pipeline.data.samples import NEGATIVES, POSITIVE, QUERY, BadSample, TextPair, caption_id, validate_text_pair
from pipeline.data.shards import DataError, ShardWriter
from pipeline.data.tokenizer import Tokenizer, train_tokenizer
from pipeline.layout import TOKENIZER
from pipeline.log import get_logger, progress_bar

log = get_logger(__name__)

FORMAT = "text_pairs"


# ------------------------------------------------------------------------------------ the stream's rows
@dataclass
class TextRow:
    """A decoded text pair, one row of a batch: exactly k hard negatives chosen."""
    key: str
    query: str
    pos: str
    negatives: list[str]
    source: str = DEFAULT_SOURCE


def choose_negatives(negatives: Sequence[str], k: int, rng: random.Random) -> list[str]:
    """k of a pair's hard negatives: drawn without replacement, repeated in a shuffled cycle when fewer.
    BadSample("missing_negatives") when k > 0 and there are none."""
    if k == 0:
        return []
    if not negatives:
        raise BadSample("missing_negatives", f"data.hard_negatives = {k} but the pair has no neg.json")
    if len(negatives) >= k:
        return rng.sample(list(negatives), k)
    order = rng.sample(list(negatives), len(negatives))
    return [order[i % len(order)] for i in range(k)]


@dataclass(frozen=True)
class TextPairRows:
    """How the stream reads text pairs: validate raw members, pick each row's negatives, tokenise a batch.

    Batch: "key" (list), "query" (n×L ids), "pos" (n×L), "caption_id" (n×2: `caption_id` of the query
    and of the positive; the loss's duplicate mask), "source" (list), and with k > 0 hard negatives
    "neg" (n×k×L).
    """
    hard_negatives: int = 0

    def validate(self, key: str, members: dict[str, bytes], shard: str) -> TextPair:
        pair = validate_text_pair(key, members, shard)
        if self.hard_negatives and not pair.negatives:
            raise BadSample("missing_negatives", f"data.hard_negatives = {self.hard_negatives} but the pair has none")
        return pair

    def decode(self, sample: TextPair, rng: random.Random) -> TextRow:
        return TextRow(sample.key, sample.query, sample.pos,
                       choose_negatives(sample.negatives, self.hard_negatives, rng))

    def collate(self, rows: Sequence[TextRow], tokenizer: Tokenizer) -> dict[str, Any]:
        batch: dict[str, Any] = {"key": [r.key for r in rows], "query": tokenizer([r.query for r in rows]),
                                 "pos": tokenizer([r.pos for r in rows]),
                                 "caption_id": torch.tensor([[caption_id(r.query), caption_id(r.pos)] for r in rows],
                                                            dtype=torch.long),
                                 "source": [r.source for r in rows]}
        if self.hard_negatives:
            negatives = tokenizer([n for r in rows for n in r.negatives])
            batch["neg"] = negatives.view(len(rows), self.hard_negatives, -1)
        return batch


# --------------------------------------------------------------------------------------- packing
def jsonl_pairs(url: str) -> Iterator[tuple[str, Optional[dict[str, bytes]], str, str]]:
    """(key, members or None, source, reason) per line of a JSONL file of pairs; members are a sample's
    tar members, or None with the reason the line cannot be one."""
    with storage.open_url(url, "rb") as f:
        for i, line in enumerate(f):
            source = f"line {i + 1}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                yield f"{i:09d}", None, source, "bad_json"
                continue
            if not isinstance(record, dict):
                yield f"{i:09d}", None, source, "bad_json"
                continue
            name = record.get("id", record.get("_id"))
            key = safe_key(str(name)) if name is not None else f"{i:09d}"
            yield key, *_members(record, source)


def _members(record: dict, source: str) -> tuple[Optional[dict[str, bytes]], str, str]:
    """(members, source, "") or (None, source, reason); a list of positives keeps its first (noted)."""
    pos, note = record.get("pos"), ""
    if isinstance(pos, list):
        note = "extra_positives_dropped" if len(pos) > 1 else ""
        pos = pos[0] if pos else None
    negatives = record.get("neg", [])
    negatives = [negatives] if isinstance(negatives, str) else negatives
    members = {}
    for name, value in ((QUERY, record.get("query")), (POSITIVE, pos)):
        if isinstance(value, str):
            members[name] = value.encode("utf-8")
    if negatives:
        members[NEGATIVES] = json.dumps(negatives, ensure_ascii=False).encode("utf-8")
    return members, source, note


def pack_jsonl(url: str, out: str, *, shard_size: int = 1000, vocab_size: int = 8192,
               progress: bool = True) -> PackSummary:
    """Check and write the pairs of a JSONL file into text-pair shards at `out`, then tokenizer.json
    (trained on the queries and positives, for models without a tokenizer of their own), then manifest.json.
    Lines that fail `validate_text_pair` (the stream's rules) and duplicate keys are skipped and counted."""
    summary = PackSummary(str(out))
    seen: set[str] = set()
    texts: list[str] = []
    dropped = 0
    with ShardWriter(out, shard_size) as writer:
        for key, members, source, reason in progress_bar(jsonl_pairs(url), enabled=progress, desc="pack", unit="pair"):
            if members is None or key in seen:
                summary.skip(reason if members is None else "duplicate_key", source)
                continue
            try:
                pair = validate_text_pair(key, members, url)
            except BadSample as e:
                summary.skip(e.reason, source)
                continue
            dropped += reason == "extra_positives_dropped"       # a note, not a skip
            seen.add(key)
            writer.write(key, members)
            if len(texts) < TOKENIZER_CAPTIONS:
                texts += [pair.query, pair.pos]
        if not seen:
            raise DataError(f"nothing to pack from {url}: every line was skipped ({dict(summary.skipped)}); expected "
                            'JSON lines {"query": "...", "pos": "...", "neg": ["...", ...]}')
        writer.flush()
        train_tokenizer(texts, vocab_size=vocab_size).save(storage.join(out, TOKENIZER))
        manifest = writer.close(created_by="contrast data pack --jsonl", format=FORMAT, source=url,
                                skipped=dict(summary.skipped))
    if dropped:
        log.warning("%d lines listed several positives: kept the first of each (one row per query)", dropped)
    summary.written = manifest["samples"]
    summary.shards = len(manifest["shards"])
    summary.bytes = sum(s["bytes"] for s in manifest["shards"])
    return summary


def write_pairs(out: str, pairs: Sequence[dict[str, Any]], *, shard_size: int = 1000,
                tokenizer: Optional[Tokenizer] = None) -> dict[str, Any]:
    """Write already-checked pairs ({"key", "query", "pos", "neg"}) as shards (the demo's generator uses it);
    `tokenizer` is saved beside them when given. Returns the manifest."""
    with ShardWriter(out, shard_size) as writer:
        for p in pairs:
            members, _, _ = _members(p, p["key"])
            writer.write(p["key"], members)
        writer.flush()
        if tokenizer is not None:
            tokenizer.save(storage.join(out, TOKENIZER))
        return writer.close(created_by="pipeline.data.text_pairs", format=FORMAT)

