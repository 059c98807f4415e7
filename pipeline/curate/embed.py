"""`contrast embed`: image and text embeddings and the pair's cosine (the "CLIP score") of every sample of a
set of shards, computed on Ray Data by actors that each hold the model once.

The unit of work is a shard: a Ray Data dataset of the shard URLs still to do, mapped by an actor pool
(`ShardEmbedder`); each actor reads its shard with the data stage's reader (`shards.iter_raw`,
`samples.validate_sample`, the eval transform), encodes it in batches and writes ``OUT/<shard>.parquet``
atomically (`storage.write_bytes`: a reader sees the whole file or none). So a shard's output exists
exactly when it is finished: a rerun skips the shards that have a file, and a shard whose actor died is
retried by Ray Data (actors restart) and written once, under the same name. A shard the reader cannot
read whole (unreadable, truncated) gets no file: it is skipped and counted, and a rerun tries it again.
Bad samples of good shards are skipped and counted by reason.

Each Parquet file holds the columns of `SCHEMA` (embeddings as float16) and, in its schema metadata,
the source shard, the model and the counts (`read_embedding_meta`).
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.data import BadSample, DataError, resolve_shards, validate_sample
from pipeline.data.shards import Lost, Shard, iter_raw
from pipeline.data.transforms import decode_image, to_tensor
from pipeline.layout import WEIGHTS
from pipeline.log import get_logger, progress_bar
from pipeline.models import Published, load_model

log = get_logger(__name__)

SUFFIX = ".parquet"
META_KEY = b"contrast.embed"               # the schema-metadata key of a file's JSON description
SUMMARY = "embed.json"                     # OUT/embed.json: what the last run did
FORMAT_VERSION = 1


def embedding_schema(dim: int) -> pa.Schema:
    """One row per usable sample: its key and shard, its caption (the line encoded), both embeddings
    (unit vectors, float16) and their cosine."""
    return pa.schema([("key", pa.string()), ("shard", pa.string()), ("caption", pa.string()),
                      ("image_emb", pa.list_(pa.float16(), dim)), ("text_emb", pa.list_(pa.float16(), dim)),
                      ("score", pa.float32())])


def output_name(shard_url: str) -> str:
    """``…/00012.tar`` → ``00012.parquet``."""
    base = posixpath.basename(shard_url.rstrip("/"))
    return (base[:-4] if base.endswith(".tar") else base) + SUFFIX


def model_identity(model_url: str, published: Published) -> dict[str, Any]:
    """What names the model in every output: its URL and, for a published checkpoint, its weights' sha256."""
    return {"url": str(model_url).rstrip("/"), "step": published.manifest.get("step"),
            "sha256": (published.manifest.get("sha256") or {}).get(WEIGHTS)}


# ------------------------------------------------------------------------------------ one shard
@dataclass
class ShardResult:
    """What embedding one shard did."""
    shard: str
    samples: int = 0                        # rows written
    bad: Counter = field(default_factory=Counter)    # bad samples by reason
    error: str = ""                         # a broken shard: why (then nothing was written)
    seconds: float = 0.0
    worker: str = ""


def embed_shard(published: Published, shard: Shard, out_url: str, model_id: dict[str, Any],
                batch_size: int = 256) -> ShardResult:
    """Embed one shard into ``out_url/<shard>.parquet`` (written whole, or not at all for a broken shard)."""
    started = time.perf_counter()
    result = ShardResult(shard.url, worker=f"{os.uname().nodename}:{os.getpid()}")
    keys, captions, images, texts, scores = [], [], [], [], []
    pending: list[tuple[str, str, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        with torch.no_grad():
            img = published.encode_image(to_tensor([p[2] for p in pending])).float()
            txt = published.encode_text(published.tokenizer([p[1] for p in pending])).float()
        keys.extend(p[0] for p in pending)
        captions.extend(p[1] for p in pending)
        images.append(img.numpy().astype(np.float16))
        texts.append(txt.numpy().astype(np.float16))
        scores.append((img * txt).sum(-1).numpy().astype(np.float32))
        pending.clear()

    size = published.image_size
    for item in iter_raw(shard):
        if isinstance(item, Lost):
            result.error = f"{item.reason}: {item.error}"
            result.bad[item.reason] += item.count
            result.seconds = time.perf_counter() - started
            return result
        try:
            sample = validate_sample(item.key, item.members, item.shard)
            pending.append((sample.key, sample.caption_lines()[0], decode_image(sample.image, size)))
        except BadSample as e:
            result.bad[e.reason] += 1
            continue
        if len(pending) >= batch_size:
            flush()
    flush()
    dim = published.model.spec.embed_dim
    meta = {"version": FORMAT_VERSION, "shard": shard.url, "model": model_id, "samples": len(keys),
            "bad": dict(result.bad)}
    table = pa.table({"key": keys, "shard": [shard.url] * len(keys), "caption": captions,
                      "image_emb": _fixed_list(images, dim), "text_emb": _fixed_list(texts, dim),
                      "score": np.concatenate(scores) if scores else np.zeros(0, np.float32)},
                     schema=embedding_schema(dim).with_metadata({META_KEY: json.dumps(meta).encode()}))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(out_url, output_name(shard.url)), buf.getvalue())
    result.samples = len(keys)
    result.seconds = time.perf_counter() - started
    return result


def _fixed_list(chunks: list[np.ndarray], dim: int) -> pa.FixedSizeListArray:
    flat = np.concatenate(chunks).reshape(-1) if chunks else np.zeros(0, np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), dim)


