"""Text pairs: `contrast data pack --jsonl`, the text-pair rules, and the stream's guarantees for them
(the same batches at any world size, exact resume, bad rows skipped and counted, k hard negatives a row)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.config import ConfigError, SourceConfig, load_config
from pipeline.data import DataError, StreamOptions, load_tokenizer, open_stream, train_tokenizer
from pipeline.data.inspection import inspect_shards
from pipeline.data.samples import BadSample, caption_id, validate_text_pair
from pipeline.data.text_pairs import choose_negatives, pack_jsonl
from tests.helpers.data import make_shard

G = 8


def pair(i: int, negatives: int = 3) -> dict:
    return {"query": f"what does function number {i} do", "pos": f"function {i} returns the value {i * 7}",
            "neg": [f"function {i} raises error {j}" for j in range(negatives)]}


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    """96 good pairs (a few with 1 negative) packed into 12 shards of 8."""
    tmp = tmp_path_factory.mktemp("pairs")
    lines = [pair(i, negatives=1 if i % 10 == 0 else 3) for i in range(96)]
    (tmp / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    pack_jsonl(str(tmp / "pairs.jsonl"), str(tmp / "shards"), shard_size=8, progress=False)
    return tmp / "shards"


def open_pairs(url, k=2, **kw):
    options = StreamOptions(format="text_pairs", hard_negatives=k, context_length=16, shuffle_buffer=10,
                            streams=kw.pop("streams", 4))
    kw.setdefault("global_batch", G)
    kw.setdefault("seed", 1)
    return open_stream(url if isinstance(url, list) else str(url), options=options, **kw)


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def global_batches(url, world, steps, state=None):
    ranks = [open_pairs(url, rank=r, world_size=world, state=state) for r in range(world)]
    per_rank = [take(s, steps) for s in ranks]
    return [{k: (sum((p[t][k] for p in per_rank), []) if isinstance(per_rank[0][t][k], list)
                 else torch.cat([p[t][k] for p in per_rank]))
             for k in per_rank[0][t]} for t in range(steps)], [s.state_dict() for s in ranks]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["key"] == y["key"]
        for k in ("query", "pos", "neg"):
            assert torch.equal(x[k], y[k]), k


# ------------------------------------------------------------------------------------------ packing
def test_pack_jsonl_skips_and_counts_bad_lines(tmp_path, capsys):
    lines = [json.dumps(pair(0)), json.dumps(pair(1)), "{not json", json.dumps(["a", "list"]),
             json.dumps({"pos": "no query"}), json.dumps({"query": "no positive"}),
             json.dumps({"query": "blank positive", "pos": "   "}),
             json.dumps({"query": "q", "pos": "p", "neg": [1, 2]}),
             json.dumps({"query": "q", "pos": "p", "neg": {"a": 1}}),
             json.dumps({"id": "x", **pair(2)}), json.dumps({"id": "x", **pair(3)}),       # duplicate id
             json.dumps({"query": "several positives", "pos": ["first", "second"], "neg": "one string negative"}),
             json.dumps({"query": "no negatives", "pos": "fine"}), ""]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines), encoding="utf-8")
    assert main(["data", "pack", "--jsonl", str(src), "--out", str(tmp_path / "out"), "--shard-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "packed 5 samples into 3 shards" in printed
    for reason, n in {"bad_json": 2, "missing_query": 1, "missing_positive": 2, "bad_negatives": 2,
                      "duplicate_key": 1}.items():
        assert f"{reason}: {n}" in printed, (reason, printed)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["format"] == "text_pairs" and manifest["samples"] == 5
    assert (tmp_path / "out" / "tokenizer.json").exists()
    reports = inspect_shards(str(tmp_path / "out"))
    assert sum(r.samples for r in reports) == 5 and not any(r.problems for r in reports)
    layouts = set().union(*(r.layouts for r in reports))
    assert "neg.json+pos.txt+query.txt" in layouts and "pos.txt+query.txt" in layouts


def test_pack_keeps_the_first_positive_and_a_string_negative(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [{"id": "a.b/c", "query": "q", "pos": ["first", "second"], "neg": "only one"},
             {"query": "other", "pos": "plain", "neg": ["x"]}]
    src.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    pack_jsonl(str(src), str(tmp_path / "out"), progress=False)
    batch = next(iter(open_pairs(tmp_path / "out", k=1, global_batch=2, streams=1)))
    assert sorted(batch["key"]) == ["000000001", "a_b_c"]
    i = batch["key"].index("a_b_c")
    tok = load_tokenizer(str(tmp_path / "out"), 16)
    assert tok.decode(batch["pos"][i].tolist()).strip().startswith("first")
    assert tok.decode(batch["neg"][i, 0].tolist()).strip().startswith("only one")


def test_pack_with_nothing_usable_is_an_error(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n[1]\n", encoding="utf-8")
    with pytest.raises(DataError, match="every line was skipped"):
        pack_jsonl(str(src), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------ rules
@pytest.mark.parametrize("members, reason", [
    ({"pos.txt": b"p"}, "missing_query"),
    ({"query.txt": b"q"}, "missing_positive"),
    ({"query.txt": b"\xff\xfe", "pos.txt": b"p"}, "bad_text_encoding"),
    ({"query.txt": b"q", "pos.txt": b"p", "neg.json": b"[\"ok\", \"\"]"}, "bad_negatives"),
    ({"query.txt": b"q", "pos.txt": b"p", "neg.json": b"\xff"}, "bad_negatives"),
])
def test_text_pair_rules(members, reason):
    with pytest.raises(BadSample) as e:
        validate_text_pair("k", members, "s.tar")
    assert e.value.reason == reason


def test_choose_negatives():
    rng = random.Random(0)
    assert choose_negatives(["a", "b", "c", "d"], 0, rng) == []
    picked = choose_negatives(["a", "b", "c", "d"], 3, rng)
    assert len(picked) == 3 and len(set(picked)) == 3
    cycled = choose_negatives(["a", "b"], 5, rng)
    assert sorted(cycled[:2]) == ["a", "b"] and cycled[2:] == cycled[:2] + cycled[:1]
    with pytest.raises(BadSample, match="missing_negatives"):
        choose_negatives([], 1, rng)


# ------------------------------------------------------------------------------------------ stream
def test_batches_carry_k_negatives_a_row(pairs_dir):
    batch = next(iter(open_pairs(pairs_dir, k=2)))
    assert set(batch) == {"key", "query", "pos", "neg", "caption_id", "source"}
    assert batch["query"].shape == batch["pos"].shape == (G, 16) and batch["neg"].shape == (G, 2, 16)
    assert batch["caption_id"].shape == (G, 2) and batch["source"] == ["train"] * G
    tok = load_tokenizer(str(pairs_dir), 16)
    for i, key in enumerate(batch["key"]):           # each row's negatives are its own pair's
        n = int(key)
        assert tok.decode(batch["pos"][i].tolist()).strip() == f"function {n} returns the value {n * 7}"
        assert batch["caption_id"][i].tolist() == [caption_id(f"what does function number {n} do"),
                                                   caption_id(f"function {n} returns the value {n * 7}")]
        for j in range(2):
            assert tok.decode(batch["neg"][i, j].tolist()).strip().startswith(f"function {n} raises error")
    assert "neg" not in next(iter(open_pairs(pairs_dir, k=0)))


def test_same_batches_at_any_world_size(pairs_dir):
    one, _ = global_batches(pairs_dir, 1, 5)
    assert_same(global_batches(pairs_dir, 2, 5)[0], one)
    assert_same(global_batches(pairs_dir, 4, 5)[0], one)
    assert len({k for b in one for k in b["key"]}) > G          # the stream moves on


def test_exact_resume_on_another_world_size(pairs_dir):
    full, _ = global_batches(pairs_dir, 1, 7)
    _, states = global_batches(pairs_dir, 2, 3)
    resumed, _ = global_batches(pairs_dir, 4, 4, state=states)
    assert_same(resumed, full[3:])


@pytest.fixture(scope="module")
def mixture(pairs_dir, tmp_path_factory) -> list[SourceConfig]:
    """The 96 pairs (weight 3) mixed with 40 others (weight 1, keys c…), both text-pair datasets."""
    tmp = tmp_path_factory.mktemp("other")
    lines = [dict(pair(100 + i, negatives=2), id=f"c{i:03d}") for i in range(40)]
    (tmp / "other.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    pack_jsonl(str(tmp / "other.jsonl"), str(tmp / "shards"), shard_size=8, progress=False)
    return [SourceConfig("docs", [str(pairs_dir)], weight=3.0), SourceConfig("code", [str(tmp / "shards")])]


def test_a_mixture_of_text_pair_sources(mixture):
    """Rows come from each source in its share, tagged with it, the same at any world size and on resume."""
    full, _ = global_batches(mixture, 1, 8)
    rows = [(key, source) for b in full for key, source in zip(b["key"], b["source"])]
    assert all(key.startswith("c") == (source == "code") for key, source in rows)
    share = sum(source == "code" for _, source in rows) / len(rows)
    assert 0.15 <= share <= 0.35                                     # weight 1 of 4
    assert all(b["neg"].shape[1] == 2 for b in full)
    assert_same(global_batches(mixture, 2, 8)[0], full)
    _, states = global_batches(mixture, 2, 5)
    assert_same(global_batches(mixture, 4, 3, state=states)[0], full[5:])


def test_bad_rows_are_skipped_and_counted(tmp_path):
    good = [(f"{i:03d}", {"query.txt": f"q{i}".encode(), "pos.txt": f"p{i}".encode(),
                          "neg.json": json.dumps([f"n{i}"]).encode()}) for i in range(12)]
    bad = [("b1", {"pos.txt": b"p"}), ("b2", {"query.txt": b"q", "pos.txt": b"p", "neg.json": b"{}"}),
           ("b3", {"query.txt": b"q", "pos.txt": b"p"})]            # no negatives, with k = 1
    make_shard(tmp_path / "a.tar", good[:6] + bad)
    make_shard(tmp_path / "b.tar", good[6:])
    train_tokenizer(["q p n"]).save(str(tmp_path / "tokenizer.json"))
    stream = open_pairs(f"{tmp_path}/{{a,b}}.tar", k=1, global_batch=4, streams=2)
    keys = [k for b in take(stream, 3) for k in b["key"]]
    # each stream reads its part of an epoch (about half the 15 rows, bad ones included) and then the next
    assert set(keys) <= {key for key, _ in good} and len(set(keys)) >= 9
    assert stream.stats()["bad"] == {"missing_query": 1, "bad_negatives": 1, "missing_negatives": 1}


def test_unknown_format_and_negatives_for_images_are_refused(pairs_dir):
    with pytest.raises(DataError, match="data.format = 'audio'"):
        open_stream(str(pairs_dir), global_batch=G, options=StreamOptions(format="audio", streams=4))
    with pytest.raises(ConfigError, match="data.hard_negatives"):
        load_config(None, ["data.hard_negatives=2"])
