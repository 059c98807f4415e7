"""The curation stage: embed on Ray Data actors equals Published.encode_*, reruns skip and duplicate nothing,
broken shards are skipped and counted; filter's counts match a pandas reference; the lineage names every shard."""
from __future__ import annotations

import io
import json
import math
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import Config
from pipeline.curate import Rules, embed, filter_pool
from pipeline.curate.filter import read_pool, select
from pipeline.data import validate_sample
from pipeline.data.shards import read_shard, resolve_shards
from pipeline.data.transforms import decode_image, to_tensor
from pipeline.models import load_published
from tests.helpers.eval import publish


@pytest.fixture(scope="module")
def pool(synth, tmp_path_factory):
    root = synth(192, image_size=32, shard_size=32)
    work = tmp_path_factory.mktemp("curate")
    data = work / "train"
    shutil.copytree(root / "train", data)
    cfg = Config()
    cfg.run_dir, cfg.model.name = str(work / "run"), "tiny"
    cfg.data.train_urls, cfg.data.image_size, cfg.data.context_length = [str(data)], 32, 32
    return work, data, publish(cfg, 1)


def _rows(out):
    return pd.concat([pq.read_table(p).to_pandas() for p in sorted(out.glob("*.parquet"))], ignore_index=True)


@pytest.mark.slow
def test_embed_on_two_actors_matches_published(pool, local_ray, tmp_path):
    work, data, ckpt = pool
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    tars = sorted(broken.glob("*.tar"))
    tars[-1].write_bytes(tars[-1].read_bytes()[:5000])          # truncated: skipped and counted
    out = tmp_path / "emb"
    summary = embed(ckpt, str(broken), str(out), workers=2, batch_size=16, progress=False)
    assert summary.done == len(tars) - 1 and list(summary.broken) == [str(tars[-1])]
    assert summary.bad["truncated_shard"] + summary.bad["unreadable_shard"] >= 1
    assert len({w for w in summary.workers}) == 2                  # both actors worked
    rows = _rows(out)
    assert len(rows) == 32 * (len(tars) - 1) and rows.key.is_unique
    # the reference: Published.encode_* in this process, on the same samples
    published = load_published(ckpt)
    samples = [validate_sample(r.key, r.members, r.shard) for r in read_shard(str(tars[0]))]
    with torch.no_grad():
        img = published.encode_image(to_tensor([decode_image(s.image, 32) for s in samples]))
        txt = published.encode_text(published.tokenizer([s.caption_lines()[0] for s in samples]))
    got = rows[rows.shard == str(tars[0])].set_index("key").loc[[s.key for s in samples]]
    np.testing.assert_allclose(np.stack(got.image_emb.to_numpy()).astype(np.float32), img.numpy(), atol=2e-3)
    np.testing.assert_allclose(np.stack(got.text_emb.to_numpy()).astype(np.float32), txt.numpy(), atol=2e-3)
    np.testing.assert_allclose(got.score.to_numpy(), (img * txt).sum(-1).numpy(), atol=1e-4)
    # a rerun skips the finished shards, retries the broken one, writes nothing twice
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    again = embed(ckpt, str(broken), str(out), workers=2, progress=False)
    assert again.skipped == len(tars) - 1 and again.done == 0 and list(again.broken) == [str(tars[-1])]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before


@pytest.mark.slow
def test_killed_actor_loses_and_duplicates_nothing(pool, local_ray, tmp_path):
    import threading

    import psutil
    work, data, ckpt = pool
    out = tmp_path / "emb"
    killed = []

    def kill_one_actor() -> None:
        while not killed:
            if list(out.glob("*.parquet")):
                for p in psutil.Process().children(recursive=True):
                    try:
                        if "ShardEmbedder" in " ".join(p.cmdline()):
                            p.kill()
                            killed.append(p.pid)
                            return
                    except psutil.Error:
                        continue
            if len(list(out.glob("*.parquet"))) >= 6:
                return
    watcher = threading.Thread(target=kill_one_actor, daemon=True)
    watcher.start()
    summary = embed(ckpt, str(data), str(out), workers=2, batch_size=8, progress=False)
    watcher.join(5)
    assert killed, "no actor was killed: the test proved nothing"
    rows = _rows(out)
    assert summary.broken == {} and len(rows) == 192 and rows.key.is_unique
    assert len(list(out.glob("*.parquet"))) == len(resolve_shards(str(data)))


def _planted_embeddings(tmp_path, work, data, ckpt):
    """Embeddings of the pool, with planted exact duplicates (rows 3k copy row 3k+1's image vector)."""
    out = tmp_path / "emb"
    import ray
    embed(ckpt, str(data), str(out), workers=1, progress=False)
    for p in sorted(out.glob("*.parquet")):
        t = pq.read_table(p)
        df = t.to_pandas()
        for i in range(0, len(df) - 1, 3):
            df.at[i, "image_emb"] = df.at[i + 1, "image_emb"]
        rng = np.random.default_rng(len(df))
        df["score"] = rng.uniform(-1, 1, len(df)).astype(np.float32)
        pq.write_table(type(t).from_pandas(df, schema=t.schema, preserve_index=False), p)
    del ray
    return out


