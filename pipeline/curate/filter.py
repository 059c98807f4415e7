"""`contrast data filter`: keep the pairs of a pool that pass the curation rules, write them as new shards.

The input is what `contrast embed` wrote (one Parquet file per source shard). The rules, applied in this
order, each to the rows the rules before it kept (a dropped row is counted under the first rule that
dropped it):

1. ``min_score``: drop pairs whose CLIP score (image–text cosine) is below it (DataComp's CLIP-score filter).
2. ``top_fraction``: keep the ceil(f·N) highest-scored of the N embedded pairs (DataComp's quantile form;
   ties broken by order: shard order, then order within the shard).
3. ``dedup``: near-duplicates by embedding: pairs whose embeddings (image's by default) have cosine ≥ t
   are linked, and of each connected group the highest-scored pair is kept. The neighbours come from an
   approximate index (usearch's HNSW, vectors stored as float16): each pair is linked to those of its
   `dedup_neighbours` nearest that pass the threshold, the cosine recomputed in float64 from the stored
   vectors (`cosines`), so a threshold near 1 (exact copies: 0.99999) means what it says.
4. ``balance``: MetaCLIP-style balancing over a vocabulary (one entry a line; an entry matches a caption
   where its words appear in it as whole words, case-insensitive). With count(e) the pairs matching entry
   e, a pair is kept when u(key) < max over its entries of min(1, cap / count(e)), u(key) a uniform number
   in [0, 1) from the BLAKE2b hash of ``"{seed}/{key}"``; a pair matching no entry is dropped
   (``balance_no_entry``), as MetaCLIP does.

Memory: the scores and keys of every pair (a few tens of bytes each) and, for `dedup`, the index (float16
vectors and its graph); embeddings are read file by file, never all at once as float32.

The kept pairs are read again from their source shards and written by the pack writer
(`pipeline.data.pack.pack`) with the source's tokenizer.json; the dataset's manifest.json carries the
lineage under ``"lineage"`` (source shards, rules, model, counts kept and dropped per reason), and
``decisions.parquet`` beside it says, for every embedded pair, which rule dropped it ("" when kept).
"""
from __future__ import annotations

import hashlib
import io
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.curate.embed import embedding_files, read_embedding_meta
from pipeline.data import BadSample, DataError, load_tokenizer, validate_sample
from pipeline.data.pack import Item, PackSummary, pack
from pipeline.data.shards import Lost, Shard, dataset_dir, iter_raw
from pipeline.data.tokenizer import tokenizer_url
from pipeline.log import get_logger, progress_bar

log = get_logger(__name__)

KEPT = ""
MIN_SCORE, TOP_FRACTION, DEDUP, BALANCE, NO_ENTRY = "min_score", "top_fraction", "dedup", "balance", "balance_no_entry"
DECISIONS = "decisions.parquet"
SEARCH_CHUNK = 4096                        # rows searched in the index at once
INDEX_SLACK = 1e-3                         # the index's float16 distances: candidates up to this past the threshold
ROUNDING = 1e-9                            # float64 rounding of a recomputed cosine (identical vectors: 1 ± 1e-15)


@dataclass(frozen=True)
class Rules:
    """The curation rules (None: rule off); see the module docstring."""
    min_score: Optional[float] = None
    top_fraction: Optional[float] = None
    dedup: Optional[float] = None          # cosine threshold
    dedup_on: str = "image"                # which embedding: image or text
    dedup_neighbours: int = 16
    balance: Optional[str] = None          # URL of the vocabulary (one entry a line)
    balance_cap: int = 20_000
    seed: int = 0

    def check(self) -> None:
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise DataError(f"--top-fraction {self.top_fraction}: expected a fraction in (0, 1]")
        if self.dedup is not None and not -1 <= self.dedup <= 1:
            raise DataError(f"--dedup {self.dedup}: expected a cosine threshold in [-1, 1]")
        if self.dedup_on not in ("image", "text"):
            raise DataError(f"--dedup-on {self.dedup_on}: expected image or text")
        if self.balance_cap < 1 or self.dedup_neighbours < 1:
            raise DataError("--balance-cap and --dedup-neighbours: expected at least 1")


