"""Weighted mixtures of sources: shares, independence of world size and loader processes, exact resume,
the end of a source (stop / restart), per-source counts, the config and `contrast data inspect --config`."""
from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest

from pipeline.config import ConfigError, SourceConfig, load_config
from pipeline.data import DataError, merge_states
from pipeline.data.mixture import MixturePlan
from tests.helpers.stream import assert_same, global_batches, open_, take

G = 16
WEIGHTS = {"laion": 0.6, "cc12m": 0.3, "inhouse": 0.1}


@pytest.fixture(scope="module")
def roots(synth) -> dict[str, str]:
    """Three synthetic datasets of 96 samples (3 shards each), different seeds."""
    return {name: str(synth(96, shard_size=32, seed=20 + i) / "train") for i, name in enumerate(WEIGHTS)}


def sources(roots, **changes) -> list[SourceConfig]:
    """The three sources with WEIGHTS; `changes` maps a name to the fields it changes."""
    return [SourceConfig(name, [roots[name]], WEIGHTS[name], **changes.get(name, {})) for name in WEIGHTS]


def mix(roots, **kw):
    """Options of every mixture stream here: 16-px images, the first source's tokenizer."""
    kw.setdefault("image_size", 16)
    kw.setdefault("tokenizer", f"{roots['laion']}/tokenizer.json")
    return kw


def test_shares_over_200_steps_match_the_weights(roots):
    stream = open_(sources(roots), **mix(roots))
    counts, per_batch = Counter(), []
    for batch in take(stream, 200):
        c = Counter(batch["source"])
        counts.update(c)
        per_batch.append(c)
    for name, weight in WEIGHTS.items():
        assert abs(counts[name] / (200 * G) - weight) < 0.02 * weight, (name, counts)
        assert all(abs(c[name] - weight * G) <= 2 for c in per_batch), name        # every batch, not just on average
    rows_by_source = {k: v["ok"] for k, v in stream.stats()["sources"].items()}
    assert rows_by_source == dict(counts)


def test_plan_shares_for_any_weights_and_long_runs():
    """The row → source plan alone: shares within a few rows over 10^6 rows, deep into a long run too."""
    plan = MixturePlan([5, 1, 0.5, 3.5], seed=9)
    for first in (0, 10**12):
        counts = plan.counts(first, 10**6)
        assert np.abs(counts - 10**6 * np.array(plan.shares)).max() < 30, counts
    assert not np.array_equal(plan.sources(0, 64), MixturePlan([5, 1, 0.5, 3.5], seed=10).sources(0, 64))


@pytest.mark.parametrize("world_size,num_workers", [(2, 0), (4, 0), (1, 2), (2, 2)])
def test_mixture_batches_do_not_depend_on_world_size_or_loader_processes(roots, world_size, num_workers):
    reference, _ = global_batches(sources(roots), 1, 8, streams=4, **mix(roots))
    batches, _ = global_batches(sources(roots), world_size, 8, num_workers=num_workers, streams=4, **mix(roots))
    assert_same(batches, reference)
    assert set(s for b in reference for s in b["source"]) == set(WEIGHTS)


def test_exact_resume_mid_mixture(roots):
    """18 batches × 16 = 288 rows: the laion source (96 samples, ~173 rows) is past its second epoch."""
    full, _ = global_batches(sources(roots), 1, 18, **mix(roots))
    _, states = global_batches(sources(roots), 2, 7, **mix(roots))
    state = json.loads(json.dumps(merge_states(states), sort_keys=True))       # as a checkpoint stores it
    assert set(state["streams"]["0"]) == set(WEIGHTS) and sum(state["drawn"].values()) == 7 * G
    for w in (1, 4):
        resumed, _ = global_batches(sources(roots), w, 11, state=state, **mix(roots))
        assert_same(resumed, full[7:])