class ShardEmbedder:
    """A Ray Data actor: loads the model once, then embeds the shards of each batch of shard rows.

    `threads` caps torch's threads (one actor per CPU Ray gives it)."""

    def __init__(self, model_url: str, out_url: str, batch_size: int, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.published = load_model(model_url)
        self.model_id = model_identity(model_url, self.published)
        self.out_url, self.batch_size = out_url, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for url, samples in zip(batch["shard"], batch["samples"]):
            shard = Shard(str(url), int(samples) if samples >= 0 else None)
            r = embed_shard(self.published, shard, self.out_url, self.model_id, self.batch_size)
            rows.append(r)
        return {"shard": np.array([r.shard for r in rows]), "samples": np.array([r.samples for r in rows]),
                "bad": np.array([json.dumps(dict(r.bad)) for r in rows]), "error": np.array([r.error for r in rows]),
                "seconds": np.array([r.seconds for r in rows]), "worker": np.array([r.worker for r in rows])}


# ------------------------------------------------------------------------------------ the stage
@dataclass
class EmbedSummary:
    """What a run of `embed` did; `text()` is what the command prints."""
    out: str
    model: dict[str, Any]
    shards: int = 0                         # input shards
    skipped: int = 0                        # already finished by an earlier run
    done: int = 0                           # finished by this run
    samples: int = 0                        # rows written by this run
    bad: Counter = field(default_factory=Counter)
    broken: dict[str, str] = field(default_factory=dict)     # shard URL → why it was skipped
    seconds: float = 0.0
    workers: dict[str, dict[str, float]] = field(default_factory=dict)   # worker → shards, samples, seconds

    def throughput(self) -> dict[str, float]:
        """Samples per second of each worker over the time it spent in shards."""
        return {w: v["samples"] / v["seconds"] if v["seconds"] else 0.0 for w, v in self.workers.items()}

    def text(self) -> str:
        lines = [f"embedded {self.samples} samples of {self.done} shards into {self.out} in {self.seconds:.1f} s "
                 f"({self.skipped} of {self.shards} shards already done, skipped)"]
        if self.bad:
            lines.append("bad samples skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.bad.items())))
        for url, why in sorted(self.broken.items()):
            lines.append(f"broken shard skipped (a rerun retries it): {url}: {why}")
        rates = self.throughput()
        if rates:
            lines.append(f"throughput: {self.samples / max(self.seconds, 1e-9):.1f} samples/s in all; per worker: "
                         + ", ".join(f"{w} {r:.1f} samples/s ({int(self.workers[w]['shards'])} shards)"
                                     for w, r in sorted(rates.items())))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "model": self.model, "shards": self.shards, "skipped": self.skipped,
                "done": self.done, "samples": self.samples, "bad": dict(self.bad), "broken": self.broken,
                "seconds": self.seconds, "workers": self.workers, "throughput": self.throughput()}


def finished_shards(out_url: str, shards: Sequence[Shard], model_url: Optional[str] = None) -> set[str]:
    """URLs of the shards whose output file exists; refuses outputs of another model or another shard."""
    present = set(storage.listdir(out_url))
    done = set()
    for s in shards:
        name = output_name(s.url)
        if name not in present:
            continue
        meta = read_embedding_meta(storage.join(out_url, name))
        if meta.get("shard") != s.url:
            raise DataError(f"{storage.join(out_url, name)} holds the embeddings of {meta.get('shard')}, not of "
                            f"{s.url}: embed other shards into another --out")
        if model_url is not None and meta.get("model", {}).get("url") != str(model_url).rstrip("/"):
            raise DataError(f"{out_url} holds embeddings by model {meta.get('model', {}).get('url')}, not "
                            f"{model_url}: embed with another model into another --out")
        done.add(s.url)
    return done


def read_embedding_meta(url: str) -> dict[str, Any]:
    """The JSON description in an embeddings file's schema metadata (source shard, model, counts)."""
    with storage.open_url(url, "rb") as f:
        schema = pq.read_schema(f)
    return json.loads((schema.metadata or {}).get(META_KEY, b"{}"))


def embedding_files(url: str | Sequence[str]) -> list[str]:
    """The embedding files of `embed` outputs: folders (every .parquet inside) or file URLs."""
    items = [url] if isinstance(url, str) else list(url)
    files: list[str] = []
    for item in items:
        item = str(item).rstrip("/")
        files.extend([item] if item.endswith(SUFFIX) else storage.iter_files(item, SUFFIX))
    if not files:
        raise DataError(f"no {SUFFIX} files at {', '.join(map(str, items))}: expected the --out of `contrast embed`")
    return sorted(files)


def embed(model_url: str, urls: str | Sequence[str], out_url: str, *, workers: int = 2, batch_size: int = 256,
          cpus_per_worker: float = 1.0, progress: bool = True, allow_pipe: bool = False) -> EmbedSummary:
    """Embed every shard of `urls` not yet done into `out_url` with `workers` Ray Data actors (Ray must be
    initialised: `pipeline.cluster.connect`; a local one is started otherwise). Writes OUT/embed.json."""
    import ray

    started = time.perf_counter()
    shards = resolve_shards(urls, allow_pipe=allow_pipe)
    names = Counter(output_name(s.url) for s in shards)
    clash = [n for n, c in names.items() if c > 1]
    if clash:
        raise DataError(f"several input shards would write {clash[0]}: embed shards of the same name (from "
                        "different folders) into different --out folders")
    storage.makedirs(out_url)
    identity = model_identity(model_url, load_model(model_url))      # fails here, not in every actor
    done_before = finished_shards(out_url, shards, model_url)
    todo = [s for s in shards if s.url not in done_before]
    summary = EmbedSummary(str(out_url), identity, shards=len(shards), skipped=len(done_before))
    if todo:
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        _quiet_ray_data()
        for r in progress_bar(_run(todo, model_url, out_url, workers, batch_size, cpus_per_worker),
                              enabled=progress, total=len(todo), desc="embed", unit="shard"):
            _count(summary, r)
    summary.seconds = time.perf_counter() - started
    storage.write_json(storage.join(out_url, SUMMARY), summary.to_dict())
    log.info("%s", summary.text())
    return summary


def _run(todo: Sequence[Shard], model_url: str, out_url: str, workers: int, batch_size: int,
         cpus: float) -> Iterator[dict[str, Any]]:
    import ray

    items = [{"shard": s.url, "samples": -1 if s.samples is None else s.samples} for s in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    pool = ray.data.ActorPoolStrategy(size=max(1, min(workers, len(items))))
    kwargs = {"model_url": str(model_url), "out_url": str(out_url), "batch_size": batch_size,
              "threads": max(1, int(cpus))}
    results = ds.map_batches(ShardEmbedder, batch_size=1, compute=pool, num_cpus=cpus, fn_constructor_kwargs=kwargs)
    yield from results.iter_rows()


def _count(summary: EmbedSummary, row: dict[str, Any]) -> None:
    bad = Counter(json.loads(row["bad"]))
    summary.bad.update(bad)
    worker = summary.workers.setdefault(str(row["worker"]), defaultdict(float))
    worker["seconds"] += float(row["seconds"])
    if row["error"]:
        summary.broken[str(row["shard"])] = str(row["error"])
        return
    summary.done += 1
    summary.samples += int(row["samples"])
    worker["shards"] += 1
    worker["samples"] += int(row["samples"])


def _quiet_ray_data() -> None:
    """Our bar instead of Ray Data's own progress bars and its per-run log lines."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