@dataclass
class Pool:
    """The scalar columns of every embedded pair, in file order; the embeddings stay in the files."""
    files: list[str]
    keys: pa.ChunkedArray
    shards: pa.ChunkedArray
    scores: np.ndarray
    offsets: list[int]                     # first row of each file
    metas: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.scores)


def read_pool(files: Sequence[str]) -> Pool:
    """Keys, shards and scores of every embeddings file (plus each file's metadata)."""
    keys, shards, scores, offsets, metas, n = [], [], [], [], [], 0
    for url in files:
        with storage.open_url(url, "rb") as f:
            t = pq.read_table(f, columns=["key", "shard", "score"])
        metas.append(read_embedding_meta(url))
        offsets.append(n)
        n += t.num_rows
        keys.extend(t["key"].chunks)
        shards.extend(t["shard"].chunks)
        scores.append(t["score"].to_numpy())
    return Pool(list(files), pa.chunked_array(keys, pa.string()), pa.chunked_array(shards, pa.string()),
                np.concatenate(scores) if scores else np.zeros(0, np.float32), offsets, metas)


def _column_chunks(pool: Pool, column: str) -> Iterator[tuple[int, pa.ChunkedArray]]:
    """(first row, column) of each file, one file in memory at a time."""
    for url, start in zip(pool.files, pool.offsets):
        with storage.open_url(url, "rb") as f:
            yield start, pq.read_table(f, columns=[column])[column]