def test_a_source_that_stops_ends_the_stream_on_every_rank_at_the_same_step(roots):
    """`on_end: stop` on the 0.3 source (96 samples, ~4.8 rows a batch): the data ends before the batch
    whose planned draws would pass 96, on both ranks; until then the source's rows are its first pass."""
    srcs = sources(roots, cc12m={"on_end": "stop"})
    plan = MixturePlan(list(WEIGHTS.values()), seed=3)
    drawn = np.cumsum([plan.counts(t * G, G)[1] for t in range(40)])
    expected_steps = int(np.argmax(drawn > 96))
    ranks = [open_(srcs, rank=r, world_size=2, **mix(roots)) for r in range(2)]
    got = [list(s) for s in ranks]
    assert [len(b) for b in got] == [expected_steps, expected_steps]
    assert ranks[0].exhausted.source == "cc12m" and ranks[0].exhausted.step == expected_steps
    stopped_keys = [k for r in got for b in r for k, s in zip(b["key"], b["source"]) if s == "cc12m"]
    assert len(stopped_keys) == drawn[expected_steps - 1] and len(set(stopped_keys)) >= len(stopped_keys) - 4
    assert len(take(open_(sources(roots), **mix(roots)), expected_steps + 5)) == expected_steps + 5   # restart


def test_resampled_and_epoch_sources_mix(roots):
    srcs = sources(roots, inhouse={"resampled": True})
    batches = take(open_(srcs, **mix(roots)), 20)
    assert Counter(s for b in batches for s in b["source"])["inhouse"] > 0
    with pytest.raises(DataError, match=r"data.sources\[2\].on_end = 'stop' with resampled"):
        open_(sources(roots, inhouse={"resampled": True, "on_end": "stop"}), **mix(roots))


def test_resume_refuses_other_sources_and_follows_new_weights(roots, caplog):
    stream = open_(sources(roots), **mix(roots))
    take(stream, 3)
    state = stream.state_dict()
    with pytest.raises(DataError, match="the source names, in order"):
        open_(list(reversed(sources(roots))), state=state, **mix(roots))
    reweighted = [SourceConfig(s.name, s.urls, 1.0) for s in sources(roots)]
    with caplog.at_level(logging.WARNING, logger="pipeline.data.stream"):
        batches = take(open_(reweighted, state=state, **mix(roots)), 30)
    assert "weights changed" in caplog.text
    counts = Counter(s for b in batches for s in b["source"])
    assert all(abs(counts[n] / (30 * G) - 1 / 3) < 0.02 for n in WEIGHTS), counts


def test_sources_in_the_config(roots, tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text(f"""
data:
  sources:
    - {{name: laion, urls: [{roots['laion']}], weight: 6}}
    - {{name: inhouse, urls: [{roots['inhouse']}], weight: 1, resampled: true}}
""")
    cfg = load_config(path)
    assert [(s.name, s.weight, s.resampled, s.on_end) for s in cfg.data.sources] == [
        ("laion", 6.0, None, "restart"), ("inhouse", 1.0, True, "restart")]
    bad = {
        "data.sources=[{name: a, urls: [x]}, {name: a, urls: [y]}]": r"data.sources\[1\].name = 'a'.*no other",
        "data.sources=[{name: 'a b', urls: [x]}]": "letters, digits",
        "data.sources=[{name: a, urls: [x], weight: 0}]": r"weight = 0.0.*positive",
        "data.sources=[{name: a, urls: [x], wieght: 2}]": r"unknown key data.sources\[0\].wieght",
        "data.sources=[{name: a, urls: [x], on_end: never}]": r"on_end = 'never'.*'restart', 'stop'",
        "data.train_urls=[x]": "are both set",
    }
    for override, match in bad.items():
        with pytest.raises(ConfigError, match=match):
            load_config(path, [override])


def test_inspect_prints_the_expected_share_of_each_source(roots, tmp_path, capsys):
    from pipeline.cli import main
    path = tmp_path / "mix.yaml"
    path.write_text(f"""
data:
  tokenizer: {roots['laion']}/tokenizer.json
  sources:
    - {{name: laion, urls: [{roots['laion']}], weight: 0.6}}
    - {{name: cc12m, urls: [{roots['cc12m']}], weight: 0.3, on_end: stop}}
    - {{name: inhouse, urls: [{roots['inhouse']}], weight: 0.1, resampled: true}}
train: {{global_batch: 32, steps: 100}}
""")
    assert main(["data", "inspect", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:5]}
    assert lines["laion"][1:4] == ["0.6", "60.0%", "60.0%"] and lines["laion"][6] == "96"
    assert lines["cc12m"][2] == "30.0%" and "stop" in out and "ends after ~10 steps" in out
    assert lines["inhouse"][2] == "10.0%" and "resampled (endless)" in out
    assert "the data ends after about 10 of the 100 steps" in out
