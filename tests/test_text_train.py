"""Text–text training end to end: Ray Train workers, DeepSpeed ZeRO-2, the gradient cache, hard negatives,
the step-0 checkpoint, scheduled BEIR evaluation beside training, and exact resume; on a tiny random BERT."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data import load_tokenizer
from pipeline.data.pydoc_pairs import write_beir_set
from pipeline.data.text_pairs import pack_jsonl
from pipeline.eval.report import read_results
from pipeline.layout import published_url
from pipeline.models import load_published
from pipeline.orchestrate import train
from tests.helpers.compare import max_abs_diff
from tests.helpers.text import tiny_bert

pytestmark = pytest.mark.slow

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def pair(i: int) -> dict:
    a, b, c = WORDS[i % 19], WORDS[(3 * i + 1) % 19], WORDS[(5 * i + 2) % 19]
    return {"query": f"{a} {b} {i}", "pos": f"the {a} of {b} is {c} {i}", "neg": [f"the {b} of {a} is {c} {i + 1}"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-train")
    (root / "pairs.jsonl").write_text("".join(json.dumps(pair(i)) + "\n" for i in range(96)))
    pack_jsonl(str(root / "pairs.jsonl"), str(root / "train"), shard_size=24, vocab_size=300, progress=False)
    write_beir_set(str(root / "eval" / "held"), [pair(i) for i in range(100, 124)])
    vocab = load_tokenizer(str(root / "train"), 16).vocab_size
    bert = tiny_bert(root / "bert", vocab_size=vocab, hidden=32, dropout=0.1)
    return root, bert


def run(setup, run_dir: Path, *overrides: str):
    root, bert = setup
    cfg = load_config(None, [
        f"run_dir={run_dir}", "model.name=text", f"model.text.hf_path={bert}", "data.format=text_pairs",
        f"data.train_urls=[{root / 'train'}]", f"data.eval_dir={root / 'eval'}", "eval.sets=[held]",
        f"data.tokenizer={root / 'train' / 'tokenizer.json'}",
        "data.context_length=16", "data.hard_negatives=1", "data.shuffle_buffer=24", "data.streams=4",
        "loss.name=clip", "train.global_batch=16", "train.steps=4", "train.lr=1e-3", "train.warmup_steps=1",
        "train.log_every=1", "gradcache.chunk_size=4", "deepspeed.zero_optimization.stage=2",
        "cluster.num_workers=2", "checkpoint.every_steps=2", "checkpoint.publish_initial=true",
        "eval.schedule=off", *overrides])
    train(cfg)
    return cfg


def test_trains_evaluates_beside_and_resumes_exactly(local_ray, setup, tmp_path):
    whole = tmp_path / "whole"
    run(setup, whole, "eval.schedule=every", "eval.poll_s=0.5")
    steps = [r["step"] for r in read_results(str(whole))]
    assert steps[0] == 0 and steps[-1] == 4
    first, last = read_results(str(whole))[0], read_results(str(whole))[-1]
    assert set(last["metrics"]) == {"held/nDCG@10", "held/MRR@10", "held/Recall@100"}
    assert first["metrics"]["held/nDCG@10"] > 0                      # step 0 (the pretrained encoder) scored too
    moved = load_published(published_url(str(whole), 0)).model.state_dict()
    assert max_abs_diff(load_published(published_url(str(whole), 4)).model.state_dict(), moved) > 1e-3
    for name in ("step_00000000", "step_00000002", "step_00000004"):
        assert (whole / "published" / name / "COMPLETE").exists()

    halves = tmp_path / "halves"
    run(setup, halves, "train.steps=2")
    run(setup, halves)                                               # resumes at step 2, ends at 4
    a = load_published(published_url(str(whole), 4)).model.state_dict()
    b = load_published(published_url(str(halves), 4)).model.state_dict()
    assert max_abs_diff(a, b) < 1e-6