def _vectors(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks()
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


# ------------------------------------------------------------------------------------ the rules
def select(pool: Pool, rules: Rules, progress: bool = False) -> np.ndarray:
    """The decision for every row of the pool: "" (kept) or the name of the rule that dropped it."""
    rules.check()
    reason = np.full(len(pool), KEPT, dtype=object)
    if rules.min_score is not None:
        reason[pool.scores < rules.min_score] = MIN_SCORE
    if rules.top_fraction is not None:
        keep = math.ceil(rules.top_fraction * len(pool))
        order = np.argsort(-pool.scores, kind="stable")
        below = np.zeros(len(pool), bool)
        below[order[keep:]] = True
        reason[below & (reason == KEPT)] = TOP_FRACTION
    if rules.dedup is not None:
        reason[duplicates(pool, reason == KEPT, rules, progress) & (reason == KEPT)] = DEDUP
    if rules.balance is not None:
        dropped, unmatched = balanced_out(pool, reason == KEPT, rules)
        reason[unmatched & (reason == KEPT)] = NO_ENTRY
        reason[dropped & (reason == KEPT)] = BALANCE
    return reason


def duplicates(pool: Pool, candidates: np.ndarray, rules: Rules, progress: bool = False) -> np.ndarray:
    """Rows (among `candidates`) that are near-duplicates of a better-scored candidate: in each group
    linked by cosine ≥ `rules.dedup`, all but the highest-scored."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from usearch.index import Index

    column = f"{rules.dedup_on}_emb"
    index: Optional[Index] = None
    for start, col in _column_chunks(pool, column):
        vecs = _vectors(col)
        ids = np.arange(start, start + len(vecs), dtype=np.uint64)
        mask = candidates[start:start + len(vecs)]
        if index is None:
            index = Index(ndim=vecs.shape[1], metric="cos", dtype="f16")
        if mask.any():
            index.add(ids[mask], np.ascontiguousarray(vecs[mask]), log=False)
    if index is None or len(index) < 2:
        return np.zeros(len(pool), bool)
    k = min(rules.dedup_neighbours + 1, len(index))
    max_distance = 1.0 - rules.dedup + INDEX_SLACK
    sources, targets = [], []
    chunks = progress_bar(_column_chunks(pool, column), enabled=progress, total=len(pool.files), desc="dedup",
                          unit="file", leave=False)
    for start, col in chunks:
        vecs = _vectors(col)
        rows = np.flatnonzero(candidates[start:start + len(vecs)])
        for lo in range(0, len(rows), SEARCH_CHUNK):
            part = rows[lo:lo + SEARCH_CHUNK]
            found = index.search(np.ascontiguousarray(vecs[part]), k, log=False)
            keys = np.asarray(found.keys).reshape(len(part), -1)
            dist = np.asarray(found.distances).reshape(len(part), -1)
            query = np.repeat(np.arange(len(part)), keys.shape[1])
            src, dst = part[query] + start, keys.reshape(-1).astype(np.int64)
            hit = (dist.reshape(-1) <= max_distance) & (dst != src) & (dst >= 0) & (dst < len(pool))
            near = np.asarray(index.get(dst[hit].astype(np.uint64)))
            hit[hit] = cosines(vecs[part[query[hit]]], near) >= rules.dedup - ROUNDING
            sources.append(src[hit])
            targets.append(dst[hit])
    src, dst = np.concatenate(sources), np.concatenate(targets)
    graph = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(len(pool), len(pool)))
    _, group = connected_components(graph, directed=False)
    # the best of each group: highest score, then first row
    rows = np.flatnonzero(candidates)
    order = rows[np.lexsort((rows, -pool.scores[rows]))]
    first = np.zeros(len(pool), bool)
    _, best = np.unique(group[order], return_index=True)
    first[order[best]] = True
    return candidates & ~first


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two stacks of stored (float16) vectors, computed in float64. The stored unit
    vectors' norms are 1 only to float16's ~1e-4, and the index's distances are approximate: this is the
    cosine the threshold is compared with."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


_WORDS = re.compile(r"\w+")


def read_vocabulary(url: str) -> dict[tuple[str, ...], int]:
    """A balancing vocabulary: entry (its lower-case words) → its index, one entry a line."""
    text = storage.read_bytes(url).decode("utf-8")
    entries: dict[tuple[str, ...], int] = {}
    for line in text.splitlines():
        words = tuple(_WORDS.findall(line.lower()))
        if words and words not in entries:
            entries[words] = len(entries)
    if not entries:
        raise DataError(f"--balance {url}: no entries (expected one vocabulary entry a line)")
    return entries


def matched_entries(caption: str, entries: dict[tuple[str, ...], int], longest: int) -> set[int]:
    """The vocabulary entries whose words appear, consecutive and whole, in the caption."""
    words = _WORDS.findall(caption.lower())
    found = set()
    for n in range(1, longest + 1):
        for i in range(len(words) - n + 1):
            e = entries.get(tuple(words[i:i + n]))
            if e is not None:
                found.add(e)
    return found


def uniform(seed: int, key: str) -> float:
    """u(key) in [0, 1): the first 8 bytes of BLAKE2b("{seed}/{key}") as a little-endian integer / 2^64."""
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2 ** 64


def balanced_out(pool: Pool, candidates: np.ndarray, rules: Rules) -> tuple[np.ndarray, np.ndarray]:
    """(dropped by balancing, matching no entry) among `candidates`; two passes over the captions."""
    entries = read_vocabulary(rules.balance)
    longest = max(len(e) for e in entries)
    counts = np.zeros(len(entries), np.int64)
    for start, col in _column_chunks(pool, "caption"):
        for i, caption in enumerate(col.to_pylist()):
            if candidates[start + i]:
                for e in matched_entries(caption, entries, longest):
                    counts[e] += 1
    p = np.minimum(1.0, rules.balance_cap / np.maximum(counts, 1))
    dropped, unmatched = np.zeros(len(pool), bool), np.zeros(len(pool), bool)
    keys = pool.keys
    for start, col in _column_chunks(pool, "caption"):
        file_keys = keys.slice(start, len(col)).to_pylist()
        for i, caption in enumerate(col.to_pylist()):
            if not candidates[start + i]:
                continue
            found = matched_entries(caption, entries, longest)
            if not found:
                unmatched[start + i] = True
            elif uniform(rules.seed, file_keys[i]) >= max(p[e] for e in found):
                dropped[start + i] = True
    return dropped, unmatched


# ------------------------------------------------------------------------------------ the stage
@dataclass
class FilterSummary:
    out: str
    embedded: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    pack: Optional[PackSummary] = None

    def text(self) -> str:
        lines = [f"kept {self.kept} of {self.embedded} pairs ({self.kept / max(self.embedded, 1):.1%}); dropped: "
                 + (", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none")]
        if self.pack is not None:
            lines.append(self.pack.text())
        return "\n".join(lines)


def filter_pool(urls: str | Sequence[str], out: str, rules: Rules, *, shard_size: int = 1000,
                progress: bool = True) -> FilterSummary:
    """Apply `rules` to the embeddings at `urls` (`contrast embed` outputs) and write the kept pairs as
    shards at `out` with their lineage (see the module docstring)."""
    rules.check()
    files = embedding_files(urls)
    pool = read_pool(files)
    if not len(pool):
        raise DataError(f"no embedded pairs in {', '.join(files[:3])}: nothing to filter")
    models = {_model_name(m) for m in pool.metas}
    if len(models) > 1:
        log.warning("the embeddings come from %d models (%s): their scores are not comparable", len(models),
                    ", ".join(sorted(models)))
    reason = select(pool, rules, progress)
    kept = reason == KEPT
    summary = FilterSummary(str(out), embedded=len(pool), kept=int(kept.sum()),
                            dropped=Counter(str(r) for r in reason[~kept]))
    keys, shards = pool.keys.to_pylist(), pool.shards.to_pylist()
    wanted: dict[str, set[str]] = {}
    for i in np.flatnonzero(kept):
        wanted.setdefault(shards[i], set()).add(keys[i])
    sources = [m["shard"] for m in pool.metas]
    per_source = Counter(shards[i] for i in np.flatnonzero(kept))
    lineage = {
        "created_by": "contrast data filter",
        "rules": asdict(rules),
        "order": [MIN_SCORE, TOP_FRACTION, DEDUP, BALANCE],
        "models": [m["model"] for m in _unique_models(pool.metas)],
        "embeddings": files,
        "sources": [{"shard": m["shard"], "embedded": m["samples"], "kept": per_source.get(m["shard"], 0),
                     "bad_at_embed": m.get("bad", {})} for m in pool.metas],
        "counts": {"embedded": len(pool), "kept": summary.kept, "dropped": dict(summary.dropped),
                   "bad_at_embed": dict(sum((Counter(m.get("bad", {})) for m in pool.metas), Counter()))},
    }
    items = _kept_items(sources, wanted, progress)
    summary.pack = pack(items, out, shard_size=shard_size, progress=False, source=", ".join(sources[:3]) +
                        (f" (+{len(sources) - 3} more)" if len(sources) > 3 else ""),
                        tokenizer=_source_tokenizer(sources), manifest_extra={"lineage": lineage})
    write_decisions(storage.join(out, DECISIONS), keys, shards, pool.scores, reason)
    log.info("%s", summary.text())
    return summary


def _model_name(meta: dict[str, Any]) -> str:
    m = meta.get("model", {})
    return f"{m.get('url')}@{m.get('sha256')}"


def _unique_models(metas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for m in metas:
        if _model_name(m) not in seen:
            seen.add(_model_name(m))
            out.append(m)
    return out


def _kept_items(sources: Sequence[str], wanted: dict[str, set[str]], progress: bool) -> Iterator[Item]:
    """The kept samples, read again from their shards, in source order."""
    for url in progress_bar(sources, enabled=progress, desc="filter: write", unit="shard"):
        keys = wanted.get(url)
        if not keys:
            continue
        found = set()
        for raw in iter_raw(Shard(url)):
            if isinstance(raw, Lost):
                raise DataError(f"{url}: {raw.reason} while writing the kept pairs ({raw.error}); it was readable "
                                "when embedded")
            if raw.key not in keys:
                continue
            found.add(raw.key)
            try:
                s = validate_sample(raw.key, raw.members, raw.shard)
            except BadSample as e:
                yield Item(raw.key, None, None, f"{url}:{raw.key}", error=e.reason)
                continue
            yield Item(s.key, s.image, s.caption.encode("utf-8"), f"{s.shard}:{s.key}", s.meta, label=s.label)
        if missing := sorted(keys - found):
            raise DataError(f"{url}: {len(missing)} kept sample(s) are no longer in the shard (e.g. "
                            f"{', '.join(missing[:3])}); it changed after it was embedded: embed it again")


def _source_tokenizer(sources: Sequence[str]) -> Any:
    """The tokenizer.json beside the source shards (the filtered set then tokenises as its source did)."""
    where = dataset_dir(sources[0]) if sources else None
    if where is not None and storage.exists(tokenizer_url(where)):
        return load_tokenizer(where)
    return None


def write_decisions(url: str, keys: list[str], shards: list[str], scores: np.ndarray, reason: np.ndarray) -> None:
    table = pa.table({"key": keys, "shard": shards, "score": scores, "dropped_by": reason.astype(str)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(url, buf.getvalue())