@pytest.mark.slow
def test_filter_counts_match_pandas_and_lineage(pool, local_ray, tmp_path):
    work, data, ckpt = pool
    emb = _planted_embeddings(tmp_path, work, data, ckpt)
    df = _rows(emb)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red\nblue\ncircle\nstar\n")
    rules = Rules(min_score=-0.5, top_fraction=0.6, dedup=0.9999, balance=str(vocab), balance_cap=10, seed=3)
    summary = filter_pool(str(emb), str(tmp_path / "out"), rules, shard_size=50, progress=False)
    # the pandas reference, from the rules as the docs state them
    ref = pd.Series("", index=df.index)
    ref[df.score < -0.5] = "min_score"
    top = df.sort_values("score", ascending=False, kind="stable").index[:math.ceil(0.6 * len(df))]
    ref[~df.index.isin(top) & (ref == "")] = "top_fraction"
    live = df[ref == ""]
    vecs = np.stack(live.image_emb.to_numpy()).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    sim = vecs @ vecs.T
    parent = list(range(len(live)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i
    for a, b in zip(*np.nonzero(np.triu(sim >= 0.9999, 1))):
        parent[find(a)] = find(b)
    groups = pd.Series([find(i) for i in range(len(live))], index=live.index)
    best = live.assign(g=groups, row=live.index).sort_values(["score", "row"], ascending=[False, True]) \
        .groupby("g").head(1).index
    ref[live.index[~live.index.isin(best)]] = "dedup"
    import hashlib
    import re
    live = df[ref == ""]
    words = live.caption.map(lambda c: set(re.findall(r"\w+", c.lower())))
    entries = ["red", "blue", "circle", "star"]
    counts = {e: sum(e in w for w in words) for e in entries}
    for i, w in words.items():
        found = [e for e in entries if e in w]
        if not found:
            ref[i] = "balance_no_entry"
            continue
        u = int.from_bytes(hashlib.blake2b(f"3/{df.key[i]}".encode(), digest_size=8).digest(), "little") / 2 ** 64
        if u >= max(min(1, 10 / counts[e]) for e in found):
            ref[i] = "balance"
    assert (ref == "dedup").sum() > 0 and (ref == "balance").sum() > 0      # every rule had work to do
    expected = ref[ref != ""].value_counts().to_dict()
    assert dict(summary.dropped) == expected and summary.kept == int((ref == "").sum())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["samples"] == summary.kept
    lineage = manifest["lineage"]
    assert sorted(s["shard"] for s in lineage["sources"]) == sorted(s.url for s in resolve_shards(str(data)))
    assert lineage["counts"]["dropped"] == expected and lineage["models"][0]["url"] == ckpt
    kept_keys = {r.key for t in sorted((tmp_path / "out").glob("*.tar")) for r in read_shard(str(t))}
    assert kept_keys == set(df.key[ref == ""])
    # select() agrees on a pool read again (the decisions file says the same)
    decisions = pq.read_table(tmp_path / "out" / "decisions.parquet").to_pandas()
    assert (decisions.dropped_by.to_numpy() == select(read_pool(sorted(map(str, emb.glob("*.parquet")))),
                                                      rules).astype(str)).all()


def test_planted_quality_arithmetic():
    """Precision/recall against planted noise, counted by hand on a small pool."""
    from pipeline.curate.quality import planted_quality
    planted = {"s1": {"noise": "caption", "source": "x"}, "s2": {"noise": "caption", "source": "x"},
               "s3": {"noise": "caption", "source": "x"}, "s4": {"noise": "caption", "source": "x"},
               # group a: a + 2 copies (2 redundant); group b: b + 1 copy, b dropped by score first (0 redundant)
               "a1": {"noise": "duplicate", "source": "a"}, "a2": {"noise": "duplicate", "source": "a"},
               "b1": {"noise": "duplicate", "source": "b"}}
    dropped_by = {"s1": "top_fraction", "s2": "min_score", "s3": "", "s4": "dedup", "c1": "top_fraction",
                  "a": "", "a1": "dedup", "a2": "dedup", "b": "top_fraction", "b1": "", "c2": "dedup", "c3": ""}
    q = planted_quality(dropped_by, planted)
    score, dedup = q["rules"]["score"], q["rules"]["dedup"]
    # score rules dropped s1, s2, c1, b: 2 of them swapped, of 4 swapped
    assert (score["dropped"], score["precision"], score["recall"]) == (4, 0.5, 0.5)
    # dedup dropped s4, a1, a2, c2: 2 correct (group a), 2 redundant
    assert (dedup["planted"], dedup["dropped"], dedup["precision"], dedup["recall"]) == (2, 4, 0.5, 1.0)
    assert q["kept"] == 4 and q["swapped_in_kept"] == 0.25 and q["swapped_in_pool"] == 4 / 12
    # a group whose copies are all dropped by dedup, original too: only A - 1 count as correct
    q = planted_quality({"a": "dedup", "a1": "dedup"}, {"a1": {"noise": "duplicate", "source": "a"}})
    assert q["rules"]["dedup"]["precision"] == 0.5 and q["rules"]["dedup"]["recall"] == 1.0


def _collapsed_pool(tmp_path, n=600, copies=60, dim=64, files=3):
    """Embedding files of a nearly collapsed model (unit vectors within ~1e-4 of a common direction, as a
    20-step model gives; spread in a few directions, as embeddings are, where HNSW finds the true neighbours)
    with `copies` exact copies of other rows' image vectors: the float16 cosines ≈ 1."""
    import pyarrow as pa

    from pipeline.curate.embed import META_KEY, embedding_schema

    rng = np.random.default_rng(0)
    x = rng.normal(size=dim) + 0.05 * rng.normal(size=(n, 4)) @ rng.normal(size=(4, dim)) / 2   # a 4-d spread
    img = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    source = rng.choice(n - copies, copies, replace=False)
    img[n - copies:] = img[source]
    score = rng.random(n).astype(np.float32)
    keys = [f"{i:05d}" for i in range(n)]
    for f, rows in enumerate(np.array_split(np.arange(n), files)):
        table = pa.table({"key": [keys[i] for i in rows], "shard": [f"s{f}.tar"] * len(rows),
                          "caption": ["a shape"] * len(rows),
                          "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(img[rows].reshape(-1)), dim),
                          "text_emb": pa.FixedSizeListArray.from_arrays(pa.array(img[rows].reshape(-1)), dim),
                          "score": score[rows]},
                         schema=embedding_schema(dim).with_metadata({META_KEY: json.dumps({"shard": f"s{f}.tar"})}))
        pq.write_table(table, tmp_path / f"s{f}.parquet")
    return sorted(map(str, tmp_path.glob("*.parquet"))), img, score, source


def _dedup_reference(img, score, t):
    """Brute force: link every pair whose float64 cosine of the stored vectors is ≥ t, keep the best-scored
    (then first) row of each connected group; returns the dropped rows."""
    from scipy.sparse.csgraph import connected_components

    v = img.astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    _, group = connected_components(v @ v.T >= t, directed=False)
    best = {}
    for i in sorted(range(len(score)), key=lambda i: (-score[i], i)):
        best.setdefault(group[i], i)
    return {i for i in range(len(score)) if best[group[i]] != i}


def test_dedup_at_float16_cosines_near_one(tmp_path):
    """A collapsed pool: a threshold of 1 - 1e-6 drops exactly the copies (and not the distinct rows within
    5e-6 of them); a threshold among the distinct rows' cosines links exactly the pairs at or above it."""
    files, img, score, source = _collapsed_pool(tmp_path)
    pool = read_pool(files)
    copies = _dedup_reference(img, score, 0.999999)
    planted = set(range(len(img) - len(source), len(img))) | set(source)
    assert len(copies) == len(source) and copies <= planted          # one of each copy pair dropped
    assert set(np.flatnonzero(select(pool, Rules(dedup=0.999999)) == "dedup")) == copies
    v = img.astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    sim = v @ v.T
    np.fill_diagonal(sim, -1)
    t = float(np.quantile(sim.max(1), 0.5))                           # half the rows have a neighbour ≥ t
    expected = _dedup_reference(img, score, t)
    assert len(copies) < len(expected) < len(img) // 2
    assert set(np.flatnonzero(select(pool, Rules(dedup=t)) == "dedup")) == expected


@pytest.mark.slow
def test_filter_refuses_a_source_shard_that_lost_a_kept_sample(pool, local_ray, tmp_path):
    import tarfile

    from pipeline.data import DataError
    work, data, ckpt = pool
    source = tmp_path / "data"
    shutil.copytree(data, source)
    emb = tmp_path / "emb"
    embed(ckpt, str(source), str(emb), workers=1, progress=False)
    shard = sorted(source.glob("*.tar"))[1]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    gone = members[0][0].name.split(".")[0]
    with tarfile.open(shard, "w") as tar:                        # the shard changed after it was embedded
        for m, payload in members:
            if m.name.split(".")[0] != gone:
                tar.addfile(m, io.BytesIO(payload))
    changed = rf"{shard.name}: 1 kept sample\(s\) are no longer in the shard \(e.g. {gone}\)"
    with pytest.raises(DataError, match=changed):
        filter_pool(str(emb), str(tmp_path / "out"), Rules(), shard_size=50, progress=False)
